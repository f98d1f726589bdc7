//! virtio-blk over a raw image file: read, write (unless read-only), flush, get-id.
//!
//! Request parsing and execution are pure functions over guest memory and a
//! [`Disk`] trait, so tests run them against an in-memory disk. A request the
//! guest got wrong in a recoverable way (bad sector, write to a read-only disk)
//! completes with an error status; a structurally broken chain is a
//! [`QueueError`] that ends the VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::chain::{self, Chain};
use super::{QueueError, TYPE_BLOCK, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

const SECTOR: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const QUEUE_SIZES: &[u16] = &[256];
const DEVICE_ID: &[u8] = b"runv-blk";

/// Errors opening the backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk {0}")]
    Open(String, #[source] std::io::Error),
}

/// Storage behind a block device.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
}

/// A raw image file.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    len: u64,
}

impl FileDisk {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |e| BlockError::Open(path.display().to_string(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        Ok(Self { file, len })
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Per-device counters.
#[derive(Debug, Clone, Default)]
pub struct BlockCounters {
    pub read_bytes: Arc<AtomicU64>,
    pub write_bytes: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
}

/// The virtio-blk device.
pub struct Block {
    disk: Box<dyn Disk>,
    read_only: bool,
    config: [u8; 8],
    counters: BlockCounters,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Block {
    pub fn new(disk: Box<dyn Disk>, read_only: bool, counters: BlockCounters) -> Self {
        let config = (disk.size() / SECTOR).to_le_bytes();
        Self {
            disk,
            read_only,
            config,
            counters,
        }
    }

    /// Executes one validated chain; returns (status, bytes written to the guest).
    pub fn execute(&self, c: &Chain, mem: &GuestMemoryMmap) -> Result<(u8, u32), QueueError> {
        let bufs = &c.buffers;
        let (head, rest) = bufs
            .split_first()
            .ok_or_else(|| QueueError::Malformed("empty request".into()))?;
        let (status, data) = rest
            .split_last()
            .ok_or_else(|| QueueError::Malformed("request without a status buffer".into()))?;
        if head.write_only || head.len < 16 {
            return Err(QueueError::Malformed("bad request header".into()));
        }
        if !status.write_only || status.len < 1 {
            return Err(QueueError::Malformed("bad status buffer".into()));
        }
        let mem_err = QueueError::Memory;
        let kind: u32 = mem.read_obj(head.addr).map_err(mem_err)?;
        let sector: u64 = mem.read_obj(head.addr.unchecked_add(8)).map_err(mem_err)?;
        let mut written = 0u32;
        let result = match kind {
            T_IN | T_OUT => {
                let want_write = kind == T_IN;
                if data.iter().any(|b| b.write_only != want_write) {
                    return Err(QueueError::Malformed(
                        "data buffer has the wrong direction".into(),
                    ));
                }
                let total: u64 = data.iter().map(|b| u64::from(b.len)).sum();
                let start = sector.checked_mul(SECTOR);
                match start.and_then(|s| s.checked_add(total)) {
                    Some(end) if end <= self.disk.size() => {
                        let mut off = start.unwrap_or(0);
                        let mut status = S_OK;
                        for b in data {
                            let mut buf = vec![0u8; b.len as usize];
                            let r = if kind == T_IN {
                                self.disk
                                    .read_at(&mut buf, off)
                                    .map(|_| mem.write_slice(&buf, b.addr).map_err(mem_err))
                            } else if self.read_only {
                                status = S_IOERR;
                                break;
                            } else {
                                mem.read_slice(&mut buf, b.addr).map_err(mem_err)?;
                                self.disk.write_at(&buf, off).map(Ok)
                            };
                            match r {
                                Ok(inner) => inner?,
                                Err(_) => {
                                    status = S_IOERR;
                                    break;
                                }
                            }
                            off += u64::from(b.len);
                            if kind == T_IN {
                                written += b.len;
                            }
                        }
                        if status == S_OK {
                            let c = if kind == T_IN {
                                &self.counters.read_bytes
                            } else {
                                &self.counters.write_bytes
                            };
                            c.fetch_add(total, Ordering::Relaxed);
                        }
                        status
                    }
                    _ => S_IOERR,
                }
            }
            T_FLUSH => {
                if self.disk.flush().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => match data.first() {
                Some(b) if b.write_only => {
                    let n = DEVICE_ID.len().min(b.len as usize);
                    mem.write_slice(&DEVICE_ID[..n], b.addr).map_err(mem_err)?;
                    written += n as u32;
                    S_OK
                }
                _ => S_IOERR,
            },
            _ => S_UNSUPP,
        };
        mem.write_obj(result, status.addr).map_err(mem_err)?;
        Ok((result, written + 1))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let chains = chain::pop_all(index, queue, mem)?;
        for c in &chains {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let (status, len) = self.execute(c, mem)?;
            if status != S_OK {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            chain::add_used(queue, mem, c.head, len)?;
        }
        Ok(!chains.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::testing::*;
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct MemDisk(Mutex<Vec<u8>>);
    impl Disk for MemDisk {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn block(read_only: bool) -> Block {
        Block::new(
            Box::new(MemDisk(Mutex::new(vec![0u8; 64 * 1024]))),
            read_only,
            BlockCounters::default(),
        )
    }

    /// Builds header(kind, sector) → data(len, dir) → status at descriptors 0..3.
    fn request(m: &GuestMemoryMmap, kind: u32, sector: u64, len: u32, data_write: bool) {
        m.write_obj(kind, GuestAddress(0x8000)).unwrap();
        m.write_obj(sector, GuestAddress(0x8008)).unwrap();
        desc(m, 0, 0x8000, 16, F_NEXT, 1);
        desc(
            m,
            1,
            0x9000,
            len,
            F_NEXT | if data_write { F_WRITE } else { 0 },
            2,
        );
        desc(m, 2, 0xa000, 1, F_WRITE, 0);
        m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        publish(m, &[0]);
    }

    fn status(m: &GuestMemoryMmap) -> u8 {
        m.read_obj(GuestAddress(0xa000)).unwrap()
    }

    #[test]
    fn write_then_read_back_a_pattern() {
        let m = mem();
        let mut q = queue();
        let mut b = block(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x9000)).unwrap();
        request(&m, T_OUT, 4, 1024, false);
        assert!(b.process_queue(0, &mut q, &m).unwrap());
        assert_eq!(status(&m), S_OK);
        m.write_slice(&[0u8; 1024], GuestAddress(0x9000)).unwrap();
        request(&m, T_IN, 4, 1024, true);
        b.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_OK);
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(used(&m, 1), (2, 0, 1025));
        assert_eq!(b.counters.read_bytes.load(Ordering::Relaxed), 1024);
    }

    #[test]
    fn out_of_range_sectors_and_read_only_writes_fail_with_ioerr() {
        let m = mem();
        let mut q = queue();
        let mut b = block(false);
        request(&m, T_IN, 127, 1024, true); // ends past 64 KiB
        b.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_IOERR);
        request(&m, T_IN, u64::MAX / 2, 512, true); // sector * 512 overflows
        b.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_IOERR);
        let mut ro = block(true);
        assert_ne!(ro.features() & VIRTIO_BLK_F_RO, 0);
        request(&m, T_OUT, 0, 512, false);
        ro.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_IOERR);
        request(&m, 77, 0, 512, true);
        b.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_UNSUPP);
        request(&m, T_FLUSH, 0, 0, true);
        b.process_queue(0, &mut q, &m).unwrap();
        assert_eq!(status(&m), S_OK);
        request(&m, T_GET_ID, 0, 20, true);
        b.process_queue(0, &mut q, &m).unwrap();
        let mut id = [0u8; 8];
        m.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
        assert_eq!(&id, DEVICE_ID);
    }

    #[test]
    fn structurally_broken_requests_are_queue_errors() {
        let m = mem();
        let mut b = block(false);
        // Header only, no status.
        let mut q = queue();
        desc(&m, 0, 0x8000, 16, 0, 0);
        publish(&m, &[0]);
        assert!(b.process_queue(0, &mut q, &m).is_err());
        // Read into a device-readable buffer.
        let mut q = queue();
        request(&m, T_IN, 0, 512, false);
        assert!(b.process_queue(0, &mut q, &m).is_err());
        // Status buffer not writable.
        let mut q = queue();
        desc(&m, 0, 0x8000, 16, F_NEXT, 1);
        desc(&m, 1, 0xa000, 1, 0, 0);
        publish(&m, &[0]);
        assert!(b.process_queue(0, &mut q, &m).is_err());
    }

    #[test]
    fn capacity_is_in_sectors() {
        let b = block(false);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 128);
    }
}

//! virtio-net over a host tap device.
//!
//! TX (queue 1) runs on the notifying vCPU: each chain is gathered, its 12-byte
//! `virtio_net_hdr_v1` stripped and the frame written to the tap. RX (queue 0)
//! runs when the guest adds buffers and when the host I/O thread sees the tap
//! readable: one frame per chain, with a zeroed header. Frames that find no
//! room wait in a one-frame slot; frames that do not fit a chain are dropped
//! and counted.

pub mod tap;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain::{self, Chain};
use super::{QueueError, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};
pub use tap::{Tap, TapError};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const HDR_LEN: usize = 12;
const MAX_FRAME: usize = 65550;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// Per-device counters.
#[derive(Debug, Clone, Default)]
pub struct NetCounters {
    pub rx_bytes: Arc<AtomicU64>,
    pub tx_bytes: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

/// Where frames go and come from (a tap, or a fake in tests).
pub trait FrameIo: Send {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&self, frame: &[u8]) -> std::io::Result<usize>;
    fn fd(&self) -> Option<RawFd>;
}

impl FrameIo for Tap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_frame(buf)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.write_frame(frame)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(Tap::fd(self))
    }
}

/// The virtio-net device.
pub struct Net {
    io: Box<dyn FrameIo>,
    config: [u8; 8],
    pending: Option<Vec<u8>>,
    counters: NetCounters,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &&self.config[..6])
            .finish()
    }
}

impl Net {
    pub fn new(io: Box<dyn FrameIo>, mac: [u8; 6], counters: NetCounters) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        Self {
            io,
            config,
            pending: None,
            counters,
        }
    }

    fn tx(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let chains = chain::pop_all(index, queue, mem)?;
        for c in &chains {
            let mut frame = Vec::new();
            for b in c.buffers.iter().filter(|b| !b.write_only) {
                let start = frame.len();
                frame.resize(start + b.len as usize, 0);
                mem.read_slice(&mut frame[start..], b.addr)
                    .map_err(QueueError::Memory)?;
            }
            if frame.len() > HDR_LEN && frame.len() - HDR_LEN <= MAX_FRAME {
                match self.io.send(&frame[HDR_LEN..]) {
                    Ok(n) => {
                        self.counters
                            .tx_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            chain::add_used(queue, mem, c.head, 0)?;
        }
        Ok(!chains.is_empty())
    }

    fn deliver(frame: &[u8], c: &Chain, mem: &GuestMemoryMmap) -> Result<Option<u32>, QueueError> {
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        let total = HDR_LEN + frame.len();
        let room: usize = c
            .buffers
            .iter()
            .filter(|b| b.write_only)
            .map(|b| b.len as usize)
            .sum();
        if room < total {
            return Ok(None);
        }
        let mut src = hdr.iter().chain(frame.iter()).copied();
        let mut left = total;
        for b in c.buffers.iter().filter(|b| b.write_only) {
            if left == 0 {
                break;
            }
            let n = (b.len as usize).min(left);
            let chunk: Vec<u8> = src.by_ref().take(n).collect();
            mem.write_slice(&chunk, b.addr)
                .map_err(QueueError::Memory)?;
            left -= n;
        }
        Ok(Some(total as u32))
    }

    fn rx(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            if self.pending.is_none() {
                let mut buf = vec![0u8; MAX_FRAME];
                match self.io.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        self.pending = Some(buf);
                    }
                    _ => break,
                }
            }
            let Some(c) = chain::pop_one(index, queue, mem)? else {
                break;
            };
            let frame = self.pending.take().unwrap_or_default();
            let len = match Self::deliver(&frame, &c, mem)? {
                Some(len) => {
                    self.counters
                        .rx_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                    len
                }
                None => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            chain::add_used(queue, mem, c.head, len)?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
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
        match index {
            RX => self.rx(index, queue, mem),
            TX => self.tx(index, queue, mem),
            _ => Ok(false),
        }
    }
    fn host_fd(&self) -> Option<(RawFd, usize)> {
        self.io.fd().map(|fd| (fd, RX))
    }
    fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::testing::*;
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Fake {
        inbox: Mutex<Vec<Vec<u8>>>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }
    impl FrameIo for Fake {
        fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut q = self.inbox.lock().unwrap();
            if q.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let f = q.remove(0);
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
        fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(frame.len())
        }
        fn fd(&self) -> Option<RawFd> {
            None
        }
    }

    #[test]
    fn tx_strips_the_header_and_rx_prepends_one() {
        let m = mem();
        let fake = Fake::default();
        let sent = fake.sent.clone();
        fake.inbox.lock().unwrap().push(b"incoming-frame".to_vec());
        let mut net = Net::new(Box::new(fake), [2, 0, 0, 0, 0, 1], NetCounters::default());
        // TX: header + frame in two buffers.
        let mut q = queue();
        m.write_slice(&[0u8; 12], GuestAddress(0x8000)).unwrap();
        m.write_slice(b"outgoing", GuestAddress(0x9000)).unwrap();
        desc(&m, 0, 0x8000, 12, F_NEXT, 1);
        desc(&m, 1, 0x9000, 8, 0, 0);
        publish(&m, &[0]);
        assert!(net.process_queue(TX, &mut q, &m).unwrap());
        assert_eq!(sent.lock().unwrap().as_slice(), &[b"outgoing".to_vec()]);
        // RX: one writable buffer.
        let mut q = queue();
        desc(&m, 0, 0xa000, 2048, F_WRITE, 0);
        publish(&m, &[0]);
        assert!(net.process_queue(RX, &mut q, &m).unwrap());
        let (idx, id, len) = used(&m, 0);
        assert_eq!((idx, id, len), (1, 0, 12 + 14));
        let mut got = [0u8; 26];
        m.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(&got[12..], b"incoming-frame");
        assert_eq!(got[10], 1);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn a_frame_waits_for_rx_buffers_and_too_small_buffers_drop_it() {
        let m = mem();
        let fake = Fake::default();
        fake.inbox.lock().unwrap().push(vec![7u8; 100]);
        let mut net = Net::new(Box::new(fake), [2; 6], NetCounters::default());
        let mut q = queue();
        // No buffers yet: nothing used, the frame is kept.
        assert!(!net.process_queue(RX, &mut q, &m).unwrap());
        assert!(net.pending.is_some());
        desc(&m, 0, 0xa000, 50, F_WRITE, 0);
        publish(&m, &[0]);
        assert!(net.process_queue(RX, &mut q, &m).unwrap());
        assert_eq!(used(&m, 0), (1, 0, 0));
        assert_eq!(net.counters.dropped.load(Ordering::Relaxed), 1);
    }
}

//! virtio-vsock with a unix-socket host side (hybrid vsock, as Firecracker's).
//!
//! A guest connection to host CID 2, port P is bridged to a stream on the unix
//! socket `<udsPath>_P`. Owns the connection table, credit accounting and
//! packet building; host sockets are non-blocking and registered in an epoll
//! set whose fd the host I/O thread watches. Connections initiated from the
//! host side (`CONNECT <port>`) are not implemented yet.

pub mod packet;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::chain::{self, Chain};
use super::{QueueError, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};
use packet::*;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256, 64];
const HOST_CID: u64 = 2;
/// Receive buffer the host side advertises per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Most connections one VM may hold.
const MAX_CONNECTIONS: usize = 256;
/// Largest payload the host side sends in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("creating the epoll set: {0}")]
    Epoll(std::io::Error),
}

/// Counters.
#[derive(Debug, Clone, Default)]
pub struct VsockCounters {
    pub rx_bytes: Arc<AtomicU64>,
    pub tx_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    pub resets: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// What the guest told us about its receive buffer.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes we forwarded from the guest to the host socket.
    fwd_cnt: u32,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// (guest port, host port) identifies a connection.
type Key = (u32, u32);

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    config: [u8; 8],
    conns: BTreeMap<Key, Conn>,
    /// Control packets waiting for an RX buffer.
    control: VecDeque<Header>,
    epoll: OwnedFd,
    counters: VsockCounters,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Vsock {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        counters: VsockCounters,
    ) -> Result<Self, VsockError> {
        // SAFETY: plain epoll_create1 call; the returned fd is owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(VsockError::Epoll(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            guest_cid,
            uds_path,
            config: guest_cid.to_le_bytes(),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            epoll,
            counters,
        })
    }

    fn reply(&self, to: &Header, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self
                .conns
                .get(&(to.src_port, to.dst_port))
                .map_or(0, |c| c.fwd_cnt),
            ..Default::default()
        }
    }

    fn watch(&self, fd: RawFd, key: Key) {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: (u64::from(key.0) << 32) | u64::from(key.1),
        };
        // SAFETY: valid epoll fd, valid stream fd and event struct.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            // SAFETY: removing a registered fd from our epoll set; errors are harmless.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    c.stream.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    fn connect(&mut self, h: &Header) {
        let key = (h.src_port, h.dst_port);
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = if self.conns.len() < MAX_CONNECTIONS && !self.conns.contains_key(&key) {
            UnixStream::connect(&path).ok()
        } else {
            None
        };
        match stream.and_then(|s| s.set_nonblocking(true).ok().map(|_| s)) {
            Some(stream) => {
                self.watch(stream.as_raw_fd(), key);
                self.conns.insert(
                    key,
                    Conn {
                        stream,
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        tx_cnt: 0,
                        fwd_cnt: 0,
                    },
                );
                self.counters.connections.fetch_add(1, Ordering::Relaxed);
                let r = self.reply(h, OP_RESPONSE);
                self.control.push_back(r);
            }
            None => {
                self.counters.resets.fetch_add(1, Ordering::Relaxed);
                let r = self.reply(h, OP_RST);
                self.control.push_back(r);
            }
        }
    }

    /// Handles one packet from the guest.
    fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.kind != TYPE_STREAM || h.dst_cid != HOST_CID || h.src_cid != self.guest_cid {
            let r = self.reply(h, OP_RST);
            self.control.push_back(r);
            return;
        }
        let key = (h.src_port, h.dst_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.connect(h),
            OP_RW => {
                let ok = match self.conns.get_mut(&key) {
                    Some(c) => match c.stream.write_all(payload) {
                        Ok(()) => {
                            c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                            self.counters
                                .tx_bytes
                                .fetch_add(payload.len() as u64, Ordering::Relaxed);
                            true
                        }
                        Err(_) => false,
                    },
                    None => false,
                };
                if !ok {
                    self.close(key);
                    let r = self.reply(h, OP_RST);
                    self.control.push_back(r);
                }
            }
            OP_CREDIT_REQUEST => {
                let r = self.reply(h, OP_CREDIT_UPDATE);
                self.control.push_back(r);
            }
            OP_SHUTDOWN | OP_RST => {
                let had = self.conns.contains_key(&key);
                self.close(key);
                if had && h.op == OP_SHUTDOWN {
                    let r = self.reply(h, OP_RST);
                    self.control.push_back(r);
                }
            }
            _ => {}
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
            let mut bytes = Vec::new();
            for b in c.buffers.iter().filter(|b| !b.write_only) {
                let start = bytes.len();
                bytes.resize(start + b.len as usize, 0);
                mem.read_slice(&mut bytes[start..], b.addr)
                    .map_err(|e| QueueError::Memory(e.to_string()))?;
            }
            let hdr: [u8; HDR_LEN] = bytes
                .get(..HDR_LEN)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| {
                    QueueError::Malformed("vsock packet shorter than its header".into())
                })?;
            let h = Header::decode(&hdr);
            let end = HDR_LEN + h.len as usize;
            let payload = bytes.get(HDR_LEN..end).ok_or_else(|| {
                QueueError::Malformed("vsock payload longer than its buffers".into())
            })?;
            self.handle_guest_packet(&h, payload);
            chain::add_used(queue, mem, c.head, 0)?;
        }
        Ok(!chains.is_empty())
    }

    fn write_packet(
        h: &Header,
        payload: &[u8],
        c: &Chain,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, QueueError> {
        let b = c
            .buffers
            .first()
            .filter(|b| b.write_only && b.len as usize >= HDR_LEN + payload.len())
            .ok_or_else(|| QueueError::Malformed("vsock RX buffer too small".into()))?;
        let mem_err = |e: vm_memory::GuestMemoryError| QueueError::Memory(e.to_string());
        mem.write_slice(&h.encode(), b.addr).map_err(mem_err)?;
        let at = b
            .addr
            .checked_add(HDR_LEN as u64)
            .ok_or_else(|| QueueError::Malformed("vsock RX buffer address overflows".into()))?;
        mem.write_slice(payload, at).map_err(mem_err)?;
        Ok((HDR_LEN + payload.len()) as u32)
    }

    /// Sends queued control packets while RX buffers last.
    fn flush_control(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(h) = self.control.front().copied() {
            let Some(c) = chain::pop_one(index, queue, mem)? else {
                break;
            };
            let len = Self::write_packet(&h, &[], &c, mem)?;
            chain::add_used(queue, mem, c.head, len)?;
            self.control.pop_front();
            used = true;
        }
        Ok(used)
    }

    /// Moves host data to the guest, one RX buffer per packet, within credit.
    fn rx(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = self.flush_control(index, queue, mem)?;
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            while let Some(conn) = self.conns.get_mut(&key) {
                let credit = conn.credit() as usize;
                if credit == 0 {
                    break;
                }
                let Some(c) = chain::pop_one(index, queue, mem)? else {
                    return Ok(used); // data stays in the socket until buffers come
                };
                let room = c
                    .buffers
                    .first()
                    .map_or(0, |b| b.len as usize)
                    .saturating_sub(HDR_LEN);
                let mut buf = vec![0u8; credit.min(MAX_PAYLOAD).min(room)];
                let n = match conn.stream.read(&mut buf) {
                    Ok(n) if n > 0 || buf.is_empty() => n,
                    Ok(_) => {
                        // The host closed its end: tell the guest.
                        queue.go_to_previous_position();
                        let mut h = self.reply(
                            &Header {
                                src_port: key.0,
                                dst_port: key.1,
                                ..Default::default()
                            },
                            OP_SHUTDOWN,
                        );
                        h.flags = 3;
                        self.close(key);
                        self.control.push_back(h);
                        break;
                    }
                    Err(_) => {
                        queue.go_to_previous_position();
                        break;
                    }
                };
                if n == 0 {
                    queue.go_to_previous_position();
                    break;
                }
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: key.1,
                    dst_port: key.0,
                    len: n as u32,
                    kind: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: conn.fwd_cnt,
                };
                let len = Self::write_packet(&h, &buf[..n], &c, mem)?;
                chain::add_used(queue, mem, c.head, len)?;
                self.counters
                    .rx_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                used = true;
            }
        }
        used |= self.flush_control(index, queue, mem)?;
        Ok(used)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
            TX => self.tx(index, queue, mem),
            RX => self.rx(index, queue, mem),
            _ => Ok(false),
        }
    }
    fn host_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.epoll.as_raw_fd(), RX))
    }
    fn pending_queue(&self) -> Option<usize> {
        (!self.control.is_empty()).then_some(RX)
    }
    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        self.control.clear();
    }
}

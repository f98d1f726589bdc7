//! virtio-vsock with a unix-socket host side (hybrid vsock, as Firecracker's).
//!
//! A guest connection to host CID 2, port P is bridged to a stream on the unix
//! socket `<udsPath>_P`. Owns the connection table, credit accounting and
//! packet building; host sockets are non-blocking and registered in an epoll
//! set whose fd the host I/O thread watches. The host side connects to the
//! guest through `udsPath` itself: a client sends `CONNECT <port>\n`, the
//! device asks the guest (REQUEST to that port from a fresh host port) and
//! answers `OK <host port>\n` once the guest accepts, or closes the stream
//! if it refuses; after that the stream is an ordinary connection. Guest
//! data the host side cannot take yet (its socket is full) waits in the
//! connection, at most the credit the device advertised ([`BUF_ALLOC`]):
//! the device's `fwd_cnt` counts only bytes written to the socket, so a
//! guest that honours credit stops sending, the socket's EPOLLOUT resumes
//! the writes, and a CREDIT_UPDATE tells the guest once a quarter of the
//! credit is free again; a guest that sends past its credit gets RST. Pending
//! handshakes are bounded in number, line length and time. Control packets
//! for the guest (RESPONSE, RST, credit updates) are bounded too: while
//! [`MAX_CONTROL`] of them wait for RX buffers, TX packets stay in their ring
//! (back-pressure), and TX resumes once RX buffers have drained the queue.

pub mod packet;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
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
/// Longest `CONNECT <port>\n` line, and most handshakes waiting at once.
const MAX_CONNECT_LINE: usize = 32;
const MAX_PENDING: usize = 16;
/// How long a host client may take to send its CONNECT line.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Host-side ports for host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most control packets waiting for RX buffers. Each TX packet adds at most
/// one, so a guest that sends without posting RX buffers cannot grow the
/// queue past this: TX processing stops until it drains.
pub const MAX_CONTROL: usize = 1024;

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("creating the epoll set")]
    Epoll(#[source] std::io::Error),
    #[error("listening on {0}")]
    Listen(String, #[source] std::io::Error),
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
    /// Host-initiated and not yet accepted by the guest: no data moves.
    connecting: bool,
    /// Guest data not yet written to the host socket (at most [`BUF_ALLOC`]).
    unwritten: Vec<u8>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_told: u32,
    /// The guest shut the connection down while data waited: it closes once
    /// that is written, and nothing more moves.
    shut: bool,
}

/// A host client that has not sent its whole `CONNECT` line yet.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    since: std::time::Instant,
}

impl Conn {
    fn new(stream: UnixStream, peer_buf_alloc: u32, peer_fwd_cnt: u32, connecting: bool) -> Self {
        Conn {
            stream,
            peer_buf_alloc,
            peer_fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            connecting,
            unwritten: Vec::new(),
            fwd_told: 0,
            shut: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what the socket takes now; the rest waits in `unwritten`.
    /// Refuses data past the credit the device advertised.
    fn forward(&mut self, payload: &[u8]) -> std::io::Result<()> {
        if self.unwritten.len() + payload.len() > BUF_ALLOC as usize {
            return Err(std::io::Error::other("the guest sent past its credit"));
        }
        let mut done = 0;
        if self.unwritten.is_empty() {
            done = self.write_some(payload)?;
        }
        self.unwritten.extend_from_slice(&payload[done..]);
        Ok(())
    }

    /// Writes waiting data; true once none is left.
    fn flush(&mut self) -> std::io::Result<bool> {
        let data = std::mem::take(&mut self.unwritten);
        let done = self.write_some(&data)?;
        self.unwritten = data;
        self.unwritten.drain(..done);
        Ok(self.unwritten.is_empty())
    }

    fn write_some(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < data.len() {
            match self.stream.write(&data[done..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
        Ok(done)
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
    listener: UnixListener,
    pending: Vec<Pending>,
    next_host_port: u32,
    /// TX packets are waiting because [`Vsock::control`] was full.
    tx_stalled: bool,
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
        let listen_err = |e| VsockError::Listen(uds_path.display().to_string(), e);
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let v = Self {
            guest_cid,
            uds_path,
            config: guest_cid.to_le_bytes(),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            epoll,
            listener,
            pending: Vec::new(),
            next_host_port: FIRST_HOST_PORT,
            tx_stalled: false,
            counters,
        };
        v.watch(v.listener.as_raw_fd(), (u32::MAX, u32::MAX));
        Ok(v)
    }

    /// Accepts host clients and reads their `CONNECT <port>` lines; a
    /// complete line becomes a REQUEST to the guest. Bounded: at most
    /// [`MAX_PENDING`] waiting clients, [`MAX_CONNECT_LINE`] bytes each, and
    /// [`CONNECT_TIMEOUT`] to send the line; anything else is dropped.
    fn host_connects(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.pending.len() >= MAX_PENDING || stream.set_nonblocking(true).is_err() {
                continue; // dropping the stream closes it
            }
            self.watch(stream.as_raw_fd(), (u32::MAX, u32::MAX - 1));
            self.pending.push(Pending {
                stream,
                line: Vec::new(),
                since: std::time::Instant::now(),
            });
        }
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let mut byte = [0u8; 1];
            let mut done = false;
            let mut drop_it = p.since.elapsed() > CONNECT_TIMEOUT;
            while !done && !drop_it {
                match p.stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => done = true,
                    Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                    Ok(_) => drop_it = true, // EOF or an overlong line
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => drop_it = true,
                }
            }
            if !done && !drop_it {
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            self.unwatch(p.stream.as_raw_fd());
            let port = std::str::from_utf8(&p.line)
                .ok()
                .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
                .and_then(|n| n.trim().parse::<u32>().ok());
            if let (true, Some(port)) = (done, port) {
                self.host_request(p.stream, port);
            }
        }
    }

    /// Asks the guest to accept a host connection to its `port`.
    fn host_request(&mut self, stream: UnixStream, port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS || self.control.len() >= MAX_CONTROL {
            return;
        }
        let host_port = self.next_host_port;
        self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (port, host_port);
        if self.conns.contains_key(&key) {
            return;
        }
        self.conns.insert(key, Conn::new(stream, 0, 0, true));
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: host_port,
            dst_port: port,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: BUF_ALLOC,
            ..Default::default()
        });
    }

    fn unwatch(&self, fd: RawFd) {
        // SAFETY: removing a registered fd from our epoll set; errors are harmless.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
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

    /// Starts watching an accepted host-initiated connection's stream.
    fn watch_key(&self, key: Key) {
        if let Some(c) = self.conns.get(&key) {
            self.watch(c.stream.as_raw_fd(), key);
        }
    }

    fn watch(&self, fd: RawFd, key: Key) {
        self.epoll_ctl(libc::EPOLL_CTL_ADD, fd, key, false);
    }

    /// Also waits for the stream to take more data (while guest data waits).
    fn watch_writable(&self, key: Key, writable: bool) {
        if let Some(c) = self.conns.get(&key) {
            self.epoll_ctl(libc::EPOLL_CTL_MOD, c.stream.as_raw_fd(), key, writable);
        }
    }

    fn epoll_ctl(&self, op: libc::c_int, fd: RawFd, key: Key, writable: bool) {
        let out = if writable { libc::EPOLLOUT as u32 } else { 0 };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32 | out,
            u64: (u64::from(key.0) << 32) | u64::from(key.1),
        };
        // SAFETY: valid epoll fd, valid stream fd and event struct.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
    }

    /// Tells the guest its credit once a quarter of it was freed since it
    /// last heard (while the control queue has room).
    fn credit_update_if_due(&mut self, key: Key) {
        let due = self
            .conns
            .get(&key)
            .is_some_and(|c| !c.connecting && c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 4);
        if due && self.control.len() < MAX_CONTROL {
            let r = self.reply(
                &Header {
                    src_port: key.0,
                    dst_port: key.1,
                    ..Default::default()
                },
                OP_CREDIT_UPDATE,
            );
            self.told(key);
            self.control.push_back(r);
        }
    }

    /// The guest is about to hear this connection's `fwd_cnt`.
    fn told(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_told = c.fwd_cnt;
        }
    }

    /// Writes guest data that waited for the host sockets.
    fn flush_unwritten(&mut self) {
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.unwritten.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let shut = c.shut;
            match c.flush() {
                Ok(true) if shut => {
                    self.close(key);
                    continue;
                }
                Ok(true) => self.watch_writable(key, false),
                Ok(false) => {}
                Err(_) => {
                    // The host closed its end: reset the guest's side (or,
                    // with the control queue full, answer its next packet).
                    self.close(key);
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    if !shut && self.control.len() < MAX_CONTROL {
                        let r = self.reply(
                            &Header {
                                src_port: key.0,
                                dst_port: key.1,
                                ..Default::default()
                            },
                            OP_RST,
                        );
                        self.control.push_back(r);
                    }
                    continue;
                }
            }
            self.credit_update_if_due(key);
        }
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(c.stream.as_raw_fd());
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
                self.conns
                    .insert(key, Conn::new(stream, h.buf_alloc, h.fwd_cnt, false));
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
            OP_RESPONSE => {
                // The guest accepted a host-initiated connection.
                let accepted = match self.conns.get_mut(&key) {
                    Some(c) if c.connecting => {
                        c.connecting = false;
                        let ok = format!("OK {}\n", h.dst_port);
                        c.stream.write_all(ok.as_bytes()).is_ok()
                    }
                    _ => false,
                };
                if accepted {
                    self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    self.watch_key(key);
                } else {
                    self.close(key);
                    let r = self.reply(h, OP_RST);
                    self.control.push_back(r);
                }
            }
            OP_RW => {
                let result = match self.conns.get_mut(&key) {
                    Some(c) if !c.connecting && !c.shut => {
                        let was_waiting = !c.unwritten.is_empty();
                        c.forward(payload)
                            .map(|()| !was_waiting && !c.unwritten.is_empty())
                    }
                    _ => Err(std::io::ErrorKind::NotConnected.into()),
                };
                match result {
                    Ok(now_waiting) => {
                        self.counters
                            .tx_bytes
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                        if now_waiting {
                            self.watch_writable(key, true);
                        }
                        self.credit_update_if_due(key);
                    }
                    Err(_) => {
                        self.close(key);
                        let r = self.reply(h, OP_RST);
                        self.control.push_back(r);
                    }
                }
            }
            OP_CREDIT_REQUEST => {
                let r = self.reply(h, OP_CREDIT_UPDATE);
                self.told(key);
                self.control.push_back(r);
            }
            OP_SHUTDOWN | OP_RST => {
                let had = self.conns.contains_key(&key);
                // A guest that shuts down after data the host socket has not
                // taken yet: the data still goes, then the stream closes.
                match self.conns.get_mut(&key) {
                    Some(c) if h.op == OP_SHUTDOWN && !c.unwritten.is_empty() => c.shut = true,
                    _ => self.close(key),
                }
                if had && h.op == OP_SHUTDOWN {
                    let r = self.reply(h, OP_RST);
                    self.control.push_back(r);
                }
            }
            _ => {}
        }
    }

    /// Handles TX packets while the control queue has room for a reply, at
    /// most one ring's worth per call.
    fn tx(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        self.tx_stalled = false;
        for _ in 0..queue.size() {
            if self.control.len() >= MAX_CONTROL {
                self.tx_stalled = true;
                break;
            }
            let Some(c) = chain::pop_one(index, queue, mem)? else {
                break;
            };
            let mut bytes = Vec::new();
            for b in c.buffers.iter().filter(|b| !b.write_only) {
                let start = bytes.len();
                bytes.resize(start + b.len as usize, 0);
                mem.read_slice(&mut bytes[start..], b.addr)
                    .map_err(QueueError::Memory)?;
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
            used = true;
        }
        Ok(used)
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
        let mem_err = QueueError::Memory;
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
        self.host_connects();
        self.flush_unwritten();
        let mut used = self.flush_control(index, queue, mem)?;
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            while let Some(conn) = self
                .conns
                .get_mut(&key)
                .filter(|c| !c.connecting && !c.shut)
            {
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
                conn.fwd_told = conn.fwd_cnt;
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
        if !self.control.is_empty() {
            Some(RX)
        } else if self.tx_stalled {
            Some(TX)
        } else {
            None
        }
    }
    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        for p in std::mem::take(&mut self.pending) {
            self.unwatch(p.stream.as_raw_fd());
        }
        self.control.clear();
        self.tx_stalled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_pending_resolved(v: &mut Vsock) {
        for _ in 0..200 {
            v.host_connects();
            if v.pending.is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("handshakes still pending");
    }

    #[test]
    fn host_connect_lines_become_requests_and_bad_ones_are_dropped() {
        let path = std::env::temp_dir().join(format!("runv-vsock-{}.sock", std::process::id()));
        let mut v = Vsock::new(3, path.clone(), VsockCounters::default()).unwrap();
        let mut good = UnixStream::connect(&path).unwrap();
        good.write_all(b"CONNECT 5000\n").unwrap();
        let mut garbage = UnixStream::connect(&path).unwrap();
        garbage.write_all(b"HELLO 1\n").unwrap();
        let mut long = UnixStream::connect(&path).unwrap();
        long.write_all(&[b'9'; 100]).unwrap();
        wait_pending_resolved(&mut v);
        // One REQUEST, from the first host port to guest port 5000.
        assert_eq!(v.control.len(), 1);
        let h = v.control[0];
        assert_eq!(
            (h.op, h.dst_port, h.src_port),
            (OP_REQUEST, 5000, FIRST_HOST_PORT)
        );
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, 3));
        assert!(v.conns[&(5000, FIRST_HOST_PORT)].connecting);
        // The rejected clients were closed.
        let mut b = [0u8; 1];
        garbage
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(garbage.read(&mut b).unwrap(), 0);
        long.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(long.read(&mut b).unwrap_or(0), 0);
        // The guest accepts: the client gets `OK <host port>`.
        let resp = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: FIRST_HOST_PORT,
            kind: TYPE_STREAM,
            op: OP_RESPONSE,
            buf_alloc: 4096,
            ..Default::default()
        };
        v.handle_guest_packet(&resp, &[]);
        assert!(!v.conns[&(5000, FIRST_HOST_PORT)].connecting);
        good.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut ok = [0u8; 14];
        good.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, format!("OK {FIRST_HOST_PORT}\n").as_bytes());
        // A RESPONSE for a connection nobody asked for is answered with RST.
        v.control.clear();
        let stray = Header {
            src_port: 1,
            dst_port: 2,
            ..resp
        };
        v.handle_guest_packet(&stray, &[]);
        assert_eq!(v.control[0].op, OP_RST);
        std::fs::remove_file(&path).ok();
    }

    /// A guest-initiated connection from guest port 1000 to a host service
    /// on port 5000 that reads nothing until the test does; the socket paths
    /// are removed on drop.
    struct Service {
        v: Vsock,
        host: UnixStream,
        req: Header,
        paths: [PathBuf; 2],
    }

    const KEY: Key = (1000, 5000);

    impl Service {
        fn new(tag: &str) -> Service {
            let path =
                std::env::temp_dir().join(format!("runv-vsock-{tag}-{}.sock", std::process::id()));
            let service = PathBuf::from(format!("{}_5000", path.display()));
            let _ = std::fs::remove_file(&service);
            let listener = UnixListener::bind(&service).unwrap();
            let mut v = Vsock::new(3, path.clone(), VsockCounters::default()).unwrap();
            let req = Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: KEY.0,
                dst_port: KEY.1,
                kind: TYPE_STREAM,
                op: OP_REQUEST,
                buf_alloc: 4096,
                ..Default::default()
            };
            v.handle_guest_packet(&req, &[]);
            assert_eq!(v.control.pop_front().map(|h| h.op), Some(OP_RESPONSE));
            let (host, _) = listener.accept().unwrap();
            host.set_nonblocking(true).unwrap();
            Service {
                v,
                host,
                req,
                paths: [path, service],
            }
        }

        /// The guest sends 4 KiB packets while its credit, as it last heard
        /// it, allows; returns `(sent, heard)`.
        fn guest_sends(&mut self, chunk: &[u8], mut sent: u32, mut heard: u32) -> (u32, u32) {
            while BUF_ALLOC - (sent - heard) >= chunk.len() as u32 {
                let rw = Header {
                    op: OP_RW,
                    len: chunk.len() as u32,
                    ..self.req
                };
                self.v.handle_guest_packet(&rw, chunk);
                sent += chunk.len() as u32;
                heard = self.credit_heard(heard);
                assert!(sent < 64 << 20, "the host socket never filled");
            }
            (sent, heard)
        }

        /// The fwd_cnt of the credit updates queued for the guest.
        fn credit_heard(&mut self, mut heard: u32) -> u32 {
            while let Some(h) = self.v.control.pop_front() {
                assert_eq!(h.op, OP_CREDIT_UPDATE, "{h:?}");
                heard = h.fwd_cnt;
            }
            heard
        }

        /// The host reads until `want` bytes came (the device writing what
        /// waited in between); returns them.
        fn host_reads(&mut self, want: usize, heard: &mut u32) -> Vec<u8> {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..10_000 {
                match self.host.read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                self.v.flush_unwritten();
                *heard = self.credit_heard(*heard);
                if got.len() >= want {
                    break;
                }
            }
            got
        }
    }

    impl Drop for Service {
        fn drop(&mut self) {
            for p in &self.paths {
                std::fs::remove_file(p).ok();
            }
        }
    }

    fn chunk() -> Vec<u8> {
        (0..4096u32).map(|i| (i % 251) as u8).collect()
    }

    /// A host that does not read: the guest's data waits in the device up to
    /// the credit it advertised (no reset), the device tells the guest its
    /// credit as the host drains it, and data past the credit is a reset.
    #[test]
    fn guest_data_waits_for_a_full_host_socket_within_credit() {
        let mut s = Service::new("wait");
        let chunk = chunk();
        let (sent, mut heard) = s.guest_sends(&chunk, 0, 0);
        let c = &s.v.conns[&KEY];
        assert!(!c.unwritten.is_empty(), "nothing waits");
        assert!(c.unwritten.len() <= BUF_ALLOC as usize);
        assert_eq!(c.fwd_cnt as usize + c.unwritten.len(), sent as usize);

        // The host reads everything: the waiting data follows, in order, and
        // the guest hears that its credit is free again (at most a quarter
        // of it goes untold).
        let got = s.host_reads(sent as usize, &mut heard);
        assert_eq!(got.len(), sent as usize);
        assert!(got.chunks(4096).all(|c| c == chunk.as_slice()));
        assert!(
            BUF_ALLOC - (sent - heard) > BUF_ALLOC / 4 * 3,
            "the guest was not told its credit is free: sent {sent}, heard {heard}"
        );

        // Filled again, a packet past the credit resets the connection.
        s.guest_sends(&chunk, sent, heard);
        let room = BUF_ALLOC as usize - s.v.conns[&KEY].unwritten.len();
        let too_much = vec![0u8; room + 1];
        let rw = Header {
            op: OP_RW,
            len: too_much.len() as u32,
            ..s.req
        };
        s.v.handle_guest_packet(&rw, &too_much);
        assert_eq!(s.v.control.pop_back().map(|h| h.op), Some(OP_RST));
        assert!(!s.v.conns.contains_key(&KEY));
    }

    /// A guest that shuts down while its data waits: the data still reaches
    /// the host, then the stream ends.
    #[test]
    fn waiting_guest_data_outlives_the_guests_shutdown() {
        let mut s = Service::new("linger");
        let chunk = chunk();
        let (sent, mut heard) = s.guest_sends(&chunk, 0, 0);
        assert!(!s.v.conns[&KEY].unwritten.is_empty());
        let shutdown = Header {
            op: OP_SHUTDOWN,
            flags: 3,
            ..s.req
        };
        s.v.handle_guest_packet(&shutdown, &[]);
        assert_eq!(s.v.control.pop_back().map(|h| h.op), Some(OP_RST));
        let got = s.host_reads(sent as usize, &mut heard);
        assert_eq!(got.len(), sent as usize);
        assert!(!s.v.conns.contains_key(&KEY), "closed once written");
        let mut b = [0u8; 1];
        s.host.set_nonblocking(false).unwrap();
        s.host
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(s.host.read(&mut b).unwrap(), 0, "the stream ends");
    }

    #[test]
    fn a_guest_without_rx_buffers_cannot_grow_the_control_queue() {
        use super::super::chain::testing::{self, SIZE, desc, publish};
        use vm_memory::GuestAddress;
        let path = std::env::temp_dir().join(format!("runv-vsock-bp-{}.sock", std::process::id()));
        let mut v = Vsock::new(3, path.clone(), VsockCounters::default()).unwrap();
        let m = testing::mem();
        // TX: the same REQUEST, to a port nobody serves, in every slot; each
        // one earns an RST the guest has no RX buffer for.
        let mut tx = testing::queue();
        let req = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1,
            dst_port: 9,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            ..Default::default()
        };
        m.write_slice(&req.encode(), GuestAddress(0x8000)).unwrap();
        desc(&m, 0, 0x8000, HDR_LEN as u32, 0, 0);
        for _ in 0..MAX_CONTROL / usize::from(SIZE) + 1 {
            publish(&m, &[0; SIZE as usize]);
            v.process_queue(TX, &mut tx, &m).unwrap();
            assert!(v.control.len() <= MAX_CONTROL);
        }
        assert_eq!(v.control.len(), MAX_CONTROL);
        assert_eq!(
            tx.next_avail(),
            MAX_CONTROL as u16,
            "the rest wait in the ring"
        );
        assert_eq!(v.pending_queue(), Some(RX));

        // RX buffers drain the control queue, 16 packets at a time...
        let (rx_desc, rx_avail, rx_used) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
        let mut rx = Queue::new(SIZE).unwrap();
        rx.set_size(SIZE);
        rx.set_desc_table_address(Some(rx_desc as u32), Some(0));
        rx.set_avail_ring_address(Some(rx_avail as u32), Some(0));
        rx.set_used_ring_address(Some(rx_used as u32), Some(0));
        rx.set_ready(true);
        for i in 0..u64::from(SIZE) {
            let at = rx_desc + 16 * i;
            m.write_obj(0x20_0000 + 64 * i, GuestAddress(at)).unwrap();
            m.write_obj(64u32, GuestAddress(at + 8)).unwrap();
            m.write_obj(2u16, GuestAddress(at + 12)).unwrap(); // device-writable
        }
        let mut posted = 0u16;
        while v.pending_queue() == Some(RX) {
            for i in 0..SIZE {
                let slot = u64::from(posted.wrapping_add(i) % SIZE);
                m.write_obj(i, GuestAddress(rx_avail + 4 + 2 * slot))
                    .unwrap();
            }
            posted = posted.wrapping_add(SIZE);
            m.write_obj(posted, GuestAddress(rx_avail + 2)).unwrap();
            assert!(v.process_queue(RX, &mut rx, &m).unwrap());
        }
        assert!(v.control.is_empty());
        // ...and then the device asks for TX again, and the waiting packets go.
        assert_eq!(v.pending_queue(), Some(TX));
        v.process_queue(TX, &mut tx, &m).unwrap();
        assert_eq!(tx.next_avail(), (MAX_CONTROL + usize::from(SIZE)) as u16);
        assert_eq!(v.control.len(), usize::from(SIZE));
        assert_eq!(v.pending_queue(), Some(RX));
        std::fs::remove_file(&path).ok();
    }
}

//! The guest end of the channel to the node agent: one connection at a
//! time over vsock (listening), a virtio-console port, or a unix socket
//! (connecting, in tests), and a bounded outbox that never blocks the
//! container.
//!
//! Every new connection starts with this side's Hello. Frames queued while
//! no host is connected wait in the outbox; output past [`OUTBOX_LIMIT`]
//! drops the oldest output (never Started or Exited) and is counted in a
//! Dropped frame placed before what follows it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use runv_vmm_api::guest::{
    Decoder, Dropped, Frame, GuestState, Hello, MAX_FRAME, PROTOCOL_VERSION, ProtoError,
    check_hello,
};

use crate::settings::ChannelAddr;

/// Most bytes of queued frames (output is dropped past it).
pub const OUTBOX_LIMIT: usize = 1024 * 1024;
/// How soon a lost connection is tried again (port and unix transports).
const RETRY: Duration = Duration::from_millis(100);
/// Most bytes read from the connection per readiness event.
const READ_BUDGET: usize = 4 * MAX_FRAME;

/// Which output stream a queued frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

#[derive(Debug)]
struct Queued {
    bytes: Vec<u8>,
    output: Option<Stream>,
}

/// Frames waiting for a host.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Queued>,
    bytes: usize,
    /// Bytes of the front frame already written to the current connection.
    front_sent: usize,
    dropped: Dropped,
}

impl Outbox {
    /// Queues a frame, dropping the oldest output past the limit.
    pub fn push(&mut self, frame: &Frame) {
        let output = match frame {
            Frame::Stdout(_) => Some(Stream::Out),
            Frame::Stderr(_) => Some(Stream::Err),
            _ => None,
        };
        let bytes = frame.encode();
        self.bytes += bytes.len();
        self.frames.push_back(Queued { bytes, output });
        self.trim();
    }

    fn trim(&mut self) {
        let mut i = usize::from(self.front_sent > 0);
        while self.bytes > OUTBOX_LIMIT && i < self.frames.len() {
            let Some(stream) = self.frames[i].output else {
                i += 1;
                continue;
            };
            let Some(q) = self.frames.remove(i) else {
                break;
            };
            self.bytes -= q.bytes.len();
            let payload = (q.bytes.len() - 5) as u64;
            match stream {
                Stream::Out => self.dropped.stdout += payload,
                Stream::Err => self.dropped.stderr += payload,
            }
        }
    }

    /// True when something waits to be written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.dropped == Dropped::default()
    }

    /// Queued bytes.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.bytes
    }

    /// Writes what the writer takes; `Ok` when it would block or all is out.
    fn write_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        loop {
            if self.front_sent == 0 && self.dropped != Dropped::default() {
                let d = std::mem::take(&mut self.dropped);
                let bytes = Frame::Dropped(d).encode();
                self.bytes += bytes.len();
                self.frames.push_front(Queued {
                    bytes,
                    output: None,
                });
            }
            let Some(front) = self.frames.front() else {
                return Ok(());
            };
            match w.write(&front.bytes[self.front_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.front_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.front_sent == front.bytes.len() {
                self.bytes -= front.bytes.len();
                self.frames.pop_front();
                self.front_sent = 0;
            }
        }
    }

    /// A connection ended: its partly written frame goes again, whole, on
    /// the next one.
    fn restart_front(&mut self) {
        self.front_sent = 0;
    }
}

#[derive(Debug)]
struct Conn {
    stream: std::fs::File,
    decoder: Decoder,
    /// This side's Hello, not yet all written.
    hello: Vec<u8>,
    /// The peer's Hello arrived.
    greeted: bool,
}

/// The channel.
#[derive(Debug)]
pub struct Channel {
    addr: ChannelAddr,
    listener: Option<OwnedFd>,
    /// An `O_PATH` handle on the port's device or the socket's directory,
    /// taken before the root is switched: reconnecting goes through it
    /// (`/proc/self/fd/N`), since the container's root has neither.
    pinned: Option<OwnedFd>,
    conn: Option<Conn>,
    retry_at: Option<Instant>,
    /// What waits for the host.
    pub outbox: Outbox,
}

/// What [`Channel::poll_fds`] asks poll to watch.
#[derive(Debug, Clone, Copy)]
pub struct Interest<'a> {
    /// The fd.
    pub fd: BorrowedFd<'a>,
    /// Watch for writability too.
    pub write: bool,
}

impl Channel {
    /// Opens the transport (a vsock listener); connections come later.
    pub fn open(addr: ChannelAddr) -> io::Result<Channel> {
        let listener = match &addr {
            ChannelAddr::Vsock(port) => Some(listen_vsock(*port)?),
            _ => None,
        };
        let pinned = match &addr {
            ChannelAddr::Unix(path) => Some(pin(path.parent().unwrap_or(Path::new("/")))?),
            _ => None,
        };
        Ok(Channel {
            addr,
            listener,
            pinned,
            conn: None,
            retry_at: Some(Instant::now()),
            outbox: Outbox::default(),
        })
    }

    /// When the channel wants to be called again without an event.
    pub fn deadline(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.conn.is_none())
    }

    /// The fds to poll: the listener, and the connection.
    pub fn poll_fds(&self) -> Vec<Interest<'_>> {
        let mut out = Vec::new();
        if let Some(l) = &self.listener {
            out.push(Interest {
                fd: l.as_fd(),
                write: false,
            });
        }
        if let Some(c) = &self.conn {
            out.push(Interest {
                fd: c.stream.as_fd(),
                write: !c.hello.is_empty() || !self.outbox.is_empty(),
            });
        }
        out
    }

    /// Queues a frame for the host.
    pub fn send(&mut self, frame: &Frame) {
        self.outbox.push(frame);
    }

    /// Accepts or makes a connection, reads and writes what is ready.
    /// Returns the host's frames; `state` is what a new Hello tells.
    pub fn service(&mut self, state: &GuestState) -> Vec<Frame> {
        self.connect(state);
        let mut frames = Vec::new();
        if let Some(conn) = &mut self.conn {
            let result = read_frames(conn, &mut frames)
                .and_then(|()| flush(conn, &mut self.outbox).map_err(ProtoError::Io));
            if let Err(e) = result {
                self.drop_conn(&e);
            }
        }
        frames
    }

    fn connect(&mut self, state: &GuestState) {
        let stream = match (&self.addr, &self.listener) {
            (ChannelAddr::Vsock(_), Some(l)) => accept(l),
            (ChannelAddr::Port(name), _) if self.due() => open_port(name, &mut self.pinned),
            (ChannelAddr::Unix(path), _) if self.due() => connect_unix(path, &self.pinned),
            _ => return,
        };
        match stream {
            Ok(Some(stream)) => {
                if self.conn.is_some() {
                    eprintln!("runv-init: a new host connection replaces the old one");
                }
                self.outbox.restart_front();
                self.conn = Some(Conn {
                    stream,
                    decoder: Decoder::new(),
                    hello: Frame::Hello(hello(state)).encode(),
                    greeted: false,
                });
                self.retry_at = None;
            }
            Ok(None) => {}
            Err(_) => self.retry_at = Some(Instant::now() + RETRY),
        }
    }

    fn due(&self) -> bool {
        self.conn.is_none() && self.retry_at.is_some_and(|t| Instant::now() >= t)
    }

    fn drop_conn(&mut self, why: &ProtoError) {
        if let Some(mut conn) = self.conn.take()
            && !matches!(why, ProtoError::Io(_) | ProtoError::Truncated)
        {
            eprintln!("runv-init: closing the host connection: {why}");
            let _ = conn.stream.write(&Frame::Error(why.to_string()).encode());
        }
        self.outbox.restart_front();
        self.retry_at = Some(Instant::now() + RETRY);
    }
}

fn hello(state: &GuestState) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        software: format!("runv-init {}", env!("CARGO_PKG_VERSION")),
        state: Some(state.clone()),
    }
}

fn read_frames(conn: &mut Conn, frames: &mut Vec<Frame>) -> Result<(), ProtoError> {
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; MAX_FRAME + 4];
    while budget > 0 {
        let want = conn.decoder.wanted().min(budget);
        match conn.stream.read(&mut buf[..want]) {
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => {
                budget -= n;
                conn.decoder.push(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        while let Some(frame) = conn.decoder.next_frame()? {
            accept_frame(conn, frame, frames)?;
        }
    }
    Ok(())
}

fn accept_frame(conn: &mut Conn, frame: Frame, frames: &mut Vec<Frame>) -> Result<(), ProtoError> {
    match frame {
        Frame::Hello(h) => {
            check_hello(&h)?;
            conn.greeted = true;
            Ok(())
        }
        f if !conn.greeted => Err(ProtoError::BeforeHello(f.name())),
        Frame::Error(m) => {
            eprintln!("runv-init: the host says: {m}");
            Ok(())
        }
        f if f.from_host() => {
            frames.push(f);
            Ok(())
        }
        f => Err(ProtoError::Unexpected(f.name())),
    }
}

fn flush(conn: &mut Conn, outbox: &mut Outbox) -> io::Result<()> {
    while !conn.hello.is_empty() {
        match conn.stream.write(&conn.hello) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.hello.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    outbox.write_to(&mut conn.stream)
}

fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )?;
    socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> io::Result<Option<std::fs::File>> {
    match socket::accept4(
        std::os::fd::AsRawFd::as_raw_fd(listener),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    ) {
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        })),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The device of the virtio-console port named `name`.
fn port_device(name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let found = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if found.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-console port is named {name}"),
    ))
}

fn pin(path: &Path) -> io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, open};
    open(
        path,
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(io::Error::from)
}

fn through(pinned: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(pinned)
    ))
}

fn open_port(name: &str, pinned: &mut Option<OwnedFd>) -> io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = match pinned {
        Some(p) => through(p),
        None => {
            let device = port_device(name)?;
            let p = pin(&device)?;
            *pinned = Some(p);
            device
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    Ok(Some(file))
}

fn connect_unix(path: &Path, dir: &Option<OwnedFd>) -> io::Result<Option<std::fs::File>> {
    let path = match (dir, path.file_name()) {
        (Some(d), Some(name)) => through(d).join(name),
        _ => path.to_owned(),
    };
    let stream = UnixStream::connect(path)?;
    stream.set_nonblocking(true)?;
    Ok(Some(std::fs::File::from(OwnedFd::from(stream))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(n: usize) -> Frame {
        Frame::Stdout(vec![b'o'; n])
    }

    struct Slow {
        took: Vec<u8>,
        budget: usize,
    }
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.budget);
            self.budget -= n;
            self.took.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut d = Decoder::new();
        d.push(bytes);
        std::iter::from_fn(|| d.next_frame().unwrap()).collect()
    }

    #[test]
    fn output_past_the_limit_drops_the_oldest_and_says_how_much() {
        let mut o = Outbox::default();
        o.push(&Frame::Stderr(b"first".to_vec()));
        for _ in 0..40 {
            o.push(&out(30_000));
        }
        o.push(&Frame::Exited(runv_vmm_api::guest::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false,
            start_error: None,
            started_at_nanos: 0,
            finished_at_nanos: 0,
        }));
        assert!(o.len() <= OUTBOX_LIMIT + 64, "{}", o.len());
        let mut w = Slow {
            took: vec![],
            budget: usize::MAX,
        };
        o.write_to(&mut w).unwrap();
        let got = frames(&w.took);
        let Frame::Dropped(d) = &got[0] else {
            panic!("first is {:?}", got[0].name())
        };
        assert_eq!(d.stderr, 5);
        let kept = got.iter().filter(|f| matches!(f, Frame::Stdout(_))).count();
        assert_eq!(d.stdout, (40 - kept as u64) * 30_000);
        assert!(
            matches!(got.last(), Some(Frame::Exited(_))),
            "Exited is never dropped"
        );
        assert!(o.is_empty());
    }

    #[test]
    fn a_frame_cut_by_a_lost_connection_goes_again_whole() {
        let mut o = Outbox::default();
        o.push(&out(100));
        o.push(&out(10));
        let mut first = Slow {
            took: vec![],
            budget: 50,
        };
        o.write_to(&mut first).unwrap();
        o.restart_front();
        let mut second = Slow {
            took: vec![],
            budget: usize::MAX,
        };
        o.write_to(&mut second).unwrap();
        assert_eq!(frames(&second.took), vec![out(100), out(10)]);
    }

    #[test]
    fn the_frame_being_written_is_never_dropped() {
        let mut o = Outbox::default();
        o.push(&out(30_000));
        let mut w = Slow {
            took: vec![],
            budget: 10,
        };
        o.write_to(&mut w).unwrap();
        for _ in 0..40 {
            o.push(&out(30_000));
        }
        w.budget = usize::MAX;
        o.write_to(&mut w).unwrap();
        let got = frames(&w.took);
        assert_eq!(got[0], out(30_000), "the frame begun is finished");
        assert!(matches!(got[1], Frame::Dropped(_)));
    }
}

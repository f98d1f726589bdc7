//! The channel between the node agent and `runv-init`, the guest's PID 1.
//!
//! A byte stream (virtio-vsock port [`VSOCK_PORT`] under runv-vmm, a
//! virtio-console port under QEMU, a unix socket in tests) carries frames:
//!
//! ```text
//! | length: u32, big endian | kind: u8 | payload: length - 1 bytes |
//! ```
//!
//! `length` counts the kind byte and the payload and is at most
//! [`MAX_FRAME`]; a longer one ends the connection before any of it is read
//! into memory. Structured payloads are JSON (camelCase), output payloads are
//! the raw bytes.
//!
//! # The conversation (version 1)
//! 1. On every new connection, each side sends [`Frame::Hello`] first. A
//!    side that gets another version answers [`Frame::Error`] and closes.
//!    The guest's Hello carries its state, so an agent that reconnects
//!    after a restart knows where the container is.
//! 2. The host sends [`Frame::Config`] while the guest waits for one; the
//!    guest ignores a Config once its container started.
//! 3. The guest sends [`Frame::Started`], then [`Frame::Stdout`] and
//!    [`Frame::Stderr`] as the process writes, and [`Frame::Exited`] once.
//!    The guest never blocks the container on the host: while no host is
//!    connected or the host reads slowly, output waits in a bounded buffer
//!    and the oldest is dropped past it, counted in [`Frame::Dropped`].
//! 4. The host may send [`Frame::Stop`]: SIGTERM now, SIGKILL after the
//!    grace period.
//! 5. After Exited the host answers [`Frame::ExitAck`], and the guest syncs
//!    and powers off. With no host to answer, it powers off after
//!    [`GuestConfig::exit_report_timeout_seconds`].
//!
//! The host trusts nothing in a guest frame: the decoder bounds every
//! length, and a malformed frame is an error of that connection.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The version of this protocol both sides speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// The guest's vsock port.
pub const VSOCK_PORT: u32 = 1024;
/// Largest `length` of one frame (kind byte and payload).
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest output chunk the guest puts in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 32 * 1024;

/// The format version of [`GuestConfig`] and [`ContainerConfig`].
pub const CONFIG_VERSION: u32 = 1;
/// `PATH` when neither image nor spec sets one (containerd's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the container runs: the image's config merged with the workload's
/// `spec.container` (see `runv_image::container` for the rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerConfig {
    /// Format version, [`CONFIG_VERSION`].
    pub version: u32,
    /// `registry/repository@digest` (Pod status' imageID).
    #[serde(rename = "imageID")]
    pub image_id: String,
    /// The image manifest's digest (names the root filesystem disk).
    pub manifest_digest: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `NAME=value` strings.
    pub env: Vec<String>,
    /// The working directory.
    pub working_dir: String,
    /// The user (`name`, `uid`, `uid:gid`, `name:group`, …; empty means root).
    pub user: String,
}

/// Everything the guest needs to run its container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestConfig {
    /// Format version, [`CONFIG_VERSION`].
    pub version: u32,
    /// The process.
    pub container: ContainerConfig,
    /// The guest's hostname (the VM's name).
    pub hostname: String,
    /// The image's root filesystem, mounted read-only under a tmpfs overlay.
    pub rootfs: RootFs,
    /// The network interface, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
    /// Seconds between SIGTERM and SIGKILL on a stop.
    pub termination_grace_period_seconds: u32,
    /// Seconds the guest waits for [`Frame::ExitAck`] before powering off.
    pub exit_report_timeout_seconds: u32,
}

/// The root filesystem disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootFs {
    /// Block device (or, for a file-backed filesystem, the file) to mount.
    pub source: String,
    /// Its filesystem type: `erofs` or `ext4`.
    pub fstype: String,
}

/// One interface's address, as the node assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestNetwork {
    /// The interface's name in the guest (`eth0`).
    pub interface: String,
    /// IPv4 address with prefix length, `10.1.0.5/24`.
    pub address: String,
    /// The default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Name servers for `/etc/resolv.conf`.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Search domains for `/etc/resolv.conf`.
    #[serde(default)]
    pub search: Vec<String>,
}

/// Sent first, by each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The sender's name and version, for logs.
    pub software: String,
    /// The guest's state (the host sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<GuestState>,
}

/// Where the guest is, as told in its Hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "phase")]
pub enum GuestState {
    /// runv-init is up and waits for its config.
    WaitingForConfig,
    /// The container runs.
    Running(Started),
    /// The container ended; the guest powers off once this is acknowledged.
    Exited(Exited),
}

/// The container's process started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// Its pid in the guest.
    pub pid: u32,
    /// When, in nanoseconds since the Unix epoch (guest clock).
    pub started_at_nanos: u64,
}

/// The container ended: exactly one of `code` and `signal` is set, or
/// `start_error` when it never started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exited {
    /// Exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The guest kernel's OOM killer killed a process while it ran, and it
    /// died of SIGKILL.
    #[serde(default)]
    pub oom_killed: bool,
    /// Why it could not be started (no such program, bad user, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_error: Option<String>,
    /// When it started (0 when it never did), nanoseconds since the epoch.
    pub started_at_nanos: u64,
    /// When it ended.
    pub finished_at_nanos: u64,
}

impl Exited {
    /// The exit code as a Pod reports it: the status, `128 + signal`, or
    /// 128 for a process that never started (as containerd reports it).
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 128,
        }
    }
}

/// Output the guest dropped because no host read it in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dropped {
    /// Bytes of stdout.
    pub stdout: u64,
    /// Bytes of stderr.
    pub stderr: u64,
}

/// Stop the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stop {
    /// Seconds between SIGTERM and SIGKILL.
    pub grace_period_seconds: u32,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Both sides, first.
    Hello(Hello),
    /// Host to guest.
    Config(Box<GuestConfig>),
    /// Guest to host.
    Started(Started),
    /// Guest to host: bytes the container wrote to stdout.
    Stdout(Vec<u8>),
    /// Guest to host: bytes the container wrote to stderr.
    Stderr(Vec<u8>),
    /// Guest to host.
    Exited(Exited),
    /// Guest to host.
    Dropped(Dropped),
    /// Host to guest.
    Stop(Stop),
    /// Host to guest: the exit was recorded.
    ExitAck,
    /// Either side: what went wrong, in words.
    Error(String),
}

const KIND_HELLO: u8 = 1;
const KIND_CONFIG: u8 = 2;
const KIND_STARTED: u8 = 3;
const KIND_STDOUT: u8 = 4;
const KIND_STDERR: u8 = 5;
const KIND_EXITED: u8 = 6;
const KIND_DROPPED: u8 = 7;
const KIND_STOP: u8 = 8;
const KIND_EXIT_ACK: u8 = 9;
const KIND_ERROR: u8 = 10;

/// Why bytes on the channel are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream failed.
    #[error("reading the guest channel")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("the guest channel ended inside a frame")]
    Truncated,
    /// A frame's length is 0 or above [`MAX_FRAME`].
    #[error("a frame of {0} bytes; frames are 1 to {MAX_FRAME} bytes")]
    Length(u64),
    /// An unknown kind byte.
    #[error("a frame of unknown kind {0}")]
    Kind(u8),
    /// A structured payload that is not the JSON its kind needs.
    #[error("a {kind} frame whose payload is not valid: {source}")]
    Payload {
        /// The frame's kind.
        kind: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A frame that must not come from this side (a guest sending Config).
    #[error("a {0} frame, which this side of the channel never receives")]
    Unexpected(&'static str),
    /// A frame before the peer's Hello.
    #[error("a {0} frame before Hello")]
    BeforeHello(&'static str),
    /// The peer speaks another protocol version.
    #[error("the peer speaks guest protocol version {0}; this side speaks {PROTOCOL_VERSION}")]
    Version(u32),
}

impl Frame {
    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Config(_) => "Config",
            Frame::Started(_) => "Started",
            Frame::Stdout(_) => "Stdout",
            Frame::Stderr(_) => "Stderr",
            Frame::Exited(_) => "Exited",
            Frame::Dropped(_) => "Dropped",
            Frame::Stop(_) => "Stop",
            Frame::ExitAck => "ExitAck",
            Frame::Error(_) => "Error",
        }
    }

    /// True for frames only the host sends.
    pub fn from_host(&self) -> bool {
        matches!(self, Frame::Config(_) | Frame::Stop(_) | Frame::ExitAck)
    }

    /// The frame's bytes on the wire. An output chunk or error text longer
    /// than fits is cut to [`MAX_FRAME`] - 1 bytes; callers chunk output at
    /// [`MAX_OUTPUT_CHUNK`].
    pub fn encode(&self) -> Vec<u8> {
        // JSON of these types cannot fail: no maps with non-string keys.
        fn json<T: Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).unwrap_or_default()
        }
        let (kind, mut payload) = match self {
            Frame::Hello(h) => (KIND_HELLO, json(h)),
            Frame::Config(c) => (KIND_CONFIG, json(c.as_ref())),
            Frame::Started(s) => (KIND_STARTED, json(s)),
            Frame::Stdout(b) => (KIND_STDOUT, b.clone()),
            Frame::Stderr(b) => (KIND_STDERR, b.clone()),
            Frame::Exited(e) => (KIND_EXITED, json(e)),
            Frame::Dropped(d) => (KIND_DROPPED, json(d)),
            Frame::Stop(s) => (KIND_STOP, json(s)),
            Frame::ExitAck => (KIND_EXIT_ACK, Vec::new()),
            Frame::Error(m) => (KIND_ERROR, m.as_bytes().to_vec()),
        };
        payload.truncate(MAX_FRAME - 1);
        let mut out = Vec::with_capacity(5 + payload.len());
        out.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&payload);
        out
    }

    /// Parses one frame's kind and payload.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, ProtoError> {
        fn parse<T: serde::de::DeserializeOwned>(
            kind: &'static str,
            p: &[u8],
        ) -> Result<T, ProtoError> {
            serde_json::from_slice(p).map_err(|source| ProtoError::Payload { kind, source })
        }
        Ok(match kind {
            KIND_HELLO => Frame::Hello(parse("Hello", payload)?),
            KIND_CONFIG => Frame::Config(Box::new(parse("Config", payload)?)),
            KIND_STARTED => Frame::Started(parse("Started", payload)?),
            KIND_STDOUT => Frame::Stdout(payload.to_vec()),
            KIND_STDERR => Frame::Stderr(payload.to_vec()),
            KIND_EXITED => Frame::Exited(parse("Exited", payload)?),
            KIND_DROPPED => Frame::Dropped(parse("Dropped", payload)?),
            KIND_STOP => Frame::Stop(parse("Stop", payload)?),
            KIND_EXIT_ACK => Frame::ExitAck,
            KIND_ERROR => Frame::Error(String::from_utf8_lossy(payload).into_owned()),
            other => return Err(ProtoError::Kind(other)),
        })
    }
}

/// Reads frames from bytes that arrive in pieces (a non-blocking stream).
/// Holds at most one frame's bytes plus what the last push added.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// How many bytes the next read may bring without passing one frame.
    pub fn wanted(&self) -> usize {
        match self.header() {
            Some(len) if len <= MAX_FRAME => 4 + len - self.buf.len().min(4 + len),
            _ => 4 - self.buf.len().min(4),
        }
        .max(1)
    }

    fn header(&self) -> Option<usize> {
        let h: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(h) as usize)
    }

    /// Adds bytes read from the stream; at most [`Decoder::wanted`] of them
    /// keep the buffer within one frame.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let Some(len) = self.header() else {
            return Ok(None);
        };
        if len == 0 || len > MAX_FRAME {
            return Err(ProtoError::Length(len as u64));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }
}

/// Reads one frame from a blocking stream; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtoError::Length(len as u64));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtoError::Truncated,
        _ => ProtoError::Io(e),
    })?;
    Frame::decode(body[0], &body[1..]).map(Some)
}

/// Writes one frame to a blocking stream.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())?;
    w.flush()
}

/// Checks a peer's Hello.
pub fn check_hello(hello: &Hello) -> Result<(), ProtoError> {
    if hello.version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtoError::Version(hello.version))
    }
}

/// The line a host sends runv-vmm's hybrid vsock socket to reach the
/// guest's `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Longest answer line the VMM sends to a CONNECT.
pub const MAX_CONNECT_ANSWER: usize = 32;

/// Reads what the VMM answered a CONNECT (`line` without its newline;
/// `None` when the stream ended first): `OK <host port>` opens the stream.
pub fn check_connect_answer(line: Option<&[u8]>, port: u32) -> io::Result<()> {
    match line {
        Some(l) if l.starts_with(b"OK ") => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("nothing in the guest listens on vsock port {port}"),
        )),
        Some(l) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the VMM answered {:?} to CONNECT {port}",
                String::from_utf8_lossy(l)
            ),
        )),
    }
}

/// Opens a host-initiated connection through runv-vmm's hybrid vsock
/// socket: sends `CONNECT <port>` and reads the `OK <host port>` line.
/// The caller sets a read timeout on the stream first.
pub fn hybrid_connect(stream: &mut (impl Read + Write), port: u32) -> io::Result<()> {
    stream.write_all(connect_line(port).as_bytes())?;
    let mut line = Vec::with_capacity(MAX_CONNECT_ANSWER);
    let mut byte = [0u8; 1];
    while line.len() < MAX_CONNECT_ANSWER {
        match stream.read(&mut byte)? {
            0 => return check_connect_answer(None, port),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    check_connect_answer(Some(&line), port)
}

#[cfg(test)]
mod tests;

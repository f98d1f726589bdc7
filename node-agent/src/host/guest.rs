//! The agent's end of the channel to each container VM's `runv-init`
//! ([`runv_vmm_api::guest`]), over runv-vmm's hybrid vsock socket.
//!
//! One task per running container VM connects (`CONNECT 1024`), greets,
//! sends the config while the guest waits for one, and then records what
//! the guest reports: the run record ([`RunRecord`], `run.json`, written
//! atomically on every change) and the container's output as CRI-format
//! log files, rotated ([`super::logs`]). After `Exited` is on disk it
//! acknowledges, and the guest powers off. A lost connection is made again
//! (the guest keeps output meanwhile, bounded); an agent restart starts a
//! new task that picks up from the guest's Hello.
//!
//! Nothing a guest sends grows memory past one frame (64 KiB) per VM, or
//! disk past the log files' bound; a malformed frame ends that connection
//! with the reason, logged, and the task tries again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use runv_vmm_api::guest::{
    self, Decoder, Dropped, Exited, Frame, GuestConfig, GuestState, Hello, MAX_FRAME,
    PROTOCOL_VERSION, ProtoError, Started, Stop, VSOCK_PORT, check_hello,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::HostError;
use super::files::write_atomic;
use super::logs::{LogFile, LogStream};

/// How soon a failed connection is tried again.
const RETRY: Duration = Duration::from_millis(200);
/// How long the guest may take to answer CONNECT and Hello.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What the agent knows of one boot of a container VM (`run.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// Format version (1).
    pub version: u32,
    /// When runv-init first said Hello (milliseconds since the epoch, the
    /// agent's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_at_ms: Option<i64>,
    /// The container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Started>,
    /// When the agent heard it started (milliseconds since the epoch, the
    /// node's clock, which the status reports: a guest's clock is its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    /// The container ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited: Option<Exited>,
    /// When the agent heard it ended (the node's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at_ms: Option<i64>,
    /// Output the guest dropped because the agent did not read it in time.
    #[serde(default)]
    pub dropped: Dropped,
}

impl RunRecord {
    /// Reads a record; `None` when there is none or it is unreadable.
    pub fn read(path: &std::path::Path) -> Option<RunRecord> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, path: &std::path::Path) -> Result<(), HostError> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| HostError::Invalid {
            what: "run record",
            value: e.to_string(),
        })?;
        write_atomic(path, &body)
    }
}

/// One VM's link: where to connect and what to record.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    /// The VM's key (`namespace/name`), as [`GuestLinks`] tells it back.
    pub key: String,
    /// Which boot of the VM this is (its VMM's identity); a new boot ends
    /// the old link.
    pub boot: String,
    /// The VMM's hybrid vsock socket.
    pub socket: PathBuf,
    /// What the guest is sent.
    pub config: GuestConfig,
    /// Where the run record goes.
    pub record: PathBuf,
    /// The container's log file.
    pub log: PathBuf,
    /// Bytes one log file grows to before it is rotated.
    pub log_max_bytes: u64,
    /// Log files kept, the current one included.
    pub log_max_files: u32,
}

struct Link {
    boot: String,
    stop: mpsc::Sender<Stop>,
    task: tokio::task::JoinHandle<()>,
}

/// The links of every container VM on the node.
pub struct GuestLinks {
    runtime: tokio::runtime::Handle,
    links: Mutex<HashMap<String, Link>>,
    /// Called with a VM's key when its record changed (booted, started,
    /// exited), so its status is reconciled soon.
    changed: Notify,
}

/// Who hears of a VM whose record changed.
pub type OnChange = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
struct Notify(Arc<std::sync::RwLock<OnChange>>);

impl Notify {
    fn call(&self, key: &str) {
        let f = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        f(key);
    }
}

impl std::fmt::Debug for GuestLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLinks").finish_non_exhaustive()
    }
}

impl GuestLinks {
    /// Links whose tasks run on `runtime`; `changed` hears of new facts.
    pub fn new(runtime: tokio::runtime::Handle, changed: OnChange) -> Self {
        Self {
            runtime,
            links: Mutex::default(),
            changed: Notify(Arc::new(std::sync::RwLock::new(changed))),
        }
    }

    /// Sends news of changed records to `changed` from now on.
    pub fn set_on_change(&self, changed: OnChange) {
        *self
            .changed
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = changed;
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps a link to this boot of the VM (idempotent; a link to an older
    /// boot is ended first).
    pub fn ensure(&self, spec: LinkSpec) {
        let mut links = self.links();
        if let Some(l) = links.get(&spec.key)
            && l.boot == spec.boot
            && !l.task.is_finished()
        {
            return;
        }
        if let Some(old) = links.remove(&spec.key) {
            old.task.abort();
        }
        let (tx, rx) = mpsc::channel(4);
        let key = spec.key.clone();
        let boot = spec.boot.clone();
        let changed = self.changed.clone();
        let task = self.runtime.spawn(run_link(spec, rx, changed));
        links.insert(
            key,
            Link {
                boot,
                stop: tx,
                task,
            },
        );
    }

    /// Ends the VM's link (its VMM is gone).
    pub fn forget(&self, key: &str) {
        if let Some(l) = self.links().remove(key) {
            l.task.abort();
        }
    }

    /// Asks the VM's container to stop: SIGTERM, then SIGKILL after
    /// `grace_period_seconds`. False when no link could pass it on.
    pub fn request_stop(&self, key: &str, grace_period_seconds: u32) -> bool {
        self.links().get(key).is_some_and(|l| {
            l.stop
                .try_send(Stop {
                    grace_period_seconds,
                })
                .is_ok()
        })
    }
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connecting to the VM's vsock socket")]
    Connect(#[source] std::io::Error),
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("recording what the guest reported")]
    Record(#[source] HostError),
}

async fn run_link(spec: LinkSpec, mut stop: mpsc::Receiver<Stop>, changed: Notify) {
    let mut record = RunRecord::read(&spec.record).unwrap_or(RunRecord {
        version: 1,
        ..RunRecord::default()
    });
    let mut log = LogFile::new(spec.log.clone(), spec.log_max_bytes, spec.log_max_files);
    let mut pending_stop = None;
    loop {
        match session(
            &spec,
            &mut record,
            &mut log,
            &mut stop,
            &mut pending_stop,
            &changed,
        )
        .await
        {
            Ok(()) => return,
            Err(LinkError::Connect(_)) => {}
            Err(e) => tracing::info!(
                vm = %spec.key,
                error = %chain(&e),
                "guest channel ended; connecting again"
            ),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// `error: cause: cause ...`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn connect(spec: &LinkSpec) -> Result<UnixStream, LinkError> {
    let mut stream = UnixStream::connect(&spec.socket)
        .await
        .map_err(LinkError::Connect)?;
    // runv_vmm_api::guest::hybrid_connect's exchange, on a tokio stream.
    let handshake = async {
        stream
            .write_all(guest::connect_line(VSOCK_PORT).as_bytes())
            .await?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < guest::MAX_CONNECT_ANSWER {
            if stream.read(&mut byte).await? == 0 {
                return guest::check_connect_answer(None, VSOCK_PORT);
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        guest::check_connect_answer(Some(&line), VSOCK_PORT)
    };
    match tokio::time::timeout(HANDSHAKE, handshake).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(LinkError::Connect(e)),
        Err(_) => Err(LinkError::Timeout(HANDSHAKE)),
    }
}

struct FrameReader {
    decoder: Decoder,
    buf: Vec<u8>,
}

impl FrameReader {
    async fn next(&mut self, stream: &mut UnixStream) -> Result<Frame, LinkError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(f);
            }
            let want = self.decoder.wanted().min(self.buf.len());
            let n = stream
                .read(&mut self.buf[..want])
                .await
                .map_err(ProtoError::Io)?;
            if n == 0 {
                return Err(ProtoError::Truncated.into());
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

async fn send(stream: &mut UnixStream, frame: &Frame) -> Result<(), LinkError> {
    stream
        .write_all(&frame.encode())
        .await
        .map_err(|e| LinkError::Proto(ProtoError::Io(e)))
}

/// One connection: greet, configure, record until the exit is
/// acknowledged (`Ok`) or the connection ends (`Err`).
async fn session(
    spec: &LinkSpec,
    record: &mut RunRecord,
    log: &mut LogFile,
    stop: &mut mpsc::Receiver<Stop>,
    pending_stop: &mut Option<Stop>,
    changed: &Notify,
) -> Result<(), LinkError> {
    let mut stream = connect(spec).await?;
    let mut reader = FrameReader {
        decoder: Decoder::new(),
        buf: vec![0u8; MAX_FRAME + 4],
    };
    send(
        &mut stream,
        &Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: format!("runv-agent {}", env!("CARGO_PKG_VERSION")),
            state: None,
        }),
    )
    .await?;
    let hello = match tokio::time::timeout(HANDSHAKE, reader.next(&mut stream)).await {
        Ok(Ok(Frame::Hello(h))) => h,
        Ok(Ok(other)) => return Err(ProtoError::BeforeHello(other.name()).into()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(LinkError::Timeout(HANDSHAKE)),
    };
    if let Err(e) = check_hello(&hello) {
        let _ = send(&mut stream, &Frame::Error(e.to_string())).await;
        return Err(e.into());
    }
    if record.booted_at_ms.is_none() {
        record.booted_at_ms = Some(now_ms());
        record.write(&spec.record).map_err(LinkError::Record)?;
        changed.call(&spec.key);
    }
    // What the guest's state tells counts as if its frames had come again:
    // a start or an end this link missed (an agent restart, a lost
    // connection) is recorded, and an end acknowledged.
    match hello.state {
        Some(GuestState::WaitingForConfig) => {
            send(&mut stream, &Frame::Config(Box::new(spec.config.clone()))).await?;
        }
        Some(GuestState::Running(s)) => {
            take_frame(spec, record, log, Frame::Started(s), changed)?;
        }
        Some(GuestState::Exited(e)) => {
            // Recorded (take_frame says so): acknowledged, and done.
            take_frame(spec, record, log, Frame::Exited(e), changed)?;
            send(&mut stream, &Frame::ExitAck).await?;
            return Ok(());
        }
        None => {}
    }
    if let Some(s) = pending_stop.take() {
        send(&mut stream, &Frame::Stop(s)).await?;
    }
    loop {
        tokio::select! {
            frame = reader.next(&mut stream) => {
                let frame = frame?;
                if take_frame(spec, record, log, frame, changed)? {
                    send(&mut stream, &Frame::ExitAck).await?;
                    return Ok(());
                }
            }
            Some(s) = stop.recv() => {
                *pending_stop = Some(s);
                send(&mut stream, &Frame::Stop(s)).await?;
                *pending_stop = None;
            }
        }
    }
}

/// Records one frame from the guest; true once the exit is on disk.
fn take_frame(
    spec: &LinkSpec,
    record: &mut RunRecord,
    log: &mut LogFile,
    frame: Frame,
    changed: &Notify,
) -> Result<bool, LinkError> {
    let now = now_ms();
    match frame {
        Frame::Stdout(b) => log.write(LogStream::Stdout, &b, now),
        Frame::Stderr(b) => log.write(LogStream::Stderr, &b, now),
        Frame::Dropped(d) => {
            record.dropped.stdout += d.stdout;
            record.dropped.stderr += d.stderr;
            log.note_dropped(d, now);
            record.write(&spec.record).map_err(LinkError::Record)?;
        }
        Frame::Started(s) => {
            if record.started.as_ref() != Some(&s) {
                record.started = Some(s);
                record.started_at_ms.get_or_insert(now);
                record.write(&spec.record).map_err(LinkError::Record)?;
                changed.call(&spec.key);
            }
        }
        Frame::Exited(e) => {
            log.flush(now);
            if record.exited.as_ref() != Some(&e) {
                record.exited = Some(e);
                record.exited_at_ms.get_or_insert(now);
                record.write(&spec.record).map_err(LinkError::Record)?;
                changed.call(&spec.key);
            }
            return Ok(true);
        }
        Frame::Error(m) => tracing::warn!(vm = %spec.key, guest = %m, "the guest reports an error"),
        Frame::Hello(_) => return Err(ProtoError::Unexpected("second Hello").into()),
        f => return Err(ProtoError::Unexpected(f.name()).into()),
    }
    Ok(false)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_vmm_api::guest::{
        CONFIG_VERSION, ContainerConfig, GuestConfig, RootFs, read_frame, write_frame,
    };
    use std::io::{BufRead, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config() -> GuestConfig {
        GuestConfig {
            version: CONFIG_VERSION,
            container: ContainerConfig {
                version: CONFIG_VERSION,
                image_id: "r/app@sha256:00".into(),
                manifest_digest: "sha256:00".into(),
                argv: vec!["/app".into()],
                env: vec![],
                working_dir: "/".into(),
                user: String::new(),
            },
            hostname: "web-0".into(),
            rootfs: RootFs {
                source: "/dev/vda".into(),
                fstype: "erofs".into(),
            },
            network: None,
            termination_grace_period_seconds: 30,
            exit_report_timeout_seconds: 60,
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        listener: UnixListener,
        changes: Arc<AtomicUsize>,
        links: GuestLinks,
        _rt: tokio::runtime::Runtime,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("vsock.sock")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        let links = GuestLinks::new(
            rt.handle().clone(),
            Arc::new(move |_: &str| {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        Fixture {
            dir,
            listener,
            changes,
            links,
            _rt: rt,
        }
    }

    impl Fixture {
        fn spec(&self) -> LinkSpec {
            LinkSpec {
                key: "ns/web-0".into(),
                boot: "1-1".into(),
                socket: self.dir.path().join("vsock.sock"),
                config: config(),
                record: self.dir.path().join("run.json"),
                log: self.dir.path().join("current.log"),
                log_max_bytes: 1 << 20,
                log_max_files: 2,
            }
        }

        /// Accepts the agent as runv-vmm's hybrid vsock does, and greets it
        /// as runv-init would in `state`.
        fn guest(&self, state: GuestState) -> UnixStream {
            let (mut s, _) = self.listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            s.write_all(b"OK 1073741824\n").unwrap();
            write_frame(
                &mut s,
                &Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    software: "fake".into(),
                    state: Some(state),
                }),
            )
            .unwrap();
            let Some(Frame::Hello(h)) = read_frame(&mut s).unwrap() else {
                panic!("the agent did not greet")
            };
            assert_eq!(h.version, PROTOCOL_VERSION);
            s
        }

        fn record(&self) -> RunRecord {
            RunRecord::read(&self.dir.path().join("run.json")).unwrap_or_default()
        }
    }

    fn exited(code: i32) -> Exited {
        Exited {
            code: Some(code),
            signal: None,
            oom_killed: false,
            start_error: None,
            started_at_nanos: 1,
            finished_at_nanos: 2,
        }
    }

    #[test]
    fn a_run_is_configured_recorded_logged_and_acknowledged() {
        let f = fixture();
        f.links.ensure(f.spec());
        let mut g = f.guest(GuestState::WaitingForConfig);
        let Some(Frame::Config(c)) = read_frame(&mut g).unwrap() else {
            panic!("no config")
        };
        assert_eq!(*c, config());
        let started = Started {
            pid: 2,
            started_at_nanos: 1,
        };
        write_frame(&mut g, &Frame::Started(started.clone())).unwrap();
        write_frame(&mut g, &Frame::Stdout(b"hello\nwor".to_vec())).unwrap();
        write_frame(&mut g, &Frame::Stderr(b"oops\n".to_vec())).unwrap();
        write_frame(&mut g, &Frame::Stdout(b"ld".to_vec())).unwrap();
        write_frame(&mut g, &Frame::Exited(exited(3))).unwrap();
        assert_eq!(read_frame(&mut g).unwrap(), Some(Frame::ExitAck));
        let r = f.record();
        assert!(r.booted_at_ms.is_some());
        assert_eq!(r.started, Some(started));
        assert_eq!(
            r.exited,
            Some(exited(3)),
            "on disk before the acknowledgement"
        );
        let log = std::fs::read(f.dir.path().join("current.log")).unwrap();
        let entries = super::super::logs::read_entries(&log);
        let text: Vec<(LogStream, String)> = entries
            .iter()
            .map(|e| (e.stream, String::from_utf8_lossy(&e.text).into_owned()))
            .collect();
        assert_eq!(
            text,
            vec![
                (LogStream::Stdout, "hello\n".into()),
                (LogStream::Stderr, "oops\n".into()),
                (LogStream::Stdout, "world\n".into()),
            ]
        );
        assert_eq!(
            f.changes.load(Ordering::SeqCst),
            3,
            "booted, started, exited"
        );
    }

    #[test]
    fn a_reconnect_sends_no_second_config_and_a_stop_reaches_the_guest() {
        let f = fixture();
        f.links.ensure(f.spec());
        let mut g = f.guest(GuestState::WaitingForConfig);
        assert!(matches!(
            read_frame(&mut g).unwrap(),
            Some(Frame::Config(_))
        ));
        drop(g);
        let running = Started {
            pid: 2,
            started_at_nanos: 1,
        };
        let mut g = f.guest(GuestState::Running(running));
        assert!(f.links.request_stop("ns/web-0", 7));
        assert_eq!(
            read_frame(&mut g).unwrap(),
            Some(Frame::Stop(Stop {
                grace_period_seconds: 7
            })),
            "no Config to a guest that runs its container"
        );
        assert!(!f.links.request_stop("ns/other", 7));
    }

    #[test]
    fn a_hostile_guest_costs_one_connection_and_no_memory() {
        let f = fixture();
        f.links.ensure(f.spec());
        let mut g = f.guest(GuestState::WaitingForConfig);
        assert!(matches!(
            read_frame(&mut g).unwrap(),
            Some(Frame::Config(_))
        ));
        // A length past the bound: the agent ends the connection without
        // reading (or buffering) the frame.
        g.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut g, &mut rest);
        // A frame only a host sends.
        let mut g = f.guest(GuestState::WaitingForConfig);
        assert!(matches!(
            read_frame(&mut g).unwrap(),
            Some(Frame::Config(_))
        ));
        write_frame(&mut g, &Frame::Config(Box::new(config()))).unwrap();
        let _ = std::io::Read::read_to_end(&mut g, &mut rest);
        // The link is still there and serves the next connection.
        let mut g = f.guest(GuestState::WaitingForConfig);
        assert!(matches!(
            read_frame(&mut g).unwrap(),
            Some(Frame::Config(_))
        ));
        write_frame(&mut g, &Frame::Exited(exited(0))).unwrap();
        assert_eq!(read_frame(&mut g).unwrap(), Some(Frame::ExitAck));
        assert_eq!(f.record().exited, Some(exited(0)));
    }

    #[test]
    fn an_end_the_link_missed_is_taken_from_the_guests_hello_and_acknowledged() {
        let f = fixture();
        f.links.ensure(f.spec());
        let mut g = f.guest(GuestState::Exited(exited(5)));
        assert_eq!(read_frame(&mut g).unwrap(), Some(Frame::ExitAck));
        assert_eq!(f.record().exited, Some(exited(5)));
    }

    #[test]
    fn a_guest_of_another_protocol_version_is_told_so() {
        let f = fixture();
        f.links.ensure(f.spec());
        let (mut s, _) = f.listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        s.write_all(b"OK 1\n").unwrap();
        write_frame(
            &mut s,
            &Frame::Hello(Hello {
                version: 99,
                software: "future".into(),
                state: Some(GuestState::WaitingForConfig),
            }),
        )
        .unwrap();
        assert!(matches!(read_frame(&mut s).unwrap(), Some(Frame::Hello(_))));
        let Some(Frame::Error(e)) = read_frame(&mut s).unwrap() else {
            panic!("no error")
        };
        assert!(e.contains("version 99"), "{e}");
        assert!(f.record().booted_at_ms.is_none());
    }
}

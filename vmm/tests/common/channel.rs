//! The node agent's side of the guest channel (`runv_vmm_api::guest`), for
//! tests that boot the test guest in `test=container`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runv_vmm_api::guest::{
    CONFIG_VERSION, ContainerConfig, Exited, Frame, GuestConfig, GuestState, Hello,
    PROTOCOL_VERSION, RootFs, Started, VSOCK_PORT, hybrid_connect, read_frame, write_frame,
};

/// How long one read from the guest may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may take to accept a connection at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to the guest's channel port as the agent does: `CONNECT 1024`
/// on the VM's vsock socket `uds`, tried again (bounded) while the VMM has
/// not bound it or the guest has not set up its device yet. `serial` is the
/// VM's console log, shown when something fails.
pub fn connect(uds: &Path, serial: &Path) -> Conn {
    let start = Instant::now();
    loop {
        let attempt = UnixStream::connect(uds).and_then(|mut s| {
            s.set_read_timeout(Some(READ_TIMEOUT))?;
            s.set_write_timeout(Some(READ_TIMEOUT))?;
            hybrid_connect(&mut s, VSOCK_PORT)?;
            Ok(s)
        });
        match attempt {
            Ok(stream) => {
                return Conn {
                    stream,
                    serial: serial.to_owned(),
                };
            }
            Err(e) if start.elapsed() > CONNECT_TIMEOUT => panic!(
                "cannot connect to the guest channel: {e}\n{}",
                std::fs::read_to_string(serial).unwrap_or_default()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One host connection to the guest's channel.
pub struct Conn {
    pub stream: UnixStream,
    /// The VM's serial log, shown when something fails.
    serial: PathBuf,
}

impl Conn {
    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn read(&mut self) -> Frame {
        match read_frame(&mut self.stream) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("the guest closed the channel\n{}", self.serial()),
            Err(e) => panic!("reading the guest channel: {e:?}\n{}", self.serial()),
        }
    }

    /// The stream ends (the guest closed the connection).
    pub fn expect_end(&mut self) {
        match read_frame(&mut self.stream) {
            Ok(None) => {}
            Ok(Some(f)) => panic!("another frame: {f:?}\n{}", self.serial()),
            Err(e) => panic!("the stream did not end cleanly: {e:?}\n{}", self.serial()),
        }
    }

    pub fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).unwrap();
    }

    /// Sends raw bytes (frames a well-behaved host would not send).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).unwrap();
    }

    pub fn hello(&mut self) {
        self.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "runv-vmm channel test".into(),
            state: None,
        }));
    }

    /// Reads the guest's Hello and returns the state it tells.
    pub fn guest_hello(&mut self) -> GuestState {
        match self.read() {
            Frame::Hello(Hello {
                version,
                software,
                state: Some(state),
            }) => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert_eq!(software, "runv-test-guest");
                state
            }
            f => panic!("expected the guest's Hello with its state, got {f:?}"),
        }
    }
}

pub fn guest_config(exit_report_timeout_seconds: u32) -> GuestConfig {
    GuestConfig {
        version: CONFIG_VERSION,
        container: ContainerConfig {
            version: CONFIG_VERSION,
            image_id: "registry.test/app@sha256:0123".into(),
            manifest_digest: "sha256:0123".into(),
            argv: vec!["/bin/app".into(), "--serve".into()],
            env: vec![runv_vmm_api::guest::DEFAULT_PATH.into()],
            working_dir: "/".into(),
            user: String::new(),
        },
        hostname: "vm-1".into(),
        rootfs: RootFs {
            source: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        network: None,
        termination_grace_period_seconds: 5,
        exit_report_timeout_seconds,
    }
}

/// Sends Config and reads Started, Stdout and Stderr; returns the config's
/// payload length (the guest's stdout line names it).
pub fn run_container(conn: &mut Conn, word: &str) -> usize {
    let config = Frame::Config(Box::new(guest_config(60)));
    let config_len = config.encode().len() - 5;
    conn.send(&config);
    assert_eq!(
        conn.read(),
        Frame::Started(Started {
            pid: 1,
            started_at_nanos: 0
        })
    );
    assert_eq!(
        conn.read(),
        Frame::Stdout(stdout_line(word, config_len, "vm-1", "/bin/app"))
    );
    assert_eq!(
        conn.read(),
        Frame::Stderr(format!("runv-test-guest stderr: {word}\n").into_bytes())
    );
    config_len
}

/// The test guest's stdout line for a Config of `config_len` payload bytes.
pub fn stdout_line(word: &str, config_len: usize, hostname: &str, argv0: &str) -> Vec<u8> {
    format!(
        "runv-test-guest stdout: {word} (config of {config_len} bytes, hostname {hostname}, argv[0] {argv0})\n"
    )
    .into_bytes()
}

pub fn exited_with_code(code: i32) -> Exited {
    Exited {
        code: Some(code),
        signal: None,
        oom_killed: false,
        start_error: None,
        started_at_nanos: 0,
        finished_at_nanos: 0,
    }
}

pub fn exited_with_signal(signal: i32) -> Exited {
    Exited {
        code: None,
        signal: Some(signal),
        ..exited_with_code(0)
    }
}

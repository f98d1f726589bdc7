//! Helpers for tests that run the real `runv-vmm` binary on /dev/kvm.
//!
//! Every KVM test starts with [`require_kvm`]: if /dev/kvm cannot be opened the
//! test fails when `RUNV_REQUIRE_KVM=1` (CI) and skips with a message otherwise.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use runv_vmm_api::{ExitRecord, Request, Response};

pub mod channel;
pub mod packet;

/// Returns the hypervisor name, or None when the test should skip.
pub fn require_kvm(test: &str) -> Option<&'static str> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {
            let name = runv_vmm::kvm::hypervisor_name();
            eprintln!("{test}: running on {name}");
            Some(name)
        }
        Err(e) => {
            if std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!(
                    "{test}: /dev/kvm is required (RUNV_REQUIRE_KVM=1) but cannot be opened: {e}"
                );
            }
            eprintln!(
                "{test}: skipping: /dev/kvm not available ({e}) (set RUNV_REQUIRE_KVM=1 to fail instead)"
            );
            None
        }
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("runv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
}

/// Runs to completion with a hard timeout (a hang is a test failure, not a stuck CI).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runv-vmm");
    wait_output(child, timeout)
}

pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "runv-vmm did not exit within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn read_exit_file(path: &Path) -> ExitRecord {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("exit file {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A line-oriented control-socket client.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects, retrying until the VMM has bound the socket.
    pub fn connect(path: &Path) -> Self {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    return Self {
                        reader: BufReader::new(s.try_clone().unwrap()),
                        writer: s,
                    };
                }
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    panic!("control socket {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Like [`Control::raw`], but `None` when the VMM closed the connection.
    pub fn try_raw(&mut self, line: &[u8]) -> Option<Response> {
        self.writer.write_all(line).ok()?;
        let mut out = String::new();
        self.reader.read_line(&mut out).ok()?;
        Response::decode(out.trim_end().as_bytes()).ok()
    }

    pub fn raw(&mut self, line: &[u8]) -> Response {
        self.writer.write_all(line).unwrap();
        let mut out = String::new();
        self.reader.read_line(&mut out).unwrap();
        Response::decode(out.trim_end().as_bytes())
            .unwrap_or_else(|e| panic!("bad response {out:?}: {e}"))
    }

    pub fn ask(&mut self, req: Request) -> Response {
        self.raw(req.encode().as_bytes())
    }

    /// Waits (at most 10 s) until the guest's serial output passes `above`
    /// bytes; returns the count.
    pub fn wait_serial_past(&mut self, above: u64) -> u64 {
        let start = Instant::now();
        loop {
            let n = self.counter("serial_tx_bytes_total");
            if n > above {
                return n;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "guest output stalled at {n}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn counter(&mut self, name: &str) -> u64 {
        match self.ask(Request::Counters) {
            Response::Counters { counters } => counters.get(name).copied().unwrap_or(0),
            r => panic!("{r:?}"),
        }
    }
}

/// Kills the VMM if a test panics before it exited, so no VM outlives its test.
pub struct KillOnDrop(pub Option<Child>);

impl KillOnDrop {
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    /// Hands the child back for an orderly wait.
    pub fn take(mut self) -> Child {
        self.0.take().expect("child already taken")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

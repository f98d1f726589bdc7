//! The container's process: its user, environment and working directory,
//! started as a child in its own session with stdout and stderr on pipes
//! and stdin on `/dev/null`.

use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{Gid, Pid, Uid};
use runv_vmm_api::guest::{ContainerConfig, Started};

use crate::user::{self, Identity};

/// Most bytes read of the image's `/etc/passwd` or `/etc/group`.
const MAX_USER_FILE: u64 = 1024 * 1024;

/// Nanoseconds since the epoch, by the guest's clock.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A started container.
#[derive(Debug)]
pub struct Container {
    /// Its pid.
    pub pid: Pid,
    /// Its stdout, non-blocking.
    pub stdout: ChildStdout,
    /// Its stderr, non-blocking.
    pub stderr: ChildStderr,
    /// When it started.
    pub started: Started,
}

fn read_small(path: &str) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_USER_FILE).read_to_string(&mut s);
    }
    s
}

/// The user of `c`, through the image's files.
pub fn identity(c: &ContainerConfig) -> Result<Identity, String> {
    user::resolve(
        &c.user,
        &read_small("/etc/passwd"),
        &read_small("/etc/group"),
    )
    .map_err(|e| e.to_string())
}

/// Starts the container's process in the current root. An error is the
/// start error the host is told.
pub fn spawn(c: &ContainerConfig) -> Result<Container, String> {
    let id = identity(c)?;
    let (program, args) = c
        .argv
        .split_first()
        .ok_or("the container config has no program to run")?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    for kv in &c.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        cmd.env(k, v);
    }
    if !c.env.iter().any(|kv| kv.starts_with("HOME=")) {
        cmd.env("HOME", &id.home);
    }
    if !std::path::Path::new(&c.working_dir).is_dir() {
        return Err(format!(
            "the working directory {:?} does not exist in the image",
            c.working_dir
        ));
    }
    cmd.current_dir(&c.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(id.uid), Gid::from_raw(id.gid));
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe system calls (sigprocmask, setsid, setgroups,
    // setgid, setuid) on values prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            // PID 1 blocks the signals it reads from its signalfd; the
            // container starts with none blocked.
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::unistd::setsid()?;
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))?;
    let started = Started {
        pid: child.id(),
        started_at_nanos: now_nanos(),
    };
    let pid = Pid::from_raw(child.id() as i32);
    let (Some(stdout), Some(stderr)) = (child.stdout, child.stderr) else {
        return Err("the container's output pipes were not made".into());
    };
    for fd in [
        std::os::fd::AsFd::as_fd(&stdout),
        std::os::fd::AsFd::as_fd(&stderr),
    ] {
        set_nonblocking(fd).map_err(|e| format!("making the output pipes non-blocking: {e}"))?;
    }
    Ok(Container {
        pid,
        stdout,
        stderr,
        started,
    })
}

fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// The guest kernel's count of OOM kills (`/proc/vmstat`), 0 if unknown.
pub fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

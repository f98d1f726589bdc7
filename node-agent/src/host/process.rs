//! Real VMM processes: spawned detached (own session, stdin from /dev/null,
//! output appended to a log file) and in the VM's cgroup from before `exec`,
//! identified by pid plus kernel start time, killed with SIGKILL only after
//! the identity is checked again.
//!
//! Must not decide when to spawn or kill: the reconcile logic does.

use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::{HostError, ProcessUsage, Processes, SpawnRequest, VmmIdentity};

/// Processes on this Linux host.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxProcesses;

/// The fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The start time (clock ticks since boot) and state letter of a process.
pub fn start_ticks(pid: u32) -> Option<(u64, char)> {
    let f = stat_fields(pid)?;
    // Fields after the name start at field 3 (state); starttime is field 22.
    let state = f.first()?.chars().next()?;
    let ticks = f.get(22 - 3)?.parse().ok()?;
    Some((ticks, state))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

/// Reaps `pid` if it is a zombie child of this process; harmless otherwise.
fn reap(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks, and waiting
    // on a pid that is not our child only returns ECHILD.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// At most this many files are passed to one VMM (a kernel, an initrd and
/// the disks of one VM fit many times over).
const MAX_PASSED: usize = 32;

/// Places `fds` at [`super::FIRST_PASSED_FD`], `+1`, ... without close-on-exec,
/// so the exec'd VMM inherits them there. Every source is first duplicated
/// above all sources and targets, then each copy is placed, so no placement
/// overwrites a source not yet copied. Allocates nothing and calls only
/// fcntl(2) and dup2(2): async-signal-safe, used between fork and exec.
fn pass_files(fds: &[libc::c_int]) -> std::io::Result<()> {
    if fds.len() > MAX_PASSED {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    let count = fds.len() as libc::c_int;
    let above = fds
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(super::FIRST_PASSED_FD + count)
        + 1;
    let mut high = [0 as libc::c_int; MAX_PASSED];
    for (h, &fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the parent holds
        // open; it touches no memory. The copy is closed at exec.
        *h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if *h < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, &h) in high[..fds.len()].iter().enumerate() {
        // SAFETY: dup2 onto a number this child may reuse: it closes whatever
        // the agent had there (close-on-exec anyway, and every source is
        // safe in `high`); the copy it makes has no close-on-exec flag.
        if unsafe { libc::dup2(h, super::FIRST_PASSED_FD + i as libc::c_int) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`
/// (writing `0` means "the writer", in cgroup v1 and v2 alike).
/// Async-signal-safe: used between fork and exec.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to the fd opened above.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = (n != 1).then(std::io::Error::last_os_error);
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    err.map_or(Ok(()), Err)
}

impl Processes for LinuxProcesses {
    fn spawn(
        &self,
        req: &SpawnRequest,
        files: Vec<std::fs::File>,
    ) -> Result<VmmIdentity, HostError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&req.log)
            .map_err(|e| HostError::io("opening", &req.log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HostError::io("opening", &req.log, e))?;
        let cgroup_procs = req
            .cgroup
            .iter()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| HostError::Invalid {
                what: "cgroup path",
                value: format!("{:?}", req.cgroup),
            })?;
        let mut cmd = Command::new(&req.vmm);
        if !cgroup_procs.is_empty() {
            // SAFETY: the closure runs in the forked child before exec and calls
            // only open(2), write(2) and close(2), which are async-signal-safe, on
            // paths allocated before the fork; it allocates nothing. Joining in the
            // child, before exec, means no instruction of the VMM (let alone of its
            // guest) runs outside the cgroup and all memory the VMM maps is charged
            // to it; if joining fails, spawn fails and no VMM runs unlimited.
            // Registered first, so it runs before setsid and before anything that
            // could hide /sys/fs/cgroup from the child.
            unsafe {
                cmd.pre_exec(move || cgroup_procs.iter().try_for_each(|p| join_cgroup(p)));
            }
        }
        cmd.arg("--config")
            .arg(&req.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // setsid(2), which is async-signal-safe. A new session keeps the VMM out of
        // the agent's process group, so signals to the agent (Ctrl-C, kill of the
        // group) do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if !files.is_empty() {
            let fds: Vec<libc::c_int> = files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            // SAFETY: the closure runs in the forked child before exec and calls
            // only fcntl(2) and dup2(2), which are async-signal-safe, on
            // descriptors the parent holds open (`files` lives until spawn
            // returns); it allocates nothing (`fds` was built before the fork).
            unsafe {
                cmd.pre_exec(move || pass_files(&fds));
            }
        }
        let child = cmd.spawn().map_err(|e| {
            if req.cgroup.is_empty() {
                HostError::io("spawning", &req.vmm, e)
            } else {
                HostError::io("spawning (in its cgroup)", &req.vmm, e)
            }
        })?;
        let pid = child.id();
        // The Child handle is dropped without waiting: the VMM is independent of
        // us; is_alive reaps it when it exits while we still run.
        drop(child);
        let (start_ticks, _) = start_ticks(pid).ok_or(HostError::NotOurs(pid))?;
        Ok(VmmIdentity { pid, start_ticks })
    }

    fn is_alive(&self, id: VmmIdentity) -> bool {
        match start_ticks(id.pid) {
            Some((ticks, state)) if ticks == id.start_ticks => {
                if state == 'Z' || state == 'X' {
                    reap(id.pid);
                    false
                } else {
                    true
                }
            }
            _ => false,
        }
    }

    fn kill(&self, id: VmmIdentity) -> Result<(), HostError> {
        if !self.is_alive(id) {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(id.pid).map_err(|_| HostError::NotOurs(id.pid))?;
        // SAFETY: kill(2) has no memory-safety preconditions; the identity check
        // just above makes a reused pid very unlikely.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(HostError::io("killing", format!("pid {}", id.pid), e));
            }
        }
        // Reap it if it was our child, so it does not linger as a zombie.
        for _ in 0..100 {
            if !self.is_alive(id) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }

    fn usage(&self, id: VmmIdentity) -> Option<ProcessUsage> {
        let f = stat_fields(id.pid)?;
        if f.get(22 - 3)?.parse::<u64>().ok()? != id.start_ticks {
            return None;
        }
        let utime: u64 = f.get(14 - 3)?.parse().ok()?;
        let stime: u64 = f.get(15 - 3)?.parse().ok()?;
        let rss_pages: u64 = f.get(24 - 3)?.parse().ok()?;
        Some(ProcessUsage {
            rss_bytes: rss_pages * page_size(),
            cpu_seconds: (utime + stime) as f64 / clock_ticks_per_second(),
        })
    }

    fn exited(&self, id: VmmIdentity) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(exited(id))
    }
}

/// Whether `id` runs: its pid has its start time and has not ended.
fn runs(id: VmmIdentity) -> bool {
    matches!(start_ticks(id.pid), Some((t, s)) if t == id.start_ticks && s != 'Z' && s != 'X')
}

/// Resolves once `id` has exited: a pidfd (which names one process, never a
/// later one with the same pid) becomes readable when the process ends,
/// whether or not it is our child. Polls every second where pidfds are
/// missing (Linux before 5.3).
async fn exited(id: VmmIdentity) {
    let Some(pid) = i32::try_from(id.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty());
    // The pidfd names whatever had this pid when it was opened: if that is
    // the VMM (same start time) and it has not ended, wait on it.
    if !runs(id) {
        return;
    }
    let ready = fd.ok().and_then(|fd| {
        // SAFETY: the AsyncFd owns `fd`, an OwnedFd: it stays open, and
        // `as_raw_fd` returns the same descriptor, until the AsyncFd drops it.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()
    });
    match ready {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => {
            while runs(id) {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &std::path::Path, secs: &str) -> SpawnRequest {
        // A stand-in VMM: a shell script that ignores --config and sleeps.
        let script = dir.join("fake-vmm");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho started \"$@\"\nexec sleep {secs}\n"),
        )
        .unwrap();
        let mut perm = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&script, perm).unwrap();
        SpawnRequest {
            vmm: script,
            config: dir.join("config.json"),
            log: dir.join("vmm.log"),
            cgroup: Vec::new(),
        }
    }

    #[test]
    fn spawned_process_is_found_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let p = LinuxProcesses;
        let id = p.spawn(&sleeper(dir.path(), "30"), Vec::new()).unwrap();
        assert!(p.is_alive(id));
        // Its own session: not in our process group.
        // SAFETY: getpgid/getpgrp have no memory-safety preconditions.
        let (theirs, ours) = unsafe { (libc::getpgid(id.pid as i32), libc::getpgrp()) };
        assert_ne!(theirs, ours);
        // Once the script has run its first command, it has memory of its own;
        // between `exec` dropping the shell's and `sleep` mapping its own the
        // kernel may show none for a moment, so look (bounded) until it does.
        wait_started(dir.path());
        let start = std::time::Instant::now();
        let usage = loop {
            let usage = p.usage(id).expect("usage of a running process");
            if usage.rss_bytes > 0 || start.elapsed() > std::time::Duration::from_secs(10) {
                break usage;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(usage.rss_bytes > 0, "{usage:?}");
        // A different start time is a different process, never ours to kill.
        let other = VmmIdentity {
            pid: id.pid,
            start_ticks: id.start_ticks + 1,
        };
        assert!(!p.is_alive(other));
        assert!(p.usage(other).is_none());
        p.kill(id).unwrap();
        assert!(!p.is_alive(id));
        p.kill(id).unwrap(); // idempotent
        let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap();
        assert!(log.contains("--config"), "{log}");
    }

    /// Waits (at most 10 s) until the stand-in VMM script has run its first command.
    fn wait_started(dir: &std::path::Path) {
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(dir.join("vmm.log"))
            .unwrap_or_default()
            .contains("started")
        {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn an_exit_is_seen_when_it_happens_and_only_for_that_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = LinuxProcesses;
        let id = p.spawn(&sleeper(dir.path(), "30"), Vec::new()).unwrap();
        // Another start time is another process: resolves at once.
        let other = VmmIdentity {
            pid: id.pid,
            start_ticks: id.start_ticks + 1,
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), p.exited(other))
            .await
            .expect("a process that is not the VMM counts as exited");
        let mut exit = p.exited(id);
        // Still running: the future stays pending.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), &mut exit)
                .await
                .is_err()
        );
        p.kill(id).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), exit)
            .await
            .expect("the kill is seen");
        // Once it is gone, a new wait resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), p.exited(id))
            .await
            .expect("a process that ended counts as exited");
    }

    #[test]
    fn passed_files_are_inherited_in_order_and_no_copy_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmm");
        std::fs::write(
            &script,
            "#!/bin/sh\ncat <&3; cat <&4; ls /proc/self/fd | tr '\\n' ' '\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "kernel;").unwrap();
        std::fs::write(&b, "initrd;").unwrap();
        // Opened so that the second source may sit where the first goes.
        let files = vec![
            std::fs::File::open(&a).unwrap(),
            std::fs::File::open(&b).unwrap(),
        ];
        let req = SpawnRequest {
            vmm: script,
            config: dir.path().join("config.json"),
            log: dir.path().join("vmm.log"),
            cgroup: Vec::new(),
        };
        let id = LinuxProcesses.spawn(&req, files).unwrap();
        let start = std::time::Instant::now();
        while LinuxProcesses.is_alive(id) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap();
        assert!(log.starts_with("kernel;initrd;"), "{log}");
        // The copies made on the way (above every source) are not inherited:
        // any other descriptor the child has, this process has too (one it
        // inherited itself without close-on-exec, as from cargo).
        let ours: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for fd in log["kernel;initrd;".len()..].split_whitespace() {
            let n: i32 = fd.parse().unwrap();
            assert!(
                n <= 5 || ours.iter().any(|o| o == fd),
                "fd {n} leaked: {log}"
            );
        }
    }

    #[test]
    fn a_process_that_exits_is_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        let p = LinuxProcesses;
        let id = p.spawn(&sleeper(dir.path(), "0"), Vec::new()).unwrap();
        let start = std::time::Instant::now();
        while p.is_alive(id) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn the_child_joins_its_cgroup_before_exec_or_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file stands in for cgroup.procs: the child writes "0" to it
        // (meaning "me") before the VMM binary runs.
        let procs = dir.path().join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let mut req = sleeper(dir.path(), "0");
        req.cgroup = vec![procs.clone()];
        let id = LinuxProcesses.spawn(&req, Vec::new()).unwrap();
        assert_eq!(std::fs::read_to_string(&procs).unwrap(), "0");
        wait_started(dir.path());
        LinuxProcesses.kill(id).unwrap();
        // A cgroup that cannot be joined: no process at all, and the error says so.
        req.cgroup = vec![dir.path().join("gone/cgroup.procs")];
        let e = LinuxProcesses.spawn(&req, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("in its cgroup"), "{e}");
        let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap();
        assert_eq!(log.matches("started").count(), 1, "{log}");
    }

    #[test]
    fn a_missing_binary_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = sleeper(dir.path(), "0");
        req.vmm = dir.path().join("no-such-vmm");
        let e = LinuxProcesses.spawn(&req, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("no-such-vmm"), "{e}");
    }
}

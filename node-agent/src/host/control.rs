//! VMM control sockets, reached only when the VMM the agent recorded is the
//! one listening.
//!
//! A VM's control socket is `run/ctl.sock`, in the one directory its jailed
//! VMM owns. A compromised VMM could put anything there, such as a link to
//! another VM's socket, and the agent's pause, shutdown or kill would go to
//! the wrong VM. So every connection is made in two guarded steps:
//!
//! 1. `ctl.sock` is opened with `O_PATH | O_NOFOLLOW`: a handle on the entry
//!    itself, never on what a link names. A link, or anything but a socket,
//!    is refused. The agent then connects through `/proc/self/fd/N`, which
//!    reaches exactly the inode it checked: the path is not looked up again,
//!    so swapping the entry after the check gains nothing.
//! 2. After connecting, `SO_PEERCRED` names the process that listens (its
//!    pid and uid as of its `listen(2)`). It must be the recorded VMM: the
//!    recorded pid, still with the recorded start time (not a recycled pid),
//!    and a uid that VMM may have listened with: the agent's own (a VMM binds
//!    its socket before it enters its jail) or its jail's. This is the real
//!    guard: whatever the path leads to, a socket of another VMM has another
//!    pid.
//!
//! On a mismatch nothing is sent and the caller gets
//! [`HostError::ControlSocketMismatch`]. This module does not decide what to
//! do about it (see `reconcile`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use runv_vmm_api::{Request, Response, VmState};

use super::vmm_client::VmmClient;
use super::{Control, ControlTarget, HostError, VmmView};

/// How long one control-socket exchange may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// [`Control`] over the real control sockets, with the checks above.
#[derive(Debug, Default, Clone, Copy)]
pub struct SocketControl;

/// The process listening on the other end of a unix socket, as the kernel
/// recorded it when that process called `listen(2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its pid.
    pub pid: u32,
    /// Its effective uid then.
    pub uid: u32,
}

/// `SO_PEERCRED` of a connected unix socket.
fn peer_cred(s: &UnixStream) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let size = size_of::<libc::ucred>();
    let mut len = libc::socklen_t::try_from(size).map_err(std::io::Error::other)?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a `ucred` on
    // this stack frame whose size `len` holds, and stores the length it wrote
    // in `len`; the fd is the stream's, open for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if usize::try_from(len).ok() != Some(size) {
        return Err(std::io::Error::other("short SO_PEERCRED"));
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
    })
}

/// The agent's effective uid.
fn agent_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `peer` is not the VMM `target` names, if it is not. `agent_uid` is the
/// agent's uid; `start_ticks` gives a running process's start time.
pub fn check_peer(
    target: &ControlTarget,
    peer: PeerCred,
    agent_uid: u32,
    start_ticks: impl Fn(u32) -> Option<u64>,
) -> Result<(), String> {
    if peer.pid != target.vmm.pid {
        return Err(format!(
            "another process listens on it: pid {} (uid {})",
            peer.pid, peer.uid
        ));
    }
    if start_ticks(peer.pid) != Some(target.vmm.start_ticks) {
        return Err(format!(
            "pid {} listens on it, but that pid is no longer the recorded process (gone, or reused)",
            peer.pid
        ));
    }
    if peer.uid != agent_uid && Some(peer.uid) != target.jail_uid {
        let jail = target
            .jail_uid
            .map_or_else(|| "none".to_owned(), |u| u.to_string());
        return Err(format!(
            "pid {} listens on it with uid {}, neither the agent's ({agent_uid}) nor the VM's jail's ({jail})",
            peer.pid, peer.uid
        ));
    }
    Ok(())
}

/// Connects to the control socket of `target`, checked as the module docs
/// say; every later read and write waits at most `timeout`.
pub fn connect(target: &ControlTarget, timeout: Duration) -> Result<VmmClient, HostError> {
    let socket = &target.socket;
    let mismatch = |found_pid, found: String| HostError::ControlSocketMismatch {
        socket: socket.clone(),
        expected_pid: target.vmm.pid,
        found_pid,
        found,
    };
    // A handle on the entry itself: O_PATH opens no file (a socket cannot be
    // opened otherwise) and, with O_NOFOLLOW, a link yields the link.
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(socket)
        .map_err(|e| HostError::io("connecting to", socket, e))?;
    let kind = handle
        .metadata()
        .map_err(|e| HostError::io("connecting to", socket, e))?
        .file_type();
    if kind.is_symlink() {
        return Err(mismatch(None, "it is a symbolic link".into()));
    }
    if !kind.is_socket() {
        return Err(mismatch(None, format!("it is not a socket ({kind:?})")));
    }
    // The magic link reaches the inode behind the handle, without a new lookup.
    let via = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let stream =
        UnixStream::connect(&via).map_err(|e| HostError::io("connecting to", socket, e))?;
    drop(handle);
    let peer = peer_cred(&stream).map_err(|e| HostError::io("SO_PEERCRED of", socket, e))?;
    check_peer(target, peer, agent_uid(), |pid| {
        super::process::start_ticks(pid).map(|(ticks, _)| ticks)
    })
    .map_err(|found| mismatch(Some(peer.pid), found))?;
    VmmClient::from_stream(stream, timeout).map_err(client_error(target))
}

/// A [`HostError::Client`] for a call on `target`'s socket.
fn client_error(target: &ControlTarget) -> impl Fn(super::vmm_client::ClientError) -> HostError {
    |source| HostError::Client {
        socket: target.socket.clone(),
        source,
    }
}

impl Control for SocketControl {
    fn view(&self, target: &ControlTarget) -> Result<VmmView, HostError> {
        let mut c = connect(target, CONTROL_TIMEOUT)?;
        let d = c.describe().map_err(client_error(target))?;
        let counters = c.counters().unwrap_or_default();
        Ok(VmmView {
            paused: d.state == VmState::Paused,
            serial_bytes: counters.get("serial_tx_bytes_total").copied().unwrap_or(0),
            counters,
        })
    }

    fn send(&self, target: &ControlTarget, request: Request) -> Result<(), HostError> {
        let mut c = connect(target, CONTROL_TIMEOUT)?;
        match c.call(&request).map_err(client_error(target))? {
            Response::Error { message } => Err(HostError::io(
                "control socket",
                &target.socket,
                std::io::Error::other(message),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::host::VmmIdentity;
    use crate::host::process::start_ticks;

    /// A stand-in VMM in this test process: answers `pong` to every line and
    /// records the lines it got.
    fn serve(path: &Path) -> Arc<Mutex<Vec<String>>> {
        let l = UnixListener::bind(path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    seen2.lock().unwrap().push(line);
                    let _ = w.write_all(b"{\"kind\":\"pong\"}\n");
                }
            }
        });
        seen
    }

    fn me() -> VmmIdentity {
        let pid = std::process::id();
        VmmIdentity {
            pid,
            start_ticks: start_ticks(pid).unwrap().0,
        }
    }

    fn target(socket: &Path, vmm: VmmIdentity) -> ControlTarget {
        ControlTarget {
            socket: socket.to_owned(),
            vmm,
            jail_uid: None,
        }
    }

    #[test]
    fn the_recorded_vmm_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let seen = serve(&sock);
        let t = target(&sock, me());
        SocketControl.send(&t, Request::Ping).unwrap();
        let mut c = connect(&t, Duration::from_secs(5)).unwrap();
        c.ping().unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
        // No VMM listening is an ordinary error, not a mismatch.
        let gone = target(&dir.path().join("none.sock"), me());
        let e = SocketControl.send(&gone, Request::Ping).unwrap_err();
        assert!(!e.is_control_mismatch(), "{e}");
    }

    #[test]
    fn another_process_listening_is_refused_and_told_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let seen = serve(&sock);
        // The recorded VMM is a child process; this test process listens.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let recorded = VmmIdentity {
            pid: child.id(),
            start_ticks: start_ticks(child.id()).unwrap().0,
        };
        let e = SocketControl
            .send(&target(&sock, recorded), Request::Kill)
            .unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        match &e {
            HostError::ControlSocketMismatch {
                expected_pid,
                found_pid,
                ..
            } => {
                assert_eq!(*expected_pid, recorded.pid);
                assert_eq!(*found_pid, Some(std::process::id()));
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", recorded.pid))
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(seen.lock().unwrap().is_empty(), "a request was sent");
    }

    #[test]
    fn a_link_or_a_non_socket_is_refused_without_connecting() {
        let dir = tempfile::tempdir().unwrap();
        // Another VM's socket, served by this process: the recorded identity
        // would pass the peer check, so only the link check refuses it.
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let theirs = dir.path().join("other/ctl.sock");
        let seen = serve(&theirs);
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let ours = dir.path().join("run/ctl.sock");
        std::os::unix::fs::symlink(&theirs, &ours).unwrap();
        let e = SocketControl
            .send(&target(&ours, me()), Request::Pause)
            .unwrap_err();
        assert!(
            matches!(
                &e,
                HostError::ControlSocketMismatch {
                    found_pid: None,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A regular file is no socket either.
        std::fs::remove_file(&ours).unwrap();
        std::fs::write(&ours, "").unwrap();
        let e = SocketControl.view(&target(&ours, me())).unwrap_err();
        assert!(e.is_control_mismatch(), "{e}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(seen.lock().unwrap().is_empty(), "the other VM was reached");
    }

    #[test]
    fn the_peer_must_be_the_recorded_process_with_a_uid_it_may_have() {
        let vmm = VmmIdentity {
            pid: 40,
            start_ticks: 7,
        };
        let jailed = ControlTarget {
            socket: "/x/run/ctl.sock".into(),
            vmm,
            jail_uid: Some(0x7000_0000),
        };
        let ticks = |pid: u32| (pid == 40).then_some(7);
        let peer = |pid, uid| PeerCred { pid, uid };
        // Listened before its jail (the agent's uid) or after it (the jail's).
        assert!(check_peer(&jailed, peer(40, 0), 0, ticks).is_ok());
        assert!(check_peer(&jailed, peer(40, 0x7000_0000), 0, ticks).is_ok());
        let e = check_peer(&jailed, peer(40, 0x7000_0001), 0, ticks).unwrap_err();
        assert!(e.contains("uid 1879048193"), "{e}");
        assert!(check_peer(&jailed, peer(41, 0), 0, ticks).is_err());
        // The recorded pid, but a later process.
        let e = check_peer(&jailed, peer(40, 0), 0, |_| Some(8)).unwrap_err();
        assert!(e.contains("no longer the recorded process"), "{e}");
        // Unjailed: the agent's uid only.
        let plain = ControlTarget {
            jail_uid: None,
            ..jailed
        };
        assert!(check_peer(&plain, peer(40, 1000), 1000, ticks).is_ok());
        assert!(check_peer(&plain, peer(40, 0x7000_0000), 1000, ticks).is_err());
    }
}

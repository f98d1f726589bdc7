//! The jail: privilege separation inside one process. [`crate::vmm::start`]
//! first opens every host resource the VM needs (kernel and initrd, disk
//! images, the serial file, `/dev/kvm` and the VM/vCPU fds, taps, the bound
//! control, serial and vsock sockets), then calls [`enter`] while the process
//! still has one thread, before any guest code runs and before any seccomp
//! filter is installed:
//!
//! 1. new mount, network and IPC namespaces (`unshare`), every mount made
//!    private so nothing propagates in or out;
//! 2. `chroot` into the jail root (the VM's state directory), `chdir("/")`,
//!    umask 077;
//! 3. no supplementary groups, the given gid, an empty capability bounding
//!    set, the given uid (the kernel clears the effective and permitted
//!    capabilities on the switch from root; the inheritable ones are cleared
//!    explicitly), `no_new_privs`;
//! 4. checks: the ids are the given ones, no capability is left, and root
//!    cannot be regained.
//!
//! Open file descriptors keep working. What the jail does not do: no PID
//! namespace (the VMM starts no processes, and as a uid of its own it can
//! signal no other process, so one would hide nothing), no cgroup (the node
//! agent's job), no `pivot_root` (the host's mounts stay in the private
//! namespace, unreachable outside the chroot). Owns these syscalls only;
//! which paths are used after the jail is the config's business
//! ([`runv_vmm_api::JailConfig::inside`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use runv_vmm_api::JailConfig;

/// Errors entering the jail; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the VMM has {0} threads; the jail must be entered while it has one")]
    Threads(usize),
    #[error("jail step {step}")]
    Step {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("jail check failed")]
    Config(#[source] runv_vmm_api::ConfigError),
    #[error("jail check failed: {0}")]
    Check(String),
}

/// Set once the process's root has changed: from then on, paths are in-jail paths.
static ROOT_CHANGED: AtomicBool = AtomicBool::new(false);

/// Whether this process chrooted into its jail (even if a later step failed).
pub fn entered() -> bool {
    ROOT_CHANGED.load(Ordering::Acquire)
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn step(step: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(JailError::Step {
            step,
            source: std::io::Error::last_os_error(),
        })
    }
}

fn cstring(step: &'static str, path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| JailError::Step {
        step,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })
}

/// Threads of this process, from `/proc/self/task`.
fn thread_count() -> Result<usize, JailError> {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .map_err(|source| JailError::Step {
            step: "counting threads (/proc/self/task)",
            source,
        })
}

fn capabilities() -> Result<[CapData; 2], JailError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads one header and writes two `CapData` (version 3), both
    // of which live on this stack frame with the kernel's layout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    step("capget", if rc == 0 { 0 } else { -1 })?;
    Ok(data)
}

/// Confines the calling process (see the module docs). Call it once, from
/// the only thread. On error the process must end: it may be half-confined.
pub fn enter(jail: &JailConfig) -> Result<(), JailError> {
    jail.validate().map_err(JailError::Config)?;
    // unshare(CLONE_NEWNS) and chroot affect the calling thread's view only
    // once threads exist, and setresuid(2) through glibc must reach them all:
    // a second thread would stay outside the jail.
    let threads = thread_count()?;
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    let root = cstring("chroot", &jail.root)?;
    new_namespaces()?;
    change_root(&root)?;
    drop_privileges(jail)?;
    check_confined(jail)
}

/// Step 1: new mount, network and IPC namespaces, every mount made private.
fn new_namespaces() -> Result<(), JailError> {
    // SAFETY: unshare and mount take no pointers but the NUL-terminated "/" and
    // NULLs, which mount(2) accepts for MS_PRIVATE propagation changes.
    unsafe {
        step(
            "unshare(CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC)",
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC),
        )?;
        step(
            "making mounts private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )
    }
}

/// Step 2: the new root: chroot, `chdir("/")`, umask 077.
fn change_root(root: &CString) -> Result<(), JailError> {
    // SAFETY: `root` and "/" are NUL-terminated strings that outlive the calls.
    unsafe {
        step("chroot", libc::chroot(root.as_ptr()))?;
        ROOT_CHANGED.store(true, Ordering::Release);
        step("chdir(/)", libc::chdir(c"/".as_ptr()))?;
        libc::umask(0o077);
    }
    Ok(())
}

/// Step 3: credentials: groups and gid while still root, then the bounding set
/// (CAP_SETPCAP), then the uid, which drops every remaining capability; the
/// inheritable ones explicitly, and `no_new_privs`.
fn drop_privileges(jail: &JailConfig) -> Result<(), JailError> {
    // SAFETY: setgroups with a count of 0 reads no memory; the set*id calls and
    // prctl take integers only.
    unsafe {
        step("setgroups(0)", libc::setgroups(0, std::ptr::null()))?;
        step("setresgid", libc::setresgid(jail.gid, jail.gid, jail.gid))?;
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                // EINVAL: past the last capability this kernel knows.
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                step("dropping the capability bounding set", -1)?;
            }
        }
        step("setresuid", libc::setresuid(jail.uid, jail.uid, jail.uid))?;
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let empty = [CapData::default(); 2];
    // SAFETY: capset reads one header and two `CapData` (version 3) from this
    // stack frame; lowering capabilities needs no privilege.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            empty.as_ptr(),
        )
    };
    step("capset(none)", if rc == 0 { 0 } else { -1 })?;
    // SAFETY: prctl with integer arguments only.
    step("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}

/// Step 4: checks: the ids are the given ones, no capability is left, and root
/// cannot be regained.
fn check_confined(jail: &JailConfig) -> Result<(), JailError> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three out-pointers are valid locals.
    step("getresuid", unsafe {
        libc::getresuid(&mut r, &mut e, &mut s)
    })?;
    if (r, e, s) != (jail.uid, jail.uid, jail.uid) {
        return Err(JailError::Check(format!("uids are {r}/{e}/{s}")));
    }
    // SAFETY: as above.
    step("getresgid", unsafe {
        libc::getresgid(&mut r, &mut e, &mut s)
    })?;
    if (r, e, s) != (jail.gid, jail.gid, jail.gid) {
        return Err(JailError::Check(format!("gids are {r}/{e}/{s}")));
    }
    let caps = capabilities()?;
    if caps
        .iter()
        .any(|c| c.effective != 0 || c.permitted != 0 || c.inheritable != 0)
    {
        return Err(JailError::Check("capabilities remain".into()));
    }
    // SAFETY: setuid takes an integer; it must fail here.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(JailError::Check("root could be regained".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail() -> JailConfig {
        JailConfig {
            root: std::env::temp_dir(),
            uid: 1_879_048_192,
            gid: 1_879_048_192,
        }
    }

    /// The checks that come before any syscall with an effect: a second
    /// thread, or a config that would not confine, is refused with the
    /// process untouched. (Entering for real is `tests/jail.rs`, in the VMM.)
    #[test]
    fn a_process_with_threads_or_a_bad_config_is_refused_untouched() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let e = enter(&jail()).unwrap_err();
        assert!(matches!(e, JailError::Threads(n) if n >= 2), "{e}");
        let mut root_uid = jail();
        root_uid.uid = 0;
        let e = enter(&root_uid).unwrap_err();
        let text = crate::error_chain(&e);
        assert!(text.contains("jail.uid must not be 0"), "{text}");
        assert!(!entered());
        assert_ne!(std::env::current_dir().unwrap(), Path::new("/"));
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
    }
}

//! Seccomp allowlists, as data, applied per thread.
//!
//! Each thread kind gets the syscalls it needs after setup and nothing else; a
//! syscall outside the list fails with EPERM (the thread sees the refusal and
//! the VM ends with a reason rather than a silent kill). This module owns the
//! lists and their compilation; threads call [`Filter::apply`] themselves, at
//! their start, and threads they spawn inherit the filter.
//!
//! [`probe`] is a test hook: with `RUNV_VMM_SECCOMP_PROBE` naming a thread
//! kind in the VMM's environment, that thread tries one syscall no list allows
//! (`getcwd`) right after installing its filter and reports the result on
//! stderr. Only whoever starts the VMM sets its environment; a guest cannot.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Errors from compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the filter")]
    Compile(#[source] seccompiler::Error),
    #[error("installing the filter")]
    Apply(#[source] seccompiler::Error),
}

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: KVM_RUN plus device emulation (serial output, block and
    /// tap I/O, vsock connections, MSIs through the IOAPIC).
    Vcpu,
    /// The main thread once the VM runs: waits for the exit record, flushes
    /// the serial output, writes the exit file, removes the control socket.
    Main,
    /// The control socket's listener and per-client threads (and the
    /// shutdown grace timer they start); also the serial socket's acceptor.
    Control,
    /// The host I/O thread: polls taps and vsock sockets, fills RX queues and
    /// raises the devices' interrupts.
    Io,
}

impl ThreadKind {
    /// The name `RUNV_VMM_SECCOMP_PROBE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Main => "main",
            Self::Control => "control",
            Self::Io => "io",
        }
    }
}

/// Syscalls a vCPU thread makes after setup.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_close,
    // vsock: a guest connection opens a unix stream to the host side; a host
    // connection is accepted on the device's socket.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_epoll_ctl,
];

/// Syscalls every thread makes: memory, locks, time, signals, thread exit.
const COMMON_SYSCALLS: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_close,
    libc::SYS_write,
];

/// Starting a thread (Rust std on glibc): stack, guard page, clone, the new
/// thread's robust list, rseq, name and signal stack.
const SPAWN_SYSCALLS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
];

/// The main thread after the VM started.
const MAIN_SYSCALLS: &[i64] = &[
    // Serial flush to a socket; the exit file (create, write, rename) and
    // removing the control socket.
    libc::SYS_sendto,
    libc::SYS_writev,
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fcntl,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    // Kicking vCPU threads on exit.
    libc::SYS_tgkill,
];

/// The control socket's threads.
const CONTROL_SYSCALLS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_writev,
    libc::SYS_fcntl,
    // FIONBIO, and KVM_SIGNAL_MSI when `shutdown` raises the power button's
    // GED interrupt.
    libc::SYS_ioctl,
    // `try_clone` of a connection, the resident-memory counter, pause kicks.
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_mincore,
    libc::SYS_tgkill,
];

/// The host I/O thread.
const IO_SYSCALLS: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    // KVM_SIGNAL_MSI for the interrupts of RX completions.
    libc::SYS_ioctl,
    libc::SYS_tgkill,
];

/// A compiled filter, ready to install on the calling thread.
#[derive(Debug, Clone)]
pub struct Filter {
    program: BpfProgram,
}

impl Filter {
    /// Compiles the allowlist for `kind`.
    pub fn for_thread(kind: ThreadKind) -> Result<Self, SeccompError> {
        Self::from_list(&allowlist(kind))
    }

    /// Compiles an allowlist of syscall numbers.
    pub fn from_list(list: &[i64]) -> Result<Self, SeccompError> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            list.iter().map(|&n| (n, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| SeccompError::Compile(e.into()))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.into()))?;
        Ok(Self { program })
    }

    /// Installs the filter on the calling thread (and threads it later creates).
    pub fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.program).map_err(SeccompError::Apply)
    }
}

/// The allowlist of `kind`.
pub fn allowlist(kind: ThreadKind) -> Vec<i64> {
    let mut list: Vec<i64> = match kind {
        ThreadKind::Vcpu => VCPU_SYSCALLS.to_vec(),
        ThreadKind::Main => [COMMON_SYSCALLS, MAIN_SYSCALLS].concat(),
        ThreadKind::Control => [COMMON_SYSCALLS, SPAWN_SYSCALLS, CONTROL_SYSCALLS].concat(),
        ThreadKind::Io => [COMMON_SYSCALLS, IO_SYSCALLS].concat(),
    };
    list.sort_unstable();
    list.dedup();
    list
}

/// Installs `filter` (if any) on the calling thread of kind `kind`, then runs
/// the test probe for it (see the module docs).
pub fn enter(kind: ThreadKind, filter: Option<&Filter>) -> Result<(), SeccompError> {
    if let Some(f) = filter {
        f.apply()?;
    }
    probe(kind);
    Ok(())
}

/// The test hook: if `RUNV_VMM_SECCOMP_PROBE` names `kind`, try `getcwd(2)`
/// (on no allowlist) and report on stderr whether it was refused.
pub fn probe(kind: ThreadKind) {
    let Some(wanted) = std::env::var_os("RUNV_VMM_SECCOMP_PROBE") else {
        return;
    };
    if !wanted
        .to_string_lossy()
        .split(',')
        .any(|k| k == kind.name())
    {
        return;
    }
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for the length passed; getcwd writes at most that.
    let rc = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
    let what = if rc < 0 {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => "refused (EPERM)".to_string(),
            e => format!("failed with errno {e:?}"),
        }
    } else {
        "allowed".to_string()
    };
    eprintln!(
        "runv-vmm: seccomp probe: {} thread: getcwd {what}",
        kind.name()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syscall_outside_the_vcpu_list_is_refused() {
        let f = Filter::for_thread(ThreadKind::Vcpu).unwrap();
        let (allowed, refused) = std::thread::spawn(move || {
            f.apply().unwrap();
            // getpid is on the list.
            // SAFETY: getpid has no arguments and no side effects.
            let pid = unsafe { libc::getpid() };
            // openat(2) is not on the vCPU list: a vCPU thread opens no files.
            let path = c"/dev/null";
            // SAFETY: `path` is a valid NUL-terminated string; a returned fd is leaked
            // only if the filter failed, which the assert below reports.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            (pid > 0, (fd, errno))
        })
        .join()
        .unwrap();
        assert!(allowed);
        assert_eq!(refused, (-1, Some(libc::EPERM)));
        // The filter stayed on that thread: this one can still open files.
        assert!(std::fs::File::open("/dev/null").is_ok());
    }

    /// `syscall(nr)` with harmless arguments on a thread running `kind`'s
    /// filter: the errno it failed with, or None.
    fn errno_under(kind: ThreadKind, nr: i64) -> Option<i32> {
        let f = Filter::for_thread(kind).unwrap();
        std::thread::spawn(move || {
            f.apply().unwrap();
            let mut buf = [0u8; 64];
            // SAFETY: each probed syscall gets a writable buffer and its length (or
            // a NULL path for the *at calls, which then fail with EFAULT if allowed).
            let rc = unsafe { libc::syscall(nr, buf.as_mut_ptr(), buf.len()) };
            (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        })
        .join()
        .unwrap()
    }

    #[test]
    fn every_thread_kind_refuses_what_its_list_leaves_out() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Main,
            ThreadKind::Control,
            ThreadKind::Io,
        ] {
            assert_eq!(
                errno_under(kind, libc::SYS_getcwd),
                Some(libc::EPERM),
                "{kind:?}"
            );
            assert!(!allowlist(kind).contains(&libc::SYS_execve), "{kind:?}");
        }
        // Only the main thread opens files (the exit file).
        for kind in [ThreadKind::Vcpu, ThreadKind::Control, ThreadKind::Io] {
            assert!(!allowlist(kind).contains(&libc::SYS_openat), "{kind:?}");
        }
        assert!(allowlist(ThreadKind::Main).contains(&libc::SYS_openat));
        // Only the control threads start threads (clients, the grace timer).
        for kind in [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::Io] {
            assert!(!allowlist(kind).contains(&libc::SYS_clone3), "{kind:?}");
        }
        // gettid is on every list and still works under the filter.
        for kind in [ThreadKind::Main, ThreadKind::Control, ThreadKind::Io] {
            assert_eq!(errno_under(kind, libc::SYS_gettid), None, "{kind:?}");
        }
    }
}

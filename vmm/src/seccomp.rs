//! Seccomp allowlists, as data, applied per thread.
//!
//! Each thread kind gets the syscalls it needs after setup and nothing else; a
//! syscall outside the list fails with EPERM (the thread sees the refusal and
//! the VM ends with a reason rather than a silent kill). This module owns the
//! lists and their compilation; threads call [`Filter::apply`] themselves, at
//! their start, and threads they spawn inherit the filter.
//!
//! A few syscalls are allowed only with certain arguments ([`ARG_RULES`]):
//! `clone` only with the flags of a new thread, so no thread, whatever a
//! guest makes it do, starts a process or enters a new namespace. `clone3`
//! takes its flags behind a pointer a filter cannot read, so every filter
//! answers it ENOSYS first (as Firecracker, Cloud Hypervisor and Chromium
//! do): glibc (2.34 and later tries `clone3` first) then falls back to
//! `clone`, whose flags the filter checks.
//!
//! [`probe`] is a test hook: with `RUNV_VMM_SECCOMP_PROBE` naming a thread
//! kind in the VMM's environment, that thread tries one syscall no list allows
//! (`getcwd`) and a fork (`clone` without `CLONE_THREAD`) right after
//! installing its filter and reports the results on stderr. Only whoever
//! starts the VMM sets its environment; a guest cannot.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

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
    // Rotating the serial log file (with pread64/pwrite64 above).
    libc::SYS_ftruncate,
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

/// Starting a thread (Rust std on glibc): stack, guard page, clone (with a
/// new thread's flags only: see [`ARG_RULES`]), the new thread's robust list,
/// rseq, name and signal stack.
const SPAWN_SYSCALLS: &[i64] = &[
    libc::SYS_clone,
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
    // The last serial flush may rotate the log file.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
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

/// The `clone` flags of a new thread, exactly as glibc's `pthread_create`
/// passes them (and Rust's `std::thread` through it): one address space,
/// filesystem info, file table, signal handlers and SysV semaphore undo list
/// with its creator, in its thread group, with its own TLS and the tid
/// futexes; no exit signal. musl adds `CLONE_DETACHED`, which the kernel
/// ignores (see [`CLONE_IGNORED`]).
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// `clone` flags a thread creation may carry or not: `CLONE_DETACHED`
/// (musl's), which the kernel has ignored since 2.6.
const CLONE_IGNORED: u64 = libc::CLONE_DETACHED as u64;

/// A syscall allowed only when one argument, masked, has one value.
#[derive(Debug, Clone, Copy)]
struct ArgRule {
    /// The syscall.
    nr: i64,
    /// Which argument (0-based).
    arg: u8,
    /// The bits compared.
    mask: u64,
    /// The value they must have.
    value: u64,
}

/// Syscalls that, wherever a list allows them, are allowed only with these
/// arguments; any other call fails with EPERM.
const ARG_RULES: &[ArgRule] = &[
    // clone(flags, ...): a new thread, never a process (no CLONE_THREAD, an
    // exit signal, CLONE_VFORK, CLONE_PARENT) nor a namespace (CLONE_NEW*).
    ArgRule {
        nr: libc::SYS_clone,
        arg: 0,
        mask: !CLONE_IGNORED,
        value: THREAD_CLONE_FLAGS,
    },
];

/// Syscalls every filter answers with ENOSYS before its allowlist is
/// consulted, so that libc falls back to a call the allowlist can check:
/// `clone3` (its flags are behind a pointer) falls back to `clone`.
const ENOSYS_SYSCALLS: &[i64] = &[libc::SYS_clone3];

// The prologue's jumps are 8-bit offsets.
const _: () = assert!(ENOSYS_SYSCALLS.len() < 100);

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

    /// Compiles an allowlist of syscall numbers (those in [`ARG_RULES`]
    /// allowed only with their arguments), behind the ENOSYS answers of
    /// [`ENOSYS_SYSCALLS`].
    pub fn from_list(list: &[i64]) -> Result<Self, SeccompError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for &nr in list {
            let mut conditions = Vec::new();
            for r in ARG_RULES.iter().filter(|r| r.nr == nr) {
                conditions.push(
                    SeccompCondition::new(
                        r.arg,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(r.mask),
                        r.value,
                    )
                    .map_err(|e| SeccompError::Compile(e.into()))?,
                );
            }
            let chain = if conditions.is_empty() {
                Vec::new()
            } else {
                vec![SeccompRule::new(conditions).map_err(|e| SeccompError::Compile(e.into()))?]
            };
            rules.insert(nr, chain);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| SeccompError::Compile(e.into()))?;
        let allowlist: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.into()))?;
        let mut program = enosys_prologue(ENOSYS_SYSCALLS);
        program.extend(allowlist);
        Ok(Self { program })
    }

    /// Installs the filter on the calling thread (and threads it later creates).
    pub fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.program).map_err(SeccompError::Apply)
    }
}

/// BPF that answers each syscall of `nrs` (on x86_64) with ENOSYS and falls
/// through to the instruction after it for every other call. The program
/// that follows starts over (it loads the architecture and the number
/// itself), so this needs nothing from its layout.
fn enosys_prologue(nrs: &[i64]) -> BpfProgram {
    // struct seccomp_data: int nr at offset 0, __u32 arch at offset 4.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let load = |k| sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k| sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let enosys = u32::from(SeccompAction::Errno(libc::ENOSYS as u32));
    // Per syscall: compare, and on a match return ENOSYS (the next
    // instruction); else skip that return.
    let mut body = Vec::new();
    for &nr in nrs {
        body.push(jeq(u32::try_from(nr).unwrap_or(u32::MAX), 0, 1));
        body.push(ret(enosys));
    }
    // Another architecture skips the whole prologue: the allowlist refuses it.
    let skip = u8::try_from(body.len() + 1).unwrap_or(u8::MAX);
    let mut program = vec![load(ARCH), jeq(AUDIT_ARCH_X86_64, 0, skip), load(NR)];
    program.extend(body);
    program
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
    eprintln!(
        "runv-vmm: seccomp probe: {} thread: getcwd {}",
        kind.name(),
        outcome(rc)
    );
    eprintln!(
        "runv-vmm: seccomp probe: {} thread: fork {}",
        kind.name(),
        outcome(clone_and_reap(libc::SIGCHLD as u64))
    );
}

/// How a probed syscall that returned `rc` went, for the probe's report.
fn outcome(rc: libc::c_long) -> String {
    if rc < 0 {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => "refused (EPERM)".to_string(),
            e => format!("failed with errno {e:?}"),
        }
    } else {
        "allowed".to_string()
    }
}

/// Calls `clone(flags)` with a NULL stack and no other argument: with
/// `SIGCHLD` alone, a `fork(2)`. A child, if one starts, exits at once and is
/// reaped (where the filter allows waiting). Returns clone's result.
///
/// `flags` must not hold `CLONE_VM` unless the kernel refuses the call
/// anyway (as it does `CLONE_FS` with `CLONE_NEWNS` or `CLONE_NEWUSER`): a
/// child sharing this address space and stack could not run here.
fn clone_and_reap(flags: u64) -> libc::c_long {
    // SAFETY: per the contract above, the call either fails or is a fork:
    // the child runs on a copy of this address space and stack and calls
    // only _exit(2) below; the parent is unaffected.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if rc == 0 {
        // SAFETY: in the child: ends it at once, running no destructor,
        // atexit handler or stdio flush of the parent's state.
        unsafe { libc::_exit(0) };
    }
    if let Ok(pid) = libc::pid_t::try_from(rc)
        && pid > 0
    {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is the child just started.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    rc
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

    const ALL_KINDS: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Main,
        ThreadKind::Control,
        ThreadKind::Io,
    ];

    #[test]
    fn every_thread_kind_refuses_what_its_list_leaves_out() {
        for kind in ALL_KINDS {
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
        // Only the control threads start threads (clients, the grace timer),
        // and clone3 is on no list (see ENOSYS_SYSCALLS).
        for kind in [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::Io] {
            assert!(!allowlist(kind).contains(&libc::SYS_clone), "{kind:?}");
        }
        for kind in ALL_KINDS {
            assert!(!allowlist(kind).contains(&libc::SYS_clone3), "{kind:?}");
        }
        // gettid is on every list and still works under the filter.
        for kind in [ThreadKind::Main, ThreadKind::Control, ThreadKind::Io] {
            assert_eq!(errno_under(kind, libc::SYS_gettid), None, "{kind:?}");
        }
    }

    /// `clone(flags)` as [`clone_and_reap`] makes it: the errno it failed
    /// with, or `None` when it started a child (which exited at once).
    fn clone_errno(flags: u64) -> Option<i32> {
        let rc = clone_and_reap(flags);
        (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// New namespaces for a thread: the kernel refuses both beside CLONE_FS
    /// (EINVAL), so these calls start nothing wherever they get through.
    const NAMESPACED_THREADS: [u64; 2] = [
        THREAD_CLONE_FLAGS | libc::CLONE_NEWNS as u64,
        THREAD_CLONE_FLAGS | libc::CLONE_NEWUSER as u64,
    ];

    #[test]
    fn the_control_filter_lets_threads_start_and_no_process_or_namespace() {
        // Unfiltered, the kernel itself judges the namespaced clones: EINVAL.
        for flags in NAMESPACED_THREADS {
            assert_eq!(clone_errno(flags), Some(libc::EINVAL), "{flags:#x}");
        }
        let f = Filter::for_thread(ThreadKind::Control).unwrap();
        let (thread, fork, raw_fork, namespaced) = std::thread::spawn(move || {
            f.apply().unwrap();
            // glibc tries clone3 (ENOSYS), then clone with the thread flags.
            let thread = std::thread::spawn(|| 7).join().ok();
            // glibc's fork: clone(CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD).
            // SAFETY: a child, if the filter let one start, only calls _exit(2).
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: in the child: ends it at once.
                unsafe { libc::_exit(0) };
            }
            let fork = (pid, std::io::Error::last_os_error().raw_os_error());
            let raw_fork = clone_errno(libc::SIGCHLD as u64);
            let namespaced: Vec<Option<i32>> =
                NAMESPACED_THREADS.iter().map(|f| clone_errno(*f)).collect();
            (thread, fork, raw_fork, namespaced)
        })
        .join()
        .unwrap();
        assert_eq!(thread, Some(7), "a thread starts under the filter");
        assert_eq!(fork, (-1, Some(libc::EPERM)), "fork(3)");
        assert_eq!(raw_fork, Some(libc::EPERM), "clone(SIGCHLD)");
        assert_eq!(
            namespaced,
            [Some(libc::EPERM); 2],
            "the filter, not the kernel, refused"
        );
    }

    #[test]
    fn threads_of_the_other_kinds_start_nothing() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::Io] {
            let f = Filter::for_thread(kind).unwrap();
            let (thread, fork) = std::thread::spawn(move || {
                f.apply().unwrap();
                let thread = std::thread::Builder::new().spawn(|| 7).is_ok();
                (thread, clone_errno(libc::SIGCHLD as u64))
            })
            .join()
            .unwrap();
            assert!(!thread, "{kind:?} started a thread");
            assert_eq!(fork, Some(libc::EPERM), "{kind:?}");
        }
    }

    /// The errno of `clone3` with a zero size (the kernel refuses that size
    /// with EINVAL, so nothing starts even where the call reaches it).
    fn clone3_errno() -> Option<i32> {
        // SAFETY: a NULL clone_args with size 0: the kernel reads nothing.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    #[test]
    fn clone3_is_answered_enosys_on_every_thread_kind() {
        // No filter: the kernel itself looks at it (and refuses size 0).
        assert_eq!(clone3_errno(), Some(libc::EINVAL));
        for kind in ALL_KINDS {
            let f = Filter::for_thread(kind).unwrap();
            let errno = std::thread::spawn(move || {
                f.apply().unwrap();
                clone3_errno()
            })
            .join()
            .unwrap();
            assert_eq!(errno, Some(libc::ENOSYS), "{kind:?}");
        }
    }
}

//! vCPU threads: run a [`Vcpu`] and route its exits to the buses.
//!
//! Owns the exit → outcome mapping (which exits end the VM and with what
//! reason) and the signal used to kick threads out of KVM_RUN. Guest-caused
//! conditions never panic here: they end in an exit record.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use runv_vmm_api::ExitReason;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::devices::ioapic::Ioapic;
use crate::devices::{Bus, GuestEvent, Unmapped, lock};
use crate::kvm::{KvmError, Vcpu, VcpuExit};
use crate::state::{Kicker, Shared};

/// Signal number (relative to SIGRTMIN) used to kick vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// The buses a vCPU dispatches to.
#[derive(Debug, Clone)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
    /// The userspace IOAPIC, told about the guest's EOIs of level vectors.
    pub ioapic: Option<Arc<std::sync::Mutex<Ioapic>>>,
}

/// Counters every vCPU thread bumps.
#[derive(Debug, Clone)]
struct ExitCounters {
    exits: Arc<AtomicU64>,
    io: Arc<AtomicU64>,
    mmio: Arc<AtomicU64>,
    unhandled: Arc<AtomicU64>,
}

/// Installs the no-op kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, noop)
}

/// Kicks vCPU threads with a real-time signal so KVM_RUN returns EINTR.
///
/// It keeps the threads' join handles: a thread that is neither joined nor
/// detached keeps its id valid after it returns (a vCPU thread returns once
/// the VM ends, while others may still kick).
#[derive(Debug, Default)]
pub struct SignalKicker {
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl SignalKicker {
    pub fn add(&self, h: JoinHandle<()>) {
        lock(&self.threads).push(h);
    }
}

impl Kicker for SignalKicker {
    fn kick_all(&self) {
        for h in lock(&self.threads).iter() {
            // SAFETY: the id is of a thread we spawned whose handle `self` holds, so
            // it is never joined or detached and the id stays valid even after the
            // thread returned. The signal has a no-op handler, installed before any
            // vCPU thread starts.
            unsafe {
                libc::pthread_kill(h.as_pthread_t(), SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
        }
    }
}

/// What one exit means for the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Park,
    Exit(ExitReason, String),
}

fn event_outcome(ev: Option<GuestEvent>) -> Outcome {
    match ev {
        None => Outcome::Continue,
        Some(GuestEvent::PowerOff) => {
            Outcome::Exit(ExitReason::PowerOff, "guest powered off".into())
        }
        Some(GuestEvent::Reset) => {
            Outcome::Exit(ExitReason::Reset, "guest requested a reset".into())
        }
        Some(GuestEvent::Panic) => {
            Outcome::Exit(ExitReason::GuestPanic, "guest panicked (pvpanic)".into())
        }
        Some(GuestEvent::DeviceFault(msg)) => Outcome::Exit(ExitReason::GuestFault, msg),
    }
}

/// Maps one exit to an outcome, performing the device access it asks for.
pub fn dispatch(exit: VcpuExit<'_>, buses: &Buses, unhandled: &AtomicU64) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                unhandled.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Continue
        }
        VcpuExit::IoOut(port, data) => match buses.pio.write(u64::from(port), data) {
            Ok(ev) => event_outcome(ev),
            Err(Unmapped) => {
                unhandled.fetch_add(1, Ordering::Relaxed);
                Outcome::Continue
            }
        },
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0);
                unhandled.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => match buses.mmio.write(addr, data) {
            Ok(ev) => event_outcome(ev),
            Err(Unmapped) => {
                unhandled.fetch_add(1, Ordering::Relaxed);
                Outcome::Continue
            }
        },
        VcpuExit::IoapicEoi(vector) => {
            if let Some(a) = &buses.ioapic {
                lock(a).end_of_interrupt(vector);
            }
            Outcome::Continue
        }
        VcpuExit::Interrupted => Outcome::Continue,
        VcpuExit::Hlt => Outcome::Park,
        VcpuExit::Shutdown => Outcome::Exit(
            ExitReason::TripleFault,
            "guest triple-faulted (KVM shutdown exit)".into(),
        ),
        VcpuExit::PowerOff => Outcome::Exit(ExitReason::PowerOff, "guest powered off".into()),
        VcpuExit::Reset => Outcome::Exit(ExitReason::Reset, "guest requested a reset".into()),
        VcpuExit::Crash => Outcome::Exit(ExitReason::GuestPanic, "guest crashed".into()),
        VcpuExit::InternalError { suberror } => {
            // KVM_INTERNAL_ERROR_EMULATION
            if suberror == 1 {
                Outcome::Exit(
                    ExitReason::EmulationFailure,
                    "KVM could not emulate an instruction".into(),
                )
            } else {
                Outcome::Exit(
                    ExitReason::InternalError,
                    format!("KVM internal error, suberror {suberror}"),
                )
            }
        }
        VcpuExit::FailEntry { reason } => Outcome::Exit(
            ExitReason::InternalError,
            format!("VM entry failed, hardware reason {reason:#x}"),
        ),
        VcpuExit::Other(what) => Outcome::Exit(
            ExitReason::EmulationFailure,
            format!("unhandled vCPU exit {what}"),
        ),
    }
}

fn describe_rip(vcpu: &Vcpu) -> String {
    match vcpu.regs() {
        Ok(r) => format!(" (vCPU {} rip {:#x})", vcpu.id(), r.rip),
        Err(_) => String::new(),
    }
}

fn run_loop(mut vcpu: Vcpu, buses: Buses, shared: Arc<Shared>, c: ExitCounters) {
    while shared.vcpu_checkpoint() {
        let outcome = match vcpu.run() {
            Ok(exit) => {
                c.exits.fetch_add(1, Ordering::Relaxed);
                match &exit {
                    VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => {
                        c.io.fetch_add(1, Ordering::Relaxed)
                    }
                    VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => {
                        c.mmio.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => 0,
                };
                dispatch(exit, &buses, &c.unhandled)
            }
            Err(KvmError::Run(e)) => {
                Outcome::Exit(ExitReason::InternalError, format!("KVM_RUN failed: {e}"))
            }
            Err(e) => Outcome::Exit(ExitReason::VmmError, crate::error_chain(&e)),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Park => {
                shared.park_until_exit();
                return;
            }
            Outcome::Exit(reason, msg) => {
                let msg = if reason.exit_code() != 0 {
                    format!("{msg}{}", describe_rip(&vcpu))
                } else {
                    msg
                };
                shared.request_exit(reason, msg);
                return;
            }
        }
    }
}

/// Starts the thread for `vcpu`; `seccomp` is applied inside it before the first run.
pub fn spawn(
    vcpu: Vcpu,
    buses: Buses,
    shared: Arc<Shared>,
    seccomp: Option<crate::seccomp::Filter>,
) -> std::io::Result<JoinHandle<()>> {
    let c = ExitCounters {
        exits: shared.counters.get("vcpu_exits_total"),
        io: shared.counters.get("vcpu_io_exits_total"),
        mmio: shared.counters.get("vcpu_mmio_exits_total"),
        unhandled: shared.counters.get("vcpu_unhandled_accesses_total"),
    };
    std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id()))
        .stack_size(256 << 10)
        .spawn(move || {
            if let Err(e) =
                crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu, seccomp.as_ref())
            {
                let e = crate::error_chain(&e);
                shared.request_exit(ExitReason::VmmError, format!("seccomp: {e}"));
                return;
            }
            run_loop(vcpu, buses, shared, c)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_exits_map_to_non_zero_reasons() {
        let buses = Buses {
            pio: Bus::new(),
            mmio: Bus::new(),
            ioapic: None,
        };
        let u = AtomicU64::new(0);
        let Outcome::Exit(r, _) = dispatch(VcpuExit::Shutdown, &buses, &u) else {
            panic!()
        };
        assert_eq!(r, ExitReason::TripleFault);
        let Outcome::Exit(r, _) = dispatch(VcpuExit::InternalError { suberror: 1 }, &buses, &u)
        else {
            panic!()
        };
        assert_eq!(r, ExitReason::EmulationFailure);
        let Outcome::Exit(r, _) = dispatch(VcpuExit::InternalError { suberror: 3 }, &buses, &u)
        else {
            panic!()
        };
        assert_eq!(r, ExitReason::InternalError);
        assert_eq!(dispatch(VcpuExit::Hlt, &buses, &u), Outcome::Park);
    }

    #[test]
    fn an_ioapic_eoi_exit_clears_remote_irr() {
        use crate::devices::ioapic::{Msi, MsiSink, PINS};
        struct Quiet;
        impl MsiSink for Quiet {
            fn signal(&self, _: Msi) {}
            fn routes_changed(&self, _: &[Option<Msi>; PINS]) {}
        }
        let ioapic = Arc::new(std::sync::Mutex::new(Ioapic::new(Box::new(Quiet))));
        let mut mmio = Bus::new();
        mmio.insert(0xfec0_0000, 0x1000, ioapic.clone()).unwrap();
        let buses = Buses {
            pio: Bus::new(),
            mmio,
            ioapic: Some(ioapic.clone()),
        };
        let u = AtomicU64::new(0);
        // Pin 9: vector 0x33, level; asserted, so remote IRR is set.
        let (reg, v) = (0x10u32 + 18, 0x33u32 | 1 << 15);
        buses.mmio.write(0xfec0_0000, &reg.to_le_bytes()).unwrap();
        buses.mmio.write(0xfec0_0010, &v.to_le_bytes()).unwrap();
        lock(&ioapic).assert(9);
        lock(&ioapic).lower(9);
        assert_ne!(lock(&ioapic).entry(9).unwrap() & (1 << 14), 0);
        assert_eq!(
            dispatch(VcpuExit::IoapicEoi(0x33), &buses, &u),
            Outcome::Continue
        );
        assert_eq!(lock(&ioapic).entry(9).unwrap() & (1 << 14), 0);
    }

    #[test]
    fn unmapped_accesses_are_counted_not_fatal() {
        let buses = Buses {
            pio: Bus::new(),
            mmio: Bus::new(),
            ioapic: None,
        };
        let u = AtomicU64::new(0);
        let mut d = [0u8; 4];
        assert_eq!(
            dispatch(VcpuExit::IoIn(0x80, &mut d), &buses, &u),
            Outcome::Continue
        );
        assert_eq!(d, [0xff; 4]);
        assert_eq!(
            dispatch(VcpuExit::MmioWrite(0x1000, &[1]), &buses, &u),
            Outcome::Continue
        );
        let mut d = [1u8; 8];
        assert_eq!(
            dispatch(VcpuExit::MmioRead(0x1000, &mut d), &buses, &u),
            Outcome::Continue
        );
        assert_eq!(d, [0; 8]);
        assert_eq!(u.load(Ordering::Relaxed), 3);
    }
}

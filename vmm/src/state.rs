//! State shared by the vCPU threads, the control socket and the main thread:
//! run/pause state, the one exit record, the power button and counters.
//!
//! Owns the pause protocol (set state, kick vCPUs, wait until all are parked)
//! and the "first exit wins" rule. It issues no KVM ioctls itself (pressing
//! the power button raises the GED interrupt through the device's line).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use runv_vmm_api::{ExitReason, ExitRecord, VmState};

use crate::counters::Counters;
use crate::devices::lock;
use crate::devices::power::PowerButton;

/// Wakes a vCPU thread out of KVM_RUN (a signal in the real VMM).
pub trait Kicker: Send + Sync {
    fn kick_all(&self);
}

/// The shared state of one VM.
pub struct Shared {
    pub started: Instant,
    pub counters: Counters,
    pub power_button: Arc<PowerButton>,
    vcpus: usize,
    state: Mutex<VmState>,
    state_cv: Condvar,
    parked: AtomicUsize,
    exit: Mutex<Option<ExitRecord>>,
    exit_cv: Condvar,
    kicker: Mutex<Option<Arc<dyn Kicker>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("vcpus", &self.vcpus)
            .field("state", &*lock(&self.state))
            .finish()
    }
}

/// How long `pause` waits for every vCPU to park before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Shared {
    pub fn new(vcpus: usize) -> Self {
        Self::with_counters(vcpus, Counters::default())
    }

    /// Like [`Shared::new`] with counters that devices already hold.
    pub fn with_counters(vcpus: usize, counters: Counters) -> Self {
        Self {
            started: Instant::now(),
            counters,
            power_button: Arc::new(PowerButton::new()),
            vcpus,
            state: Mutex::new(VmState::Running),
            state_cv: Condvar::new(),
            parked: AtomicUsize::new(0),
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
            kicker: Mutex::new(None),
        }
    }

    pub fn set_kicker(&self, k: Arc<dyn Kicker>) {
        *lock(&self.kicker) = Some(k);
    }

    fn kick(&self) {
        if let Some(k) = lock(&self.kicker).clone() {
            k.kick_all();
        }
    }

    pub fn state(&self) -> VmState {
        *lock(&self.state)
    }

    /// Records why the VM ends; the first record wins. Wakes everybody.
    pub fn request_exit(&self, reason: ExitReason, message: impl Into<String>) {
        {
            let mut e = lock(&self.exit);
            if e.is_none() {
                *e = Some(ExitRecord::new(reason, message));
            }
        }
        self.exit_cv.notify_all();
        self.state_cv.notify_all();
        self.kick();
    }

    pub fn exiting(&self) -> bool {
        lock(&self.exit).is_some()
    }

    /// Blocks until some thread requested an exit, or `timeout` passes.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitRecord> {
        let g = lock(&self.exit);
        let (g, _) = self
            .exit_cv
            .wait_timeout_while(g, timeout, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.clone()
    }

    /// Stops all vCPUs; returns once each is parked (or errs after a timeout).
    pub fn pause(&self) -> Result<(), String> {
        {
            let mut s = lock(&self.state);
            if *s == VmState::Paused {
                return Ok(());
            }
            *s = VmState::Paused;
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while self.parked.load(Ordering::Acquire) < self.vcpus {
            if self.exiting() {
                return Err("VM is exiting".into());
            }
            if Instant::now() > deadline {
                return Err("vCPUs did not stop in time".into());
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Marks the VM paused before its vCPU threads start: each parks at its
    /// first checkpoint, before its first `KVM_RUN`, until [`Shared::resume`].
    pub fn start_paused(&self) {
        *lock(&self.state) = VmState::Paused;
    }

    pub fn resume(&self) {
        let mut s = lock(&self.state);
        if *s == VmState::Paused {
            *s = VmState::Running;
        }
        drop(s);
        self.state_cv.notify_all();
    }

    /// Asks the guest to power off (presses the power button: port 0x601 and
    /// the GED interrupt) and marks the VM.
    pub fn press_power_button(&self) {
        self.power_button.press();
        let mut s = lock(&self.state);
        if *s == VmState::Running {
            *s = VmState::ShuttingDown;
        }
    }

    /// Called by a vCPU thread between runs: parks while paused. Returns false
    /// when the VM is exiting and the thread should end.
    pub fn vcpu_checkpoint(&self) -> bool {
        let mut s = lock(&self.state);
        if *s == VmState::Paused {
            self.parked.fetch_add(1, Ordering::AcqRel);
            while *s == VmState::Paused && !self.exiting() {
                s = self.state_cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::AcqRel);
        }
        drop(s);
        !self.exiting()
    }

    /// Parks a vCPU that has nothing to run (halted with no interrupt source)
    /// until the VM exits.
    pub fn park_until_exit(&self) {
        self.parked.fetch_add(1, Ordering::AcqRel);
        let g = lock(&self.exit);
        let _g = self
            .exit_cv
            .wait_while(g, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKick;
    impl Kicker for NoKick {
        fn kick_all(&self) {}
    }

    #[test]
    fn first_exit_wins() {
        let s = Shared::new(1);
        s.request_exit(ExitReason::TripleFault, "a");
        s.request_exit(ExitReason::PowerOff, "b");
        let r = s.wait_exit(Duration::from_millis(1)).unwrap();
        assert_eq!(r.reason, ExitReason::TripleFault);
        assert!(!s.vcpu_checkpoint());
    }

    #[test]
    fn a_vm_started_paused_runs_nothing_until_resumed() {
        let s = Arc::new(Shared::new(1));
        s.set_kicker(Arc::new(NoKick));
        s.start_paused();
        let runs = Arc::new(AtomicUsize::new(0));
        let t = {
            let (s, runs) = (s.clone(), runs.clone());
            std::thread::spawn(move || {
                while s.vcpu_checkpoint() {
                    runs.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        s.pause().unwrap(); // idempotent
        assert_eq!(
            (s.state(), runs.load(Ordering::Relaxed)),
            (VmState::Paused, 0)
        );
        s.resume();
        let start = Instant::now();
        while runs.load(Ordering::Relaxed) == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "never ran");
            std::thread::yield_now();
        }
        assert_eq!(s.state(), VmState::Running);
        s.request_exit(ExitReason::Killed, "test");
        t.join().unwrap();
    }

    #[test]
    fn pause_waits_for_vcpus_to_park_and_resume_releases_them() {
        let s = Arc::new(Shared::new(2));
        s.set_kicker(Arc::new(NoKick));
        let runs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (s, runs) = (s.clone(), runs.clone());
                std::thread::spawn(move || {
                    while s.vcpu_checkpoint() {
                        runs.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        s.pause().unwrap();
        assert_eq!(s.state(), VmState::Paused);
        let before = runs.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::Relaxed), before, "paused vCPUs ran");
        s.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(runs.load(Ordering::Relaxed) > before);
        s.request_exit(ExitReason::Killed, "test");
        for t in threads {
            t.join().unwrap();
        }
    }
}

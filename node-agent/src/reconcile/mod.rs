//! The agent's decisions, as pure functions: desired state (a MicroVM spec and
//! its generation) against observed state (is a VMM running for it, paused,
//! booted, how did the last run end) gives the actions to take and the status
//! to report. No I/O and no clock: the caller passes `now`.
//!
//! The driver runs [`decide`], executes its actions, observes again and calls
//! [`decide`] once more with the first decision's status as `previous`; the
//! second status is what it reports. Restart counting and backoff read only
//! `previous` (the MicroVM's status) and the observation, never the agent's
//! memory, so a restarted agent decides the same.

mod status;
#[cfg(test)]
mod tests;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::microvm::{PowerState, RunPolicy};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{ExitReason, ExitRecord};

pub use status::{Transition, agent_status, exit_reason_name, exit_status, transitions};

/// How a previous run ended, as found on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedExit {
    /// The VMM's exit record; `None` when it left none (it was SIGKILLed or crashed).
    pub record: Option<ExitRecord>,
    /// When the exit happened (the exit file's time, else when it was noticed).
    pub at: Timestamp,
    /// The agent ended this run itself (power state, spec change, deletion).
    pub requested: bool,
    /// The kernel's OOM killer ended it: it left no exit record and its
    /// cgroup's `oom_kill` count rose during the run.
    pub oom_killed: bool,
}

/// What is on the host for this VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// No VMM runs for it.
    NotRunning {
        /// How the last run ended, if there was one.
        exit: Option<ObservedExit>,
        /// The generation the last run was started for.
        last_generation: Option<i64>,
    },
    /// A VMM runs for it.
    Running {
        /// When it was started.
        started_at: Timestamp,
        /// The vCPUs are paused.
        paused: bool,
        /// When the guest was seen booted, if it was.
        booted_at: Option<Timestamp>,
        /// The VMM runs the config the spec asks for now.
        config_current: bool,
        /// When the agent asked the guest to power off, if it did.
        shutdown_since: Option<Timestamp>,
        /// Why its control socket is not to be trusted (naming the expected
        /// and the found process), when a link or another process is behind
        /// it: nothing is sent there, and what it would say (paused,
        /// booted) is unknown.
        control_mismatch: Option<String>,
    },
}

/// Host facts that decide whether a VM can start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Files the spec names that do not exist: (field, path).
    pub missing_files: Vec<(String, String)>,
    /// Why the spec cannot become a VMM config, if it cannot.
    pub invalid: Option<String>,
    /// Why the node cannot enforce `spec.isolation.limits` (no usable cgroups,
    /// or creating the VM's cgroup failed), if it cannot.
    pub limits_error: Option<String>,
    /// Why the last start attempt failed, if it did.
    pub start_error: Option<String>,
}

/// Restart backoff, as kubelet's: `initial`, doubled per restart, capped at `max`;
/// back to `initial` when the last run lasted at least `reset_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A run at least this long resets the delay.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The delay before restart number `restarts + 1`.
    pub fn delay(&self, restarts: i32, last_run: Option<Duration>) -> Duration {
        if last_run.is_some_and(|d| d >= self.reset_after) {
            return self.initial;
        }
        let shift = u32::try_from(restarts.clamp(0, 30)).unwrap_or(30);
        self.initial
            .checked_mul(1u32 << shift.min(20))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// Something to do on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Prepare the VM (directory, disks, taps, config) and spawn its VMM;
    /// `paused` asks for the vCPUs to be paused as soon as it runs.
    Start {
        /// A restart after the VM exited (counts in restartCount).
        restart: bool,
    },
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Ask the guest to power off (the power button).
    Shutdown,
    /// End the VMM now.
    Kill,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// The status fields the agent owns.
    pub status: MicroVMStatus,
    /// When to look again even if nothing changes.
    pub requeue: Option<Duration>,
}

/// Whether an exit is a clean end of the guest (power-off or reset).
pub fn is_clean(exit: &ObservedExit) -> bool {
    exit.record.as_ref().is_some_and(|r| {
        matches!(r.reason, ExitReason::PowerOff | ExitReason::Reset) && r.exit_code == 0
    })
}

/// Where the VM is headed, before actions.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Running as asked (booted or booting).
    Running { booted: bool },
    /// Paused as asked.
    Paused,
    /// Being stopped on purpose.
    Stopping,
    /// Down on purpose (power state, Halted, Manual after exit).
    Stopped { why: &'static str },
    /// Ended cleanly, not to be restarted.
    Succeeded,
    /// Ended with a failure, not to be restarted.
    Failed,
    /// Waiting to restart after an exit.
    BackOff { remaining: Duration, failure: bool },
    /// Running, but its control socket is not its own: left alone, reported.
    ControlSocketMismatch { message: String },
    /// Starting now.
    Starting,
    /// Cannot start: something on the node or in the spec must change.
    Blocked {
        reason: &'static str,
        message: String,
    },
}

/// Decides what to do with one VM.
pub fn decide(
    spec: &MicroVMSpec,
    generation: i64,
    previous: &MicroVMStatus,
    observed: &Observed,
    facts: &Facts,
    backoff: &Backoff,
    now: Timestamp,
) -> Decision {
    let mut actions = Vec::new();
    let mut requeue = None;
    let mut status = previous.clone();
    status.observed_generation = Some(generation);
    let halted = spec.run_policy == RunPolicy::Halted;
    let want_down = halted || spec.power_state == PowerState::Stopped;

    // Record a new exit once.
    if let Observed::NotRunning {
        exit: Some(exit), ..
    } = observed
    {
        let last = exit_status(exit);
        if status
            .last_exit
            .as_ref()
            .is_none_or(|l| l.time != last.time)
        {
            status.last_exit = Some(last);
        }
    }

    let verdict = match observed {
        Observed::Running {
            paused,
            booted_at,
            config_current,
            shutdown_since,
            control_mismatch,
            ..
        } => {
            if want_down && control_mismatch.is_some() {
                // No power button can be pressed through a socket that is not
                // the VMM's: end the recorded process (by its pid) at once.
                actions.push(Action::Kill);
                Verdict::Stopping
            } else if want_down {
                let grace = Duration::from_secs(
                    u64::try_from(spec.termination_grace_period_seconds).unwrap_or(0),
                );
                match shutdown_since {
                    None if grace.is_zero() => actions.push(Action::Kill),
                    None => {
                        actions.push(Action::Shutdown);
                        requeue = Some(grace);
                    }
                    Some(since) => {
                        let waited = elapsed(*since, now);
                        if waited >= grace {
                            actions.push(Action::Kill);
                        } else {
                            requeue = Some(grace - waited);
                        }
                    }
                }
                Verdict::Stopping
            } else if !config_current {
                // The spec changed what the VM is: restart it to apply.
                actions.push(Action::Kill);
                actions.push(Action::Start { restart: false });
                Verdict::Starting
            } else if let Some(why) = control_mismatch {
                // Someone must look: the VMM may be compromised. It keeps
                // running; pause and resume are not sent.
                requeue = Some(Duration::from_secs(10));
                Verdict::ControlSocketMismatch {
                    message: format!(
                        "the agent sends nothing to a control socket the VMM it started does not serve (the VMM may be compromised): {why}; delete the MicroVM or set powerState: Stopped to kill the VMM"
                    ),
                }
            } else if spec.power_state == PowerState::Paused {
                if !paused {
                    actions.push(Action::Pause);
                }
                Verdict::Paused
            } else {
                if *paused {
                    actions.push(Action::Resume);
                }
                if booted_at.is_none() {
                    // Booting: look again soon, the boot time is as precise as this.
                    requeue = Some(Duration::from_millis(200));
                }
                Verdict::Running {
                    booted: booted_at.is_some(),
                }
            }
        }
        Observed::NotRunning {
            exit,
            last_generation,
        } => {
            let own_exit = exit.as_ref().filter(|e| !e.requested);
            if want_down {
                Verdict::Stopped {
                    why: if halted { "Halted" } else { "Stopped" },
                }
            } else {
                let ran = previous.boot_start_time.is_some() || exit.is_some();
                let want_start = match (spec.run_policy, own_exit) {
                    (_, None) => match spec.run_policy {
                        // Manual: a start asked by a new generation, or the first one.
                        RunPolicy::Manual => last_generation.is_none_or(|g| g < generation) || !ran,
                        // Once: it ran and ended (its host state may be gone, its status is not).
                        RunPolicy::Once => previous.last_exit.is_none(),
                        _ => true,
                    },
                    (RunPolicy::Always, Some(_)) => true,
                    (RunPolicy::RerunOnFailure, Some(e)) => !is_clean(e),
                    (RunPolicy::Manual, Some(_)) => last_generation.is_some_and(|g| g < generation),
                    (RunPolicy::Once | RunPolicy::Halted, Some(_)) => false,
                };
                if !want_start {
                    match (spec.run_policy, own_exit) {
                        (RunPolicy::Manual, _) => Verdict::Stopped { why: "Manual" },
                        (_, Some(e)) if is_clean(e) => Verdict::Succeeded,
                        (_, None)
                            if previous.last_exit.as_ref().is_some_and(|l| {
                                matches!(l.reason.as_str(), "GuestPowerOff" | "GuestReset")
                            }) =>
                        {
                            Verdict::Succeeded
                        }
                        _ => Verdict::Failed,
                    }
                } else if let Some(blocked) = blocked(facts) {
                    requeue = Some(Duration::from_secs(10));
                    blocked
                } else {
                    let restart = own_exit.is_some()
                        && matches!(
                            spec.run_policy,
                            RunPolicy::Always | RunPolicy::RerunOnFailure
                        );
                    let wait = match (restart, own_exit) {
                        (true, Some(e)) => {
                            let last_run = previous
                                .boot_start_time
                                .as_ref()
                                .map(|t| elapsed(t.0, e.at));
                            let delay = backoff.delay(previous.restart_count, last_run);
                            delay.saturating_sub(elapsed(e.at, now))
                        }
                        _ => Duration::ZERO,
                    };
                    if wait.is_zero() {
                        actions.push(Action::Start { restart });
                        if restart {
                            status.restart_count = previous.restart_count.saturating_add(1);
                        }
                        Verdict::Starting
                    } else {
                        requeue = Some(wait);
                        Verdict::BackOff {
                            remaining: wait,
                            failure: own_exit.is_some_and(|e| !is_clean(e)),
                        }
                    }
                }
            }
        }
    };

    match observed {
        Observed::Running {
            started_at,
            booted_at,
            ..
        } => {
            status.boot_start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                *started_at,
            ));
            status.boot_duration_millis = booted_at
                .map(|b| i64::try_from(elapsed(*started_at, b).as_millis()).unwrap_or(i64::MAX));
        }
        Observed::NotRunning { .. } => {}
    }
    status::apply(&mut status, spec, generation, &verdict, observed, now);
    Decision {
        actions,
        status,
        requeue,
    }
}

fn blocked(facts: &Facts) -> Option<Verdict> {
    if let Some((field, path)) = facts.missing_files.first() {
        let reason = if field == "spec.boot.kernel" {
            "KernelNotFound"
        } else if field == "spec.boot.initrd" {
            "InitrdNotFound"
        } else {
            "DiskNotFound"
        };
        return Some(Verdict::Blocked {
            reason,
            message: format!("{field}: file {path} does not exist on the node"),
        });
    }
    if let Some(why) = &facts.invalid {
        return Some(Verdict::Blocked {
            reason: "InvalidSpec",
            message: why.clone(),
        });
    }
    if let Some(why) = &facts.limits_error {
        return Some(Verdict::Blocked {
            reason: "LimitsNotEnforceable",
            message: why.clone(),
        });
    }
    facts.start_error.as_ref().map(|why| Verdict::Blocked {
        reason: "StartFailed",
        message: why.clone(),
    })
}

/// `to - from`, zero when negative.
pub fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    let ms = to.as_millisecond().saturating_sub(from.as_millisecond());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

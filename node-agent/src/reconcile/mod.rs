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

pub mod admit;
mod status;
#[cfg(test)]
mod tests;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runv_crds::contract::{self, ExitReason, NotRequested, Reason};
use runv_crds::microvm::{PowerState, RunPolicy, Toggle};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{ExitReason as VmmExit, ExitRecord};

pub use status::{Transition, agent_body, agent_status, exit_reason, exit_status, transitions};

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
    /// For a VM with `spec.container`: the container's exit code as the
    /// guest reported it, `None` when it reported none (the VM ended
    /// without it). Not set for other VMs.
    pub container: Option<Option<i32>>,
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
    /// Why the sandbox the spec switches off must stay on here (see
    /// [`sandbox_refusal`]), if it must.
    pub sandbox_refused: Option<String>,
    /// Why the last start attempt failed, if it did.
    pub start_error: Option<String>,
    /// Why the VM's record (`vm.json`) exists but cannot be read, if so: a
    /// VMM may run for it that the agent cannot see, so none is started.
    pub state_error: Option<String>,
    /// Why the node is fenced, if it is: nothing runs here, a running VMM is
    /// killed, and the status says so (the operator's evidence to move it).
    pub fenced: Option<String>,
    /// A host file the spec names that it may not use
    /// (`HostPathNotAllowed`) or that cannot be opened (`StartFailed`), and
    /// why.
    pub host_file: Option<(Reason, String)>,
    /// Why the node does not admit the VM now, beside the VMs holding a
    /// place here (`OutOfCapacity`, `IsolationConflict`; see [`admit`]), if
    /// it does not. Known only once a start is decided.
    pub admission: Option<(Reason, String)>,
    /// Why the VM's container image is not ready, if it is not.
    pub image: Option<crate::images::ImageFailure>,
}

/// Which parts of the VMM's sandbox a spec may switch off on this node: the
/// node administrator's choice (agent flags), never the tenant's. Both off by
/// default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxPolicy {
    /// `spec.isolation.jail: Disabled` may run (`--allow-jail-disabled`).
    pub allow_jail_disabled: bool,
    /// `spec.isolation.seccomp: Disabled` may run (`--allow-seccomp-disabled`).
    pub allow_seccomp_disabled: bool,
}

/// Why `spec` may not run on a node with `policy`: each part of the sandbox it
/// switches off that the node does not allow, with the flag that would allow
/// it. `None` when it may run. The VM is then not started at all: it never
/// runs with less sandbox than it asked for, nor silently with more.
pub fn sandbox_refusal(spec: &MicroVMSpec, policy: SandboxPolicy) -> Option<String> {
    let refused: Vec<String> = [
        (
            "spec.isolation.jail",
            spec.isolation.jail,
            policy.allow_jail_disabled,
            "--allow-jail-disabled",
        ),
        (
            "spec.isolation.seccomp",
            spec.isolation.seccomp,
            policy.allow_seccomp_disabled,
            "--allow-seccomp-disabled",
        ),
    ]
    .into_iter()
    .filter(|(_, toggle, allowed, _)| *toggle == Toggle::Disabled && !allowed)
    .map(|(field, _, _, flag)| {
        format!(
            "{field}: Disabled is not allowed on this node (its administrator allows it with the agent flag {flag})"
        )
    })
    .collect();
    (!refused.is_empty()).then(|| {
        format!(
            "{}; the VM is not started: set Enabled, or run it on a node that allows Disabled",
            refused.join("; ")
        )
    })
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
    /// Events of this reconcile that no status change shows (an image
    /// pulled), besides those [`transitions`] derives.
    pub events: Vec<Transition>,
}

/// Whether an exit is a clean end of the guest (power-off or reset).
pub fn is_clean(exit: &ObservedExit) -> bool {
    // A container VM's run is its container's: clean when that exited 0.
    if let Some(code) = exit.container {
        return code == Some(0);
    }
    exit.record
        .as_ref()
        .is_some_and(|r| matches!(r.reason, VmmExit::PowerOff | VmmExit::Reset) && r.exit_code == 0)
}

/// Why a VM is down on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StopWhy {
    /// `runPolicy: Halted` or `powerState: Stopped`.
    NotRequested(NotRequested),
    /// `runPolicy: Manual` after its run ended.
    Manual,
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
    Stopped { why: StopWhy },
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
    Blocked { reason: Reason, message: String },
    /// Cannot start yet: the container image is not ready, and trying again
    /// may help (kubelet's `ErrImagePull`, `ImagePullBackOff`).
    ImageWaiting { reason: Reason, message: String },
    /// The node is fenced: stopped (or being killed), nothing starts here.
    Fenced { message: String },
}

/// What [`decide`] reads.
struct Inputs<'a> {
    spec: &'a MicroVMSpec,
    generation: i64,
    previous: &'a MicroVMStatus,
    facts: &'a Facts,
    backoff: &'a Backoff,
    now: Timestamp,
}

/// What [`decide`] is building: the actions and when to look again.
#[derive(Default)]
struct Plan {
    actions: Vec<Action>,
    requeue: Option<Duration>,
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
    let inputs = Inputs {
        spec,
        generation,
        previous,
        facts,
        backoff,
        now,
    };
    let mut plan = Plan::default();
    let mut status = previous.clone();
    status.observed_generation = Some(generation);
    let verdict = match &facts.fenced {
        Some(message) => {
            if matches!(observed, Observed::Running { .. }) {
                plan.actions.push(Action::Kill);
            }
            plan.requeue = Some(FENCED_RECHECK);
            Verdict::Fenced {
                message: message.clone(),
            }
        }
        None => decide_observed(&inputs, observed, &mut plan, &mut status),
    };
    status::apply(&mut status, spec, generation, &verdict, observed, now);
    Decision {
        events: Vec::new(),
        actions: plan.actions,
        status,
        requeue: plan.requeue,
    }
}

/// How often a VM on a fenced node is looked at (to start it again soon
/// after the taint is removed).
const FENCED_RECHECK: Duration = Duration::from_secs(5);

/// The verdict on a node that is not fenced.
fn decide_observed(
    inputs: &Inputs<'_>,
    observed: &Observed,
    plan: &mut Plan,
    status: &mut MicroVMStatus,
) -> Verdict {
    match observed {
        Observed::Running {
            started_at,
            paused,
            booted_at,
            config_current,
            shutdown_since,
            control_mismatch,
        } => {
            status.boot_start_time = Some(Time(*started_at));
            status.boot_duration_millis = booted_at
                .map(|b| i64::try_from(elapsed(*started_at, b).as_millis()).unwrap_or(i64::MAX));
            let running = RunningVm {
                paused: *paused,
                booted: booted_at.is_some(),
                config_current: *config_current,
                shutdown_since: *shutdown_since,
                control_mismatch: control_mismatch.as_deref(),
            };
            decide_running(inputs, &running, plan)
        }
        Observed::NotRunning {
            exit,
            last_generation,
        } => {
            // Record a new exit once.
            if let Some(exit) = exit {
                let last = exit_status(exit);
                if status
                    .last_exit
                    .as_ref()
                    .is_none_or(|l| l.time != last.time)
                {
                    status.last_exit = Some(last);
                }
            }
            decide_not_running(inputs, exit.as_ref(), *last_generation, plan, status)
        }
    }
}

/// What is known of a running VMM.
struct RunningVm<'a> {
    paused: bool,
    booted: bool,
    config_current: bool,
    shutdown_since: Option<Timestamp>,
    control_mismatch: Option<&'a str>,
}

/// A VMM runs: stop it, restart it on a new config, or bring it to the
/// power state the spec asks for.
fn decide_running(inputs: &Inputs<'_>, vm: &RunningVm<'_>, plan: &mut Plan) -> Verdict {
    let spec = inputs.spec;
    let want_down = contract::not_requested(spec).is_some();
    if want_down && vm.control_mismatch.is_some() {
        // No power button can be pressed through a socket that is not
        // the VMM's: end the recorded process (by its pid) at once.
        plan.actions.push(Action::Kill);
        return Verdict::Stopping;
    }
    if want_down {
        stop_gracefully(inputs, vm.shutdown_since, plan);
        return Verdict::Stopping;
    }
    if !vm.config_current {
        // The spec changed what the VM is: restart it to apply, unless what
        // it asks for now cannot start here (then it only ends, and says why).
        plan.actions.push(Action::Kill);
        if let Some(blocked) = cannot_start(inputs.facts, plan) {
            return blocked;
        }
        plan.actions.push(Action::Start { restart: false });
        return Verdict::Starting;
    }
    if let Some(why) = vm.control_mismatch {
        // Someone must look: the VMM may be compromised. It keeps
        // running; pause and resume are not sent.
        plan.requeue = Some(Duration::from_secs(10));
        return Verdict::ControlSocketMismatch {
            message: format!(
                "the agent sends nothing to a control socket the VMM it started does not serve (the VMM may be compromised): {why}; delete the MicroVM or set powerState: Stopped to kill the VMM"
            ),
        };
    }
    if spec.power_state == PowerState::Paused {
        if !vm.paused {
            plan.actions.push(Action::Pause);
        }
        return Verdict::Paused;
    }
    if vm.paused {
        plan.actions.push(Action::Resume);
    }
    if !vm.booted {
        // Booting: look again soon, the boot time is as precise as this.
        plan.requeue = Some(Duration::from_millis(200));
    }
    Verdict::Running { booted: vm.booted }
}

/// The power button, then a kill once the grace period has passed.
fn stop_gracefully(inputs: &Inputs<'_>, shutdown_since: Option<Timestamp>, plan: &mut Plan) {
    let grace = Duration::from_secs(
        u64::try_from(inputs.spec.termination_grace_period_seconds).unwrap_or(0),
    );
    match shutdown_since {
        None if grace.is_zero() => plan.actions.push(Action::Kill),
        None => {
            plan.actions.push(Action::Shutdown);
            plan.requeue = Some(grace);
        }
        Some(since) => {
            let waited = elapsed(since, inputs.now);
            if waited >= grace {
                plan.actions.push(Action::Kill);
            } else {
                plan.requeue = Some(grace - waited);
            }
        }
    }
}

/// No VMM runs: leave it down, start it, or wait out the restart backoff.
fn decide_not_running(
    inputs: &Inputs<'_>,
    exit: Option<&ObservedExit>,
    last_generation: Option<i64>,
    plan: &mut Plan,
    status: &mut MicroVMStatus,
) -> Verdict {
    if let Some(n) = contract::not_requested(inputs.spec) {
        return Verdict::Stopped {
            why: StopWhy::NotRequested(n),
        };
    }
    let own_exit = exit.filter(|e| !e.requested);
    if !wants_start(inputs, exit.is_some(), own_exit, last_generation) {
        return ended(inputs, own_exit);
    }
    if let Some(blocked) = cannot_start(inputs.facts, plan) {
        return blocked;
    }
    let restart = own_exit.is_some()
        && matches!(
            inputs.spec.run_policy,
            RunPolicy::Always | RunPolicy::RerunOnFailure
        );
    let wait = match (restart, own_exit) {
        (true, Some(e)) => {
            let last_run = inputs
                .previous
                .boot_start_time
                .as_ref()
                .map(|t| elapsed(t.0, e.at));
            let delay = inputs
                .backoff
                .delay(inputs.previous.restart_count, last_run);
            delay.saturating_sub(elapsed(e.at, inputs.now))
        }
        _ => Duration::ZERO,
    };
    if !wait.is_zero() {
        plan.requeue = Some(wait);
        return Verdict::BackOff {
            remaining: wait,
            failure: own_exit.is_some_and(|e| !is_clean(e)),
        };
    }
    plan.actions.push(Action::Start { restart });
    if restart {
        status.restart_count = inputs.previous.restart_count.saturating_add(1);
    }
    Verdict::Starting
}

/// Whether the run policy asks for a (re)start, given how the last run ended
/// (`own_exit`: an exit the agent did not ask for).
fn wants_start(
    inputs: &Inputs<'_>,
    exited: bool,
    own_exit: Option<&ObservedExit>,
    last_generation: Option<i64>,
) -> bool {
    let (spec, previous, generation) = (inputs.spec, inputs.previous, inputs.generation);
    let ran = previous.boot_start_time.is_some() || exited;
    match (spec.run_policy, own_exit) {
        // Manual: a start asked by a new generation, or the first one.
        (RunPolicy::Manual, None) => last_generation.is_none_or(|g| g < generation) || !ran,
        // Once: it ran and ended (its host state may be gone, its status is not).
        (RunPolicy::Once, None) => previous.last_exit.is_none(),
        (_, None) => true,
        (RunPolicy::Always, Some(_)) => true,
        (RunPolicy::RerunOnFailure, Some(e)) => !is_clean(e),
        (RunPolicy::Manual, Some(_)) => last_generation.is_some_and(|g| g < generation),
        (RunPolicy::Once | RunPolicy::Halted, Some(_)) => false,
    }
}

/// A VM that ran and is not to be started again: how it ended.
fn ended(inputs: &Inputs<'_>, own_exit: Option<&ObservedExit>) -> Verdict {
    if inputs.spec.run_policy == RunPolicy::Manual {
        return Verdict::Stopped {
            why: StopWhy::Manual,
        };
    }
    let clean = match own_exit {
        Some(e) => is_clean(e),
        // Its host state may be gone; its status says how it ended: a
        // container VM by its container's exit code.
        None if inputs.spec.container.is_some() => inputs
            .previous
            .container
            .as_ref()
            .and_then(|c| c.state.as_ref()?.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0),
        None => inputs
            .previous
            .last_exit
            .as_ref()
            .and_then(|l| ExitReason::parse(&l.reason))
            .is_some_and(ExitReason::is_guest_end),
    };
    if clean {
        Verdict::Succeeded
    } else {
        Verdict::Failed
    }
}

/// Why the VM cannot start now, and when to look again: what [`blocked`]
/// finds (every 10 s), else its image not being ready (when the pull may
/// be tried again; an image failure nothing but a spec change mends blocks).
fn cannot_start(facts: &Facts, plan: &mut Plan) -> Option<Verdict> {
    if let Some(v) = blocked(facts) {
        plan.requeue = Some(Duration::from_secs(10));
        return Some(v);
    }
    let image = facts.image.as_ref()?;
    let (reason, message) = (image.reason, image.message.clone());
    match image.retry {
        Some(retry) => {
            plan.requeue = Some(retry.max(Duration::from_millis(100)));
            Some(Verdict::ImageWaiting { reason, message })
        }
        None => {
            plan.requeue = Some(Duration::from_secs(10));
            Some(Verdict::Blocked { reason, message })
        }
    }
}

fn blocked(facts: &Facts) -> Option<Verdict> {
    if let Some(why) = &facts.state_error {
        return Some(Verdict::Blocked {
            reason: Reason::StateUnreadable,
            message: why.clone(),
        });
    }
    if let Some(why) = &facts.sandbox_refused {
        return Some(Verdict::Blocked {
            reason: Reason::SandboxNotAllowed,
            message: why.clone(),
        });
    }
    if let Some((reason, why)) = &facts.host_file {
        return Some(Verdict::Blocked {
            reason: *reason,
            message: why.clone(),
        });
    }
    if let Some((field, path)) = facts.missing_files.first() {
        let reason = match field.as_str() {
            "spec.boot.kernel" => Reason::KernelNotFound,
            "spec.boot.initrd" => Reason::InitrdNotFound,
            _ => Reason::DiskNotFound,
        };
        return Some(Verdict::Blocked {
            reason,
            message: format!("{field}: file {path} does not exist on the node"),
        });
    }
    if let Some(why) = &facts.invalid {
        return Some(Verdict::Blocked {
            reason: Reason::InvalidSpec,
            message: why.clone(),
        });
    }
    if let Some(why) = &facts.limits_error {
        return Some(Verdict::Blocked {
            reason: Reason::LimitsNotEnforceable,
            message: why.clone(),
        });
    }
    if let Some((reason, why)) = &facts.admission {
        return Some(Verdict::Blocked {
            reason: *reason,
            message: why.clone(),
        });
    }
    facts.start_error.as_ref().map(|why| Verdict::Blocked {
        reason: Reason::StartFailed,
        message: why.clone(),
    })
}

/// `to - from`, zero when negative.
pub fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    let ms = to.as_millisecond().saturating_sub(from.as_millisecond());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

//! Status math: phase and the agent's conditions for a verdict, the exit
//! record as `status.lastExit`, the subset of status the agent applies, and
//! the Events a status change deserves. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions::{self as cond, Row, Status::False, Status::True};
use runv_crds::contract::{ExitReason, Reason};
use runv_crds::microvm::{ContainerState, ExitStatus, Phase};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{ExitReason as VmmExit, ExitRecord};

use super::{Observed, ObservedExit, StopWhy, Verdict};

/// The `lastExit.reason` of an exit: the exit record's, else (killed by a
/// signal) `OOMKilled` when the OOM killer did it, else `Killed`.
pub fn exit_reason(record: Option<&ExitRecord>, oom_killed: bool) -> ExitReason {
    match record.map(|r| r.reason) {
        None if oom_killed => ExitReason::OOMKilled,
        Some(VmmExit::PowerOff) => ExitReason::GuestPowerOff,
        Some(VmmExit::Reset) => ExitReason::GuestReset,
        Some(VmmExit::Killed) | None => ExitReason::Killed,
        Some(VmmExit::TripleFault) => ExitReason::TripleFault,
        Some(VmmExit::InternalError) => ExitReason::InternalError,
        Some(VmmExit::EmulationFailure) => ExitReason::EmulationFailure,
        Some(VmmExit::GuestPanic) => ExitReason::GuestPanicked,
        Some(VmmExit::GuestFault) => ExitReason::GuestFault,
        Some(VmmExit::VmmError) => ExitReason::VMMError,
    }
}

/// `status.lastExit` for an observed exit.
pub fn exit_status(exit: &ObservedExit) -> ExitStatus {
    ExitStatus {
        code: exit.record.as_ref().map(|r| r.exit_code),
        reason: exit_reason(exit.record.as_ref(), exit.oom_killed)
            .as_str()
            .to_owned(),
        message: Some(match &exit.record {
            Some(r) => r.message.clone(),
            None if exit.oom_killed => "the kernel's OOM killer ended the VMM: its cgroup ran out of memory (guest memory and the VMM's own count against spec.isolation.limits.memory)".to_owned(),
            None => "the VMM process ended without an exit record (killed by a signal)".to_owned(),
        }),
        time: Time(exit.at),
    }
}

fn exit_summary(status: &MicroVMStatus) -> String {
    match &status.last_exit {
        Some(e) => format!(
            "last exit: {}{}",
            e.reason,
            e.message
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        ),
        None => String::new(),
    }
}

/// The last exit's reason as the status records it.
fn last_exit_reason(status: &MicroVMStatus) -> Option<ExitReason> {
    status
        .last_exit
        .as_ref()
        .and_then(|e| ExitReason::parse(&e.reason))
}

/// What every verdict's rows are built from.
struct Seen {
    /// The vCPUs are paused.
    paused: bool,
    /// The guest booted.
    booted: bool,
    /// "last exit: ..." for messages.
    last: String,
    /// How the last run ended, if it did.
    exit: Option<ExitReason>,
}

impl Seen {
    fn paused_row(&self) -> Row {
        if self.paused {
            Row::new(cond::PAUSED, True, Reason::Paused).message("the vCPUs are paused")
        } else {
            Row::new(cond::PAUSED, False, Reason::NotPaused)
        }
    }

    fn booted_row(&self) -> Row {
        if self.booted {
            Row::new(cond::GUEST_BOOTED, True, Reason::Booted)
        } else {
            Row::new(cond::GUEST_BOOTED, False, Reason::Booting)
        }
    }

    /// `GuestBooted` of a VM that is down.
    fn down_booted(&self) -> Row {
        let reason = self.exit.map_or(Reason::NotRunning, ExitReason::not_booted);
        Row::new(cond::GUEST_BOOTED, False, reason)
    }

    /// `VMMStarted` of a VM whose VMM exited.
    fn exited(&self) -> Row {
        Row::new(cond::VMM_STARTED, False, Reason::VMMExited).message(self.last.clone())
    }
}

fn started() -> Row {
    Row::new(cond::VMM_STARTED, True, Reason::Started)
}

fn reconciled() -> Row {
    Row::new(cond::RECONCILING, False, Reason::Reconciled)
}

fn reconciling(reason: Reason) -> Row {
    Row::new(cond::RECONCILING, True, reason)
}

fn not_stalled() -> Row {
    Row::new(cond::STALLED, False, Reason::Progressing)
}

/// Phase and conditions: what [`apply`] sets.
type Rows = (Phase, [Row; 6]);

fn ready(status: cond::Status, reason: Reason, message: &str) -> Row {
    Row::new(cond::READY, status, reason).message(message)
}

/// Phase and the six agent conditions for `verdict`.
fn rows(verdict: &Verdict, spec: &MicroVMSpec, seen: &Seen) -> Rows {
    match verdict {
        Verdict::Running { booted } => running(*booted, seen),
        Verdict::Paused => paused(seen),
        Verdict::Stopping => stopping(seen),
        Verdict::ControlSocketMismatch { message } => control_mismatch(message, seen),
        Verdict::Starting => starting(seen),
        Verdict::Stopped { why } => stopped(*why, seen),
        Verdict::Succeeded => succeeded(seen),
        Verdict::Failed => failed(spec, seen),
        Verdict::BackOff { remaining, failure } => back_off(*remaining, *failure, seen),
        Verdict::Blocked { reason, message } => blocked(*reason, message, seen),
        Verdict::ImageWaiting { reason, message } => image_waiting(*reason, message, seen),
        Verdict::Fenced { message } => fenced(message, seen),
    }
}

fn running(booted: bool, seen: &Seen) -> Rows {
    let (phase, ready, reconciling_row) = if booted {
        (
            Phase::Running,
            ready(True, Reason::Running, ""),
            reconciled(),
        )
    } else {
        (
            Phase::Starting,
            ready(False, Reason::Booting, "waiting for the guest to boot"),
            reconciling(Reason::Booting),
        )
    };
    let rows = [
        started(),
        seen.booted_row(),
        ready,
        seen.paused_row(),
        reconciling_row,
        not_stalled(),
    ];
    (phase, rows)
}

fn paused(seen: &Seen) -> Rows {
    let (ready, reconciling_row) = if seen.paused {
        (ready(True, Reason::Paused, "paused as asked"), reconciled())
    } else {
        (
            ready(False, Reason::Pausing, ""),
            reconciling(Reason::Pausing),
        )
    };
    let rows = [
        started(),
        seen.booted_row(),
        ready,
        seen.paused_row(),
        reconciling_row,
        not_stalled(),
    ];
    (Phase::Paused, rows)
}

fn stopping(seen: &Seen) -> Rows {
    let phase = if seen.paused {
        Phase::Paused
    } else {
        Phase::Running
    };
    let rows = [
        started(),
        seen.booted_row(),
        ready(False, Reason::Stopping, "the guest was asked to power off"),
        seen.paused_row(),
        reconciling(Reason::Stopping),
        not_stalled(),
    ];
    (phase, rows)
}

fn control_mismatch(message: &str, seen: &Seen) -> Rows {
    let reason = Reason::ControlSocketMismatch;
    let rows = [
        started(),
        seen.booted_row(),
        ready(False, reason, message),
        seen.paused_row(),
        Row::new(cond::RECONCILING, False, reason),
        Row::new(cond::STALLED, True, reason).message(message),
    ];
    (Phase::Running, rows)
}

fn starting(seen: &Seen) -> Rows {
    let rows = [
        Row::new(cond::VMM_STARTED, False, Reason::Starting),
        Row::new(cond::GUEST_BOOTED, False, Reason::Booting),
        ready(False, Reason::Starting, ""),
        seen.paused_row(),
        reconciling(Reason::Starting),
        not_stalled(),
    ];
    (Phase::Starting, rows)
}

fn stopped(why: StopWhy, seen: &Seen) -> Rows {
    let msg = match why {
        StopWhy::NotRequested(n) => n.message().to_owned(),
        StopWhy::Manual => format!(
            "runPolicy is Manual: stays down until a new generation asks to run; {}",
            seen.last
        ),
    };
    let rows = [
        Row::new(cond::VMM_STARTED, False, Reason::Stopped).message(msg.clone()),
        seen.down_booted(),
        ready(True, Reason::Stopped, &msg),
        seen.paused_row(),
        reconciled(),
        not_stalled(),
    ];
    (Phase::Stopped, rows)
}

fn succeeded(seen: &Seen) -> Rows {
    let msg = format!("the guest ended cleanly; {}", seen.last);
    let rows = [
        seen.exited(),
        seen.down_booted(),
        ready(True, Reason::Succeeded, &msg),
        seen.paused_row(),
        reconciled(),
        not_stalled(),
    ];
    (Phase::Succeeded, rows)
}

fn failed(spec: &MicroVMSpec, seen: &Seen) -> Rows {
    let reason = seen.exit.map_or(Reason::Killed, ExitReason::failure);
    let msg = format!(
        "the VM failed and runPolicy {:?} does not restart it; {}",
        spec.run_policy, seen.last
    );
    let rows = [
        seen.exited(),
        seen.down_booted(),
        ready(False, reason, &msg),
        seen.paused_row(),
        Row::new(cond::RECONCILING, False, Reason::Failed),
        Row::new(cond::STALLED, True, Reason::Failed).message(msg),
    ];
    (Phase::Failed, rows)
}

fn back_off(remaining: Duration, failure: bool, seen: &Seen) -> Rows {
    let what = if failure { "failed" } else { "exited" };
    let msg = format!(
        "back-off {}s restarting the VM that {what}; {}",
        remaining.as_secs_f64().ceil(),
        seen.last
    );
    let rows = [
        seen.exited(),
        seen.down_booted(),
        ready(False, Reason::CrashLoopBackOff, &msg),
        seen.paused_row(),
        reconciling(Reason::CrashLoopBackOff).message(msg),
        not_stalled(),
    ];
    (Phase::Starting, rows)
}

fn blocked(reason: Reason, message: &str, seen: &Seen) -> Rows {
    let rows = [
        Row::new(cond::VMM_STARTED, False, reason).message(message),
        Row::new(cond::GUEST_BOOTED, False, Reason::NotRunning),
        ready(False, reason, message),
        seen.paused_row(),
        Row::new(cond::RECONCILING, False, reason),
        Row::new(cond::STALLED, True, reason).message(message),
    ];
    (Phase::Scheduled, rows)
}

/// Waiting for the container image (pulling failed, or backing off): not
/// running, still reconciling, not stalled, since the next try may work.
fn image_waiting(reason: Reason, message: &str, seen: &Seen) -> Rows {
    let rows = [
        Row::new(cond::VMM_STARTED, False, reason).message(message),
        Row::new(cond::GUEST_BOOTED, False, Reason::NotRunning),
        ready(False, reason, message),
        seen.paused_row(),
        reconciling(reason),
        not_stalled(),
    ];
    (Phase::Scheduled, rows)
}

/// Stopped by the node's fencing taint: phase `Stopped`, `Ready=False`
/// (`NodeFenced`), neither reconciling nor stalled (the operator moves an
/// `Always` VM on this report; the others wait for the taint to go).
fn fenced(message: &str, seen: &Seen) -> Rows {
    let rows = [
        Row::new(cond::VMM_STARTED, False, Reason::NodeFenced).message(message),
        Row::new(cond::GUEST_BOOTED, False, Reason::NotRunning),
        ready(False, Reason::NodeFenced, message),
        seen.paused_row(),
        Row::new(cond::RECONCILING, False, Reason::NodeFenced),
        not_stalled(),
    ];
    (Phase::Stopped, rows)
}

/// Sets phase and the six agent conditions for `verdict`.
pub(crate) fn apply(
    status: &mut MicroVMStatus,
    spec: &MicroVMSpec,
    generation: i64,
    verdict: &Verdict,
    observed: &Observed,
    now: Timestamp,
) {
    let (paused, booted) = match observed {
        Observed::Running {
            paused, booted_at, ..
        } => (*paused, booted_at.is_some()),
        Observed::NotRunning { .. } => (false, false),
    };
    let seen = Seen {
        paused,
        booted,
        last: exit_summary(status),
        exit: last_exit_reason(status),
    };
    let (phase, rows) = rows(verdict, spec, &seen);
    status.phase = Some(phase);
    for row in rows {
        row.set(&mut status.conditions, Some(generation), Time(now));
    }
}

/// The status fields the agent owns on its node (see
/// [`runv_crds::contract::ownership`]): everything but `nodeName`, `tenant`
/// and the `Scheduled` condition, which are the operator's.
pub fn agent_status(status: &MicroVMStatus) -> MicroVMStatus {
    MicroVMStatus {
        node_name: None,
        tenant: None,
        conditions: status
            .conditions
            .iter()
            .filter(|c| c.type_ != cond::SCHEDULED)
            .cloned()
            .collect(),
        ..status.clone()
    }
}

/// The server-side apply body (the value of `status`) of the agent's fields.
pub fn agent_body(status: &MicroVMStatus) -> serde_json::Value {
    serde_json::to_value(agent_status(status)).unwrap_or_default()
}

/// An Event a status change deserves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// A Warning rather than a Normal event.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Message for people.
    pub note: String,
}

fn cond_of<'s>(s: &'s MicroVMStatus, t: &str) -> Option<(&'s str, &'s str, &'s str)> {
    cond::find(&s.conditions, t).map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// `Started` and `Exited` of a container VM's container, as its state
/// changes.
fn container_transitions(
    before: &MicroVMStatus,
    after: &MicroVMStatus,
    push: &mut impl FnMut(bool, &str, String),
) {
    let state = |s: &MicroVMStatus| s.container.as_ref().and_then(|c| c.state.clone());
    let (was, now) = (state(before), state(after));
    if was == now {
        return;
    }
    let now = now.unwrap_or_default();
    // A run is known by when it started; one that started and ended between
    // two looks was still started.
    let started = |s: &ContainerState| {
        s.running
            .as_ref()
            .map(|r| Some(r.started_at.clone()))
            .or_else(|| s.terminated.as_ref().map(|t| t.started_at.clone()))
            .flatten()
    };
    if let Some(at) = started(&now)
        && was.as_ref().and_then(started) != Some(at)
    {
        push(false, "Started", "Started container".into());
    }
    if let Some(t) = &now.terminated
        && was.as_ref().and_then(|w| w.terminated.as_ref()) != Some(t)
    {
        let detail = t
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        push(
            t.exit_code != 0,
            "Exited",
            format!(
                "Container exited with code {} ({}){detail}",
                t.exit_code, t.reason
            ),
        );
    }
}

/// The Events between two statuses of one VM.
pub fn transitions(before: &MicroVMStatus, after: &MicroVMStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let mut push = |warning: bool, reason: &str, note: String| {
        out.push(Transition {
            warning,
            reason: reason.to_owned(),
            note,
        });
    };
    if after.last_exit != before.last_exit
        && let Some(e) = &after.last_exit
    {
        let clean = ExitReason::parse(&e.reason).is_some_and(ExitReason::is_guest_end);
        push(
            !clean,
            "Exited",
            format!(
                "VM exited: {} (code {}) {}",
                e.reason,
                e.code.map_or_else(|| "none".into(), |c| c.to_string()),
                e.message.clone().unwrap_or_default()
            ),
        );
    }
    let vmm = (
        cond_of(before, cond::VMM_STARTED),
        cond_of(after, cond::VMM_STARTED),
    );
    if let (b, Some(("True", _, _))) = vmm
        && b.map(|c| c.0) != Some("True")
    {
        push(false, "Started", "VMM started".into());
    }
    if let (b, Some(("True", _, _))) = (
        cond_of(before, cond::GUEST_BOOTED),
        cond_of(after, cond::GUEST_BOOTED),
    ) && b.map(|c| c.0) != Some("True")
    {
        let ms = after
            .boot_duration_millis
            .map_or_else(String::new, |m| format!(" in {m} ms"));
        push(false, "Booted", format!("guest booted{ms}"));
    }
    container_transitions(before, after, &mut push);
    if after.restart_count > before.restart_count {
        push(
            false,
            "Restarted",
            format!("restart {} of the VM", after.restart_count),
        );
    }
    let ready = (cond_of(before, cond::READY), cond_of(after, cond::READY));
    if let (b, Some(("False", reason, msg))) = ready
        && b.map(|c| c.1) != Some(reason)
        && let Some(reason) = Reason::parse(reason).filter(|r| r.warns())
    {
        let event = match reason {
            Reason::CrashLoopBackOff => "BackOff",
            other => other.as_str(),
        };
        push(true, event, msg.to_owned());
    }
    if after.phase != before.phase
        && let Some(p) = after.phase
        && matches!(
            p,
            Phase::Paused | Phase::Stopped | Phase::Succeeded | Phase::Failed
        )
    {
        push(
            p == Phase::Failed,
            &format!("{p:?}"),
            format!("phase {p:?}"),
        );
    }
    out
}

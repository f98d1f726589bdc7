//! Status math: phase and the agent's conditions for a verdict, the exit
//! record as `status.lastExit`, the subset of status the agent applies, and
//! the Events a status change deserves. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions::{self as cond, Status, Update};
use runv_crds::microvm::{ExitStatus, Phase};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{ExitReason, ExitRecord};

use super::{Observed, ObservedExit, Verdict};

/// The CamelCase `lastExit.reason` of an exit: the exit record's, else
/// (killed by a signal) `OOMKilled` when the OOM killer did it, else `Killed`.
pub fn exit_reason_name(record: Option<&ExitRecord>, oom_killed: bool) -> &'static str {
    match record.map(|r| r.reason) {
        None if oom_killed => "OOMKilled",
        Some(ExitReason::PowerOff) => "GuestPowerOff",
        Some(ExitReason::Reset) => "GuestReset",
        Some(ExitReason::Killed) | None => "Killed",
        Some(ExitReason::TripleFault) => "TripleFault",
        Some(ExitReason::InternalError) => "InternalError",
        Some(ExitReason::EmulationFailure) => "EmulationFailure",
        Some(ExitReason::GuestPanic) => "GuestPanicked",
        Some(ExitReason::GuestFault) => "GuestFault",
        Some(ExitReason::VmmError) => "VMMError",
    }
}

/// `status.lastExit` for an observed exit.
pub fn exit_status(exit: &ObservedExit) -> ExitStatus {
    ExitStatus {
        code: exit.record.as_ref().map(|r| r.exit_code),
        reason: exit_reason_name(exit.record.as_ref(), exit.oom_killed).to_owned(),
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

type Row = (&'static str, Status, &'static str, String);

/// Sets phase and the six agent conditions for `verdict`.
pub(crate) fn apply(
    status: &mut MicroVMStatus,
    spec: &MicroVMSpec,
    generation: i64,
    verdict: &Verdict,
    observed: &Observed,
    now: Timestamp,
) {
    use Status::{False, True};
    let (paused, booted) = match observed {
        Observed::Running {
            paused, booted_at, ..
        } => (*paused, booted_at.is_some()),
        Observed::NotRunning { .. } => (false, false),
    };
    let last = exit_summary(status);
    let exited_reason = status
        .last_exit
        .as_ref()
        .map(|e| match e.reason.as_str() {
            "GuestPanicked" => "GuestPanicked",
            "TripleFault" => "TripleFault",
            _ => "NotRunning",
        })
        .unwrap_or("NotRunning");
    let paused_row: Row = if paused {
        (cond::PAUSED, True, "Paused", "the vCPUs are paused".into())
    } else {
        (cond::PAUSED, False, "NotPaused", String::new())
    };
    let started: Row = (cond::VMM_STARTED, True, "Started", String::new());
    let booted_row: Row = if booted {
        (cond::GUEST_BOOTED, True, "Booted", String::new())
    } else {
        (cond::GUEST_BOOTED, False, "Booting", String::new())
    };
    let down_booted: Row = (cond::GUEST_BOOTED, False, exited_reason, String::new());
    let not_stalled: Row = (cond::STALLED, False, "Progressing", String::new());
    let reconciled: Row = (cond::RECONCILING, False, "Reconciled", String::new());
    let (phase, rows): (Phase, [Row; 6]) = match verdict {
        Verdict::Running { booted: true } => (
            Phase::Running,
            [
                started,
                booted_row,
                (cond::READY, True, "Running", String::new()),
                paused_row,
                reconciled,
                not_stalled,
            ],
        ),
        Verdict::Running { booted: false } => (
            Phase::Starting,
            [
                started,
                booted_row,
                (
                    cond::READY,
                    False,
                    "Booting",
                    "waiting for the guest to boot".into(),
                ),
                paused_row,
                (cond::RECONCILING, True, "Booting", String::new()),
                not_stalled,
            ],
        ),
        Verdict::Paused => (
            Phase::Paused,
            [
                started,
                booted_row,
                if paused {
                    (cond::READY, True, "Paused", "paused as asked".into())
                } else {
                    (cond::READY, False, "Pausing", String::new())
                },
                paused_row,
                if paused {
                    reconciled
                } else {
                    (cond::RECONCILING, True, "Pausing", String::new())
                },
                not_stalled,
            ],
        ),
        Verdict::Stopping => (
            if paused {
                Phase::Paused
            } else {
                Phase::Running
            },
            [
                started,
                booted_row,
                (
                    cond::READY,
                    False,
                    "Stopping",
                    "the guest was asked to power off".into(),
                ),
                paused_row,
                (cond::RECONCILING, True, "Stopping", String::new()),
                not_stalled,
            ],
        ),
        Verdict::Stopped { why } => {
            let msg = match *why {
                "Halted" => "runPolicy is Halted".to_owned(),
                "Manual" => format!(
                    "runPolicy is Manual: stays down until a new generation asks to run; {last}"
                ),
                _ => "powerState is Stopped".to_owned(),
            };
            (
                Phase::Stopped,
                [
                    (cond::VMM_STARTED, False, "Stopped", msg.clone()),
                    down_booted,
                    (cond::READY, True, "Stopped", msg),
                    paused_row,
                    reconciled,
                    not_stalled,
                ],
            )
        }
        Verdict::Succeeded => (
            Phase::Succeeded,
            [
                (cond::VMM_STARTED, False, "VMMExited", last.clone()),
                down_booted,
                (
                    cond::READY,
                    True,
                    "Succeeded",
                    format!("the guest ended cleanly; {last}"),
                ),
                paused_row,
                reconciled,
                not_stalled,
            ],
        ),
        Verdict::Failed => {
            let reason = status
                .last_exit
                .as_ref()
                .map(|e| e.reason.clone())
                .unwrap_or_else(|| "Killed".into());
            let reason: &'static str = match reason.as_str() {
                "GuestPanicked" => "GuestPanicked",
                "TripleFault" => "TripleFault",
                "InternalError" => "InternalError",
                "EmulationFailure" => "EmulationFailure",
                "GuestFault" => "GuestFault",
                "VMMError" => "VMMError",
                "OOMKilled" => "OOMKilled",
                _ => "Killed",
            };
            let msg = format!(
                "the VM failed and runPolicy {:?} does not restart it; {last}",
                spec.run_policy
            );
            (
                Phase::Failed,
                [
                    (cond::VMM_STARTED, False, "VMMExited", last.clone()),
                    down_booted,
                    (cond::READY, False, reason, msg.clone()),
                    paused_row,
                    (cond::RECONCILING, False, "Failed", String::new()),
                    (cond::STALLED, True, "Failed", msg),
                ],
            )
        }
        Verdict::BackOff { remaining, failure } => {
            let what = if *failure { "failed" } else { "exited" };
            let msg = format!(
                "back-off {}s restarting the VM that {what}; {last}",
                remaining.as_secs_f64().ceil()
            );
            (
                Phase::Starting,
                [
                    (cond::VMM_STARTED, False, "VMMExited", last.clone()),
                    down_booted,
                    (cond::READY, False, "CrashLoopBackOff", msg.clone()),
                    paused_row,
                    (cond::RECONCILING, True, "CrashLoopBackOff", msg),
                    not_stalled,
                ],
            )
        }
        Verdict::ControlSocketMismatch { message } => (
            Phase::Running,
            [
                started,
                booted_row,
                (cond::READY, False, "ControlSocketMismatch", message.clone()),
                paused_row,
                (
                    cond::RECONCILING,
                    False,
                    "ControlSocketMismatch",
                    String::new(),
                ),
                (
                    cond::STALLED,
                    True,
                    "ControlSocketMismatch",
                    message.clone(),
                ),
            ],
        ),
        Verdict::Starting => (
            Phase::Starting,
            [
                (cond::VMM_STARTED, False, "Starting", String::new()),
                (cond::GUEST_BOOTED, False, "Booting", String::new()),
                (cond::READY, False, "Starting", String::new()),
                paused_row,
                (cond::RECONCILING, True, "Starting", String::new()),
                not_stalled,
            ],
        ),
        Verdict::Blocked { reason, message } => (
            Phase::Scheduled,
            [
                (cond::VMM_STARTED, False, reason, message.clone()),
                (cond::GUEST_BOOTED, False, "NotRunning", String::new()),
                (cond::READY, False, reason, message.clone()),
                paused_row,
                (cond::RECONCILING, False, reason, String::new()),
                (cond::STALLED, True, reason, message.clone()),
            ],
        ),
    };
    status.phase = Some(phase);
    for (type_, st, reason, message) in rows {
        cond::set_condition(
            &mut status.conditions,
            Update {
                type_,
                status: st,
                reason,
                message: &message,
                observed_generation: Some(generation),
            },
            Time(now),
        );
    }
}

/// The status fields the agent owns, for a server-side apply under its manager:
/// everything but `nodeName` and the `Scheduled` condition (the operator's).
pub fn agent_status(status: &MicroVMStatus) -> MicroVMStatus {
    MicroVMStatus {
        node_name: None,
        conditions: status
            .conditions
            .iter()
            .filter(|c| c.type_ != cond::SCHEDULED)
            .cloned()
            .collect(),
        ..status.clone()
    }
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
        let clean = matches!(e.reason.as_str(), "GuestPowerOff" | "GuestReset");
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
        && matches!(
            reason,
            "CrashLoopBackOff"
                | "KernelNotFound"
                | "InitrdNotFound"
                | "DiskNotFound"
                | "InvalidSpec"
                | "LimitsNotEnforceable"
                | "StartFailed"
                | "ControlSocketMismatch"
        )
    {
        push(
            true,
            if reason == "CrashLoopBackOff" {
                "BackOff"
            } else {
                reason
            },
            msg.to_owned(),
        );
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

//! Table tests of the decision function: runPolicy × exit, power states,
//! backoff, missing files, spec changes, and the status each case reports.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::MicroVMStatus;
use runv_crds::conditions::{self as cond};
use runv_crds::microvm::{Phase, PowerState, RunPolicy};
use runv_vmm_api::{ExitReason, ExitRecord};

use super::*;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn spec(policy: RunPolicy, power: PowerState) -> MicroVMSpec {
    let mut s: MicroVMSpec = serde_json::from_str(
        r#"{"boot":{"kernel":"/k/vmlinux"},"resources":{"vcpus":1,"memory":"64Mi"}}"#,
    )
    .unwrap();
    s.run_policy = policy;
    s.power_state = power;
    s
}

fn never_ran() -> Observed {
    Observed::NotRunning {
        exit: None,
        last_generation: None,
    }
}

fn exited(reason: ExitReason, when: i64) -> Observed {
    Observed::NotRunning {
        exit: Some(ObservedExit {
            container: None,
            record: Some(ExitRecord::new(reason, format!("{reason:?}"))),
            at: at(when),
            requested: false,
            oom_killed: false,
        }),
        last_generation: Some(1),
    }
}

fn running(started: i64, booted: Option<i64>, paused: bool) -> Observed {
    Observed::Running {
        started_at: at(started),
        paused,
        booted_at: booted.map(at),
        config_current: true,
        shutdown_since: None,
        control_mismatch: None,
    }
}

fn run(s: &MicroVMSpec, prev: &MicroVMStatus, obs: &Observed, now: i64) -> Decision {
    decide(
        s,
        1,
        prev,
        obs,
        &Facts::default(),
        &Backoff::default(),
        at(now),
    )
}

fn run_with(
    s: &MicroVMSpec,
    prev: &MicroVMStatus,
    obs: &Observed,
    facts: &Facts,
    now: i64,
) -> Decision {
    decide(s, 1, prev, obs, facts, &Backoff::default(), at(now))
}

fn cond_of(status: &MicroVMStatus, t: &str) -> (String, String, String) {
    let c = cond::find(&status.conditions, t).unwrap_or_else(|| panic!("no {t} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn ready(d: &Decision) -> (String, String) {
    let (s, r, _) = cond_of(&d.status, cond::READY);
    (s, r)
}

fn ran_before(restarts: i32, started: i64) -> MicroVMStatus {
    MicroVMStatus {
        restart_count: restarts,
        boot_start_time: Some(Time(at(started))),
        ..MicroVMStatus::default()
    }
}

#[test]
fn a_new_vm_starts_and_reports_every_condition() {
    let d = run(
        &spec(RunPolicy::Once, PowerState::Running),
        &MicroVMStatus::default(),
        &never_ran(),
        0,
    );
    assert_eq!(d.actions, vec![Action::Start { restart: false }]);
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert_eq!(ready(&d), ("False".into(), "Starting".into()));
    assert_eq!(d.status.observed_generation, Some(1));
    for t in cond::MICROVM_CONDITIONS
        .iter()
        .filter(|t| **t != cond::SCHEDULED)
    {
        assert!(cond::find(&d.status.conditions, t).is_some(), "{t} missing");
    }
    assert!(cond::find(&d.status.conditions, cond::SCHEDULED).is_none());
}

#[test]
fn running_booted_and_booting() {
    let s = spec(RunPolicy::Always, PowerState::Running);
    let d = run(
        &s,
        &MicroVMStatus::default(),
        &running(0, Some(2), false),
        5,
    );
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(ready(&d), ("True".into(), "Running".into()));
    assert_eq!(d.status.boot_duration_millis, Some(2000));
    assert_eq!(cond_of(&d.status, cond::GUEST_BOOTED).0, "True");
    assert_eq!(cond_of(&d.status, cond::RECONCILING).0, "False");

    let d = run(&s, &MicroVMStatus::default(), &running(0, None, false), 1);
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert_eq!(ready(&d), ("False".into(), "Booting".into()));
    assert_eq!(cond_of(&d.status, cond::VMM_STARTED).0, "True");
    assert!(d.requeue.is_some());
}

#[test]
fn missing_kernel_is_stalled_and_names_the_file() {
    let facts = Facts {
        missing_files: vec![("spec.boot.kernel".into(), "/k/vmlinux".into())],
        ..Facts::default()
    };
    let d = decide(
        &spec(RunPolicy::Always, PowerState::Running),
        1,
        &MicroVMStatus::default(),
        &never_ran(),
        &facts,
        &Backoff::default(),
        at(0),
    );
    assert!(d.actions.is_empty());
    let (s, r, m) = cond_of(&d.status, cond::READY);
    assert_eq!((s.as_str(), r.as_str()), ("False", "KernelNotFound"));
    assert!(m.contains("/k/vmlinux"), "{m}");
    assert_eq!(cond_of(&d.status, cond::STALLED).0, "True");
    assert_eq!(cond_of(&d.status, cond::VMM_STARTED).1, "KernelNotFound");
    assert_eq!(d.requeue, Some(Duration::from_secs(10)));
    // A missing disk image has its own reason.
    let facts = Facts {
        missing_files: vec![("spec.disks[root].file.path".into(), "/img/root".into())],
        ..Facts::default()
    };
    let d = decide(
        &spec(RunPolicy::Once, PowerState::Running),
        1,
        &MicroVMStatus::default(),
        &never_ran(),
        &facts,
        &Backoff::default(),
        at(0),
    );
    assert_eq!(ready(&d).1, "DiskNotFound");
}

/// jail × seccomp × what the node allows → refused fields (none: it may run).
#[test]
fn sandbox_policy_table() {
    use runv_crds::microvm::Toggle::{Disabled as Off, Enabled as On};
    let none = SandboxPolicy::default();
    let jail_ok = SandboxPolicy {
        allow_jail_disabled: true,
        ..none
    };
    let seccomp_ok = SandboxPolicy {
        allow_seccomp_disabled: true,
        ..none
    };
    let both_ok = SandboxPolicy {
        allow_jail_disabled: true,
        allow_seccomp_disabled: true,
    };
    let jail = "spec.isolation.jail";
    let seccomp = "spec.isolation.seccomp";
    let table: &[(_, _, SandboxPolicy, &[&str])] = &[
        (On, On, none, &[]),
        (Off, On, none, &[jail]),
        (On, Off, none, &[seccomp]),
        (Off, Off, none, &[jail, seccomp]),
        (Off, On, jail_ok, &[]),
        (Off, Off, jail_ok, &[seccomp]),
        (On, Off, jail_ok, &[seccomp]),
        (On, Off, seccomp_ok, &[]),
        (Off, Off, seccomp_ok, &[jail]),
        (Off, Off, both_ok, &[]),
        (On, On, both_ok, &[]),
    ];
    for (j, sc, policy, refused) in table {
        let mut s = spec(RunPolicy::Always, PowerState::Running);
        s.isolation.jail = *j;
        s.isolation.seccomp = *sc;
        let why = sandbox_refusal(&s, *policy);
        let case = format!("jail {j:?}, seccomp {sc:?}, {policy:?}: {why:?}");
        assert_eq!(why.is_none(), refused.is_empty(), "{case}");
        for field in [jail, seccomp] {
            let named = why.as_deref().is_some_and(|w| w.contains(field));
            assert_eq!(named, refused.contains(&field), "{case}");
        }
        if let Some(why) = &why {
            // The message names the flag that would allow each refused field.
            assert_eq!(
                why.contains("--allow-jail-disabled"),
                refused.contains(&jail),
                "{case}"
            );
            assert_eq!(
                why.contains("--allow-seccomp-disabled"),
                refused.contains(&seccomp),
                "{case}"
            );
        }
        // Refused: nothing starts, Ready=False with its own reason and a warning.
        let facts = Facts {
            sandbox_refused: why.clone(),
            ..Facts::default()
        };
        let d = run_with(&s, &MicroVMStatus::default(), &never_ran(), &facts, 0);
        if refused.is_empty() {
            assert_eq!(d.actions, [Action::Start { restart: false }], "{case}");
        } else {
            assert!(d.actions.is_empty(), "{case}");
            let (st, r, m) = cond_of(&d.status, cond::READY);
            assert_eq!((st.as_str(), r.as_str()), ("False", "SandboxNotAllowed"));
            assert_eq!(Some(m), why, "{case}");
            assert!(Reason::SandboxNotAllowed.warns());
            assert_eq!(cond_of(&d.status, cond::STALLED).0, "True");
        }
    }
    // A restart after an exit is refused the same way.
    let mut s = spec(RunPolicy::Always, PowerState::Running);
    s.isolation.jail = Off;
    let facts = Facts {
        sandbox_refused: sandbox_refusal(&s, none),
        ..Facts::default()
    };
    let d = run_with(
        &s,
        &MicroVMStatus::default(),
        &exited(ExitReason::PowerOff, 0),
        &facts,
        10_000,
    );
    assert!(d.actions.is_empty());
    assert_eq!(ready(&d).1, "SandboxNotAllowed");
}

/// runPolicy × how the VM ended → (phase, Ready status, Ready reason, restarts now?).
#[test]
fn run_policy_table() {
    use ExitReason::*;
    let long_ago = 10_000; // past any backoff
    let rows: &[(RunPolicy, ExitReason, Phase, &str, &str, bool)] = &[
        (
            RunPolicy::Once,
            PowerOff,
            Phase::Succeeded,
            "True",
            "Succeeded",
            false,
        ),
        (
            RunPolicy::Once,
            Reset,
            Phase::Succeeded,
            "True",
            "Succeeded",
            false,
        ),
        (
            RunPolicy::Once,
            TripleFault,
            Phase::Failed,
            "False",
            "TripleFault",
            false,
        ),
        (
            RunPolicy::Once,
            GuestPanic,
            Phase::Failed,
            "False",
            "GuestPanicked",
            false,
        ),
        (
            RunPolicy::RerunOnFailure,
            PowerOff,
            Phase::Succeeded,
            "True",
            "Succeeded",
            false,
        ),
        (
            RunPolicy::RerunOnFailure,
            EmulationFailure,
            Phase::Starting,
            "False",
            "Starting",
            true,
        ),
        (
            RunPolicy::Always,
            PowerOff,
            Phase::Starting,
            "False",
            "Starting",
            true,
        ),
        (
            RunPolicy::Always,
            InternalError,
            Phase::Starting,
            "False",
            "Starting",
            true,
        ),
        (
            RunPolicy::Manual,
            PowerOff,
            Phase::Stopped,
            "True",
            "Stopped",
            false,
        ),
        (
            RunPolicy::Manual,
            TripleFault,
            Phase::Stopped,
            "True",
            "Stopped",
            false,
        ),
    ];
    for (policy, reason, phase, rs, rr, restarts) in rows {
        let s = spec(*policy, PowerState::Running);
        let d = run(&s, &ran_before(0, 0), &exited(*reason, 5), long_ago);
        let case = format!("{policy:?} after {reason:?}");
        assert_eq!(d.status.phase, Some(*phase), "{case}");
        assert_eq!(ready(&d), (rs.to_string(), rr.to_string()), "{case}");
        assert_eq!(
            d.actions == vec![Action::Start { restart: true }],
            *restarts,
            "{case}: {:?}",
            d.actions
        );
        assert_eq!(d.status.restart_count, i32::from(*restarts), "{case}");
        let last = d.status.last_exit.as_ref().expect("lastExit");
        assert_eq!(last.time.0, at(5), "{case}");
        assert_eq!(last.code, Some(reason.exit_code()), "{case}");
    }
}

#[test]
fn a_vmm_killed_without_an_exit_record_is_a_failure() {
    let obs = Observed::NotRunning {
        exit: Some(ObservedExit {
            container: None,
            record: None,
            at: at(3),
            requested: false,
            oom_killed: false,
        }),
        last_generation: Some(1),
    };
    let d = run(
        &spec(RunPolicy::Once, PowerState::Running),
        &ran_before(0, 0),
        &obs,
        4,
    );
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&d).1, "Killed");
    let e = d.status.last_exit.unwrap();
    assert_eq!((e.reason.as_str(), e.code), ("Killed", None));
}

#[test]
fn an_oom_killed_vmm_is_a_failure_named_so_and_backs_off() {
    let oom = Observed::NotRunning {
        exit: Some(ObservedExit {
            container: None,
            record: None,
            at: at(3),
            requested: false,
            oom_killed: true,
        }),
        last_generation: Some(1),
    };
    // Once: Failed, with the reason on Ready and in lastExit.
    let d = run(
        &spec(RunPolicy::Once, PowerState::Running),
        &ran_before(0, 0),
        &oom,
        4,
    );
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&d), ("False".into(), "OOMKilled".into()));
    let e = d.status.last_exit.clone().unwrap();
    assert_eq!((e.reason.as_str(), e.code), ("OOMKilled", None));
    assert!(e.message.unwrap().contains("OOM killer"));
    // Always: backoff as for any failure, the exit named in the Events.
    let d = run(
        &spec(RunPolicy::Always, PowerState::Running),
        &ran_before(0, 0),
        &oom,
        4,
    );
    assert!(d.actions.is_empty());
    assert_eq!(ready(&d), ("False".into(), "CrashLoopBackOff".into()));
    assert!(
        cond_of(&d.status, cond::READY)
            .2
            .contains("the VM that failed; last exit: OOMKilled"),
        "{:?}",
        cond_of(&d.status, cond::READY)
    );
    let events = transitions(&ran_before(0, 0), &d.status);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "Exited" && t.note.contains("OOMKilled")),
        "{events:?}"
    );
    assert!(events.iter().any(|t| t.reason == "BackOff"), "{events:?}");
    // A record, if the VMM left one, wins over the counter.
    assert_eq!(exit_reason(None, true).as_str(), "OOMKilled");
    assert_eq!(exit_reason(None, false).as_str(), "Killed");
    let rec = ExitRecord::new(ExitReason::VmmError, "x");
    assert_eq!(exit_reason(Some(&rec), true).as_str(), "VMMError");
}

#[test]
fn a_control_socket_that_is_not_the_vmms_is_reported_and_sent_nothing() {
    let hijacked = |paused| Observed::Running {
        started_at: at(0),
        paused,
        booted_at: Some(at(1)),
        config_current: true,
        shutdown_since: None,
        control_mismatch: Some("another process listens on it: pid 9 (uid 0)".into()),
    };
    // Running or Paused asked: no pause, no resume; Ready=False, Stalled.
    for power in [PowerState::Running, PowerState::Paused] {
        let s = spec(RunPolicy::Always, power);
        let d = run(&s, &ran_before(0, 0), &hijacked(false), 5);
        assert!(d.actions.is_empty(), "{power:?}: {:?}", d.actions);
        assert_eq!(d.requeue, Some(Duration::from_secs(10)));
        assert_eq!(ready(&d), ("False".into(), "ControlSocketMismatch".into()));
        let (st, reason, msg) = cond_of(&d.status, cond::STALLED);
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("True", "ControlSocketMismatch")
        );
        assert!(msg.contains("pid 9"), "{msg}");
        let events = transitions(&ran_before(0, 0), &d.status);
        assert!(
            events.iter().any(|t| t.warning
                && t.reason == "ControlSocketMismatch"
                && t.note.contains("pid 9")),
            "{events:?}"
        );
    }
    // Stopping: the power button cannot be pressed through it: kill at once
    // (by pid; the runtime never sends it through that socket).
    let s = spec(RunPolicy::Always, PowerState::Stopped);
    let d = run(&s, &ran_before(0, 0), &hijacked(false), 5);
    assert_eq!(d.actions, vec![Action::Kill]);
    // A changed spec restarts it as usual.
    let s = spec(RunPolicy::Always, PowerState::Running);
    let mut changed = hijacked(false);
    if let Observed::Running { config_current, .. } = &mut changed {
        *config_current = false;
    }
    let d = run(&s, &ran_before(0, 0), &changed, 5);
    assert_eq!(
        d.actions,
        vec![Action::Kill, Action::Start { restart: false }]
    );
}

#[test]
fn crash_loop_backs_off_exponentially_then_restarts() {
    let s = spec(RunPolicy::Always, PowerState::Running);
    // Third restart pending: 10s * 2^2 = 40s after the exit at t=100.
    let prev = ran_before(2, 90);
    let d = run(&s, &prev, &exited(ExitReason::TripleFault, 100), 110);
    assert!(d.actions.is_empty());
    assert_eq!(ready(&d), ("False".into(), "CrashLoopBackOff".into()));
    assert_eq!(d.requeue, Some(Duration::from_secs(30)));
    let (_, _, msg) = cond_of(&d.status, cond::READY);
    assert!(msg.contains("TripleFault"), "{msg}");
    assert_eq!(d.status.restart_count, 2);
    // At t=140 it restarts, once.
    let d2 = run(&s, &d.status, &exited(ExitReason::TripleFault, 100), 140);
    assert_eq!(d2.actions, vec![Action::Start { restart: true }]);
    assert_eq!(d2.status.restart_count, 3);
    // Observed running afterwards: the count stays.
    let d3 = run(&s, &d2.status, &running(140, Some(141), false), 141);
    assert_eq!(d3.status.restart_count, 3);
    assert!(d3.actions.is_empty());
}

#[test]
fn backoff_doubles_caps_and_resets() {
    let b = Backoff::default();
    assert_eq!(b.delay(0, None), Duration::from_secs(10));
    assert_eq!(b.delay(1, None), Duration::from_secs(20));
    assert_eq!(b.delay(4, None), Duration::from_secs(160));
    assert_eq!(b.delay(5, None), Duration::from_secs(300));
    assert_eq!(b.delay(1000, None), Duration::from_secs(300));
    assert_eq!(b.delay(-1, None), Duration::from_secs(10));
    assert_eq!(
        b.delay(7, Some(Duration::from_secs(3600))),
        Duration::from_secs(10)
    );
}

#[test]
fn manual_starts_on_a_new_generation_only() {
    let s = spec(RunPolicy::Manual, PowerState::Running);
    // First time: starts.
    let d = run(&s, &MicroVMStatus::default(), &never_ran(), 0);
    assert_eq!(d.actions, vec![Action::Start { restart: false }]);
    // Exited, same generation: stays down, Ready.
    let d = run(&s, &ran_before(0, 0), &exited(ExitReason::PowerOff, 5), 6);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Stopped));
    // A new generation asks to run again.
    let d = decide(
        &s,
        2,
        &ran_before(0, 0),
        &exited(ExitReason::PowerOff, 5),
        &Facts::default(),
        &Backoff::default(),
        at(6),
    );
    assert_eq!(d.actions, vec![Action::Start { restart: false }]);
    assert_eq!(d.status.restart_count, 0, "a manual start is not a restart");
}

#[test]
fn stop_asks_the_guest_then_kills_after_the_grace_period() {
    let mut s = spec(RunPolicy::Always, PowerState::Stopped);
    s.termination_grace_period_seconds = 20;
    let d = run(
        &s,
        &MicroVMStatus::default(),
        &running(0, Some(1), false),
        10,
    );
    assert_eq!(d.actions, vec![Action::Shutdown]);
    assert_eq!(d.requeue, Some(Duration::from_secs(20)));
    assert_eq!(ready(&d), ("False".into(), "Stopping".into()));
    let asked = Observed::Running {
        started_at: at(0),
        paused: false,
        booted_at: Some(at(1)),
        config_current: true,
        shutdown_since: Some(at(10)),
        control_mismatch: None,
    };
    let d = run(&s, &d.status, &asked, 25);
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue, Some(Duration::from_secs(5)));
    let d = run(&s, &d.status, &asked, 30);
    assert_eq!(d.actions, vec![Action::Kill]);
    // Down: Stopped and Ready.
    let down = Observed::NotRunning {
        exit: Some(ObservedExit {
            container: None,
            record: Some(ExitRecord::new(ExitReason::PowerOff, "bye")),
            at: at(31),
            requested: true,
            oom_killed: false,
        }),
        last_generation: Some(1),
    };
    let d = run(&s, &d.status, &down, 32);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Stopped));
    assert_eq!(ready(&d), ("True".into(), "Stopped".into()));
    // Zero grace: kill at once. Halted: never runs.
    s.termination_grace_period_seconds = 0;
    let d = run(&s, &MicroVMStatus::default(), &running(0, None, false), 1);
    assert_eq!(d.actions, vec![Action::Kill]);
    let h = spec(RunPolicy::Halted, PowerState::Running);
    let d = run(&h, &MicroVMStatus::default(), &never_ran(), 0);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Stopped));
    assert_eq!(ready(&d), ("True".into(), "Stopped".into()));
}

#[test]
fn a_requested_stop_does_not_end_a_once_vm() {
    // Stopped by powerState, then asked to run again: it starts, it did not "exit".
    let s = spec(RunPolicy::Once, PowerState::Running);
    let down = Observed::NotRunning {
        exit: Some(ObservedExit {
            container: None,
            record: Some(ExitRecord::new(ExitReason::Killed, "killed")),
            at: at(5),
            requested: true,
            oom_killed: false,
        }),
        last_generation: Some(1),
    };
    let mut prev = ran_before(0, 0);
    prev.last_exit = None;
    let d = run(&s, &prev, &down, 6);
    assert_eq!(d.actions, vec![Action::Start { restart: false }]);
}

#[test]
fn pause_and_resume() {
    let s = spec(RunPolicy::Always, PowerState::Paused);
    let d = run(
        &s,
        &MicroVMStatus::default(),
        &running(0, Some(1), false),
        2,
    );
    assert_eq!(d.actions, vec![Action::Pause]);
    assert_eq!(ready(&d), ("False".into(), "Pausing".into()));
    let d = run(&s, &d.status, &running(0, Some(1), true), 3);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Paused));
    assert_eq!(ready(&d), ("True".into(), "Paused".into()));
    assert_eq!(cond_of(&d.status, cond::PAUSED).0, "True");
    let r = spec(RunPolicy::Always, PowerState::Running);
    let d = run(&r, &d.status, &running(0, Some(1), true), 4);
    assert_eq!(d.actions, vec![Action::Resume]);
}

#[test]
fn a_changed_spec_restarts_the_vm() {
    let s = spec(RunPolicy::Always, PowerState::Running);
    let obs = Observed::Running {
        started_at: at(0),
        paused: false,
        booted_at: Some(at(1)),
        config_current: false,
        shutdown_since: None,
        control_mismatch: None,
    };
    let d = run(&s, &MicroVMStatus::default(), &obs, 5);
    assert_eq!(
        d.actions,
        vec![Action::Kill, Action::Start { restart: false }]
    );
    // A change to something the node refuses (here: switching the jail off
    // where that is not allowed) ends the old VMM and starts nothing.
    let mut unjailed = s.clone();
    unjailed.isolation.jail = Toggle::Disabled;
    let facts = Facts {
        sandbox_refused: sandbox_refusal(&unjailed, SandboxPolicy::default()),
        ..Facts::default()
    };
    let d = run_with(&unjailed, &MicroVMStatus::default(), &obs, &facts, 5);
    assert_eq!(d.actions, vec![Action::Kill]);
    assert_eq!(ready(&d), ("False".into(), "SandboxNotAllowed".into()));
}

#[test]
fn transition_times_hold_and_events_follow_changes() {
    let s = spec(RunPolicy::Always, PowerState::Running);
    let d1 = run(&s, &MicroVMStatus::default(), &running(0, None, false), 1);
    let d2 = run(&s, &d1.status, &running(0, Some(2), false), 3);
    let d3 = run(&s, &d2.status, &running(0, Some(2), false), 9);
    let t = |d: &Decision, ty: &str| {
        cond::find(&d.status.conditions, ty)
            .unwrap()
            .last_transition_time
            .clone()
    };
    assert_eq!(t(&d2, cond::VMM_STARTED), t(&d1, cond::VMM_STARTED));
    assert_eq!(t(&d3, cond::READY), t(&d2, cond::READY));
    assert_ne!(t(&d2, cond::READY), t(&d1, cond::READY));
    assert_eq!(d3.status, d2.status, "nothing new, nothing changes");

    let ev = transitions(&MicroVMStatus::default(), &d1.status);
    assert_eq!(
        ev.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
        ["Started"]
    );
    let ev = transitions(&d1.status, &d2.status);
    assert_eq!(ev[0].reason, "Booted");
    assert!(ev[0].note.contains("2000 ms"), "{}", ev[0].note);
    assert!(transitions(&d2.status, &d3.status).is_empty());
    let d4 = run(&s, &d3.status, &exited(ExitReason::GuestPanic, 10), 11);
    let ev = transitions(&d3.status, &d4.status);
    let reasons: Vec<_> = ev.iter().map(|e| (e.reason.as_str(), e.warning)).collect();
    assert_eq!(reasons, [("Exited", true), ("BackOff", true)]);
}

#[test]
fn agent_status_leaves_the_operators_fields_out() {
    let mut status = run(
        &spec(RunPolicy::Once, PowerState::Running),
        &MicroVMStatus::default(),
        &never_ran(),
        0,
    )
    .status;
    status.node_name = Some("n1".into());
    cond::set_condition(
        &mut status.conditions,
        cond::Update {
            type_: cond::SCHEDULED,
            status: cond::Status::True,
            reason: "Placed",
            message: "",
            observed_generation: Some(1),
        },
        Time(at(0)),
    );
    let ours = agent_status(&status);
    assert_eq!(ours.node_name, None);
    assert!(cond::find(&ours.conditions, cond::SCHEDULED).is_none());
    assert_eq!(ours.conditions.len(), 6);
    assert_eq!(ours.phase, status.phase);
}

#[test]
fn a_fenced_node_kills_starts_nothing_and_says_why() {
    let facts = Facts {
        fenced: Some("node n1 carries the taint runv.dev/fenced".into()),
        ..Facts::default()
    };
    let s = spec(RunPolicy::Always, PowerState::Running);
    let decide_on = |observed: &Observed| {
        decide(
            &s,
            1,
            &MicroVMStatus::default(),
            observed,
            &facts,
            &Backoff::default(),
            at(10),
        )
    };
    // Running: killed at once, however the spec asks it to run.
    let d = decide_on(&running(0, Some(2), false));
    assert_eq!(d.actions, vec![Action::Kill]);
    // Down: nothing is started, not even a first start.
    let d = decide_on(&never_ran());
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(d.status.phase, Some(Phase::Stopped));
    let (s, r, m) = cond_of(&d.status, cond::READY);
    assert_eq!((s.as_str(), r.as_str()), ("False", "NodeFenced"));
    assert!(m.contains("runv.dev/fenced"), "{m}");
    assert_eq!(cond_of(&d.status, cond::STALLED).0, "False");
    // Looked at again soon, to start once the taint is gone.
    assert!(d.requeue.is_some_and(|q| q <= Duration::from_secs(5)));
}

#[test]
fn a_start_the_node_does_not_admit_starts_nothing_and_warns() {
    for reason in [Reason::OutOfCapacity, Reason::IsolationConflict] {
        let facts = Facts {
            admission: Some((reason, "no room".into())),
            ..Facts::default()
        };
        let s = spec(RunPolicy::Always, PowerState::Running);
        // First start, and a restart after an exit: neither happens, and the
        // refused restart is not counted.
        for (obs, now) in [(never_ran(), 0), (exited(ExitReason::PowerOff, 0), 10_000)] {
            let d = run_with(&s, &ran_before(2, 0), &obs, &facts, now);
            assert!(d.actions.is_empty(), "{reason:?}");
            assert_eq!(d.status.restart_count, 2);
            let (st, r, m) = cond_of(&d.status, cond::READY);
            assert_eq!(
                (st.as_str(), r.as_str(), m.as_str()),
                ("False", reason.as_str(), "no room")
            );
            assert_eq!(d.requeue, Some(Duration::from_secs(10)), "retried");
            assert!(reason.warns());
        }
    }
}

#[test]
fn a_container_vms_run_policy_follows_its_containers_exit_code() {
    let long_ago = 10_000;
    // The guest powers off cleanly in every case: what counts is the code.
    let container_exit = |code: Option<i32>| Observed::NotRunning {
        exit: Some(ObservedExit {
            container: Some(code),
            record: Some(ExitRecord::new(ExitReason::PowerOff, "powered off")),
            at: at(100),
            requested: false,
            oom_killed: false,
        }),
        last_generation: Some(1),
    };
    let cases = [
        (RunPolicy::Once, Some(0), Some(Phase::Succeeded), false),
        (RunPolicy::Once, Some(3), Some(Phase::Failed), false),
        (RunPolicy::Once, None, Some(Phase::Failed), false),
        (
            RunPolicy::RerunOnFailure,
            Some(0),
            Some(Phase::Succeeded),
            false,
        ),
        (RunPolicy::RerunOnFailure, Some(3), None, true),
        (RunPolicy::RerunOnFailure, None, None, true),
        (RunPolicy::Always, Some(0), None, true),
    ];
    for (policy, code, phase, restarts) in cases {
        let mut s = spec(policy, PowerState::Running);
        s.container = Some(serde_json::from_value(serde_json::json!({"image": "app:1"})).unwrap());
        let d = run(&s, &ran_before(0, 1), &container_exit(code), long_ago);
        let started = d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Start { restart: true }));
        assert_eq!(started, restarts, "{policy:?} after exit {code:?}");
        if let Some(p) = phase {
            assert_eq!(d.status.phase, Some(p), "{policy:?} after exit {code:?}");
        }
    }
}

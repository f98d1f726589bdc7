//! One writer per MicroVM status field. The operator's and the agent's
//! server-side apply bodies, each built by its own code for every state in
//! which it writes, are checked against the contract
//! (`runv_crds::contract::ownership`): neither names a field the other owns
//! in that binding, so within any binding their field sets never overlap, and
//! the fields both ever write are exactly the lifecycle fields handed over
//! between them.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runv_crds::contract::ownership::{self, LIFECYCLE_CONDITIONS, StatusField};
use runv_crds::contract::{Binding, Reason, Writer};
use runv_crds::microvm::{ExitStatus, NodeIsolation, PowerState, RunPolicy, Tenant};
use runv_crds::{MicroVM, MicroVMStatus};
use runv_node_agent::reconcile::{Backoff, Facts, Observed, ObservedExit, agent_body, decide};
use runv_operator::microvm::OperatorStatus;
use runv_vmm_api::{ExitReason, ExitRecord};

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

/// A VM whose status already carries the agent's run record and the
/// operator's tenant, so a body that re-applied the whole status type would
/// be caught naming them.
fn vm(policy: RunPolicy, power: PowerState) -> MicroVM {
    let mut vm: MicroVM = serde_json::from_value(serde_json::json!({
        "apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
        "metadata": {"name": "a", "namespace": "default", "uid": "u1", "generation": 2},
        "spec": {"boot": {"kernel": "/k"}, "resources": {"vcpus": 1, "memory": "64Mi"}},
    }))
    .unwrap();
    vm.spec.run_policy = policy;
    vm.spec.power_state = power;
    vm.status = Some(MicroVMStatus {
        restart_count: 3,
        last_exit: Some(ExitStatus {
            code: Some(13),
            reason: "GuestPanicked".into(),
            message: None,
            time: Time(at(0)),
        }),
        boot_start_time: Some(Time(at(0))),
        tenant: Some(tenant()),
        ..MicroVMStatus::default()
    });
    vm
}

fn tenant() -> Tenant {
    Tenant {
        name: "default".into(),
        node_isolation: NodeIsolation::Shared,
    }
}

/// Every state the operator writes in, with the body it applies.
fn operator_bodies() -> Vec<(String, Binding, serde_json::Value)> {
    let states = [
        OperatorStatus::Scheduled {
            node: "n1".into(),
            pinned: false,
            tenant: tenant(),
        },
        OperatorStatus::Scheduled {
            node: "n1".into(),
            pinned: true,
            tenant: tenant(),
        },
        OperatorStatus::Unschedulable {
            message: "0/1 nodes".into(),
        },
        OperatorStatus::Refused(runv_operator::tenancy::Refusal {
            reason: Reason::NodeNameNotAllowed,
            message: "spec.nodeName".into(),
        }),
        OperatorStatus::NotRequested,
        OperatorStatus::NodeLost {
            node: "n1".into(),
            reason: Reason::NodeLost,
            message: "gone".into(),
        },
        OperatorStatus::NodeLost {
            node: "n1".into(),
            reason: Reason::PinnedNodeLost,
            message: "gone".into(),
        },
    ];
    let mut out = Vec::new();
    for state in states {
        for (policy, power) in [
            (RunPolicy::Always, PowerState::Running),
            (RunPolicy::Halted, PowerState::Running),
            (RunPolicy::Always, PowerState::Stopped),
        ] {
            let body = state
                .body(&vm(policy, power), at(100))
                .expect("a transition writes");
            out.push((format!("{state:?}"), state.binding(), body));
        }
    }
    out
}

fn exit(reason: ExitReason, requested: bool, oom_killed: bool) -> Observed {
    Observed::NotRunning {
        exit: Some(ObservedExit {
            record: (!oom_killed).then(|| ExitRecord::new(reason, "x")),
            at: at(50),
            requested,
            oom_killed,
            container: None,
        }),
        last_generation: Some(1),
    }
}

fn running(paused: bool, booted: bool, config_current: bool, mismatch: bool) -> Observed {
    Observed::Running {
        started_at: at(10),
        paused,
        booted_at: booted.then(|| at(11)),
        config_current,
        shutdown_since: None,
        control_mismatch: mismatch.then(|| "another process".to_owned()),
    }
}

/// Every verdict the agent reaches on its node, with the body it applies.
fn agent_bodies() -> Vec<(String, serde_json::Value)> {
    let mut observed = vec![Observed::NotRunning {
        exit: None,
        last_generation: None,
    }];
    for reason in [
        ExitReason::PowerOff,
        ExitReason::GuestPanic,
        ExitReason::Killed,
    ] {
        observed.push(exit(reason, false, false));
        observed.push(exit(reason, true, false));
    }
    observed.push(exit(ExitReason::Killed, false, true));
    for bits in 0..16u8 {
        let bit = |i: u8| bits & (1 << i) != 0;
        observed.push(running(bit(0), bit(1), bit(2), bit(3)));
    }
    let blocked = Facts {
        missing_files: vec![("spec.boot.kernel".into(), "/k".into())],
        ..Facts::default()
    };
    let mut out = Vec::new();
    for policy in [
        RunPolicy::Always,
        RunPolicy::RerunOnFailure,
        RunPolicy::Once,
        RunPolicy::Manual,
        RunPolicy::Halted,
    ] {
        for power in [PowerState::Running, PowerState::Paused, PowerState::Stopped] {
            let v = vm(policy, power);
            for obs in &observed {
                for facts in [Facts::default(), blocked.clone()] {
                    let backoff = Backoff {
                        initial: Duration::from_secs(1000),
                        ..Backoff::default()
                    };
                    let previous = v.status.clone().unwrap();
                    let d = decide(&v.spec, 2, &previous, obs, &facts, &backoff, at(100));
                    let phase = d.status.phase;
                    out.push((
                        format!("{policy:?}/{power:?}/{phase:?}"),
                        agent_body(&d.status),
                    ));
                }
            }
        }
    }
    out
}

fn lifecycle() -> BTreeSet<StatusField> {
    let mut set: BTreeSet<StatusField> = LIFECYCLE_CONDITIONS
        .iter()
        .map(|c| StatusField::Condition((*c).to_owned()))
        .collect();
    set.insert(StatusField::Phase);
    set.insert(StatusField::ObservedGeneration);
    set
}

#[test]
fn operator_and_agent_bodies_never_overlap() {
    let mut by_binding: Vec<(Binding, Writer, BTreeSet<StatusField>)> = Vec::new();
    let mut operator_all = BTreeSet::new();
    for (state, binding, body) in operator_bodies() {
        let fields = ownership::check(Writer::Operator, binding, &body)
            .unwrap_or_else(|e| panic!("operator in {state}: {e}; body {body}"));
        operator_all.extend(fields.iter().cloned());
        by_binding.push((binding, Writer::Operator, fields));
    }
    let mut agent_all = BTreeSet::new();
    let agent = agent_bodies();
    assert!(agent.len() > 500, "{} agent states", agent.len());
    let mut phases = BTreeSet::new();
    for (state, body) in agent {
        let fields = ownership::check(Writer::Agent, Binding::OnLiveNode, &body)
            .unwrap_or_else(|e| panic!("agent in {state}: {e}; body {body}"));
        phases.insert(body["phase"].as_str().unwrap_or_default().to_owned());
        agent_all.extend(fields.iter().cloned());
        by_binding.push((Binding::OnLiveNode, Writer::Agent, fields));
    }
    // The agent's states cover its whole vocabulary of phases.
    for p in [
        "Scheduled",
        "Starting",
        "Running",
        "Paused",
        "Stopped",
        "Succeeded",
        "Failed",
    ] {
        assert!(
            phases.contains(p),
            "no agent state in phase {p}: {phases:?}"
        );
    }
    for binding in Binding::ALL {
        let of = |w: Writer| -> BTreeSet<StatusField> {
            by_binding
                .iter()
                .filter(|(b, who, _)| *b == binding && *who == w)
                .flat_map(|(_, _, f)| f.iter().cloned())
                .collect()
        };
        let both: Vec<_> = of(Writer::Operator)
            .intersection(&of(Writer::Agent))
            .cloned()
            .collect();
        assert!(both.is_empty(), "{binding:?}: both write {both:?}");
    }
    // What both ever write is exactly what changes hands; the operator never
    // writes the run record (it once reset restartCount on node loss).
    let shared: BTreeSet<_> = operator_all.intersection(&agent_all).cloned().collect();
    assert_eq!(shared, lifecycle());
    assert!(
        !operator_all
            .iter()
            .any(|f| matches!(f, StatusField::RunRecord(_)))
    );
    assert!(operator_all.contains(&StatusField::NodeName));
    assert!(operator_all.contains(&StatusField::Tenant));
    assert!(!agent_all.contains(&StatusField::NodeName));
    assert!(!agent_all.contains(&StatusField::Tenant));
    assert!(!agent_all.contains(&StatusField::Condition("Scheduled".into())));
}

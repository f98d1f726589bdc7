//! Table tests for the replica arithmetic, including whole rollouts simulated
//! step by step.

use super::*;

fn r(name: &str, hash: &str, available: bool) -> Replica {
    Replica {
        name: name.into(),
        hash: hash.into(),
        scheduled: true,
        ready: available,
        available,
        terminating: false,
    }
}

fn rolling_1_0() -> Strategy {
    Strategy::Rolling {
        max_surge: 1,
        max_unavailable: 0,
    }
}

#[test]
fn resolve_counts_and_percentages() {
    let pct = |s: &str| IntOrString::String(s.into());
    assert_eq!(resolve("f", &IntOrString::Int(2), 10, false), Ok(2));
    assert_eq!(resolve("f", &pct("25%"), 10, true), Ok(3));
    assert_eq!(resolve("f", &pct("25%"), 10, false), Ok(2));
    assert_eq!(resolve("f", &pct("0%"), 10, true), Ok(0));
    assert!(resolve("f", &IntOrString::Int(-1), 10, true).is_err());
    assert!(resolve("f", &pct("x%"), 10, true).is_err());
    assert!(resolve("f", &pct("10"), 10, true).is_err());
}

#[test]
fn rolling_bounds_never_both_zero() {
    let zero = IntOrString::Int(0);
    assert_eq!(
        rolling(&zero, &zero, 5),
        Ok(Strategy::Rolling {
            max_surge: 0,
            max_unavailable: 1
        })
    );
    let pct = IntOrString::String("25%".into());
    assert_eq!(
        rolling(&pct, &pct, 10),
        Ok(Strategy::Rolling {
            max_surge: 3,
            max_unavailable: 2
        })
    );
}

#[test]
fn scale_up_from_zero() {
    assert_eq!(
        plan(3, rolling_1_0(), "h", &[]),
        Plan {
            create: 3,
            delete: vec![]
        }
    );
}

#[test]
fn scale_down_prefers_unscheduled_then_unready() {
    let mut unscheduled = r("w-h-4", "h", false);
    unscheduled.scheduled = false;
    let replicas = [
        r("w-h-0", "h", true),
        r("w-h-1", "h", false),
        r("w-h-2", "h", true),
        r("w-h-3", "h", true),
        unscheduled,
    ];
    let p = plan(2, rolling_1_0(), "h", &replicas);
    assert_eq!(p.create, 0);
    assert_eq!(p.delete, ["w-h-4", "w-h-1", "w-h-3"]);
}

#[test]
fn terminating_replicas_are_not_counted() {
    let mut gone = r("w-h-0", "h", true);
    gone.terminating = true;
    let p = plan(1, rolling_1_0(), "h", &[gone]);
    assert_eq!(p.create, 1);
}

#[test]
fn rolling_update_surges_then_drains() {
    let old = [
        r("w-a-0", "a", true),
        r("w-a-1", "a", true),
        r("w-a-2", "a", true),
    ];
    // maxSurge 1, maxUnavailable 0: one new replica first, nothing deleted yet.
    let p = plan(3, rolling_1_0(), "b", &old);
    assert_eq!(
        p,
        Plan {
            create: 1,
            delete: vec![]
        }
    );
    // While the new one is not available, nothing moves.
    let mut state = old.to_vec();
    state.push(r("w-b-0", "b", false));
    assert_eq!(plan(3, rolling_1_0(), "b", &state), Plan::default());
    // Once it is available, one old one goes.
    state[3].available = true;
    let p = plan(3, rolling_1_0(), "b", &state);
    assert_eq!(p.create, 0);
    assert_eq!(p.delete.len(), 1);
}

/// Simulates a rollout to completion: each step applies the plan, new replicas
/// become available on the next step. Availability never drops below
/// desired - maxUnavailable and the total never exceeds desired + maxSurge.
fn simulate(desired: u32, strategy: Strategy, start: Vec<Replica>) -> usize {
    let surge = match strategy {
        Strategy::Rolling { max_surge, .. } => max_surge,
        Strategy::Recreate => 0,
    };
    let mut state = start;
    let mut next = 0;
    for step in 0..100 {
        for rep in &mut state {
            rep.available = true;
            rep.ready = true;
        }
        let c = counts("new", &state);
        if complete(desired, &c, &state) {
            return step;
        }
        let p = plan(desired, strategy, "new", &state);
        assert!(
            p.create > 0 || !p.delete.is_empty(),
            "step {step}: stuck with {state:?}"
        );
        state.retain(|rep| !p.delete.contains(&rep.name));
        let avail_after_delete = counts("new", &state).available;
        if let Strategy::Rolling {
            max_unavailable, ..
        } = strategy
        {
            assert!(
                avail_after_delete + max_unavailable >= desired,
                "step {step}: availability dropped to {avail_after_delete}"
            );
        }
        for _ in 0..p.create {
            let mut fresh = r(&format!("w-new-{next}"), "new", false);
            fresh.ready = false;
            state.push(fresh);
            next += 1;
        }
        if p.create > 0 {
            let total = counts("new", &state).replicas;
            assert!(
                total <= desired + surge,
                "step {step}: created up to {total}"
            );
        }
    }
    panic!("rollout did not complete in 100 steps");
}

#[test]
fn rollouts_complete_within_bounds() {
    let old = |n: usize| {
        (0..n)
            .map(|i| r(&format!("w-old-{i}"), "old", true))
            .collect::<Vec<_>>()
    };
    let cases = [
        (
            3,
            Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
            },
        ),
        (
            3,
            Strategy::Rolling {
                max_surge: 0,
                max_unavailable: 1,
            },
        ),
        (
            10,
            Strategy::Rolling {
                max_surge: 3,
                max_unavailable: 2,
            },
        ),
        (
            5,
            Strategy::Rolling {
                max_surge: 5,
                max_unavailable: 0,
            },
        ),
    ];
    for (desired, strategy) in cases {
        let steps = simulate(desired, strategy, old(desired as usize));
        assert!(steps > 0, "{strategy:?}");
    }
}

#[test]
fn rollout_while_scaling_down() {
    let old: Vec<_> = (0..6)
        .map(|i| r(&format!("w-old-{i}"), "old", true))
        .collect();
    simulate(
        2,
        Strategy::Rolling {
            max_surge: 1,
            max_unavailable: 0,
        },
        old,
    );
}

#[test]
fn recreate_deletes_all_then_waits_then_creates() {
    let old = [r("w-a-0", "a", true), r("w-a-1", "a", true)];
    let p = plan(2, Strategy::Recreate, "b", &old);
    assert_eq!(p.create, 0);
    assert_eq!(p.delete.len(), 2);
    // While they terminate, nothing is created.
    let mut terminating = old.to_vec();
    for t in &mut terminating {
        t.terminating = true;
    }
    assert_eq!(
        plan(2, Strategy::Recreate, "b", &terminating),
        Plan::default()
    );
    // Once they are gone, the new ones come.
    assert_eq!(plan(2, Strategy::Recreate, "b", &[]).create, 2);
}

#[test]
fn counts_and_completion() {
    let mut t = r("w-b-2", "b", true);
    t.terminating = true;
    let state = [
        r("w-a-0", "a", true),
        r("w-b-0", "b", true),
        r("w-b-1", "b", false),
        t,
    ];
    let c = counts("b", &state);
    assert_eq!(
        c,
        Counts {
            replicas: 3,
            ready: 2,
            available: 2,
            updated: 2,
            old: 1
        }
    );
    assert!(!complete(2, &c, &state));
    let done = [r("w-b-0", "b", true), r("w-b-1", "b", true)];
    assert!(complete(2, &counts("b", &done), &done));
}

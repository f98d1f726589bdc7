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

/// What a simulated rollout went through.
#[derive(Debug)]
struct Trace {
    /// Steps until complete.
    steps: usize,
    /// Active replicas after each step's creates.
    totals: Vec<u32>,
    /// Available replicas after each step's deletes.
    available: Vec<u32>,
    /// The replicas at the end.
    end: Vec<Replica>,
}

/// Simulates a rollout to template `new`: each step applies the plan, and
/// every replica is available by the start of the next step. Fails if a step
/// plans nothing before the rollout is complete, or after 100 steps.
fn simulate(desired: u32, strategy: Strategy, start: Vec<Replica>) -> Trace {
    let mut state = start;
    let mut trace = Trace {
        steps: 0,
        totals: vec![],
        available: vec![],
        end: vec![],
    };
    let mut next = 0;
    for step in 0..100 {
        for rep in &mut state {
            rep.available = true;
            rep.ready = true;
        }
        if complete(desired, &counts("new", &state), &state) {
            trace.steps = step;
            trace.end = state;
            return trace;
        }
        let p = plan(desired, strategy, "new", &state);
        assert!(
            p.create > 0 || !p.delete.is_empty(),
            "step {step}: stuck with {state:?}"
        );
        state.retain(|rep| !p.delete.contains(&rep.name));
        trace.available.push(counts("new", &state).available);
        for _ in 0..p.create {
            state.push(r(&format!("w-new-{next}"), "new", false));
            next += 1;
        }
        trace.totals.push(counts("new", &state).replicas);
    }
    panic!("rollout did not complete in 100 steps");
}

fn old(n: usize) -> Vec<Replica> {
    (0..n)
        .map(|i| r(&format!("w-old-{i}"), "old", true))
        .collect()
}

/// One rolling update of `desired` old replicas.
struct Rollout {
    desired: u32,
    max_surge: u32,
    max_unavailable: u32,
}

#[test]
fn rollouts_complete_within_bounds() {
    let rollout = |desired, max_surge, max_unavailable| Rollout {
        desired,
        max_surge,
        max_unavailable,
    };
    let cases = [
        rollout(3, 1, 0),
        rollout(3, 0, 1),
        rollout(10, 3, 2),
        rollout(5, 5, 0),
    ];
    for c in cases {
        let strategy = Strategy::Rolling {
            max_surge: c.max_surge,
            max_unavailable: c.max_unavailable,
        };
        let t = simulate(c.desired, strategy, old(c.desired as usize));
        let what = format!("{strategy:?} of {}: {t:?}", c.desired);
        // Each round replaces up to maxSurge + maxUnavailable replicas in two
        // steps (create or delete, then the new ones become available).
        let rounds = c.desired.div_ceil(c.max_surge + c.max_unavailable) as usize;
        assert!(t.steps > 0 && t.steps <= 2 * rounds, "{what}");
        // maxSurge: never more than desired + maxSurge replicas.
        assert!(
            t.totals.iter().all(|&n| n <= c.desired + c.max_surge),
            "{what}"
        );
        // maxUnavailable: never fewer than desired - maxUnavailable available.
        assert!(
            t.available
                .iter()
                .all(|&n| n + c.max_unavailable >= c.desired),
            "{what}"
        );
        // Done: exactly `desired`, all of the new template.
        assert_eq!(t.end.len(), c.desired as usize, "{what}");
        assert!(t.end.iter().all(|rep| rep.hash == "new"), "{what}");
    }
}

#[test]
fn rollout_while_scaling_down() {
    // Six old replicas, two wanted of a new template, maxSurge 1.
    let t = simulate(
        2,
        Strategy::Rolling {
            max_surge: 1,
            max_unavailable: 0,
        },
        old(6),
    );
    let what = format!("{t:?}");
    // The surplus of old replicas goes in the first step, before anything is
    // created, and without taking availability below the desired count.
    assert_eq!(t.totals[0], 2, "{what}");
    assert_eq!(t.available[0], 2, "{what}");
    // From then on: never more than desired + maxSurge, never fewer than
    // desired available.
    assert!(t.totals.iter().all(|&n| n <= 3), "{what}");
    assert!(t.available.iter().all(|&n| n >= 2), "{what}");
    // It converges to exactly two new replicas: the scale-down, then two
    // replacements of two steps each.
    assert_eq!(t.end.len(), 2, "{what}");
    assert!(t.end.iter().all(|rep| rep.hash == "new"), "{what}");
    assert!(t.steps <= 5, "{what}");
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

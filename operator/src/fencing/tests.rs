//! The fencing policy as a table, then fencing against a mocked API: the
//! grace of an expired and of a missing Lease, unfencing, the resourceVersion
//! precondition, and auto-fence off.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::{Agent, Decision, Observed, decide, fence};
use crate::context::{Config, Context};
use crate::testing::{MockApi, Recorded, context_on, fenced, lease, node};

fn with_rv(mut n: Node, rv: &str) -> Node {
    n.metadata.resource_version = Some(rv.into());
    n
}

/// A context with auto-fencing as `config` says, and two other nodes whose
/// agents are alive (so the peers agree that the API is up).
fn ctx_with(api: &MockApi, config: Config) -> Arc<Context> {
    let peers = vec![node("p1", 4, "2Gi"), node("p2", 4, "2Gi")];
    // Renewed now and valid for days: alive at every time a test looks.
    let leases: Vec<_> = ["p1", "p2"]
        .into_iter()
        .map(|p| {
            let mut l = lease(p, 0);
            if let Some(spec) = l.spec.as_mut() {
                spec.lease_duration_seconds = Some(1_000_000);
            }
            l
        })
        .collect();
    let base = context_on(api, peers, leases, vec![]);
    let ctx = Arc::try_unwrap(base).expect("one reference");
    Arc::new(Context { config, ..ctx })
}

/// Auto-fencing on, as the mocked-API cases below exercise it.
fn fencing() -> Config {
    Config {
        auto_fence: true,
        ..Config::default()
    }
}

fn node_patches(api: &MockApi) -> Vec<Recorded> {
    api.calls()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/api/v1/nodes/"))
        .collect()
}

fn ok_api() -> MockApi {
    MockApi::with(Arc::new(|r: &Recorded| {
        let body = if r.body.is_null() {
            json!({})
        } else {
            r.body.clone()
        };
        (StatusCode::OK, body)
    }))
}

fn later(t: Timestamp, secs: i64) -> Timestamp {
    t + SignedDuration::from_secs(secs)
}

/// One case of the policy: what was observed, and the decision.
struct Case {
    name: &'static str,
    auto_fence: bool,
    agent: Agent,
    fenced: bool,
    want: Decision,
}

#[test]
fn policy_table() {
    const GRACE: Duration = Duration::from_secs(300);
    let s = Duration::from_secs;
    let case = |name, auto_fence, agent, fenced, want| Case {
        name,
        auto_fence,
        agent,
        fenced,
        want,
    };
    use Agent::{Current, Expired, Missing};
    use Decision::{Fence, Keep, Unfence};
    let cases = [
        case("alive, not fenced", true, Current, false, Keep),
        case("alive, fenced: back", true, Current, true, Unfence),
        case("expired within grace", true, Expired(s(299)), false, Keep),
        case(
            "expired exactly the grace",
            true,
            Expired(GRACE),
            false,
            Fence,
        ),
        case("expired past grace", true, Expired(s(301)), false, Fence),
        case(
            "expired past grace, fenced",
            true,
            Expired(s(301)),
            true,
            Keep,
        ),
        case(
            "expired within grace, fenced",
            true,
            Expired(s(1)),
            true,
            Keep,
        ),
        case("missing within grace", true, Missing(s(299)), false, Keep),
        case(
            "missing exactly the grace",
            true,
            Missing(GRACE),
            false,
            Fence,
        ),
        case(
            "missing past grace, fenced",
            true,
            Missing(s(999)),
            true,
            Keep,
        ),
        case("off: alive, fenced", false, Current, true, Keep),
        case(
            "off: expired past grace",
            false,
            Expired(s(301)),
            false,
            Keep,
        ),
        case(
            "off: missing past grace",
            false,
            Missing(s(301)),
            false,
            Keep,
        ),
    ];
    for c in cases {
        let observed = Observed {
            auto_fence: c.auto_fence,
            grace: GRACE,
            agent: c.agent,
            fenced: c.fenced,
            peers: 2,
            peers_alive: 2,
        };
        assert_eq!(decide(&observed), c.want, "{}: {observed:?}", c.name);
    }
}

#[test]
fn fencing_needs_a_clear_majority_of_live_peers() {
    let gone = Observed {
        auto_fence: true,
        grace: Duration::from_secs(300),
        agent: Agent::Expired(Duration::from_secs(999)),
        fenced: false,
        peers: 0,
        peers_alive: 0,
    };
    // (peers, alive) → fence? The only node is never fenced; half is no
    // majority (the API may be what failed for them all).
    for (peers, alive, want) in [
        (0, 0, Decision::Keep),
        (1, 0, Decision::Keep),
        (1, 1, Decision::Fence),
        (2, 1, Decision::Keep),
        (2, 2, Decision::Fence),
        (3, 1, Decision::Keep),
        (3, 2, Decision::Fence),
        (4, 2, Decision::Keep),
        (4, 3, Decision::Fence),
    ] {
        let o = Observed {
            peers,
            peers_alive: alive,
            ..gone
        };
        assert_eq!(decide(&o), want, "{peers} peers, {alive} alive");
    }
    // Unfencing needs no quorum: the agent itself is back.
    let back = Observed {
        agent: Agent::Current,
        fenced: true,
        ..gone
    };
    assert_eq!(decide(&back), Decision::Unfence);
}

#[tokio::test]
async fn no_fencing_when_the_other_agents_are_gone_too() {
    let api = ok_api();
    let base = context_on(
        &api,
        vec![node("p1", 4, "2Gi"), node("p2", 4, "2Gi")],
        vec![lease("p1", 500), lease("p2", 500)],
        vec![],
    );
    let ctx = Arc::new(Context {
        config: fencing(),
        ..Arc::try_unwrap(base).expect("one reference")
    });
    let n = with_rv(node("n1", 4, "2Gi"), "7");
    fence(&ctx, &n, Some(&lease("n1", 500)), Timestamp::now()).await;
    assert!(node_patches(&api).is_empty(), "{:?}", api.calls());
}

#[test]
fn each_change_has_its_event_reason() {
    assert_eq!(Decision::Keep.reason(), None);
    assert_eq!(Decision::Fence.reason(), Some("NodeFenced"));
    assert_eq!(Decision::Unfence.reason(), Some("NodeUnfenced"));
}

#[tokio::test]
async fn expired_lease_fences_after_the_grace_only() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let n = with_rv(node("n1", 4, "2Gi"), "7");
    // Renewed 100 s ago, valid 40 s: expired for 60 s, under the 300 s grace.
    let l = lease("n1", 100);
    let now = Timestamp::now();
    fence(&ctx, &n, Some(&l), now).await;
    assert!(node_patches(&api).is_empty());
    fence(&ctx, &n, Some(&l), later(now, 240)).await;
    let patches = node_patches(&api);
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert_eq!(p.path, "/api/v1/nodes/n1");
    assert!(
        p.query.contains("fieldManager=runv-operator"),
        "{}",
        p.query
    );
    // Optimistic concurrency: written only over the copy it was decided on.
    assert_eq!(p.body["metadata"]["resourceVersion"], "7");
    assert_eq!(p.body["spec"]["taints"][0]["key"], "runv.dev/fenced");
    assert_eq!(p.body["spec"]["taints"][0]["effect"], "NoExecute");
    assert_eq!(api.event_reasons(), ["NodeFenced"]);
}

#[tokio::test]
async fn missing_lease_gets_the_grace_from_when_it_was_first_seen_missing() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let t0 = Timestamp::now();
    let mut n = with_rv(node("n1", 4, "2Gi"), "3");
    // Created long ago: what counts is when this operator first saw it without a Lease.
    n.metadata.creation_timestamp = Some(Time(later(t0, -10_000)));
    fence(&ctx, &n, None, t0).await;
    fence(&ctx, &n, None, later(t0, 299)).await;
    assert!(node_patches(&api).is_empty(), "{:?}", api.calls());
    fence(&ctx, &n, None, later(t0, 300)).await;
    assert_eq!(node_patches(&api).len(), 1);
    assert_eq!(api.event_reasons(), ["NodeFenced"]);
}

#[tokio::test]
async fn missing_lease_of_a_new_node_counts_from_its_creation() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let t0 = Timestamp::now();
    let mut n = node("n1", 4, "2Gi");
    // Seen first at t0, but created (by the API's clock) 100 s later: the later counts.
    n.metadata.creation_timestamp = Some(Time(later(t0, 100)));
    fence(&ctx, &n, None, t0).await;
    fence(&ctx, &n, None, later(t0, 399)).await;
    assert!(node_patches(&api).is_empty());
    fence(&ctx, &n, None, later(t0, 400)).await;
    assert_eq!(node_patches(&api).len(), 1);
}

#[tokio::test]
async fn a_lease_that_appears_resets_the_missing_clock() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let t0 = Timestamp::now();
    let n = node("n1", 4, "2Gi");
    fence(&ctx, &n, None, t0).await;
    fence(&ctx, &n, Some(&lease("n1", 0)), later(t0, 10)).await;
    // Missing again: the grace starts over.
    fence(&ctx, &n, None, later(t0, 301)).await;
    assert!(node_patches(&api).is_empty());
}

#[tokio::test]
async fn recovered_agent_unfences_and_keeps_other_taints() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let mut n = with_rv(fenced(node("n1", 4, "2Gi")), "9");
    n.spec
        .as_mut()
        .and_then(|s| s.taints.as_mut())
        .unwrap()
        .push(Taint {
            key: "example.com/maintenance".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
    fence(&ctx, &n, Some(&lease("n1", 1)), Timestamp::now()).await;
    let p = &node_patches(&api)[0];
    assert_eq!(p.body["metadata"]["resourceVersion"], "9");
    assert_eq!(
        p.body["spec"]["taints"],
        json!([{ "key": "example.com/maintenance", "effect": "NoSchedule" }])
    );
    assert_eq!(api.event_reasons(), ["NodeUnfenced"]);
}

#[tokio::test]
async fn a_node_changed_since_cached_is_not_overwritten() {
    // The API refuses the write: the Node's resourceVersion moved on.
    let api = MockApi::with(Arc::new(|r: &Recorded| {
        if r.is_event() {
            (StatusCode::CREATED, r.body.clone())
        } else {
            (
                StatusCode::CONFLICT,
                json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                    "reason": "Conflict", "message": "the object has been modified"
                }),
            )
        }
    }));
    let ctx = ctx_with(&api, fencing());
    let n = with_rv(node("n1", 4, "2Gi"), "1");
    fence(&ctx, &n, Some(&lease("n1", 1000)), Timestamp::now()).await;
    assert_eq!(node_patches(&api).len(), 1);
    // Nothing happened, so nothing is announced.
    assert!(api.event_reasons().is_empty());
}

#[tokio::test]
async fn auto_fence_off_never_touches_nodes() {
    let api = ok_api();
    let ctx = ctx_with(
        &api,
        Config {
            auto_fence: false,
            fence_after: Duration::from_secs(1),
            ..Config::default()
        },
    );
    let now = Timestamp::now();
    fence(&ctx, &node("n1", 4, "2Gi"), Some(&lease("n1", 1000)), now).await;
    fence(
        &ctx,
        &fenced(node("n2", 4, "2Gi")),
        Some(&lease("n2", 1)),
        now,
    )
    .await;
    fence(&ctx, &node("n3", 4, "2Gi"), None, later(now, 10)).await;
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_fenced_node_with_a_dead_agent_is_left_as_it_is() {
    let api = ok_api();
    let ctx = ctx_with(&api, fencing());
    let n = fenced(node("n1", 4, "2Gi"));
    fence(&ctx, &n, Some(&lease("n1", 10_000)), Timestamp::now()).await;
    assert!(api.requests.lock().unwrap().is_empty());
}

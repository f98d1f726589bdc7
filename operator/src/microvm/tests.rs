//! The MicroVM reconcile against a mocked API: every branch, and concurrent
//! placements that must not over-commit a node.

use std::sync::Arc;

use runv_crds::microvm::{Phase, PowerState, RunPolicy};

use super::*;
use crate::testing::{
    MockApi, context, context_in, context_on, fenced, lease, namespace, node, vm,
};
use runv_crds::contract::{ALLOW_EXCLUSIVE_LABEL, ALLOW_NODE_NAME_LABEL, TENANT_LABEL};
use runv_crds::microvm::NodeIsolation;

/// A mock API knowing `vms`, and a context whose caches hold these objects and
/// the Namespaces `namespaces`.
fn context_with_namespaces(
    nodes: Vec<k8s_openapi::api::core::v1::Node>,
    leases: Vec<k8s_openapi::api::coordination::v1::Lease>,
    vms: Vec<MicroVM>,
    namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
) -> (MockApi, Arc<Context>) {
    let api = MockApi::new(
        vms.iter()
            .map(|v| serde_json::to_value(v).unwrap())
            .collect(),
    );
    let ctx = context_in(&api, nodes, leases, vms, namespaces);
    (api, ctx)
}

/// `default`, where an administrator allows pinning.
fn pinning_allowed() -> k8s_openapi::api::core::v1::Namespace {
    namespace("default", &[(ALLOW_NODE_NAME_LABEL, "true")])
}

fn status_patches(api: &MockApi) -> Vec<crate::testing::Recorded> {
    api.calls()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .collect()
}

fn condition<'v>(body: &'v serde_json::Value, type_: &str) -> &'v serde_json::Value {
    body["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test]
async fn places_on_a_node_with_room() {
    let a = vm("a").size(2, "1Gi").build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert_eq!(
        p.path,
        "/apis/runv.dev/v1alpha1/namespaces/default/microvms/a/status"
    );
    assert!(
        p.query.contains("fieldManager=runv-operator") && p.query.contains("force=true"),
        "{}",
        p.query
    );
    assert_eq!(p.body["status"]["nodeName"], "n1");
    assert_eq!(p.body["status"]["phase"], "Scheduled");
    assert_eq!(p.body["status"]["observedGeneration"], 1);
    assert_eq!(condition(&p.body, "Scheduled")["status"], "True");
    assert_eq!(condition(&p.body, "Ready")["reason"], "Starting");
    assert_eq!(p.body["status"]["conditions"].as_array().unwrap().len(), 7);
    assert_eq!(api.event_reasons(), ["Scheduled"]);
}

#[tokio::test]
async fn no_room_is_reported_with_the_reason_and_retried() {
    let a = vm("a").size(1, "4Gi").build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    let action = reconcile(Arc::new(a), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(ctx.config.retry_unschedulable));
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Pending");
    assert!(p.body["status"].get("nodeName").is_none());
    let sched = condition(&p.body, "Scheduled");
    assert_eq!(sched["status"], "False");
    assert_eq!(sched["reason"], "Unschedulable");
    assert_eq!(
        sched["message"],
        "0/1 nodes can run it (1 vCPUs, 4096 MiB): 1 have too little free memory"
    );
    assert_eq!(condition(&p.body, "Reconciling")["status"], "True");
    assert_eq!(api.event_reasons(), ["FailedScheduling"]);
}

#[tokio::test]
async fn unchanged_unschedulable_status_is_not_rewritten() {
    let mut a = vm("a").size(1, "4Gi").build();
    let now = Timestamp::now();
    let status = OperatorStatus::Unschedulable {
        message: "0/1 nodes can run it (1 vCPUs, 4096 MiB): 1 have too little free memory".into(),
    }
    .to_apply(&a, now)
    .unwrap();
    a.status = Some(status);
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    assert!(status_patches(&api).is_empty(), "{:?}", api.calls());
    assert!(api.event_reasons().is_empty());
}

#[tokio::test]
async fn capacity_of_bound_vms_is_accounted() {
    let existing = vm("old").size(3, "1Gi").bound("n1", Phase::Running).build();
    let stopped = vm("off").size(1, "1Gi").bound("n2", Phase::Stopped).build();
    let a = vm("a").size(2, "512Mi").build();
    let (api, ctx) = context(
        vec![node("n1", 4, "8Gi"), node("n2", 4, "2Gi")],
        vec![lease("n1", 1), lease("n2", 1)],
        vec![existing, stopped, a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    // n1 has one vCPU left; n2 three, beside a VM that is stopped but keeps its place.
    assert_eq!(status_patches(&api)[0].body["status"]["nodeName"], "n2");
}

#[tokio::test]
async fn succeeded_and_failed_vms_keep_their_place() {
    // A VM that ended may be switched back to Always and restart where it is:
    // its capacity is never given to another VM while it is bound.
    let done = vm("done")
        .size(4, "1Gi")
        .bound("n1", Phase::Succeeded)
        .build();
    let failed = vm("failed")
        .size(4, "1Gi")
        .bound("n2", Phase::Failed)
        .build();
    let a = vm("a").size(1, "128Mi").build();
    let (api, ctx) = context(
        vec![node("n1", 4, "8Gi"), node("n2", 4, "8Gi")],
        vec![lease("n1", 1), lease("n2", 1)],
        vec![done, failed, a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert!(p.body["status"].get("nodeName").is_none(), "{}", p.body);
    assert_eq!(
        condition(&p.body, "Scheduled")["message"],
        "0/2 nodes can run it (1 vCPUs, 128 MiB): 2 have too few free vCPUs"
    );
}

#[tokio::test]
async fn concurrent_reconciles_never_overcommit() {
    let vms: Vec<_> = (0..6)
        .map(|i| vm(&format!("v{i}")).size(1, "1Gi").build())
        .collect();
    // Room for exactly four 1Gi VMs in all.
    let (api, ctx) = context(
        vec![node("n1", 8, "2Gi"), node("n2", 8, "2Gi")],
        vec![lease("n1", 1), lease("n2", 1)],
        vms.clone(),
    );
    let runs = vms.into_iter().map(|v| reconcile(Arc::new(v), ctx.clone()));
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    let patches = status_patches(&api);
    let mut per_node = BTreeMap::new();
    let mut pending = 0;
    for p in &patches {
        match p.body["status"]["nodeName"].as_str() {
            Some(n) => *per_node.entry(n.to_owned()).or_insert(0) += 1,
            None => pending += 1,
        }
    }
    assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [2, 2]);
    assert_eq!(pending, 2);
}

#[tokio::test]
async fn a_vm_bound_a_moment_ago_is_not_placed_twice() {
    let a = vm("a").build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a.clone()), ctx.clone()).await.unwrap();
    // The cache still shows it unbound.
    let action = reconcile(Arc::new(a), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    assert_eq!(status_patches(&api).len(), 1);
}

#[tokio::test]
async fn a_stale_copy_is_not_placed_when_the_cache_shows_it_bound() {
    // The reconcile started with an unbound copy, and waited for the placement
    // lock while another reconcile bound the VM and the cache caught up.
    let stale = vm("a").build();
    let bound_now = vm("a").bound("n1", Phase::Scheduled).build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![bound_now],
    );
    reconcile(Arc::new(stale), ctx).await.unwrap();
    assert!(api.calls().is_empty(), "{:?}", api.calls());
}

#[tokio::test]
async fn pinned_vm_is_bound_to_its_node() {
    // Pinning bypasses the placer's checks: cordon and room do not matter.
    let mut edge = node("edge-1", 1, "64Mi");
    edge.spec.as_mut().unwrap().unschedulable = Some(true);
    let a = vm("a").size(4, "1Gi").pinned("edge-1").build();
    let (api, ctx) = context_with_namespaces(
        vec![edge],
        vec![lease("edge-1", 1)],
        vec![a.clone()],
        vec![pinning_allowed()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["nodeName"], "edge-1");
    assert_eq!(
        p.body["status"]["tenant"],
        serde_json::json!({"name": "default", "nodeIsolation": "Shared"})
    );
    assert_eq!(condition(&p.body, "Scheduled")["reason"], "Pinned");
    assert_eq!(api.event_reasons(), ["Scheduled"]);
}

async fn pinned_and_unavailable(
    nodes: Vec<k8s_openapi::api::core::v1::Node>,
    leases: Vec<k8s_openapi::api::coordination::v1::Lease>,
) -> String {
    let a = vm("a").pinned("edge-1").policy(RunPolicy::Always).build();
    let (api, ctx) =
        context_with_namespaces(nodes, leases, vec![a.clone()], vec![pinning_allowed()]);
    let action = reconcile(Arc::new(a), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(ctx.config.retry_unschedulable));
    let p = &status_patches(&api)[0];
    assert!(p.body["status"].get("nodeName").is_none(), "{}", p.body);
    assert_eq!(p.body["status"]["phase"], "Pending");
    let sched = condition(&p.body, "Scheduled");
    assert_eq!(sched["status"], "False");
    assert_eq!(sched["reason"], "Unschedulable");
    assert_eq!(api.event_reasons(), ["FailedScheduling"]);
    sched["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pinned_vm_is_not_bound_to_a_fenced_node() {
    let message = pinned_and_unavailable(
        vec![fenced(node("edge-1", 4, "2Gi"))],
        vec![lease("edge-1", 1)],
    )
    .await;
    assert_eq!(
        message,
        "pinned by spec.nodeName to node edge-1, which is fenced"
    );
}

#[tokio::test]
async fn pinned_vm_is_not_bound_to_a_node_whose_agent_is_lost() {
    let message =
        pinned_and_unavailable(vec![node("edge-1", 4, "2Gi")], vec![lease("edge-1", 100)]).await;
    assert_eq!(
        message,
        "pinned by spec.nodeName to node edge-1, whose runv agent Lease has expired"
    );
    let message = pinned_and_unavailable(vec![node("edge-1", 4, "2Gi")], vec![]).await;
    assert_eq!(
        message,
        "pinned by spec.nodeName to node edge-1, which has no runv agent Lease"
    );
}

#[tokio::test]
async fn pinned_vm_is_not_bound_to_an_unknown_node() {
    let message = pinned_and_unavailable(vec![], vec![]).await;
    assert_eq!(
        message,
        "pinned by spec.nodeName to node edge-1, which does not exist or runs no runv agent"
    );
}

#[tokio::test]
async fn pinned_always_vm_on_a_fenced_node_stays_bound_and_unknown_without_churn() {
    let a = vm("a")
        .pinned("n1")
        .bound("n1", Phase::Running)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(
        vec![fenced(node("n1", 4, "2Gi"))],
        vec![lease("n1", 900)],
        vec![a.clone()],
    );
    let action = reconcile(Arc::new(a.clone()), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let patches = status_patches(&api);
    assert_eq!(patches.len(), 1, "{patches:?}");
    let p = &patches[0];
    // Applied (not the merge patch that unbinds), still on its node.
    assert!(p.query.contains("force=true"), "{}", p.query);
    assert_eq!(p.body["status"]["phase"], "Unknown");
    assert_eq!(p.body["status"]["nodeName"], "n1");
    let ready = condition(&p.body, "Ready");
    assert_eq!(ready["status"], "Unknown");
    assert_eq!(ready["reason"], "PinnedNodeLost");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.starts_with("node n1 is fenced and the VM is pinned to it by spec.nodeName"),
        "{message}"
    );
    assert_eq!(api.event_reasons(), ["PinnedNodeLost"]);

    // Once shown, later rounds write and announce nothing.
    let mut shown = a;
    shown.status = Some(serde_json::from_value(p.body["status"].clone()).unwrap());
    let (api, ctx) = context(
        vec![fenced(node("n1", 4, "2Gi"))],
        vec![lease("n1", 950)],
        vec![shown.clone()],
    );
    reconcile(Arc::new(shown), ctx).await.unwrap();
    assert!(api.requests.lock().unwrap().is_empty(), "{:?}", api.calls());
}

#[tokio::test]
async fn pinned_vm_on_a_deleted_node_stays_bound() {
    let a = vm("a")
        .pinned("gone")
        .bound("gone", Phase::Running)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(vec![], vec![], vec![a.clone()]);
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["nodeName"], "gone");
    let ready = condition(&p.body, "Ready");
    assert_eq!(ready["reason"], "PinnedNodeLost");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("node gone was deleted and the VM is pinned"),
        "{ready}"
    );
}

#[tokio::test]
async fn stopped_vm_is_not_placed_and_says_why() {
    let mut a = vm("a").build();
    a.spec.power_state = PowerState::Stopped;
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    assert_eq!(
        reconcile(Arc::new(a), ctx).await.unwrap(),
        Action::await_change()
    );
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Stopped");
    assert!(p.body["status"].get("nodeName").is_none());
    assert_eq!(
        condition(&p.body, "Scheduled")["message"],
        "powerState is Stopped: the VM gets a node when it is asked to run"
    );
    assert!(api.event_reasons().is_empty());
}

#[tokio::test]
async fn stopped_status_already_shown_is_not_rewritten() {
    let mut a = vm("a").policy(RunPolicy::Halted).build();
    a.status = OperatorStatus::NotRequested.to_apply(&a, Timestamp::now());
    let (api, ctx) = context(vec![], vec![], vec![a.clone()]);
    reconcile(Arc::new(a), ctx).await.unwrap();
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_vm_gone_from_the_cache_is_not_placed() {
    let a = vm("a").build();
    let (api, ctx) = context(vec![node("n1", 4, "2Gi")], vec![lease("n1", 1)], vec![]);
    assert_eq!(
        reconcile(Arc::new(a), ctx).await.unwrap(),
        Action::await_change()
    );
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_vm_being_deleted_in_the_cache_is_not_placed() {
    let stale = vm("a").build();
    let deleting = vm("a").deleting().build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![deleting],
    );
    assert_eq!(
        reconcile(Arc::new(stale), ctx).await.unwrap(),
        Action::requeue(Duration::from_secs(1))
    );
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_new_unschedulable_reason_is_written_and_announced() {
    let mut a = vm("a").size(1, "4Gi").build();
    a.status = (OperatorStatus::Unschedulable {
        message: "0/0 nodes can run it".into(),
    })
    .to_apply(&a, Timestamp::now());
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(
        condition(&p.body, "Scheduled")["message"],
        "0/1 nodes can run it (1 vCPUs, 4096 MiB): 1 have too little free memory"
    );
    assert_eq!(api.event_reasons(), ["FailedScheduling"]);
}

#[tokio::test]
async fn vm_on_a_node_without_a_lease_is_lost_with_that_message() {
    let a = vm("a").bound("n1", Phase::Running).build();
    let (api, ctx) = context(vec![node("n1", 4, "2Gi")], vec![], vec![a.clone()]);
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Unknown");
    assert_eq!(
        condition(&p.body, "Ready")["message"],
        "node n1 has no runv agent Lease"
    );
    assert_eq!(api.event_reasons(), ["NodeLost"]);
}

#[tokio::test]
async fn vm_already_unknown_is_not_rewritten_as_time_passes() {
    let mut a = vm("a").bound("n1", Phase::Running).build();
    a.status = (OperatorStatus::NodeLost {
        node: "n1".into(),
        reason: Reason::NodeLost,
        message: "the runv agent on node n1 has not renewed its Lease for 5s".into(),
    })
    .to_apply(&a, Timestamp::now());
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 100)],
        vec![a.clone()],
    );
    assert_eq!(
        reconcile(Arc::new(a), ctx).await.unwrap(),
        Action::requeue(Duration::from_secs(10))
    );
    assert!(api.requests.lock().unwrap().is_empty(), "{:?}", api.calls());
}

#[tokio::test]
async fn a_refused_move_is_an_error_and_announces_nothing() {
    let api = MockApi::with(Arc::new(|r: &crate::testing::Recorded| {
        if r.is_event() {
            (http::StatusCode::CREATED, r.body.clone())
        } else {
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd is down", "reason": "InternalError", "code": 500
                }),
            )
        }
    }));
    let a = vm("a")
        .bound("n1", Phase::Unknown)
        .policy(RunPolicy::Always)
        .build();
    let ctx = context_on(
        &api,
        vec![fenced(node("n1", 4, "2Gi"))],
        vec![lease("n1", 900)],
        vec![a.clone()],
    );
    let err = reconcile(Arc::new(a), ctx).await.unwrap_err();
    assert_eq!(err.metric_reason(), "ApiStatus");
    assert_eq!(status_patches(&api).len(), 1);
    assert!(api.event_reasons().is_empty());
}

#[tokio::test]
async fn halted_vm_is_not_placed_and_is_ready() {
    let a = vm("a").policy(RunPolicy::Halted).build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Stopped");
    assert!(p.body["status"].get("nodeName").is_none());
    assert_eq!(condition(&p.body, "Ready")["status"], "True");
    assert_eq!(condition(&p.body, "Scheduled")["reason"], "NotRequested");
    assert_eq!(condition(&p.body, "Reconciling")["status"], "False");
}

#[tokio::test]
async fn bound_vm_on_a_live_node_is_left_to_its_agent() {
    let a = vm("a").bound("n1", Phase::Running).build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    assert_eq!(
        reconcile(Arc::new(a), ctx).await.unwrap(),
        Action::await_change()
    );
    assert!(api.calls().is_empty());
}

#[tokio::test]
async fn deleting_vm_is_left_alone() {
    let a = vm("a").deleting().build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn vm_on_a_lost_node_becomes_unknown() {
    let a = vm("a")
        .bound("n1", Phase::Running)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 100)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Unknown");
    assert_eq!(p.body["status"]["nodeName"], "n1");
    let ready = condition(&p.body, "Ready");
    assert_eq!(ready["status"], "Unknown");
    assert_eq!(ready["reason"], "NodeLost");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("the runv agent on node n1 has not renewed its Lease for"),
        "{ready}"
    );
    assert_eq!(api.event_reasons(), ["NodeLost"]);
}

#[tokio::test]
async fn always_vm_leaves_a_fenced_node() {
    let a = vm("a")
        .bound("n1", Phase::Unknown)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(
        vec![fenced(node("n1", 4, "2Gi"))],
        vec![lease("n1", 900)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert!(p.query.contains("fieldManager=runv-operator"));
    assert!(!p.query.contains("force"));
    assert_eq!(
        p.body,
        serde_json::json!({ "status": { "nodeName": null, "tenant": null, "phase": "Pending" } })
    );
    assert_eq!(api.event_reasons(), ["Rescheduling"]);
}

#[tokio::test]
async fn always_vm_leaves_an_out_of_service_node() {
    let a = vm("a")
        .bound("n1", Phase::Unknown)
        .policy(RunPolicy::Always)
        .build();
    let mut n1 = node("n1", 4, "2Gi");
    n1.spec.get_or_insert_with(Default::default).taints =
        Some(vec![k8s_openapi::api::core::v1::Taint {
            key: "node.kubernetes.io/out-of-service".into(),
            effect: "NoExecute".into(),
            ..Default::default()
        }]);
    let (api, ctx) = context(vec![n1], vec![lease("n1", 900)], vec![a.clone()]);
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["nodeName"], serde_json::Value::Null);
    assert_eq!(api.event_reasons(), ["Rescheduling"]);
}

#[tokio::test]
async fn always_vm_stays_on_a_node_whose_lease_merely_expired() {
    // No evidence that the VM is not running there: it is shown Unknown
    // (NodeLost), never started a second time elsewhere.
    let a = vm("a")
        .bound("n1", Phase::Running)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 3600)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["nodeName"], "n1");
    assert_eq!(p.body["status"]["phase"], "Unknown");
    assert_eq!(api.event_reasons(), ["NodeLost"]);
}

#[tokio::test]
async fn always_vm_leaves_a_deleted_node() {
    let a = vm("a")
        .bound("gone", Phase::Running)
        .policy(RunPolicy::Always)
        .build();
    let (api, ctx) = context(vec![], vec![], vec![a.clone()]);
    reconcile(Arc::new(a), ctx).await.unwrap();
    assert_eq!(
        status_patches(&api)[0].body["status"]["nodeName"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn once_vm_stays_on_a_fenced_node_as_unknown() {
    let a = vm("a")
        .bound("n1", Phase::Running)
        .policy(RunPolicy::Once)
        .build();
    let (api, ctx) = context(
        vec![fenced(node("n1", 4, "2Gi"))],
        vec![lease("n1", 900)],
        vec![a.clone()],
    );
    reconcile(Arc::new(a), ctx).await.unwrap();
    let p = &status_patches(&api)[0];
    assert_eq!(p.body["status"]["phase"], "Unknown");
    assert_eq!(p.body["status"]["nodeName"], "n1");
}

#[tokio::test]
async fn api_errors_surface_with_a_metric_reason() {
    let api = MockApi::with(Arc::new(|r: &crate::testing::Recorded| {
        if r.is_event() {
            (http::StatusCode::OK, serde_json::json!({}))
        } else {
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd is down", "reason": "InternalError", "code": 500
                }),
            )
        }
    }));
    let a = vm("a").build();
    let ctx = context_on(
        &api,
        vec![node("n1", 4, "2Gi")],
        vec![lease("n1", 1)],
        vec![a.clone()],
    );
    let err = reconcile(Arc::new(a.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.metric_reason(), "ApiStatus");
    // A refused write leaves no assumed binding behind.
    assert!(ctx.placer.lock().await.bindings.is_empty());
}

#[tokio::test]
async fn a_write_with_an_unreadable_answer_is_assumed_to_have_happened() {
    // The API applies the status but answers with something that is not a MicroVM.
    let api = MockApi::with(Arc::new(|r: &crate::testing::Recorded| {
        if r.is_event() {
            (http::StatusCode::OK, serde_json::json!({}))
        } else {
            (
                http::StatusCode::OK,
                serde_json::json!({ "kind": "MicroVM", "garbage": true }),
            )
        }
    }));
    let a = vm("a").size(1, "1Gi").build();
    let b = vm("b").size(1, "1Gi").build();
    let ctx = context_on(
        &api,
        vec![node("n1", 4, "1Gi")],
        vec![lease("n1", 1)],
        vec![a.clone(), b.clone()],
    );
    assert!(reconcile(Arc::new(a), ctx.clone()).await.is_err());
    assert!(ctx.placer.lock().await.holds("uid-a"));
    // So b, which would fit only if a had not been placed, waits.
    reconcile(Arc::new(b), ctx).await.unwrap_err();
    let last = api.calls().into_iter().last().unwrap();
    assert_eq!(last.body["status"]["phase"], "Pending");
}

/// Reconciles `a` on one roomy node n1 with these Namespaces; the status
/// patches and Event reasons.
async fn place_in(
    a: MicroVM,
    others: Vec<MicroVM>,
    namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
) -> (Vec<crate::testing::Recorded>, Vec<String>, Action) {
    let mut vms = others;
    vms.push(a.clone());
    let (api, ctx) = context_with_namespaces(
        vec![node("n1", 8, "8Gi")],
        vec![lease("n1", 1)],
        vms,
        namespaces,
    );
    let action = reconcile(Arc::new(a), ctx).await.unwrap();
    (status_patches(&api), api.event_reasons(), action)
}

/// Asserts `patches` is one refusal with `reason`, naming every part of `names`.
fn assert_refused(patches: &[crate::testing::Recorded], reason: &str, names: &[&str]) {
    assert_eq!(patches.len(), 1, "{patches:?}");
    let status = &patches[0].body["status"];
    assert!(status.get("nodeName").is_none(), "{status}");
    assert!(status.get("tenant").is_none(), "{status}");
    assert_eq!(status["phase"], "Pending");
    let sched = condition(&patches[0].body, "Scheduled");
    assert_eq!(sched["status"], "False");
    assert_eq!(sched["reason"], reason);
    let message = sched["message"].as_str().unwrap();
    for part in names {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert_eq!(condition(&patches[0].body, "Ready")["reason"], reason);
    assert_eq!(condition(&patches[0].body, "Stalled")["status"], "True");
}

#[tokio::test]
async fn the_tenant_comes_from_the_namespace_label_and_is_written_with_the_placement() {
    let a = vm("a").in_namespace("blue-dev").build();
    let ns = namespace("blue-dev", &[(TENANT_LABEL, "blue")]);
    let (patches, events, _) = place_in(a, vec![], vec![ns.clone()]).await;
    assert_eq!(patches[0].body["status"]["nodeName"], "n1");
    assert_eq!(
        patches[0].body["status"]["tenant"],
        serde_json::json!({"name": "blue", "nodeIsolation": "Shared"})
    );
    assert_eq!(events, ["Scheduled"]);
    // Without the label, the namespace's name; spec.tenant may repeat it.
    let b = vm("b")
        .in_namespace("green")
        .tenant("green", NodeIsolation::Shared)
        .build();
    let (patches, _, _) = place_in(b, vec![], vec![namespace("green", &[])]).await;
    assert_eq!(patches[0].body["status"]["tenant"]["name"], "green");
}

#[tokio::test]
async fn a_tenant_name_other_than_the_namespaces_is_refused() {
    let a = vm("a")
        .in_namespace("mallory")
        .tenant("victim", NodeIsolation::Shared)
        .build();
    let (patches, events, action) = place_in(
        a,
        vec![],
        vec![namespace("mallory", &[(TENANT_LABEL, "mallory")])],
    )
    .await;
    assert_refused(
        &patches,
        "TenantNotAllowed",
        &[
            "spec.tenant.name",
            "\"victim\"",
            "namespace mallory",
            "runv.dev/tenant=mallory",
        ],
    );
    assert_eq!(events, ["TenantNotAllowed"]);
    // Retried: an administrator may relabel the namespace.
    assert_eq!(
        action,
        Action::requeue(crate::context::Config::default().retry_unschedulable)
    );
}

#[tokio::test]
async fn a_pin_is_refused_without_the_namespace_label() {
    let a = vm("a").pinned("n1").build();
    let (patches, events, _) = place_in(a.clone(), vec![], vec![namespace("default", &[])]).await;
    assert_refused(
        &patches,
        "NodeNameNotAllowed",
        &[
            "spec.nodeName",
            "n1",
            "namespace default",
            "runv.dev/allow-node-name=true",
        ],
    );
    assert_eq!(events, ["NodeNameNotAllowed"]);
    // With it, bound to the pinned node.
    let (patches, _, _) = place_in(a, vec![], vec![pinning_allowed()]).await;
    assert_eq!(patches[0].body["status"]["nodeName"], "n1");
    assert_eq!(condition(&patches[0].body, "Scheduled")["reason"], "Pinned");
}

#[tokio::test]
async fn exclusive_is_refused_without_the_namespace_label() {
    let a = vm("a")
        .in_namespace("acme")
        .tenant("acme", NodeIsolation::Exclusive)
        .build();
    let (patches, events, _) = place_in(a.clone(), vec![], vec![namespace("acme", &[])]).await;
    assert_refused(
        &patches,
        "ExclusiveNotAllowed",
        &[
            "spec.tenant.nodeIsolation",
            "namespace acme",
            "runv.dev/allow-exclusive=true",
        ],
    );
    assert_eq!(events, ["ExclusiveNotAllowed"]);
    let allowed = namespace("acme", &[(ALLOW_EXCLUSIVE_LABEL, "true")]);
    let (patches, _, _) = place_in(a, vec![], vec![allowed]).await;
    assert_eq!(
        patches[0].body["status"]["tenant"],
        serde_json::json!({"name": "acme", "nodeIsolation": "Exclusive"})
    );
}

#[tokio::test]
async fn an_unchanged_refusal_is_not_rewritten() {
    let mut a = vm("a").pinned("n1").build();
    let (patches, _, _) = place_in(a.clone(), vec![], vec![namespace("default", &[])]).await;
    let shown: MicroVMStatus = serde_json::from_value(patches[0].body["status"].clone()).unwrap();
    a.status = Some(shown);
    let (patches, events, _) = place_in(a, vec![], vec![namespace("default", &[])]).await;
    assert!(patches.is_empty(), "{patches:?}");
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn isolation_reads_the_tenant_resolved_at_placement_not_the_spec() {
    // A VM of tenant mallory that claims acme in its spec (an older operator
    // placed it) is still mallory's: acme's Exclusive VM does not go beside it.
    let squatter = vm("squatter")
        .in_namespace("mallory")
        .tenant("acme", NodeIsolation::Shared)
        .bound("n1", Phase::Running)
        .placed_as("mallory", NodeIsolation::Shared)
        .build();
    let a = vm("a")
        .in_namespace("acme")
        .tenant("acme", NodeIsolation::Exclusive)
        .build();
    let namespaces = vec![
        namespace("acme", &[(ALLOW_EXCLUSIVE_LABEL, "true")]),
        namespace("mallory", &[]),
    ];
    let (patches, _, _) = place_in(a, vec![squatter], namespaces.clone()).await;
    assert_eq!(
        condition(&patches[0].body, "Scheduled")["message"],
        "0/1 nodes can run it (1 vCPUs, 128 MiB): 1 run VMs of another tenant that cannot share"
    );
    // A VM placed before status.tenant was written counts as its namespace's.
    let legacy = vm("legacy")
        .in_namespace("mallory")
        .tenant("acme", NodeIsolation::Shared)
        .bound("n1", Phase::Running)
        .build();
    let b = vm("b")
        .in_namespace("acme")
        .tenant("acme", NodeIsolation::Exclusive)
        .build();
    let (patches, _, _) = place_in(b, vec![legacy], namespaces).await;
    assert!(patches[0].body["status"].get("nodeName").is_none());
}

#[tokio::test]
async fn a_vm_whose_namespace_is_not_cached_yet_waits() {
    let a = vm("a").in_namespace("new").build();
    let (patches, events, action) = place_in(a, vec![], vec![]).await;
    assert!(patches.is_empty() && events.is_empty());
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
}

#[test]
fn a_lost_node_keeps_the_tenant_in_the_operators_apply() {
    // Left out of an apply, a field the operator owns would be removed.
    let a = vm("a")
        .bound("n1", Phase::Running)
        .placed_as("blue", NodeIsolation::Exclusive)
        .build();
    let body = OperatorStatus::NodeLost {
        node: "n1".into(),
        reason: Reason::NodeLost,
        message: "gone".into(),
    }
    .body(&a, Timestamp::now())
    .unwrap();
    assert_eq!(
        body["tenant"],
        serde_json::json!({"name": "blue", "nodeIsolation": "Exclusive"})
    );
}

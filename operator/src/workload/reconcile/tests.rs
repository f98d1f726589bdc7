//! The SecureWorkload reconcile against a mocked API: scale up, scale down, a
//! rolling update step, Recreate, and a template the API refuses.

use std::sync::Arc;

use http::StatusCode;
use runv_crds::SecureWorkload;
use serde_json::{Value, json};

use super::*;
use crate::testing::{MockApi, Recorded, context_on, vm};
use crate::workload::replica::{HASH_LABEL, template_hash};

fn workload(replicas: i32, strategy: Value) -> SecureWorkload {
    serde_json::from_value(json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "SecureWorkload",
        "metadata": { "name": "web", "namespace": "default", "uid": "swl-uid", "generation": 2 },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "boot": { "kernel": "/k" } }
            },
            "container": { "image": "web:1" },
            "strategy": strategy
        }
    }))
    .unwrap()
}

fn replica(swl: &SecureWorkload, name: &str, hash: &str, ready: bool) -> MicroVM {
    let b = vm(name)
        .owned_by(swl)
        .label(HASH_LABEL, hash)
        .label("app", "web");
    if ready {
        b.bound("n1", runv_crds::microvm::Phase::Running)
            .ready()
            .build()
    } else {
        b.build()
    }
}

async fn reconcile_with(swl: &SecureWorkload, owned: Vec<MicroVM>, api: &MockApi) -> Action {
    let ctx = context_on(api, vec![], vec![], owned);
    reconcile(Arc::new(swl.clone()), ctx).await.unwrap()
}

fn mock(swl: &SecureWorkload) -> MockApi {
    MockApi::new(vec![serde_json::to_value(swl).unwrap()])
}

fn creates(api: &MockApi) -> Vec<Recorded> {
    api.calls()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect()
}

fn deletes(api: &MockApi) -> Vec<String> {
    api.calls()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.rsplit('/').next().unwrap().to_owned())
        .collect()
}

fn status_of(api: &MockApi) -> Value {
    api.calls()
        .into_iter()
        .rfind(|r| r.method == "PATCH" && r.path.ends_with("/secureworkloads/web/status"))
        .map(|r| r.body["status"].clone())
        .expect("a status apply")
}

fn condition<'v>(status: &'v Value, type_: &str) -> &'v Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn scales_up_from_zero() {
    let swl = workload(3, json!({}));
    let api = mock(&swl);
    reconcile_with(&swl, vec![], &api).await;
    let hash = template_hash(&swl);
    let posts = creates(&api);
    let names: Vec<_> = posts
        .iter()
        .map(|p| p.body["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        (0..3)
            .map(|i| format!("web-{hash}-{i}"))
            .collect::<Vec<_>>()
    );
    for p in &posts {
        assert_eq!(
            p.path,
            "/apis/runv.dev/v1alpha1/namespaces/default/microvms"
        );
        assert_eq!(p.body["metadata"]["ownerReferences"][0]["uid"], "swl-uid");
        assert_eq!(p.body["metadata"]["labels"][HASH_LABEL], hash.as_str());
        assert_eq!(p.body["metadata"]["labels"]["app"], "web");
    }
    let status = status_of(&api);
    assert_eq!(status["replicas"], 0);
    assert_eq!(status["selector"], "app=web");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(condition(&status, "Progressing")["reason"], "Progressing");
    assert_eq!(condition(&status, "Available")["status"], "False");
    assert_eq!(condition(&status, "ReplicaFailure")["status"], "False");
    assert_eq!(api.event_reasons(), ["SuccessfulCreate"; 3]);
}

#[tokio::test]
async fn scales_down_unready_first() {
    let swl = workload(1, json!({}));
    let hash = template_hash(&swl);
    let owned = vec![
        replica(&swl, &format!("web-{hash}-0"), &hash, true),
        replica(&swl, &format!("web-{hash}-1"), &hash, false),
        replica(&swl, &format!("web-{hash}-2"), &hash, true),
    ];
    let api = mock(&swl);
    reconcile_with(&swl, owned, &api).await;
    assert!(creates(&api).is_empty());
    assert_eq!(
        deletes(&api),
        [format!("web-{hash}-1"), format!("web-{hash}-2")]
    );
}

#[tokio::test]
async fn complete_rollout_reports_it_and_writes_nothing_more() {
    let swl = workload(2, json!({}));
    let hash = template_hash(&swl);
    let owned: Vec<_> = (0..2)
        .map(|i| replica(&swl, &format!("web-{hash}-{i}"), &hash, true))
        .collect();
    let api = mock(&swl);
    reconcile_with(&swl, owned.clone(), &api).await;
    let status = status_of(&api);
    assert_eq!(
        (
            status["replicas"].clone(),
            status["availableReplicas"].clone()
        ),
        (json!(2), json!(2))
    );
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "RolloutComplete"
    );
    assert_eq!(condition(&status, "Reconciling")["status"], "False");
    assert_eq!(condition(&status, "Available")["status"], "True");
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].clone(), ready["reason"].clone()),
        (json!("True"), json!("AllReplicasAvailable"))
    );

    // With that status stored, a second pass writes nothing.
    let mut stored = swl.clone();
    stored.status = Some(serde_json::from_value(status).unwrap());
    let api = mock(&stored);
    reconcile_with(&stored, owned, &api).await;
    assert!(api.calls().is_empty(), "{:?}", api.calls());
}

#[tokio::test]
async fn rolling_update_surges_one_and_keeps_old_until_new_is_available() {
    let swl = workload(
        3,
        json!({ "type": "RollingUpdate", "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 } }),
    );
    let owned: Vec<_> = (0..3)
        .map(|i| replica(&swl, &format!("web-old-{i}"), "old", true))
        .collect();
    let api = mock(&swl);
    reconcile_with(&swl, owned, &api).await;
    assert_eq!(creates(&api).len(), 1);
    assert!(deletes(&api).is_empty());
    let status = status_of(&api);
    assert_eq!(status["updatedReplicas"], 0);
    assert_eq!(condition(&status, "Available")["status"], "True");
}

#[tokio::test]
async fn recreate_deletes_old_before_creating() {
    let swl = workload(2, json!({ "type": "Recreate" }));
    let owned: Vec<_> = (0..2)
        .map(|i| replica(&swl, &format!("web-old-{i}"), "old", true))
        .collect();
    let api = mock(&swl);
    reconcile_with(&swl, owned, &api).await;
    assert!(creates(&api).is_empty());
    let mut gone = deletes(&api);
    gone.sort();
    assert_eq!(gone, ["web-old-0", "web-old-1"]);
}

#[tokio::test]
async fn refused_template_is_a_replica_failure_and_stalls() {
    let swl = workload(1, json!({}));
    let swl_json = serde_json::to_value(&swl).unwrap();
    let api = MockApi::with(Arc::new(move |r: &Recorded| {
        if r.is_event() {
            (StatusCode::CREATED, r.body.clone())
        } else if r.method == "POST" {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422, "reason": "Invalid",
                    "message": "MicroVM.runv.dev \"web-x-0\" is invalid: spec.resources.memory: Invalid value: \"string\": must be between 16Mi and 64Gi"
                }),
            )
        } else {
            (StatusCode::OK, swl_json.clone())
        }
    }));
    reconcile_with(&swl, vec![], &api).await;
    let status = status_of(&api);
    let failure = condition(&status, "ReplicaFailure");
    assert_eq!(failure["status"], "True");
    assert_eq!(failure["reason"], "FailedCreate");
    assert!(failure["message"].as_str().unwrap().contains(
        "spec.resources.memory: Invalid value: \"string\": must be between 16Mi and 64Gi"
    ));
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(condition(&status, "Stalled")["reason"], "InvalidTemplate");
    let reconciling = condition(&status, "Reconciling");
    assert_eq!(
        (reconciling["status"].clone(), reconciling["reason"].clone()),
        (json!("False"), json!("InvalidTemplate")),
        "kstatus reads Reconciling first: a stalled workload is not in progress"
    );
    assert_eq!(api.event_reasons(), ["FailedCreate"]);
}

#[tokio::test]
async fn replicas_of_other_owners_are_ignored() {
    let swl = workload(1, json!({}));
    let mut other = workload(1, json!({}));
    other.metadata.uid = Some("other-uid".into());
    let hash = template_hash(&swl);
    let foreign = replica(&other, &format!("web-{hash}-0"), &hash, true);
    let api = mock(&swl);
    reconcile_with(&swl, vec![foreign], &api).await;
    // It has no replica; the first name is taken by another owner's VM, so it
    // creates the next free one and touches nothing of the other owner.
    let posts = creates(&api);
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].body["metadata"]["name"], format!("web-{hash}-1"));
    assert!(deletes(&api).is_empty());
}

fn status_error(code: u16, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": format!("{reason} (test)")
        }),
    )
}

/// A mock that answers POSTs and DELETEs of MicroVMs with `answer`, and
/// everything else as the stored workload.
fn answering(swl: &SecureWorkload, answer: fn(&Recorded) -> (StatusCode, Value)) -> MockApi {
    let swl_json = serde_json::to_value(swl).unwrap();
    MockApi::with(Arc::new(move |r: &Recorded| {
        if r.is_event() {
            (StatusCode::CREATED, r.body.clone())
        } else if r.path.contains("/microvms") && (r.method == "POST" || r.method == "DELETE") {
            answer(r)
        } else {
            (StatusCode::OK, swl_json.clone())
        }
    }))
}

#[tokio::test]
async fn a_workload_being_deleted_is_left_to_the_garbage_collector() {
    let mut swl = workload(3, json!({}));
    swl.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let api = mock(&swl);
    assert_eq!(
        reconcile_with(&swl, vec![], &api).await,
        Action::await_change()
    );
    assert!(api.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn invalid_strategy_stalls_and_touches_no_replica() {
    let swl = workload(
        2,
        json!({ "type": "RollingUpdate", "rollingUpdate": { "maxSurge": "lots", "maxUnavailable": 0 } }),
    );
    let api = mock(&swl);
    let action = reconcile_with(&swl, vec![], &api).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(creates(&api).is_empty() && deletes(&api).is_empty());
    let status = status_of(&api);
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["status"], "True");
    assert_eq!(stalled["reason"], "InvalidStrategy");
    assert!(
        stalled["message"].as_str().unwrap().contains("maxSurge"),
        "{stalled}"
    );
    // Not reconciling as well, which kstatus would read first (and wait on).
    let reconciling = condition(&status, "Reconciling");
    assert_eq!(reconciling["status"], "False");
    assert_eq!(reconciling["reason"], "InvalidStrategy");
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].clone(), ready["reason"].clone()),
        (json!("False"), json!("InvalidStrategy"))
    );
}

#[tokio::test]
async fn a_name_taken_meanwhile_is_skipped_quietly() {
    let swl = workload(2, json!({}));
    let api = answering(&swl, |r| {
        if r.body["metadata"]["name"].as_str().unwrap().ends_with("-0") {
            status_error(409, "AlreadyExists")
        } else {
            (StatusCode::CREATED, r.body.clone())
        }
    });
    reconcile_with(&swl, vec![], &api).await;
    assert_eq!(creates(&api).len(), 2);
    assert_eq!(api.event_reasons(), ["SuccessfulCreate"]);
    assert_eq!(
        condition(&status_of(&api), "ReplicaFailure")["status"],
        "False"
    );
}

#[tokio::test]
async fn a_lost_create_answer_still_writes_the_status_then_fails() {
    let swl = workload(2, json!({}));
    // 200 with a body that is no MicroVM: the outcome is unknown to the client.
    let api = answering(&swl, |_| (StatusCode::OK, json!("not an object")));
    let ctx = context_on(&api, vec![], vec![], vec![]);
    let err = reconcile(Arc::new(swl.clone()), ctx).await.unwrap_err();
    assert_eq!(err.metric_reason(), "ApiTransport");
    assert_eq!(creates(&api).len(), 1, "stops at the first failure");
    let status = status_of(&api);
    let failure = condition(&status, "ReplicaFailure");
    assert_eq!(failure["status"], "True");
    assert_eq!(failure["reason"], "FailedCreate");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(api.event_reasons(), ["FailedCreate"]);
}

#[tokio::test]
async fn a_replica_already_gone_is_not_a_failure() {
    let swl = workload(0, json!({}));
    let hash = template_hash(&swl);
    let owned = vec![replica(&swl, &format!("web-{hash}-0"), &hash, true)];
    let api = answering(&swl, |_| status_error(404, "NotFound"));
    reconcile_with(&swl, owned, &api).await;
    assert_eq!(deletes(&api), [format!("web-{hash}-0")]);
    assert!(api.event_reasons().is_empty());
    assert_eq!(
        condition(&status_of(&api), "ReplicaFailure")["status"],
        "False"
    );
}

#[tokio::test]
async fn a_refused_delete_is_a_replica_failure_with_an_event() {
    let swl = workload(0, json!({}));
    let hash = template_hash(&swl);
    let owned: Vec<_> = (0..2)
        .map(|i| replica(&swl, &format!("web-{hash}-{i}"), &hash, true))
        .collect();
    let api = answering(&swl, |_| status_error(403, "Forbidden"));
    let action = reconcile_with(&swl, owned, &api).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert_eq!(deletes(&api).len(), 1, "stops at the first failure");
    let status = status_of(&api);
    let failure = condition(&status, "ReplicaFailure");
    assert_eq!(failure["status"], "True");
    assert_eq!(failure["reason"], "FailedDelete");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(api.event_reasons(), ["FailedDelete"]);
}

#[tokio::test]
async fn a_lost_delete_answer_still_writes_the_status_then_fails() {
    let swl = workload(0, json!({}));
    let hash = template_hash(&swl);
    let owned = vec![replica(&swl, &format!("web-{hash}-0"), &hash, true)];
    let api = answering(&swl, |_| (StatusCode::OK, json!("not an object")));
    let ctx = context_on(&api, vec![], vec![], owned);
    let err = reconcile(Arc::new(swl.clone()), ctx).await.unwrap_err();
    assert_eq!(err.metric_reason(), "ApiTransport");
    assert_eq!(
        condition(&status_of(&api), "ReplicaFailure")["reason"],
        "FailedDelete"
    );
    assert_eq!(api.event_reasons(), ["FailedDelete"]);
}

#[tokio::test]
async fn requeues_soon_while_progressing_and_rarely_once_complete() {
    let swl = workload(1, json!({}));
    let api = mock(&swl);
    assert_eq!(
        reconcile_with(&swl, vec![], &api).await,
        Action::requeue(Duration::from_secs(10))
    );
    let hash = template_hash(&swl);
    let owned = vec![replica(&swl, &format!("web-{hash}-0"), &hash, true)];
    let api = mock(&swl);
    assert_eq!(
        reconcile_with(&swl, owned, &api).await,
        Action::requeue(Duration::from_secs(300))
    );
}

// Adoption and release by selector.

const VMS: &str = "/apis/runv.dev/v1alpha1/namespaces/default/microvms";

/// A mock knowing the workload and these MicroVMs.
fn mock_with(swl: &SecureWorkload, vms: &[MicroVM]) -> MockApi {
    let mut objects = vec![serde_json::to_value(swl).unwrap()];
    objects.extend(vms.iter().map(|v| serde_json::to_value(v).unwrap()));
    MockApi::new(objects)
}

/// PATCHes of MicroVMs: (name, body).
fn vm_patches(api: &MockApi) -> Vec<(String, Value)> {
    api.calls()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with(&format!("{VMS}/")))
        .map(|r| (r.path.rsplit('/').next().unwrap().to_owned(), r.body))
        .collect()
}

/// GETs of the workload itself (the fresh read before adopting).
fn workload_reads(api: &MockApi) -> usize {
    api.calls()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/secureworkloads/web"))
        .count()
}

/// A MicroVM without any owner, labelled for `web` with template `hash`.
fn orphan(name: &str, hash: &str) -> MicroVM {
    vm(name).label("app", "web").label(HASH_LABEL, hash).build()
}

#[tokio::test]
async fn an_orphan_matching_the_selector_is_adopted_and_counted() {
    let swl = workload(2, json!({}));
    let hash = template_hash(&swl);
    let stray = orphan("stray", &hash);
    let owned = replica(&swl, &format!("web-{hash}-0"), &hash, true);
    let api = mock_with(&swl, std::slice::from_ref(&stray));
    reconcile_with(&swl, vec![owned, stray], &api).await;
    assert_eq!(workload_reads(&api), 1, "the workload is read afresh once");
    let patches = vm_patches(&api);
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].0, "stray");
    assert_eq!(
        patches[0].1,
        json!({
            "metadata": {
                "uid": "uid-stray",
                "resourceVersion": "1",
                "ownerReferences": [{
                    "apiVersion": "runv.dev/v1alpha1",
                    "kind": "SecureWorkload",
                    "name": "web",
                    "uid": "swl-uid",
                    "controller": true,
                    "blockOwnerDeletion": true
                }]
            }
        })
    );
    let patch = api
        .calls()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path == format!("{VMS}/stray"))
        .unwrap();
    assert!(
        patch.query.contains("fieldManager=runv-operator"),
        "{}",
        patch.query
    );
    // Counted in the same round: two replicas, none created.
    assert!(creates(&api).is_empty());
    assert!(deletes(&api).is_empty());
    let status = status_of(&api);
    assert_eq!(status["replicas"], 2);
    assert_eq!(status["updatedReplicas"], 2);
    assert_eq!(api.event_reasons(), ["Adopted"]);
}

#[tokio::test]
async fn an_adopted_orphan_of_another_template_is_an_old_revision() {
    let swl = workload(1, json!({}));
    let stray = vm("stray").label("app", "web").build();
    let api = mock_with(&swl, std::slice::from_ref(&stray));
    reconcile_with(&swl, vec![stray], &api).await;
    assert_eq!(vm_patches(&api).len(), 1);
    // Rolled like any old replica: a surge replica on the current template first.
    let posts = creates(&api);
    assert_eq!(posts.len(), 1);
    assert!(deletes(&api).is_empty());
    let status = status_of(&api);
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["updatedReplicas"], 0);
}

#[tokio::test]
async fn an_orphan_with_another_controller_is_not_adopted() {
    let swl = workload(1, json!({}));
    let hash = template_hash(&swl);
    let mut other = workload(1, json!({}));
    other.metadata.uid = Some("other-uid".into());
    other.metadata.name = Some("other".into());
    let foreign = vm("foreign")
        .label("app", "web")
        .label(HASH_LABEL, &hash)
        .owned_by(&other)
        .build();
    let api = mock_with(&swl, std::slice::from_ref(&foreign));
    reconcile_with(&swl, vec![foreign], &api).await;
    assert!(vm_patches(&api).is_empty());
    assert_eq!(workload_reads(&api), 0);
    assert_eq!(creates(&api).len(), 1, "it still needs its own replica");
}

#[tokio::test]
async fn an_orphan_being_deleted_is_not_adopted() {
    let swl = workload(1, json!({}));
    let hash = template_hash(&swl);
    let mut dying = orphan("dying", &hash);
    dying.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let api = mock_with(&swl, std::slice::from_ref(&dying));
    reconcile_with(&swl, vec![dying], &api).await;
    assert!(vm_patches(&api).is_empty());
    assert_eq!(creates(&api).len(), 1);
}

#[tokio::test]
async fn an_orphan_the_selector_does_not_select_is_not_adopted() {
    let swl = workload(1, json!({}));
    let other = vm("api-0").label("app", "api").build();
    let api = mock_with(&swl, std::slice::from_ref(&other));
    reconcile_with(&swl, vec![other], &api).await;
    assert!(vm_patches(&api).is_empty());
    assert_eq!(creates(&api).len(), 1);
}

#[tokio::test]
async fn a_workload_being_deleted_adopts_nothing() {
    let swl = workload(2, json!({}));
    let hash = template_hash(&swl);
    let stray = orphan("stray", &hash);

    // Seen deleting in the cache: nothing at all.
    let mut deleting = swl.clone();
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let api = mock_with(&deleting, std::slice::from_ref(&stray));
    let action = reconcile_with(&deleting, vec![stray.clone()], &api).await;
    assert_eq!(action, Action::await_change());
    assert!(api.requests.lock().unwrap().is_empty());

    // Deleting only in the fresh read: no adoption, nor any create or delete.
    let api = mock_with(&deleting, std::slice::from_ref(&stray));
    let action = reconcile_with(&swl, vec![stray.clone()], &api).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(workload_reads(&api), 1);
    assert!(vm_patches(&api).is_empty());
    assert!(creates(&api).is_empty() && deletes(&api).is_empty());

    // Replaced by a namesake (another uid) in the fresh read: likewise.
    let mut namesake = swl.clone();
    namesake.metadata.uid = Some("new-uid".into());
    let api = mock_with(&namesake, std::slice::from_ref(&stray));
    let action = reconcile_with(&swl, vec![stray], &api).await;
    assert_eq!(action, Action::await_change());
    assert!(vm_patches(&api).is_empty());
    assert!(creates(&api).is_empty());
}

#[tokio::test]
async fn a_replica_relabelled_out_of_the_selector_is_released_and_replaced() {
    let swl = workload(2, json!({}));
    let hash = template_hash(&swl);
    let kept = replica(&swl, &format!("web-{hash}-0"), &hash, true);
    let debug = vm(&format!("web-{hash}-1"))
        .owned_by(&swl)
        .label(HASH_LABEL, &hash)
        .label("app", "debug")
        .build();
    let api = mock_with(&swl, std::slice::from_ref(&debug));
    reconcile_with(&swl, vec![kept, debug], &api).await;
    assert_eq!(workload_reads(&api), 0, "releasing needs no fresh read");
    assert_eq!(
        vm_patches(&api),
        [(
            format!("web-{hash}-1"),
            json!({
                "metadata": {
                    "uid": format!("uid-web-{hash}-1"),
                    "resourceVersion": "1",
                    "ownerReferences": null
                }
            })
        )]
    );
    // Its name stays taken: the replacement gets the next free one.
    let posts = creates(&api);
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].body["metadata"]["name"], format!("web-{hash}-2"));
    assert!(deletes(&api).is_empty());
    assert_eq!(status_of(&api)["replicas"], 1);
    assert_eq!(api.event_reasons(), ["Released", "SuccessfulCreate"]);
}

#[tokio::test]
async fn a_released_replica_already_gone_is_not_an_error() {
    let swl = workload(0, json!({}));
    let hash = template_hash(&swl);
    let debug = vm("gone")
        .owned_by(&swl)
        .label(HASH_LABEL, &hash)
        .label("app", "debug")
        .build();
    // The mock knows only the workload: the patch gets a 404.
    let api = mock(&swl);
    reconcile_with(&swl, vec![debug], &api).await;
    assert_eq!(vm_patches(&api).len(), 1);
    assert!(api.event_reasons().is_empty());
    assert_eq!(status_of(&api)["replicas"], 0);
}

#[tokio::test]
async fn a_conflicting_adoption_requeues_without_acting() {
    let swl = workload(3, json!({}));
    let hash = template_hash(&swl);
    let swl_json = serde_json::to_value(&swl).unwrap();
    let api = MockApi::with(Arc::new(move |r: &Recorded| {
        if r.is_event() {
            (StatusCode::CREATED, r.body.clone())
        } else if r.method == "PATCH" && r.path.starts_with(&format!("{VMS}/")) {
            status_error(409, "Conflict")
        } else if r.method == "POST" {
            (StatusCode::CREATED, r.body.clone())
        } else {
            (StatusCode::OK, swl_json.clone())
        }
    }));
    let action = reconcile_with(&swl, vec![orphan("stray", &hash)], &api).await;
    assert_eq!(action, Action::requeue(CONFLICT_RETRY));
    assert_eq!(vm_patches(&api).len(), 1);
    assert!(creates(&api).is_empty() && deletes(&api).is_empty());
    assert!(api.event_reasons().is_empty());
}

#[tokio::test]
async fn a_failed_fresh_read_adopts_nothing_and_fails() {
    let swl = workload(1, json!({}));
    let hash = template_hash(&swl);
    let api = MockApi::with(Arc::new(|r: &Recorded| {
        if r.is_event() {
            (StatusCode::CREATED, r.body.clone())
        } else {
            status_error(500, "InternalError")
        }
    }));
    let ctx = context_on(&api, vec![], vec![], vec![orphan("stray", &hash)]);
    let err = reconcile(Arc::new(swl), ctx).await.unwrap_err();
    assert_eq!(err.metric_reason(), "ApiStatus");
    assert!(vm_patches(&api).is_empty());
    assert!(creates(&api).is_empty());
}

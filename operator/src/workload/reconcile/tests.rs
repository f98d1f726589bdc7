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
                    "message": "MicroVM.runv.dev \"web-x-0\" is invalid: spec.resources.memory: Invalid value: \"string\": spec.resources.memory must be between 16Mi and 64Gi"
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
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("spec.resources.memory must be between 16Mi and 64Gi")
    );
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    assert_eq!(condition(&status, "Stalled")["reason"], "InvalidTemplate");
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

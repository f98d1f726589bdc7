//! The monitor's view of a node, and the controllers' error policy.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, store};
use runv_crds::SecureWorkload;
use serde_json::json;

use super::{placement_labels_hash, reconcile_workload, workload_error_policy};
use crate::testing::{context, node};
use crate::workload::reconcile::ReconcileError;

#[test]
fn the_monitor_notices_label_and_taint_changes() {
    // A node that starts matching a nodeSelector or toleration must retry the
    // pending VMs at once, not at their next timed requeue.
    let base = node("n1", 4, "8Gi");
    let same = node("n1", 4, "8Gi");
    assert_eq!(placement_labels_hash(&base), placement_labels_hash(&same));
    let mut labelled = base.clone();
    labelled
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("disk".into(), "ssd".into());
    assert_ne!(
        placement_labels_hash(&base),
        placement_labels_hash(&labelled)
    );
    let mut tainted = base.clone();
    tainted.spec.get_or_insert_with(Default::default).taints = Some(vec![Taint {
        key: "dedicated".into(),
        value: Some("gpu".into()),
        effect: "NoSchedule".into(),
        ..Taint::default()
    }]);
    assert_ne!(
        placement_labels_hash(&base),
        placement_labels_hash(&tainted)
    );
}

#[tokio::test]
async fn failures_back_off_per_object_and_a_success_resets_them() {
    let (_api, ctx) = context(vec![], vec![], vec![]);
    let swl = |name: &str| -> Arc<SecureWorkload> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "runv.dev/v1alpha1", "kind": "SecureWorkload",
                "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}") },
                "spec": {
                    "replicas": 1,
                    "selector": { "matchLabels": { "app": name } },
                    "template": {
                        "metadata": { "labels": { "app": name } },
                        "spec": { "boot": { "kernel": "/k" } }
                    },
                    "container": { "image": "web:1" }
                }
            }))
            .unwrap(),
        )
    };
    let (web, db) = (swl("web"), swl("db"));
    let fail = |obj: &Arc<SecureWorkload>| {
        workload_error_policy(obj.clone(), &ReconcileError::NoNamespace, ctx.clone())
    };
    let secs = |s| Action::requeue(Duration::from_secs(s));
    assert_eq!(fail(&web), secs(1));
    assert_eq!(fail(&web), secs(2));
    assert_eq!(fail(&web), secs(4));
    assert_eq!(fail(&db), secs(1), "each object backs off on its own");
    let text = ctx.metrics.encode();
    let counted = "runv_operator_reconcile_errors_total{controller=\"secureworkload\",reason=\"Incomplete\"} 4";
    assert!(text.contains(counted), "{text}");
    // A successful reconcile (here: the object is gone from the cache) forgets
    // web's failures, and only web's.
    let (empty, _writer) = store::<SecureWorkload>();
    let done = reconcile_workload(web.clone(), ctx.clone(), empty).await;
    assert_eq!(done.unwrap(), Action::await_change());
    assert_eq!(
        ctx.workload_retry
            .failures(&ObjectRef::from_obj(web.as_ref())),
        0
    );
    assert_eq!(fail(&web), secs(1));
    assert_eq!(fail(&db), secs(2));
}

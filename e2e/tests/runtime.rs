//! kube-runtime against the server, as the operator uses it: the
//! `finalizer()` helper, the events Recorder (events.k8s.io/v1, shown by
//! `kubectl describe`), and a Controller reconciling MicroVMs with
//! server-side-applied status.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{Env, bounded};
use futures::StreamExt;
use kube::Resource;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

#[tokio::test(flavor = "multi_thread")]
async fn finalizer_helper_and_event_recorder() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        common::create_microvm(&api, "f").await?;
        let run = |obj: Arc<DynamicObject>| {
            let api = api.clone();
            async move {
                finalizer(&api, "runv.dev/cleanup", obj, |ev| async move {
                    match ev {
                        Finalized::Apply(_) | Finalized::Cleanup(_) => {
                            Ok::<_, ReconcileError>(Action::await_change())
                        }
                    }
                })
                .await
            }
        };
        // First pass adds the finalizer, second applies.
        run(Arc::new(api.get("f").await?)).await?;
        ensure!(api.get("f").await?.finalizers() == ["runv.dev/cleanup"]);
        run(Arc::new(api.get("f").await?)).await?;

        let recorder = Recorder::new(
            env.client(),
            Reporter {
                controller: "runv-operator".into(),
                instance: Some("op-0".into()),
            },
        );
        let reference = api.get("f").await?.object_ref(&common::microvm_resource());
        let ev = Event {
            type_: EventType::Normal,
            reason: "Scheduled".into(),
            note: Some("placed on n1".into()),
            action: "Schedule".into(),
            secondary: None,
        };
        recorder.publish(&ev, &reference).await?;
        recorder.publish(&ev, &reference).await?;
        let out = env.kubectl(&["describe", "mvm", "f"]).await?.ok()?;
        ensure!(
            out.contains("Scheduled") && out.contains("placed on n1"),
            "{out}"
        );

        // Deletion waits for the cleanup, which removes the finalizer.
        api.delete("f", &DeleteParams::default()).await?;
        let marked = api.get("f").await?;
        ensure!(marked.metadata.deletion_timestamp.is_some());
        run(Arc::new(marked)).await?;
        ensure!(
            api.get_opt("f").await?.is_none(),
            "object still there after cleanup"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_reconciles_to_ready() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let reconcile = |obj: Arc<DynamicObject>, api: Arc<Api<DynamicObject>>| async move {
            let status = json!({"apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM", "metadata": {"name": obj.name_any()},
                "status": {"observedGeneration": obj.metadata.generation, "phase": "Running", "conditions": [{
                    "type": "Ready", "status": "True", "reason": "Reconciled", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": obj.metadata.generation}]}});
            api.patch_status(&obj.name_any(), &PatchParams::apply("runv-operator").force(), &Patch::Apply(&status)).await?;
            Ok::<_, ReconcileError>(Action::await_change())
        };
        let controller = Controller::new_with(api.clone(), Default::default(), common::microvm_resource())
            .run(reconcile, |_, _, _| Action::requeue(Duration::from_secs(1)), Arc::new(api.clone()))
            .for_each(|_| async {});
        let handle = tokio::spawn(controller);
        env.kubectl_in(&["apply", "-f", "-"], Some(&common::microvm("c").to_string())).await?.ok()?;
        let out = env.kubectl(&["wait", "--for=condition=Ready", "mvm/c", "--timeout=30s"]).await?;
        handle.abort();
        let out = out.ok()?;
        ensure!(out.contains("condition met"), "{out}");
        let got = api.get("c").await?;
        ensure!(got.data["status"]["observedGeneration"] == 1 && got.metadata.generation == Some(1));
        Ok(())
    })
    .await
}

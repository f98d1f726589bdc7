//! kube-runtime against the server, as the operator uses it: the
//! `finalizer()` helper, the events Recorder (events.k8s.io/v1, repeats as
//! a series, shown by `kubectl describe`), and a Controller reconciling MicroVMs with
//! server-side-applied status.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{Env, bounded};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use k8s_openapi::api::events::v1::Event;
use kube::Resource;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as Published, EventType, Recorder, Reporter};
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
        let ev = Published {
            type_: EventType::Normal,
            reason: "Scheduled".into(),
            note: Some("placed on n1".into()),
            action: "Schedule".into(),
            secondary: None,
        };
        recorder.publish(&ev, &reference).await?;
        recorder.publish(&ev, &reference).await?;
        recorder.publish(&ev, &reference).await?;
        // The repeats are one Event with a series (events.k8s.io/v1), kept as a
        // series in the core/v1 view too (its deprecated `count` stays unset,
        // as in the API server's conversion).
        let events: Api<Event> = Api::namespaced(env.client(), "default");
        let list = events.list(&ListParams::default()).await?;
        ensure!(list.items.len() == 1, "{:?}", list.items);
        let stored = &list.items[0];
        ensure!(
            stored.reason.as_deref() == Some("Scheduled")
                && stored.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("f")
                && stored.reporting_controller.as_deref() == Some("runv-operator")
                && stored.series.as_ref().map(|s| s.count) == Some(3),
            "{stored:?}"
        );
        let core: Api<CoreEvent> = Api::namespaced(env.client(), "default");
        let core = core
            .list(&ListParams::default().fields("involvedObject.name=f"))
            .await?;
        ensure!(
            core.items.len() == 1
                && core.items[0].series.as_ref().and_then(|s| s.count) == Some(3)
                && core.items[0].count.is_none(),
            "{:?}",
            core.items
        );
        let out = env.kubectl(&["describe", "mvm", "f"]).await?.ok()?;
        ensure!(
            out.contains("Scheduled") && out.contains("placed on n1") && out.contains("(x3 over"),
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

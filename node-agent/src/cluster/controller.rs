//! The MicroVM controller of one node: kube-runtime's `finalizer()` around
//! "realize the VM" (apply) and "remove everything it had" (cleanup), status by
//! server-side apply of the agent's fields only, Events on transitions.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use runv_crds::MicroVM;
use runv_crds::retry::Chain;
use serde_json::json;

use super::outbox::Pending;
use super::{Context, FINALIZER, MANAGER, vm_ref};
use crate::reconcile::{agent_body, agent_status, transitions};

/// Why one reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API request failed.
    #[error("API request failed")]
    Api(#[from] kube::Error),
    /// The finalizer helper failed (adding or removing the finalizer).
    #[error("finalizer")]
    Finalizer(#[source] Box<FinalizerError<ReconcileError>>),
    /// A blocking host task panicked or was cancelled.
    #[error("host task")]
    Task(#[source] tokio::task::JoinError),
    /// Cleaning up the host failed.
    #[error("cleanup")]
    Cleanup(#[source] crate::runtime::RuntimeError),
}

/// Reconciles one MicroVM bound to this node.
pub async fn reconcile(vm: Arc<MicroVM>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
    let ctx2 = ctx.clone();
    let key = ObjectRef::from_obj(vm.as_ref());
    let action = finalizer(&api, FINALIZER, vm, |event| async move {
        match event {
            Finalizer::Apply(vm) => apply(&vm, &ctx2).await,
            Finalizer::Cleanup(vm) => cleanup(&vm, &ctx2).await,
        }
    })
    .await
    .map_err(|e| match e {
        // The step's own error, so its reason is counted, not "Finalizer".
        FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e) => e,
        e => ReconcileError::Finalizer(Box::new(e)),
    })?;
    ctx.retry.succeeded(&key);
    Ok(action)
}

/// Counts the failure and retries the VM after its backoff
/// (`runv_crds::retry`, shared with the operator's controllers).
pub fn error_policy(vm: Arc<MicroVM>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.errors.inc(err.metric_reason());
    let key = ObjectRef::from_obj(vm.as_ref());
    let object = key.to_string();
    let delay = ctx.retry.failed(key);
    tracing::warn!(%object, error = %Chain(err), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

impl ReconcileError {
    /// A bounded reason for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ReconcileError::Api(_) => "Api",
            ReconcileError::Finalizer(_) => "Finalizer",
            ReconcileError::Task(_) => "Task",
            ReconcileError::Cleanup(_) => "Cleanup",
        }
    }
}

async fn apply(vm: &MicroVM, ctx: &Context) -> Result<Action, ReconcileError> {
    let r = vm_ref(vm);
    let written = vm.status.clone().unwrap_or_default();
    // Through an API outage, decide on from what was decided but not written.
    let previous = lock(&ctx.unsent)
        .get(&r)
        .cloned()
        .unwrap_or(written.clone());
    let generation = vm.metadata.generation.unwrap_or(1);
    let rt = ctx.runtime.clone();
    let (spec, prev, r2) = (vm.spec.clone(), previous.clone(), r.clone());
    let (decision, vmm) = tokio::task::spawn_blocking(move || {
        let decision = rt.reconcile(&r2, &spec, generation, &prev, Timestamp::now());
        (decision, rt.exit_watch(&r2))
    })
    .await
    .map_err(ReconcileError::Task)?;
    ctx.exits.watch(&r, ObjectRef::from_obj(vm), vmm);
    let mut requeue = decision.requeue.unwrap_or(Duration::from_secs(30));
    if agent_status(&decision.status) != agent_status(&written) {
        let version = vm.metadata.resource_version.as_deref();
        match write_status(ctx, &r, version, &decision.status).await {
            Ok(()) => {
                lock(&ctx.unsent).remove(&r);
            }
            Err(e) if is_conflict(&e) => {
                // The MicroVM changed since it was read (it may have been
                // moved off this node): decide again on the new version,
                // which the watch brings at once.
                tracing::debug!(vm = %r, "status not written: the MicroVM changed meanwhile");
                lock(&ctx.unsent).insert(r.clone(), decision.status.clone());
                requeue = requeue.min(CONFLICT_RETRY);
            }
            Err(e) => {
                // The VM was realized locally; only the report waits. Keep
                // deciding on the host's own schedule, and retry soon.
                ctx.errors.inc("StatusWrite");
                tracing::warn!(vm = %r, error = %Chain(&e), "cannot write status; the VM is unaffected");
                lock(&ctx.unsent).insert(r.clone(), decision.status.clone());
                requeue = requeue.min(UNSENT_RETRY);
            }
        }
    } else {
        lock(&ctx.unsent).remove(&r);
    }
    let events = decision.events.iter().cloned();
    for t in events.chain(transitions(&previous, &decision.status)) {
        let event = Pending {
            reference: vm.object_ref(&()),
            warning: t.warning,
            reason: t.reason,
            note: t.note,
            action: "Reconcile".into(),
        };
        ctx.outbox.publish(&ctx.recorder, event).await;
    }
    lock(&ctx.statuses).insert(r, decision.status);
    Ok(Action::requeue(requeue))
}

/// How soon a status that could not be written is tried again.
const UNSENT_RETRY: Duration = Duration::from_secs(5);

/// How soon a status refused because the MicroVM changed is decided again
/// (sooner when the watch brings the new version).
const CONFLICT_RETRY: Duration = Duration::from_millis(500);

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies the agent's status fields, only over `version` of the MicroVM
/// (the one the decision was made on) when it is known: a MicroVM that
/// changed meanwhile, for example unbound from this node by the operator,
/// is not written over (409 Conflict).
async fn write_status(
    ctx: &Context,
    r: &crate::runtime::VmRef,
    version: Option<&str>,
    status: &runv_crds::MicroVMStatus,
) -> Result<(), kube::Error> {
    let api: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let mut body = json!({
        "apiVersion": MicroVM::api_version(&()),
        "kind": MicroVM::kind(&()),
        "status": agent_body(status),
    });
    if let Some(v) = version {
        body["metadata"] = json!({ "resourceVersion": v });
    }
    api.patch_status(
        &r.name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

async fn cleanup(vm: &MicroVM, ctx: &Context) -> Result<Action, ReconcileError> {
    let r = vm_ref(vm);
    let rt = ctx.runtime.clone();
    let grace = Duration::from_secs(
        u64::try_from(vm.spec.termination_grace_period_seconds)
            .unwrap_or(0)
            .min(30),
    );
    let r2 = r.clone();
    tokio::task::spawn_blocking(move || {
        rt.stop(&r2, grace)?;
        rt.cleanup(&r2)
    })
    .await
    .map_err(ReconcileError::Task)?
    .map_err(ReconcileError::Cleanup)?;
    lock(&ctx.statuses).remove(&r);
    lock(&ctx.unsent).remove(&r);
    let event = Pending {
        reference: vm.object_ref(&()),
        warning: false,
        reason: "Deleted".into(),
        note: "VMM stopped; taps, addresses and state removed".into(),
        action: "Cleanup".into(),
    };
    ctx.outbox.publish(&ctx.recorder, event).await;
    Ok(Action::await_change())
}

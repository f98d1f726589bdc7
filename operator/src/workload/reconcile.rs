//! The SecureWorkload reconcile: claim the replicas among the cached MicroVMs
//! (adopting and releasing by selector, see [`super::claim`]), plan one step,
//! create and delete replicas, and apply the status.
//!
//! Replicas are deleted in the background; Kubernetes' garbage collector
//! deletes them all when the SecureWorkload goes, so it needs no finalizer.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use runv_crds::conditions::{self as cond, Status, Update};
use runv_crds::secureworkload::StrategyType;
use runv_crds::{MicroVM, SecureWorkload, SecureWorkloadStatus};
use serde_json::json;

use super::claim::{self, ClaimError};
use super::plan::{self, BoundError, Strategy};
use super::replica;
use crate::context::{Context, MANAGER};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "secureworkload";

/// How soon a reconcile whose ownerReferences patch lost a race (409) runs again.
pub const CONFLICT_RETRY: Duration = Duration::from_secs(2);

/// How soon a workload whose rollout is complete is looked at again.
const SETTLED_RECHECK: Duration = Duration::from_secs(300);
/// How soon a workload still rolling out is looked at again.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(10);

/// Why a SecureWorkload reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API request failed.
    #[error("API request failed")]
    Api(#[from] kube::Error),
    /// The object has no namespace (never true for a stored SecureWorkload).
    #[error("SecureWorkload has no namespace")]
    NoNamespace,
}

impl ReconcileError {
    /// A bounded reason for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ReconcileError::Api(kube::Error::Api(_)) => "ApiStatus",
            ReconcileError::Api(_) => "ApiTransport",
            ReconcileError::NoNamespace => "Incomplete",
        }
    }
}

/// The resolved strategy, or why the bounds are unusable.
pub fn strategy(swl: &SecureWorkload) -> Result<Strategy, BoundError> {
    let desired = u32::try_from(swl.spec.replicas).unwrap_or(0);
    match swl.spec.strategy.kind {
        StrategyType::Recreate => Ok(Strategy::Recreate),
        StrategyType::RollingUpdate => {
            let default = runv_crds::secureworkload::RollingUpdate::default();
            let ru = swl
                .spec
                .strategy
                .rolling_update
                .as_ref()
                .unwrap_or(&default);
            plan::rolling(&ru.max_surge, &ru.max_unavailable, desired)
        }
    }
}

/// What failed: the reason of the ReplicaFailure condition and its Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailureReason {
    FailedCreate,
    FailedDelete,
}

impl FailureReason {
    fn as_str(self) -> &'static str {
        match self {
            FailureReason::FailedCreate => "FailedCreate",
            FailureReason::FailedDelete => "FailedDelete",
        }
    }
}

/// A failure to create or delete a replica, for the ReplicaFailure condition.
#[derive(Debug)]
struct Failure {
    reason: FailureReason,
    message: String,
    /// The API refused the replica itself (invalid template); retrying won't help.
    permanent: bool,
}

/// A replica that could not be created or deleted.
#[derive(Debug)]
struct Refusal {
    failure: Failure,
    /// The request's answer never came (rather than a refusal by the API).
    transport: Option<kube::Error>,
}

/// What this round's creates and deletes came to.
#[derive(Debug, Default)]
struct Outcome {
    /// The last failure, for the status.
    failure: Option<Failure>,
    /// A request whose answer never came: reported like a refusal, the status
    /// is still written, and the reconcile then fails so that it is retried soon.
    transport: Option<kube::Error>,
}

impl Outcome {
    fn record(&mut self, r: Refusal) {
        self.failure = Some(r.failure);
        if r.transport.is_some() {
            self.transport = r.transport;
        }
    }
}

/// Reconciles one SecureWorkload.
pub async fn reconcile(
    swl: Arc<SecureWorkload>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    ctx.metrics
        .timed(CONTROLLER, reconcile_inner(&swl, &ctx))
        .await
}

async fn reconcile_inner(swl: &SecureWorkload, ctx: &Context) -> Result<Action, ReconcileError> {
    if swl.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = swl.namespace().ok_or(ReconcileError::NoNamespace)?;
    let vms: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
    let swls: Api<SecureWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    let all = ctx.microvms.state();
    // Adopt matching orphans and release what the selector no longer selects
    // before counting; if that did not settle, neither create nor delete on a
    // count that may be wrong (as a ReplicaSet does).
    let claimed = claim::claim(swl, &all, &vms, &swls).await;
    announce_claims(ctx, swl, &claimed).await;
    match claimed.error {
        None => {}
        Some(ClaimError::Conflict) => return Ok(Action::requeue(CONFLICT_RETRY)),
        Some(gone @ ClaimError::OwnerGone { .. }) => {
            tracing::info!(reason = %gone, "adopting nothing");
            return Ok(Action::await_change());
        }
        Some(ClaimError::Api(e)) => return Err(e.into()),
    }
    let hash = replica::template_hash(swl);
    let desired = u32::try_from(swl.spec.replicas).unwrap_or(0);
    let views: Vec<plan::Replica> = claimed.owned.iter().map(|vm| replica::view(vm)).collect();
    let strat = strategy(swl);
    let outcome = match strat {
        Ok(strat) => {
            let step = plan::plan(desired, strat, &hash, &views);
            carry_out(ctx, swl, &vms, &all, &hash, step).await
        }
        Err(_) => Outcome::default(),
    };
    let counts = plan::counts(&hash, &views);
    let done =
        plan::complete(desired, &counts, &views) && outcome.failure.is_none() && strat.is_ok();
    let failure = outcome.failure.as_ref();
    let status = status(swl, &strat, &counts, done, failure, Timestamp::now());
    if swl.status.as_ref() != Some(&status) {
        apply_status(&swls, swl, &status).await?;
    }
    if let Some(e) = outcome.transport {
        return Err(e.into());
    }
    Ok(Action::requeue(if done {
        SETTLED_RECHECK
    } else {
        ROLLOUT_RECHECK
    }))
}

/// Announces the MicroVMs adopted and released this round.
async fn announce_claims(ctx: &Context, swl: &SecureWorkload, claimed: &claim::Claimed) {
    for name in &claimed.adopted {
        let note = format!("Adopted MicroVM {name}: it matches the selector and had no controller");
        publish(ctx, swl, EventType::Normal, "Adopted", note).await;
    }
    for name in &claimed.released {
        let note = format!("Released MicroVM {name}: it no longer matches the selector");
        publish(ctx, swl, EventType::Normal, "Released", note).await;
    }
}

/// Creates and deletes the replicas `step` asks for, stopping at the first
/// create and the first delete that fail, and at any unanswered request.
async fn carry_out(
    ctx: &Context,
    swl: &SecureWorkload,
    vms: &Api<MicroVM>,
    all: &[Arc<MicroVM>],
    hash: &str,
    step: plan::Plan,
) -> Outcome {
    // Names in use by any MicroVM of the namespace, so a replica never collides.
    let taken: Vec<String> = all
        .iter()
        .filter(|vm| vm.namespace() == swl.namespace())
        .map(|vm| vm.name_any())
        .collect();
    let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
    let mut out = Outcome::default();
    for name in replica::free_names(swl, hash, &taken, step.create as usize) {
        if let Some(refusal) = create_replica(ctx, swl, vms, hash, name).await {
            out.record(refusal);
            break;
        }
    }
    for name in step.delete {
        if out.transport.is_some() {
            break;
        }
        if let Some(refusal) = delete_replica(ctx, swl, vms, name).await {
            out.record(refusal);
            break;
        }
    }
    out
}

/// Creates replica `name`, announcing the outcome; `None` when it exists now.
async fn create_replica(
    ctx: &Context,
    swl: &SecureWorkload,
    vms: &Api<MicroVM>,
    hash: &str,
    name: String,
) -> Option<Refusal> {
    let post = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    let (message, permanent, transport) = match vms
        .create(&post, &replica::replica(swl, hash, name.clone()))
        .await
    {
        Ok(_) => {
            let note = format!("Created MicroVM {name}");
            publish(ctx, swl, EventType::Normal, "SuccessfulCreate", note).await;
            return None;
        }
        // A cache that lags can propose a name that exists; the next round sees it.
        Err(kube::Error::Api(s)) if s.code == 409 => return None,
        Err(kube::Error::Api(s)) => (
            format!("cannot create MicroVM {name}: {}", s.message),
            matches!(s.code, 400 | 422),
            None,
        ),
        Err(e) => (format!("cannot create MicroVM {name}: {e}"), false, Some(e)),
    };
    Some(
        refuse(
            ctx,
            swl,
            FailureReason::FailedCreate,
            message,
            permanent,
            transport,
        )
        .await,
    )
}

/// Deletes replica `name` in the background, announcing the outcome; `None`
/// when it is gone or going.
async fn delete_replica(
    ctx: &Context,
    swl: &SecureWorkload,
    vms: &Api<MicroVM>,
    name: String,
) -> Option<Refusal> {
    let (message, transport) = match vms.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {
            let note = format!("Deleted MicroVM {name}");
            publish(ctx, swl, EventType::Normal, "SuccessfulDelete", note).await;
            return None;
        }
        Err(kube::Error::Api(s)) if s.code == 404 => return None,
        Err(kube::Error::Api(s)) => (format!("cannot delete MicroVM {name}: {}", s.message), None),
        Err(e) => (format!("cannot delete MicroVM {name}: {e}"), Some(e)),
    };
    Some(
        refuse(
            ctx,
            swl,
            FailureReason::FailedDelete,
            message,
            false,
            transport,
        )
        .await,
    )
}

/// Announces a failed create or delete and describes it for the status.
async fn refuse(
    ctx: &Context,
    swl: &SecureWorkload,
    reason: FailureReason,
    message: String,
    permanent: bool,
    transport: Option<kube::Error>,
) -> Refusal {
    publish(
        ctx,
        swl,
        EventType::Warning,
        reason.as_str(),
        message.clone(),
    )
    .await;
    Refusal {
        failure: Failure {
            reason,
            message,
            permanent,
        },
        transport,
    }
}

/// Writes `status` by server-side apply under the operator's field manager.
async fn apply_status(
    swls: &Api<SecureWorkload>,
    swl: &SecureWorkload,
    status: &SecureWorkloadStatus,
) -> Result<(), ReconcileError> {
    let body = json!({
        "apiVersion": SecureWorkload::api_version(&()),
        "kind": SecureWorkload::kind(&()),
        "status": status,
    });
    swls.patch_status(
        &swl.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// One condition of the status.
#[derive(Debug)]
struct Row {
    type_: &'static str,
    status: Status,
    reason: &'static str,
    message: String,
}

fn row(type_: &'static str, status: Status, reason: &'static str, message: String) -> Row {
    Row {
        type_,
        status,
        reason,
        message,
    }
}

/// The conditions for these counts and this round's outcome, by kstatus and
/// Deployment conventions. A stalled workload is not reconciling (kstatus
/// reads `Reconciling=True` first and would wait instead of failing), and
/// `Ready` says the rollout is complete with every replica available, so
/// that `kubectl wait --for=condition=Ready` returns.
fn condition_rows(
    desired: u32,
    strat: &Result<Strategy, BoundError>,
    c: &plan::Counts,
    done: bool,
    failure: Option<&Failure>,
) -> [Row; 6] {
    let [progressing, mut reconciling] = progress_rows(desired, c, done);
    let [replica_failure, stalled] = failure_rows(strat, failure);
    if stalled.status == Status::True {
        reconciling = row(
            cond::RECONCILING,
            Status::False,
            stalled.reason,
            stalled.message.clone(),
        );
    }
    let ready = ready_row(desired, c, done, &stalled);
    [
        available_row(desired, strat, c),
        progressing,
        reconciling,
        replica_failure,
        stalled,
        ready,
    ]
}

/// Ready: the rollout is complete and every desired replica is available.
fn ready_row(desired: u32, c: &plan::Counts, done: bool, stalled: &Row) -> Row {
    let message = format!("{} of {desired} replicas available", c.available);
    if stalled.status == Status::True {
        row(
            cond::READY,
            Status::False,
            stalled.reason,
            stalled.message.clone(),
        )
    } else if done && c.available >= desired {
        row(cond::READY, Status::True, "AllReplicasAvailable", message)
    } else if done {
        row(cond::READY, Status::False, "ReplicasUnavailable", message)
    } else {
        row(cond::READY, Status::False, "Progressing", message)
    }
}

/// Available: at least desired − maxUnavailable replicas are.
fn available_row(desired: u32, strat: &Result<Strategy, BoundError>, c: &plan::Counts) -> Row {
    let min_available = match strat {
        Ok(Strategy::Rolling {
            max_unavailable, ..
        }) => desired.saturating_sub(*max_unavailable),
        _ => desired,
    };
    let message = format!(
        "{} of {desired} replicas available (at least {min_available} required)",
        c.available
    );
    if c.available >= min_available {
        row(
            cond::AVAILABLE,
            Status::True,
            "MinimumReplicasAvailable",
            message,
        )
    } else {
        row(
            cond::AVAILABLE,
            Status::False,
            "MinimumReplicasUnavailable",
            message,
        )
    }
}

/// Progressing and Reconciling: whether the rollout is complete.
fn progress_rows(desired: u32, c: &plan::Counts, done: bool) -> [Row; 2] {
    let progress = format!(
        "{} of {desired} replicas on the current template, {} available, {} old",
        c.updated, c.available, c.old
    );
    if done {
        [
            row(cond::PROGRESSING, Status::True, "RolloutComplete", progress),
            row(
                cond::RECONCILING,
                Status::False,
                "RolloutComplete",
                String::new(),
            ),
        ]
    } else {
        [
            row(
                cond::PROGRESSING,
                Status::True,
                "Progressing",
                progress.clone(),
            ),
            row(cond::RECONCILING, Status::True, "Progressing", progress),
        ]
    }
}

/// ReplicaFailure and Stalled: what failed this round, and whether retrying
/// can help.
fn failure_rows(strat: &Result<Strategy, BoundError>, failure: Option<&Failure>) -> [Row; 2] {
    let replica_failure = match failure {
        Some(f) => row(
            cond::REPLICA_FAILURE,
            Status::True,
            f.reason.as_str(),
            f.message.clone(),
        ),
        None => row(
            cond::REPLICA_FAILURE,
            Status::False,
            "NoFailure",
            String::new(),
        ),
    };
    let stalled = match (strat, failure) {
        (Err(e), _) => row(
            cond::STALLED,
            Status::True,
            "InvalidStrategy",
            e.to_string(),
        ),
        (_, Some(f)) if f.permanent => row(
            cond::STALLED,
            Status::True,
            "InvalidTemplate",
            f.message.clone(),
        ),
        _ => row(cond::STALLED, Status::False, "Progressing", String::new()),
    };
    [replica_failure, stalled]
}

/// The status for these counts and this round's outcome.
fn status(
    swl: &SecureWorkload,
    strat: &Result<Strategy, BoundError>,
    c: &plan::Counts,
    done: bool,
    failure: Option<&Failure>,
    now: Timestamp,
) -> SecureWorkloadStatus {
    let desired = u32::try_from(swl.spec.replicas).unwrap_or(0);
    let generation = swl.metadata.generation;
    let mut conditions = swl.status.clone().unwrap_or_default().conditions;
    for r in condition_rows(desired, strat, c, done, failure) {
        let update = Update {
            type_: r.type_,
            status: r.status,
            reason: r.reason,
            message: &r.message,
            observed_generation: generation,
        };
        cond::set_condition(&mut conditions, update, Time(now));
    }
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    SecureWorkloadStatus {
        replicas: count(c.replicas),
        ready_replicas: count(c.ready),
        available_replicas: count(c.available),
        updated_replicas: count(c.updated),
        observed_generation: generation,
        conditions,
        selector: Some(replica::selector_string(&swl.spec.selector)),
    }
}

async fn publish(
    ctx: &Context,
    swl: &SecureWorkload,
    type_: EventType,
    reason: &str,
    note: String,
) {
    ctx.publish(&swl.object_ref(&()), type_, reason, note, "Reconcile")
        .await;
}

#[cfg(test)]
mod tests;

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

/// Why a SecureWorkload reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API request failed.
    #[error("API request failed: {0}")]
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

/// A failure to create or delete a replica, for the ReplicaFailure condition.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
    /// The API refused the replica itself (invalid template); retrying won't help.
    permanent: bool,
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
    let hash = replica::template_hash(swl);
    let desired = u32::try_from(swl.spec.replicas).unwrap_or(0);
    let swls: Api<SecureWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    let all = ctx.microvms.state();
    // Adopt matching orphans and release what the selector no longer selects
    // before counting; if that did not settle, neither create nor delete on a
    // count that may be wrong (as a ReplicaSet does).
    let claimed = claim::claim(swl, &all, &vms, &swls).await;
    for name in &claimed.adopted {
        publish(
            ctx,
            swl,
            EventType::Normal,
            "Adopted",
            format!("Adopted MicroVM {name}: it matches the selector and had no controller"),
        )
        .await;
    }
    for name in &claimed.released {
        publish(
            ctx,
            swl,
            EventType::Normal,
            "Released",
            format!("Released MicroVM {name}: it no longer matches the selector"),
        )
        .await;
    }
    match claimed.error {
        None => {}
        Some(ClaimError::Conflict) => return Ok(Action::requeue(CONFLICT_RETRY)),
        Some(ClaimError::OwnerGone(why)) => {
            tracing::info!(reason = %why, "adopting nothing");
            return Ok(Action::await_change());
        }
        Some(ClaimError::Api(e)) => return Err(e.into()),
    }
    let owned = claimed.owned;
    // Names in use by any MicroVM of the namespace, so a replica never collides.
    let taken: Vec<String> = all
        .iter()
        .filter(|vm| vm.namespace() == swl.namespace())
        .map(|vm| vm.name_any())
        .collect();
    let views: Vec<plan::Replica> = owned.iter().map(|vm| replica::view(vm)).collect();

    let mut failure = None;
    // A request whose answer never came: reported like a refusal, the status is
    // still written, and the reconcile then fails so that it is retried soon.
    let mut transport = None;
    let strat = strategy(swl);
    if let Ok(strat) = strat {
        let step = plan::plan(desired, strat, &hash, &views);
        let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
        let names = replica::free_names(swl, &hash, &taken, step.create as usize);
        let post = PostParams {
            field_manager: Some(MANAGER.into()),
            ..PostParams::default()
        };
        for name in names {
            let (message, permanent) = match vms
                .create(&post, &replica::replica(swl, &hash, name.clone()))
                .await
            {
                Ok(_) => {
                    publish(
                        ctx,
                        swl,
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created MicroVM {name}"),
                    )
                    .await;
                    continue;
                }
                // A cache that lags can propose a name that exists; the next round sees it.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(kube::Error::Api(s)) => (
                    format!("cannot create MicroVM {name}: {}", s.message),
                    matches!(s.code, 400 | 422),
                ),
                Err(e) => {
                    let message = format!("cannot create MicroVM {name}: {e}");
                    transport = Some(e);
                    (message, false)
                }
            };
            publish(
                ctx,
                swl,
                EventType::Warning,
                "FailedCreate",
                message.clone(),
            )
            .await;
            failure = Some(Failure {
                reason: "FailedCreate",
                message,
                permanent,
            });
            break;
        }
        for name in step.delete {
            if transport.is_some() {
                break;
            }
            let message = match vms.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    publish(
                        ctx,
                        swl,
                        EventType::Normal,
                        "SuccessfulDelete",
                        format!("Deleted MicroVM {name}"),
                    )
                    .await;
                    continue;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(kube::Error::Api(s)) => {
                    format!("cannot delete MicroVM {name}: {}", s.message)
                }
                Err(e) => {
                    let message = format!("cannot delete MicroVM {name}: {e}");
                    transport = Some(e);
                    message
                }
            };
            publish(
                ctx,
                swl,
                EventType::Warning,
                "FailedDelete",
                message.clone(),
            )
            .await;
            failure = Some(Failure {
                reason: "FailedDelete",
                message,
                permanent: false,
            });
            break;
        }
    }

    let counts = plan::counts(&hash, &views);
    let done = plan::complete(desired, &counts, &views) && failure.is_none() && strat.is_ok();
    let status = status(
        swl,
        &strat,
        &counts,
        done,
        failure.as_ref(),
        Timestamp::now(),
    );
    if swl.status.as_ref() != Some(&status) {
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
    }
    if let Some(e) = transport {
        return Err(e.into());
    }
    Ok(if done {
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(Duration::from_secs(10))
    })
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
    let old = swl.status.clone().unwrap_or_default();
    let mut conditions = old.conditions;
    let mut set = |type_: &str, status: Status, reason: &str, message: String| {
        cond::set_condition(
            &mut conditions,
            Update {
                type_,
                status,
                reason,
                message: &message,
                observed_generation: generation,
            },
            Time(now),
        );
    };
    let min_available = match strat {
        Ok(Strategy::Rolling {
            max_unavailable, ..
        }) => desired.saturating_sub(*max_unavailable),
        _ => desired,
    };
    let avail_msg = format!(
        "{} of {desired} replicas available (at least {min_available} required)",
        c.available
    );
    if c.available >= min_available {
        set(
            cond::AVAILABLE,
            Status::True,
            "MinimumReplicasAvailable",
            avail_msg,
        );
    } else {
        set(
            cond::AVAILABLE,
            Status::False,
            "MinimumReplicasUnavailable",
            avail_msg,
        );
    }
    let progress = format!(
        "{} of {desired} replicas on the current template, {} available, {} old",
        c.updated, c.available, c.old
    );
    if done {
        set(cond::PROGRESSING, Status::True, "RolloutComplete", progress);
        set(
            cond::RECONCILING,
            Status::False,
            "RolloutComplete",
            String::new(),
        );
    } else {
        set(
            cond::PROGRESSING,
            Status::True,
            "Progressing",
            progress.clone(),
        );
        set(cond::RECONCILING, Status::True, "Progressing", progress);
    }
    match failure {
        Some(f) => set(
            cond::REPLICA_FAILURE,
            Status::True,
            f.reason,
            f.message.clone(),
        ),
        None => set(
            cond::REPLICA_FAILURE,
            Status::False,
            "NoFailure",
            String::new(),
        ),
    }
    match (strat, failure) {
        (Err(e), _) => set(
            cond::STALLED,
            Status::True,
            "InvalidStrategy",
            e.to_string(),
        ),
        (_, Some(f)) if f.permanent => set(
            cond::STALLED,
            Status::True,
            "InvalidTemplate",
            f.message.clone(),
        ),
        _ => set(cond::STALLED, Status::False, "Progressing", String::new()),
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

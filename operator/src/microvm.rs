//! The MicroVM controller: binds each MicroVM that wants to run to a node,
//! with the tenant its namespace gives it ([`crate::tenancy`]), refuses what
//! the namespace does not allow, reports when no node can take it, marks the
//! VMs of a lost node Unknown and moves `Always` VMs off a fenced node.
//!
//! It writes only the status fields the operator owns (phase, nodeName,
//! tenant and the condition set of [`OperatorStatus`]) with server-side
//! apply, and only at transitions; once a node's agent runs the VM, the agent
//! reports it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use runv_crds::conditions::{self as cond, Row, Status};
use runv_crds::contract::{self, Binding, Reason};
use runv_crds::microvm::{Phase, RunPolicy, Tenant};
use runv_crds::quantity::QuantityError;
use runv_crds::{MicroVM, MicroVMStatus};
use serde_json::json;

use crate::context::{Assumed, Context, MANAGER};
use crate::nodes;
use crate::placement::{self, Bound, Request, TenantRef};
use crate::tenancy::{self, Refusal};

/// Controller name in metrics and logs.
pub const CONTROLLER: &str = "microvm";

/// Why a MicroVM reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API request failed.
    #[error("API request failed")]
    Api(#[from] kube::Error),
    /// The spec holds a quantity the operator cannot use.
    #[error(transparent)]
    Quantity(#[from] QuantityError),
    /// The object has no namespace or uid (never true for a stored MicroVM).
    #[error("MicroVM has no {0}")]
    Incomplete(&'static str),
}

impl ReconcileError {
    /// A bounded reason for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ReconcileError::Api(kube::Error::Api(_)) => "ApiStatus",
            ReconcileError::Api(_) => "ApiTransport",
            ReconcileError::Quantity(_) => "InvalidQuantity",
            ReconcileError::Incomplete(_) => "Incomplete",
        }
    }
}

/// Whether the VM wants a node now ([`contract::wants_to_run`]).
pub fn wants_to_run(vm: &MicroVM) -> bool {
    contract::wants_to_run(&vm.spec)
}

/// The node a VM is bound to.
pub fn bound_node(vm: &MicroVM) -> Option<&str> {
    vm.status.as_ref().and_then(|s| s.node_name.as_deref())
}

fn tenant_ref(t: &Tenant) -> TenantRef {
    TenantRef {
        name: t.name.clone(),
        isolation: t.node_isolation,
    }
}

/// The labels of the VM's Namespace, when the cache holds it.
fn namespace_labels(vm: &MicroVM, ctx: &Context) -> Option<BTreeMap<String, String>> {
    let ns = ctx.namespaces.get(&ObjectRef::new(&vm.namespace()?))?;
    Some(ns.labels().clone())
}

/// The tenant a bound VM holds its node as: the one resolved when it was
/// placed (`status.tenant`); for a VM placed before that was recorded, what
/// its namespace gives it now (Shared where its spec is refused), never its
/// spec alone.
fn placed_tenant(vm: &MicroVM, ctx: &Context) -> TenantRef {
    if let Some(t) = vm.status.as_ref().and_then(|s| s.tenant.as_ref()) {
        return tenant_ref(t);
    }
    let ns = vm.namespace().unwrap_or_default();
    let labels = namespace_labels(vm, ctx).unwrap_or_default();
    match tenancy::resolve(&vm.spec, &ns, &labels) {
        Ok(t) => tenant_ref(&t),
        Err(_) => TenantRef {
            name: tenancy::namespace_tenant(&ns, &labels).to_owned(),
            isolation: runv_crds::microvm::NodeIsolation::Shared,
        },
    }
}

/// The uid of the VM's controlling owner (its SecureWorkload), for spreading.
fn group_of(vm: &MicroVM) -> Option<String> {
    vm.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// What the VM, of `tenant`, asks of a node.
pub fn request(vm: &MicroVM, tenant: &Tenant) -> Result<Request, QuantityError> {
    Ok(Request {
        vcpus: u64::from(vm.spec.resources.vcpus),
        memory: vm.spec.resources.memory_bytes()?,
        node_selector: vm.spec.node_selector.clone(),
        tolerations: vm.spec.tolerations.clone(),
        tenant: Some(tenant_ref(tenant)),
        group: group_of(vm),
    })
}

/// The VM, of `tenant`, as the placer accounts it on `node`. A quantity the
/// API should have refused counts as zero memory rather than stopping all
/// placement.
pub fn bound(vm: &MicroVM, node: &str, tenant: TenantRef) -> Bound {
    Bound {
        node: node.to_owned(),
        vcpus: u64::from(vm.spec.resources.vcpus),
        memory: vm.spec.resources.memory_bytes().unwrap_or(0),
        tenant: Some(tenant),
        group: group_of(vm),
    }
}

/// The status the operator writes at one of its transitions.
///
/// The operator writes `nodeName`, `tenant` and `Scheduled` always (a
/// bound VM's tenant again as it was resolved at its placement, since an
/// apply that left it out would remove it), and the lifecycle
/// fields (phase, observedGeneration, the other six conditions) only where
/// [`runv_crds::contract::ownership`] gives them to it: while the VM is
/// unbound (including the bind itself, the handoff to the agent) and while
/// its node is lost. It never writes the agent's run record.
#[derive(Clone, Debug, PartialEq)]
pub enum OperatorStatus {
    /// Bound to a node, waiting for its agent.
    Scheduled {
        /// The node.
        node: String,
        /// Bound by `spec.nodeName` rather than chosen.
        pinned: bool,
        /// The tenant and node isolation resolved from the namespace.
        tenant: Tenant,
    },
    /// Wants to run, no node can take it.
    Unschedulable {
        /// Why, per node.
        message: String,
    },
    /// Not placed: the spec asks what its namespace does not allow.
    Refused(Refusal),
    /// Does not want to run and has no node.
    NotRequested,
    /// Bound to a node whose agent stopped reporting.
    NodeLost {
        /// The node.
        node: String,
        /// `NodeLost`, or `PinnedNodeLost` for a VM pinned to a fenced or
        /// deleted node (it cannot move).
        reason: Reason,
        /// What is known of the agent.
        message: String,
    },
}

impl OperatorStatus {
    fn phase(&self) -> Phase {
        match self {
            OperatorStatus::Scheduled { .. } => Phase::Scheduled,
            OperatorStatus::Unschedulable { .. } | OperatorStatus::Refused(_) => Phase::Pending,
            OperatorStatus::NotRequested => Phase::Stopped,
            OperatorStatus::NodeLost { .. } => Phase::Unknown,
        }
    }

    fn node(&self) -> Option<&str> {
        match self {
            OperatorStatus::Scheduled { node, .. } | OperatorStatus::NodeLost { node, .. } => {
                Some(node)
            }
            _ => None,
        }
    }

    /// The VM's binding when the operator writes this: a bind is decided on
    /// an unbound VM; node loss on a VM bound to a lost node.
    pub fn binding(&self) -> Binding {
        match self {
            OperatorStatus::NodeLost { .. } => Binding::OnLostNode,
            _ => Binding::Unbound,
        }
    }

    /// The tenant to apply: the resolved one at the bind, the recorded one
    /// while bound, none while unbound.
    fn tenant(&self, vm: &MicroVM) -> Option<Tenant> {
        match self {
            OperatorStatus::Scheduled { tenant, .. } => Some(tenant.clone()),
            OperatorStatus::NodeLost { .. } => vm.status.as_ref().and_then(|s| s.tenant.clone()),
            _ => None,
        }
    }

    /// The seven MicroVM conditions.
    fn rows(&self, vm: &MicroVM) -> [Row; 7] {
        use Status::{False, True, Unknown};
        let not_paused = Row::new(cond::PAUSED, False, Reason::NotPaused);
        let no_stall = Row::new(cond::STALLED, False, Reason::Progressing);
        match self {
            OperatorStatus::Refused(Refusal { reason, message }) => [
                Row::new(cond::SCHEDULED, False, *reason).message(message.clone()),
                Row::new(cond::VMM_STARTED, False, Reason::NotScheduled),
                Row::new(cond::GUEST_BOOTED, False, Reason::NotScheduled),
                Row::new(cond::READY, False, *reason).message(message.clone()),
                not_paused,
                Row::new(cond::RECONCILING, False, *reason),
                Row::new(cond::STALLED, True, *reason).message(message.clone()),
            ],
            OperatorStatus::Scheduled { node, pinned, .. } => {
                let scheduled = if *pinned {
                    Row::new(cond::SCHEDULED, True, Reason::Pinned)
                        .message(format!("pinned to node {node} by spec.nodeName"))
                } else {
                    Row::new(cond::SCHEDULED, True, Reason::Placed)
                        .message(format!("placed on node {node}"))
                };
                let waiting = format!("waiting for the runv agent on node {node}");
                [
                    scheduled,
                    Row::new(cond::VMM_STARTED, False, Reason::Pending).message(waiting.clone()),
                    Row::new(cond::GUEST_BOOTED, False, Reason::Pending),
                    Row::new(cond::READY, False, Reason::Starting).message(waiting),
                    not_paused,
                    Row::new(cond::RECONCILING, True, Reason::Starting),
                    no_stall,
                ]
            }
            OperatorStatus::Unschedulable { message } => [
                Row::new(cond::SCHEDULED, False, Reason::Unschedulable).message(message.clone()),
                Row::new(cond::VMM_STARTED, False, Reason::NotScheduled),
                Row::new(cond::GUEST_BOOTED, False, Reason::NotScheduled),
                Row::new(cond::READY, False, Reason::Unschedulable).message(message.clone()),
                not_paused,
                Row::new(cond::RECONCILING, True, Reason::WaitingForNode),
                no_stall,
            ],
            OperatorStatus::NotRequested => {
                let why = contract::not_requested(&vm.spec)
                    .map_or("the VM does not ask to run", |n| n.message());
                let msg = format!("{why}: the VM gets a node when it is asked to run");
                [
                    Row::new(cond::SCHEDULED, False, Reason::NotRequested).message(msg.clone()),
                    Row::new(cond::VMM_STARTED, False, Reason::NotRequested),
                    Row::new(cond::GUEST_BOOTED, False, Reason::NotRequested),
                    Row::new(cond::READY, True, Reason::Stopped).message(msg),
                    not_paused,
                    Row::new(cond::RECONCILING, False, Reason::Reconciled),
                    no_stall,
                ]
            }
            OperatorStatus::NodeLost {
                node,
                reason,
                message,
            } => [
                Row::new(cond::SCHEDULED, True, Reason::Placed)
                    .message(format!("placed on node {node}")),
                Row::new(cond::VMM_STARTED, Unknown, *reason).message(message.clone()),
                Row::new(cond::GUEST_BOOTED, Unknown, *reason).message(message.clone()),
                Row::new(cond::READY, Unknown, *reason).message(message.clone()),
                Row::new(cond::PAUSED, Unknown, *reason).message(message.clone()),
                Row::new(cond::RECONCILING, True, *reason).message(message.clone()),
                no_stall,
            ],
        }
    }

    /// The status to apply, keeping transition times of unchanged conditions;
    /// `None` when the VM already shows exactly this. Only the operator's
    /// fields are set (see [`operator_body`]).
    pub fn to_apply(&self, vm: &MicroVM, now: Timestamp) -> Option<MicroVMStatus> {
        let current = vm.status.clone().unwrap_or_default();
        let generation = vm.metadata.generation;
        let mut conditions: Vec<Condition> = current.conditions.clone();
        let tenant = self.tenant(vm);
        let mut changed = current.phase != Some(self.phase())
            || current.node_name.as_deref() != self.node()
            || current.tenant != tenant
            || current.observed_generation != generation;
        for row in self.rows(vm) {
            changed |= row.set(&mut conditions, generation, Time(now));
        }
        changed.then(|| MicroVMStatus {
            phase: Some(self.phase()),
            node_name: self.node().map(str::to_owned),
            tenant,
            observed_generation: generation,
            conditions,
            ..MicroVMStatus::default()
        })
    }

    /// The server-side apply body of [`Self::to_apply`]'s status.
    pub fn body(&self, vm: &MicroVM, now: Timestamp) -> Option<serde_json::Value> {
        self.to_apply(vm, now).map(|s| operator_body(&s))
    }
}

/// The fields of `status` the operator applies: phase, nodeName, tenant,
/// observedGeneration and the conditions, never the agent's run record
/// (`restartCount` and the rest), which an apply of the whole status type
/// would reset.
pub fn operator_body(status: &MicroVMStatus) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    if let Some(phase) = status.phase {
        body.insert("phase".into(), json!(phase));
    }
    if let Some(node) = &status.node_name {
        body.insert("nodeName".into(), json!(node));
    }
    if let Some(tenant) = &status.tenant {
        body.insert("tenant".into(), json!(tenant));
    }
    if let Some(generation) = status.observed_generation {
        body.insert("observedGeneration".into(), json!(generation));
    }
    body.insert("conditions".into(), json!(status.conditions));
    serde_json::Value::Object(body)
}

fn api(vm: &MicroVM, ctx: &Context) -> Result<Api<MicroVM>, ReconcileError> {
    let ns = vm
        .namespace()
        .ok_or(ReconcileError::Incomplete("namespace"))?;
    Ok(Api::namespaced(ctx.client.clone(), &ns))
}

/// Applies the operator's status fields with its field manager.
async fn apply_status(
    vm: &MicroVM,
    status: MicroVMStatus,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let body = json!({
        "apiVersion": MicroVM::api_version(&()),
        "kind": MicroVM::kind(&()),
        "status": operator_body(&status),
    });
    api(vm, ctx)?
        .patch_status(
            &vm.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    vm: &MicroVM,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    ctx.publish(&vm.object_ref(&()), type_, reason, note, action)
        .await;
}

/// Reconciles one MicroVM.
pub async fn reconcile(vm: Arc<MicroVM>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics
        .timed(CONTROLLER, reconcile_inner(&vm, &ctx))
        .await
}

async fn reconcile_inner(vm: &MicroVM, ctx: &Context) -> Result<Action, ReconcileError> {
    if vm.metadata.deletion_timestamp.is_some() {
        // The node agent's finalizer cleans up; nothing for the operator.
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    match bound_node(vm) {
        Some(node) => watch_bound(vm, node.to_owned(), ctx, now).await,
        None if !wants_to_run(vm) => {
            if let Some(status) = OperatorStatus::NotRequested.to_apply(vm, now) {
                apply_status(vm, status, ctx).await?;
            }
            Ok(Action::await_change())
        }
        None => place(vm, ctx, now).await,
    }
}

/// Binds an unbound VM: to its pinned node, or to the placer's choice.
async fn place(vm: &MicroVM, ctx: &Context, now: Timestamp) -> Result<Action, ReconcileError> {
    let mut assumed = ctx.placer.lock().await;
    // The lock may have been contended: decide on the cache as it is now, not on
    // the copy this reconcile started with, which another reconcile may have bound.
    let Some(vm) = ctx.microvms.get(&ObjectRef::from_obj(vm)) else {
        return Ok(Action::await_change());
    };
    let vm = vm.as_ref();
    if bound_node(vm).is_some() || vm.metadata.deletion_timestamp.is_some() || !wants_to_run(vm) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let uid = vm.uid().ok_or(ReconcileError::Incomplete("uid"))?;
    if assumed.holds(&uid) {
        // Bound a moment ago; the cache has not caught up yet.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let ns = vm
        .namespace()
        .ok_or(ReconcileError::Incomplete("namespace"))?;
    let Some(labels) = namespace_labels(vm, ctx) else {
        // A MicroVM's namespace exists: the cache has not caught up yet.
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let tenant = match tenancy::resolve(&vm.spec, &ns, &labels) {
        Ok(t) => t,
        Err(refusal) => {
            drop(assumed);
            let (reason, message) = (refusal.reason, refusal.message.clone());
            return report_not_placed(
                vm,
                ctx,
                OperatorStatus::Refused(refusal),
                reason,
                message,
                now,
            )
            .await;
        }
    };
    let req = request(vm, &tenant)?;
    let outcome = match &vm.spec.node_name {
        // spec.nodeName bypasses the placer's checks (selector, taints, cordon,
        // room: the agent refuses what does not fit), but never binds to a node
        // that is fenced, unknown or whose agent is not alive.
        Some(pinned) => match pinned_node_unavailable(ctx, pinned, now) {
            None => Ok((pinned.clone(), true)),
            Some(why) => Err(why),
        },
        None => choose(ctx, &mut assumed, &req, now).map(|n| (n, false)),
    };
    match outcome {
        Ok((node, pinned)) => {
            // Assume first: a write whose answer is lost may still have happened.
            let held = bound(vm, &node, tenant_ref(&tenant));
            assumed
                .bindings
                .insert(uid.clone(), (held, std::time::Instant::now()));
            let status = OperatorStatus::Scheduled {
                node: node.clone(),
                pinned,
                tenant,
            };
            let written = match status.to_apply(vm, now) {
                Some(s) => apply_status(vm, s, ctx).await,
                None => Ok(()),
            };
            if let Err(ReconcileError::Api(kube::Error::Api(_))) = &written {
                // The API refused it: nothing was bound.
                assumed.bindings.remove(&uid);
            }
            drop(assumed);
            written?;
            ctx.metrics.placement(true);
            let note = if pinned {
                format!("Bound to node {node} (spec.nodeName)")
            } else {
                format!("Placed on node {node}")
            };
            publish(ctx, vm, EventType::Normal, "Scheduled", note, "Place").await;
            Ok(Action::await_change())
        }
        Err(message) => {
            drop(assumed);
            let status = OperatorStatus::Unschedulable {
                message: message.clone(),
            };
            report_not_placed(vm, ctx, status, Reason::Unschedulable, message, now).await
        }
    }
}

/// The placer's choice for `req` among the runv nodes, against what every
/// cached VM (and every assumed, not yet cached binding) holds. Prunes
/// assumptions the cache has confirmed or that belong to VMs gone.
fn choose(
    ctx: &Context,
    assumed: &mut Assumed,
    req: &Request,
    now: Timestamp,
) -> Result<String, String> {
    let infos: Vec<_> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| nodes::is_runv_node(n))
        .map(|n| {
            let lease = ctx.leases.get(
                &ObjectRef::new(&contract::lease_name(&n.name_any()))
                    .within(&ctx.config.lease_namespace),
            );
            nodes::node_info(n, lease.as_deref(), now, ctx.lease_watch.since())
        })
        .collect();
    let mut seen = HashSet::new();
    let mut used = Vec::new();
    for other in ctx.microvms.state() {
        let Some(other_uid) = other.uid() else {
            continue;
        };
        match bound_node(&other) {
            Some(node) => {
                // Whatever its phase: a Succeeded or Failed VM keeps its
                // place until it is deleted (docs/operations.md).
                assumed.bindings.remove(&other_uid);
                used.push(bound(&other, node, placed_tenant(&other, ctx)));
            }
            None if assumed.holds(&other_uid) => {
                if let Some((b, _)) = assumed.bindings.get(&other_uid) {
                    used.push(b.clone());
                }
            }
            None => {
                assumed.bindings.remove(&other_uid);
            }
        }
        seen.insert(other_uid);
    }
    assumed.bindings.retain(|uid, _| seen.contains(uid));
    let decision = placement::place(req, &infos, &used).map_err(|e| e.to_string());
    if let Ok(node) = &decision {
        tracing::debug!(%node, bound = used.len(), "placing");
    }
    decision
}

/// Shows why the VM is not placed (`status`: unschedulable, or refused with
/// `reason`), with a Warning Event when the message is new: `FailedScheduling`
/// when no node can take it, the refusal's reason when its namespace does not
/// allow what it asks. Both are retried: a node may get room, an
/// administrator may label the namespace.
async fn report_not_placed(
    vm: &MicroVM,
    ctx: &Context,
    status: OperatorStatus,
    reason: Reason,
    message: String,
    now: Timestamp,
) -> Result<Action, ReconcileError> {
    ctx.metrics.placement(false);
    let before = vm
        .status
        .as_ref()
        .and_then(|s| cond::find(&s.conditions, cond::SCHEDULED))
        .map(|c| c.message.clone());
    if let Some(s) = status.to_apply(vm, now) {
        apply_status(vm, s, ctx).await?;
    }
    if before.as_deref() != Some(message.as_str()) {
        let event = match reason {
            Reason::Unschedulable => "FailedScheduling",
            other => other.as_str(),
        };
        publish(ctx, vm, EventType::Warning, event, message, "Place").await;
    }
    Ok(Action::requeue(ctx.config.retry_unschedulable))
}

/// Whether the VM's agent reports it stopped because its node is fenced.
fn stopped_for_fence(vm: &MicroVM) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Stopped)
            && cond::find(&s.conditions, cond::READY)
                .is_some_and(|c| c.reason == Reason::NodeFenced.as_str())
    })
}

/// Why a VM pinned to `node` cannot be bound to it now, if it cannot. The
/// message names no durations, so it only changes (and publishes a new
/// `FailedScheduling` Event) when the node's state does.
fn pinned_node_unavailable(ctx: &Context, node: &str, now: Timestamp) -> Option<String> {
    let Some(n) = ctx.nodes.get(&ObjectRef::new(node)) else {
        return Some(format!(
            "pinned by spec.nodeName to node {node}, which does not exist or runs no runv agent"
        ));
    };
    if nodes::is_fenced(&n) {
        return Some(format!(
            "pinned by spec.nodeName to node {node}, which is fenced"
        ));
    }
    match ctx.agent_lease(node, now) {
        nodes::AgentLease::Current => None,
        nodes::AgentLease::Missing => Some(format!(
            "pinned by spec.nodeName to node {node}, which has no runv agent Lease"
        )),
        nodes::AgentLease::Expired(_) => Some(format!(
            "pinned by spec.nodeName to node {node}, whose runv agent Lease has expired"
        )),
    }
}

/// Watches a bound VM's node: marks the VM Unknown when its agent is lost, and
/// moves an `Always` VM off a node only on evidence that it cannot run there:
/// the Node is deleted, or carries runv's fencing taint or Kubernetes'
/// `node.kubernetes.io/out-of-service` taint while its agent is lost (the
/// taint asserts the node is down), or while its agent, alive, reports the
/// VM stopped for it (`NodeFenced`). A Lease that merely expired moves
/// nothing: the VM may well still be running there. A VM pinned by
/// `spec.nodeName` cannot move: it stays bound, Unknown, with reason
/// `PinnedNodeLost`.
async fn watch_bound(
    vm: &MicroVM,
    node: String,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action, ReconcileError> {
    let node_obj = ctx.nodes.get(&ObjectRef::new(&node));
    let agent = ctx.agent_lease(&node, now);
    let fenced = node_obj.as_deref().is_none_or(nodes::is_fenced);
    let why = match node_obj.as_deref() {
        None => "was deleted",
        Some(n) if nodes::has_fenced_taint(n) => "is fenced",
        Some(_) => "is out of service",
    };
    let pinned = vm.spec.node_name.is_some();
    let movable = fenced && vm.spec.run_policy == RunPolicy::Always && !pinned;
    if agent.is_current() && !(movable && stopped_for_fence(vm)) {
        return Ok(Action::await_change());
    }
    if movable {
        // Its first placement may still be assumed (the cache confirms an
        // assumption only when the placer next runs): forget it, or the VM
        // would wait out the assumption before it is placed again.
        if let Some(uid) = vm.uid() {
            ctx.placer.lock().await.bindings.remove(&uid);
        }
        // The tenant is resolved again with the next placement.
        let merge = json!({ "status": { "nodeName": null, "tenant": null, "phase": "Pending" } });
        api(vm, ctx)?
            .patch_status(
                &vm.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(merge),
            )
            .await?;
        publish(
            ctx,
            vm,
            EventType::Normal,
            "Rescheduling",
            format!("Node {node} {why}; placing the VM on another node"),
            "Place",
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let (reason, message) = if fenced && pinned {
        (
            Reason::PinnedNodeLost,
            format!(
                "node {node} {why} and the VM is pinned to it by spec.nodeName: it cannot move \
                 elsewhere and stays Unknown until the node is back or the MicroVM is deleted"
            ),
        )
    } else {
        let message = match agent {
            nodes::AgentLease::Expired(for_) => format!(
                "the runv agent on node {node} has not renewed its Lease for {}s",
                for_.as_secs()
            ),
            _ => format!("node {node} has no runv agent Lease"),
        };
        (Reason::NodeLost, message)
    };
    // Written once per reason: the message's duration alone is no transition.
    let shown = vm
        .status
        .as_ref()
        .filter(|s| s.phase == Some(Phase::Unknown))
        .and_then(|s| cond::find(&s.conditions, cond::READY))
        .map(|c| c.reason.as_str());
    if shown != Some(reason.as_str())
        && let Some(s) = (OperatorStatus::NodeLost {
            node: node.clone(),
            reason,
            message: message.clone(),
        })
        .to_apply(vm, now)
    {
        apply_status(vm, s, ctx).await?;
        publish(
            ctx,
            vm,
            EventType::Warning,
            reason.as_str(),
            message,
            "Watch",
        )
        .await;
    }
    // Look again when fencing may have happened.
    Ok(Action::requeue(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests;

//! Wires the operator together: caches of Nodes, agent Leases and MicroVMs,
//! the MicroVM and SecureWorkload controllers, and the node monitor that
//! fences lost nodes and retries pending placements when capacity changes.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use runv_crds::{MicroVM, SecureWorkload};
use tokio::sync::{Mutex, mpsc, watch};

use crate::context::{Assumed, Config, Context, MANAGER, Synced, mark_synced};
use crate::metrics::Metrics;
use crate::nodes::AgentLease;
use crate::workload::reconcile as workload;
use crate::{microvm, nodes};

/// Runs the operator until `shutdown` resolves. `ready` becomes true once the
/// caches have synced.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();

    // Each cache reports when its first list is in (see context::Synced).
    let (nodes_synced, nodes_synced_rx) = watch::channel(false);
    let (leases_synced, leases_synced_rx) = watch::channel(false);
    let (vms_synced, vms_synced_rx) = watch::channel(false);
    let (workloads_synced, workloads_synced_rx) = watch::channel(false);
    let synced = Synced {
        nodes: nodes_synced_rx,
        leases: leases_synced_rx,
        microvms: vms_synced_rx,
    };

    let (nodes_store, nodes_writer) = reflector::store::<Node>();
    let node_watch = reflector::reflector(
        nodes_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(&format!("{}=true", nodes::AGENT_LABEL)),
        ),
    )
    .default_backoff()
    .inspect(mark_synced(nodes_synced))
    .applied_objects()
    .for_each(|r| log_watch_error("Node", r));

    let (leases_store, leases_writer) = reflector::store::<Lease>();
    let lease_watch = reflector::reflector(
        leases_writer,
        watcher(
            Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .inspect(mark_synced(leases_synced))
    .applied_objects()
    .for_each(|r| log_watch_error("Lease", r));

    // One watch of MicroVMs feeds the cache and both controllers, without the
    // managedFields no reconcile reads (they are most of an object's size).
    let (vm_store, vm_writer) = reflector::store_shared::<MicroVM>(1024);
    let (Some(for_vms), Some(for_workloads), Some(for_orphans)) = (
        vm_writer.subscribe(),
        vm_writer.subscribe(),
        vm_writer.subscribe(),
    ) else {
        tracing::error!("a shared store always has subscribers");
        return;
    };
    let vm_watch = watcher(
        Api::<MicroVM>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|vm| vm.managed_fields_mut().clear())
    .reflect_shared(vm_writer)
    .inspect(mark_synced(vms_synced))
    .applied_objects()
    .for_each(|r| log_watch_error("MicroVM", r));

    let (trigger_tx, trigger_rx) = mpsc::channel::<ObjectRef<MicroVM>>(4096);
    let vm_controller = Controller::for_shared_stream(for_vms, vm_store.clone())
        .reconcile_on(futures::stream::unfold(trigger_rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .graceful_shutdown_on(shutdown.clone());
    let reporter = Reporter {
        controller: "runv.dev/operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: nodes_store,
        leases: leases_store,
        microvms: vm_store,
        placer: Mutex::new(Assumed::default()),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        config,
        lease_missing: std::sync::Mutex::default(),
        synced,
    });

    // kube-runtime holds a controller only until its own cache is filled; both
    // controllers also read the Node, Lease and MicroVM caches, so every
    // reconcile first waits for those (see Context::caches_synced).
    let vms = vm_controller
        .run(
            |vm, ctx: Arc<Context>| async move {
                if !ctx.caches_synced().await {
                    return Ok(Action::await_change());
                }
                // The copy was read before the wait: reconcile the current one.
                match ctx.microvms.get(&ObjectRef::from_obj(vm.as_ref())) {
                    Some(vm) => microvm::reconcile(vm, ctx).await,
                    None => Ok(Action::await_change()),
                }
            },
            |_vm, err: &microvm::ReconcileError, ctx: Arc<Context>| {
                tracing::warn!(error = %err, "MicroVM reconcile failed");
                ctx.metrics.error(microvm::CONTROLLER, err.metric_reason());
                Action::requeue(Duration::from_secs(5))
            },
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));

    // A SecureWorkload hears of its own replicas through their ownerReference,
    // and of an orphan its selector selects through `adopt`, so it adopts it at
    // once rather than at its next timed requeue.
    let (adopt_tx, adopt_rx) = mpsc::channel::<ObjectRef<SecureWorkload>>(1024);
    // The SecureWorkload cache is built here rather than by Controller::new so
    // that its first list can be noticed without awaiting the store, which
    // the controller itself awaits (see context::Synced).
    let (workload_store, workload_writer) = reflector::store::<SecureWorkload>();
    let workload_watch = watcher(
        Api::<SecureWorkload>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(workload_writer)
    .inspect(mark_synced(workloads_synced))
    .applied_objects();
    let workload_controller = Controller::for_stream(workload_watch, workload_store)
        .owns_shared_stream(for_workloads)
        .reconcile_on(futures::stream::unfold(adopt_rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .graceful_shutdown_on(shutdown.clone());
    let workload_store = workload_controller.store();
    let orphans = {
        let workloads = workload_store.clone();
        for_orphans.for_each(move |vm| {
            let state = workloads.state();
            for adopter in crate::workload::claim::adopters(&vm, state.iter().map(AsRef::as_ref)) {
                // A full channel means a reconcile is queued already.
                let _ = adopt_tx.try_send(adopter);
            }
            future::ready(())
        })
    };
    let workloads = workload_controller
        .run(
            move |swl, ctx: Arc<Context>| {
                let store = workload_store.clone();
                async move {
                    if !ctx.caches_synced().await {
                        return Ok(Action::await_change());
                    }
                    match store.get(&ObjectRef::from_obj(swl.as_ref())) {
                        Some(swl) => workload::reconcile(swl, ctx).await,
                        None => Ok(Action::await_change()),
                    }
                }
            },
            |_swl, err: &workload::ReconcileError, ctx: Arc<Context>| {
                tracing::warn!(error = %err, "SecureWorkload reconcile failed");
                ctx.metrics.error(workload::CONTROLLER, err.metric_reason());
                Action::requeue(Duration::from_secs(5))
            },
            ctx.clone(),
        )
        .for_each(|r| log_controller_error("SecureWorkload", r));

    let monitor = monitor(ctx.clone(), workloads_synced_rx, trigger_tx, ready);

    tokio::select! {
        _ = node_watch => tracing::error!("node watch ended"),
        _ = lease_watch => tracing::error!("lease watch ended"),
        _ = vm_watch => tracing::error!("MicroVM watch ended"),
        _ = future::join(vms, workloads) => tracing::info!("controllers stopped"),
        _ = monitor => tracing::error!("node monitor ended"),
        _ = orphans => tracing::error!("MicroVM stream for adoption ended"),
    }
}

/// What the placer's view of the cluster looks like, to notice when it changes.
/// Per node: agent ready, fenced, cordoned, vCPUs, memory, VMs holding capacity,
/// and a hash of the labels and taints that nodeSelectors and tolerations read.
type Fingerprint = BTreeMap<String, (bool, bool, bool, u64, u64, usize, u64)>;

/// A hash of what placement reads from a node besides capacity and health: its
/// labels (nodeSelector, tenant) and taints (tolerations).
fn placement_labels_hash(node: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.labels().hash(&mut h);
    if let Some(taints) = node.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        for t in taints {
            (&t.key, &t.value, &t.effect).hash(&mut h);
        }
    }
    h.finish()
}

/// Every two seconds: fence nodes whose agent is gone past the grace period,
/// unfence recovered ones, update the queue depth, and when node state or used
/// capacity changed, reconcile the pending MicroVMs and those bound to the nodes
/// that changed.
async fn monitor(
    ctx: Arc<Context>,
    workloads_synced: watch::Receiver<bool>,
    trigger: mpsc::Sender<ObjectRef<MicroVM>>,
    ready: Arc<AtomicBool>,
) {
    let synced = async {
        let mut workloads = workloads_synced.clone();
        ctx.caches_synced().await && workloads.wait_for(|s| *s).await.is_ok()
    };
    tokio::pin!(synced);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), &mut synced).await {
            Ok(true) => break,
            Ok(false) => return,
            Err(_) => {
                let mut waiting = ctx.synced.waiting();
                if !*workloads_synced.borrow() {
                    waiting.push("SecureWorkload");
                }
                tracing::warn!(
                    ?waiting,
                    "caches not synced yet: nothing is reconciled until they are"
                );
            }
        }
    }
    tracing::info!("caches synced");
    ready.store(true, Ordering::Relaxed);
    let mut last = Fingerprint::new();
    loop {
        let now = Timestamp::now();
        let vms = ctx.microvms.state();
        let mut fp = Fingerprint::new();
        let mut names = HashSet::new();
        for node in ctx.nodes.state() {
            let name = node.name_any();
            let lease = lease_of(&ctx, &name);
            let info = nodes::node_info(&node, lease.as_deref(), now);
            fence(&ctx, &node, lease.as_deref(), now).await;
            let used = vms
                .iter()
                .filter(|vm| {
                    microvm::bound_node(vm) == Some(name.as_str()) && microvm::holds_capacity(vm)
                })
                .count();
            names.insert(name.clone());
            fp.insert(
                name,
                (
                    info.agent_ready,
                    info.fenced,
                    info.cordoned,
                    info.vcpus,
                    info.memory,
                    used,
                    placement_labels_hash(&node),
                ),
            );
        }
        ctx.forget_missing_leases_except(&names);
        let pending: Vec<_> = vms
            .iter()
            .filter(|vm| {
                vm.metadata.deletion_timestamp.is_none()
                    && microvm::bound_node(vm).is_none()
                    && microvm::wants_to_run(vm)
            })
            .collect();
        ctx.metrics
            .placement_queue_depth
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        if fp != last {
            // Nodes whose readiness, fencing, capacity, labels or taints changed, or
            // that came or went.
            let changed: Vec<&String> = fp
                .keys()
                .chain(last.keys())
                .filter(|n| fp.get(*n) != last.get(*n))
                .collect();
            let on_changed = vms.iter().filter(|vm| {
                microvm::bound_node(vm).is_some_and(|n| changed.iter().any(|c| c.as_str() == n))
            });
            for vm in pending.into_iter().chain(on_changed) {
                // A full channel means a retry is queued already.
                let _ = trigger.try_send(ObjectRef::from_obj(vm.as_ref()));
            }
            last = fp;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Logs a failed list or watch: the watch retries with backoff, and until its
/// first list succeeds no reconcile runs, so the cause must be visible.
fn log_watch_error<T>(kind: &str, r: Result<T, watcher::Error>) -> future::Ready<()> {
    if let Err(e) = r {
        tracing::warn!(error = %e, "{kind} watch failed; retrying");
    }
    future::ready(())
}

/// Logs a failed SecureWorkload watch (a controller's own watch; its
/// reconcile errors are counted and logged by the error policy).
fn log_controller_error<T, E: std::error::Error, Q: std::error::Error>(
    kind: &str,
    r: Result<T, kube::runtime::controller::Error<E, Q>>,
) -> future::Ready<()> {
    match r {
        Err(kube::runtime::controller::Error::QueueError(e)) => {
            tracing::warn!(error = %e, "{kind} watch failed; retrying");
        }
        Err(e) => tracing::debug!(error = %e, "{kind} controller"),
        Ok(_) => {}
    }
    future::ready(())
}

fn lease_of(ctx: &Context, node: &str) -> Option<Arc<Lease>> {
    ctx.leases
        .get(&ObjectRef::new(&nodes::lease_name(node)).within(&ctx.config.lease_namespace))
}

/// Adds the fencing taint to a node whose agent has been gone longer than the
/// grace period, and removes it once the agent renews its Lease again. A
/// missing Lease counts from when this operator first saw the node without
/// one (or the node's creation, if later), so it gets the same grace.
///
/// The taint list is written with the cached Node's resourceVersion as a
/// precondition: if the Node changed since (someone added a taint), the API
/// answers 409 and the next round decides again on the fresh copy, rather than
/// overwriting the other writer's taints.
async fn fence(ctx: &Context, node: &Node, lease: Option<&Lease>, now: Timestamp) {
    if !ctx.config.auto_fence {
        return;
    }
    let name = node.name_any();
    let gone = match nodes::agent_lease(lease, now) {
        AgentLease::Current => {
            ctx.lease_found(&name);
            None
        }
        AgentLease::Expired(for_) => {
            ctx.lease_found(&name);
            Some(for_)
        }
        AgentLease::Missing => Some(ctx.lease_missing_for(node, now)),
    };
    let fenced = nodes::is_fenced(node);
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let (reason, note) = match gone {
        Some(gone) if !fenced && gone >= ctx.config.fence_after => {
            taints.push(k8s_openapi::api::core::v1::Taint {
                key: nodes::FENCED_TAINT.into(),
                effect: "NoExecute".into(),
                time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
                value: None,
            });
            (
                "NodeFenced",
                format!(
                    "runv agent gone for more than {}s: node fenced, Always MicroVMs move elsewhere",
                    ctx.config.fence_after.as_secs()
                ),
            )
        }
        None if fenced => {
            taints.retain(|t| t.key != nodes::FENCED_TAINT);
            (
                "NodeUnfenced",
                "runv agent is back: fencing taint removed".to_owned(),
            )
        }
        _ => return,
    };
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": node.resource_version() },
        "spec": { "taints": taints },
    });
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match Api::<Node>::all(ctx.client.clone())
        .patch(&name, &params, &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            tracing::warn!(node = %name, "{note}");
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name),
                uid: node.uid(),
                ..Default::default()
            };
            ctx.publish(&reference, EventType::Warning, reason, note, "Fence")
                .await;
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(node = %name, "node changed since it was cached; fencing decided again next round");
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "cannot update fencing taint")
        }
    }
}

#[cfg(test)]
mod tests;

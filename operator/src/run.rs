//! Wires the operator together: caches of Nodes, agent Leases, Namespaces and MicroVMs,
//! the MicroVM and SecureWorkload controllers, and the node monitor that
//! fences lost nodes and retries pending placements when capacity changes.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use runv_crds::retry::{Chain, Retry};
use runv_crds::{MicroVM, SecureWorkload};
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, mpsc, watch};

use crate::context::{Assumed, Config, Context, LeaseWatch, Synced, mark_synced};
use crate::metrics::Metrics;
use crate::workload::{claim, reconcile as workload, replica};
use crate::{fencing, microvm, nodes};

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
    let (namespaces_synced, namespaces_synced_rx) = watch::channel(false);
    let node_filter = watcher::Config::default().labels(&format!("{}=true", nodes::AGENT_LABEL));
    let (nodes_store, node_watch) = cache(
        "Node",
        Api::all(client.clone()),
        node_filter,
        nodes_synced,
        |_| (),
    );
    let leases = Api::namespaced(client.clone(), &config.lease_namespace);
    let lease_seen = Arc::new(LeaseWatch::default());
    let seen = lease_seen.clone();
    let (leases_store, lease_watch) = cache(
        "Lease",
        leases,
        watcher::Config::default(),
        leases_synced,
        move |ok| seen.observe(ok, Timestamp::now()),
    );
    // Only the labels are read: the tenant and the administrator's policy.
    let (namespaces_store, namespace_watch) = cache(
        "Namespace",
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        namespaces_synced,
        |_| (),
    );
    // Wakes a SecureWorkload at once rather than at its next timed requeue:
    // for an orphan its selector selects, and for a replica that is gone.
    let (wake, woken) = mpsc::channel::<ObjectRef<SecureWorkload>>(1024);
    let Some(vms) = MicroVMWatch::start(&client, vms_synced, wake.clone()) else {
        tracing::error!("a shared store always has subscribers");
        return;
    };
    let reporter = Reporter {
        controller: "runv.dev/operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: nodes_store,
        leases: leases_store,
        microvms: vms.store,
        namespaces: namespaces_store,
        placer: Mutex::new(Assumed::default()),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        config,
        lease_missing: std::sync::Mutex::default(),
        lease_watch: lease_seen,
        synced: Synced {
            nodes: nodes_synced_rx,
            leases: leases_synced_rx,
            microvms: vms_synced_rx,
            namespaces: namespaces_synced_rx,
        },
        microvm_retry: Retry::default(),
        workload_retry: Retry::default(),
    });
    let (trigger, microvms) = microvm_controller(vms.for_vms, ctx.clone(), shutdown.clone());
    let workloads = WorkloadController::start(
        &client,
        vms.for_workloads,
        vms.for_orphans,
        (wake, woken),
        workloads_synced,
        ctx.clone(),
        shutdown,
    );
    let monitor = monitor(ctx, workloads_synced_rx, trigger, ready);
    tokio::select! {
        _ = node_watch => tracing::error!("node watch ended"),
        _ = lease_watch => tracing::error!("lease watch ended"),
        _ = namespace_watch => tracing::error!("namespace watch ended"),
        _ = vms.watch => tracing::error!("MicroVM watch ended"),
        _ = future::join(microvms, workloads.controller) => tracing::info!("controllers stopped"),
        _ = monitor => tracing::error!("node monitor ended"),
        _ = workloads.orphans => tracing::error!("MicroVM stream for adoption ended"),
    }
}

/// A cache of `api`'s objects that `synced` reports filled, and the watch
/// that keeps it (to be polled). Annotations and managedFields are dropped:
/// no reconcile reads them of a Node, a Lease or a Namespace.
fn cache<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    synced: watch::Sender<bool>,
    on_result: impl Fn(bool) + Send + 'static,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let watch = reflector::reflector(writer, watcher(api, config).modify(strip_unread))
        .default_backoff()
        .inspect(mark_synced(synced))
        .inspect(move |r| on_result(r.is_ok()))
        .applied_objects()
        .for_each(move |r| log_watch_error(kind, r))
        .boxed();
    (store, watch)
}

/// Drops what the operator never reads from a cached object: its
/// managedFields and its annotations.
fn strip_unread<K: kube::Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// One watch of MicroVMs that feeds the cache and both controllers, without
/// the managedFields and annotations no reconcile reads (they are most of an
/// object's size, and a tenant's to make as large as the API allows: a
/// SecureWorkload's template annotations are copied into every replica).
struct MicroVMWatch {
    store: Store<MicroVM>,
    watch: BoxFuture<'static, ()>,
    for_vms: ReflectHandle<MicroVM>,
    for_workloads: ReflectHandle<MicroVM>,
    for_orphans: ReflectHandle<MicroVM>,
}

impl MicroVMWatch {
    /// `gone` hears of each deleted MicroVM's controlling SecureWorkload.
    fn start(
        client: &Client,
        synced: watch::Sender<bool>,
        gone: mpsc::Sender<ObjectRef<SecureWorkload>>,
    ) -> Option<Self> {
        let (store, writer) = reflector::store_shared::<MicroVM>(1024);
        let (for_vms, for_workloads, for_orphans) = (
            writer.subscribe()?,
            writer.subscribe()?,
            writer.subscribe()?,
        );
        let watch = watcher(
            Api::<MicroVM>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(strip_unread)
        .reflect_shared(writer)
        // A shared stream passes on no deletions (kube-rs issue 1590), so a
        // workload would not hear that a replica is gone (a Recreate waits for
        // that, and a rollout is complete only then) until its next requeue.
        // The cache no longer holds the MicroVM when this runs.
        .inspect(move |e| {
            if let Ok(watcher::Event::Delete(vm)) = e
                && let Some(owner) = replica::workload_of(vm)
            {
                // A full channel means a reconcile is queued already.
                let _ = gone.try_send(owner);
            }
        })
        .inspect(mark_synced(synced))
        .applied_objects()
        .for_each(|r| log_watch_error("MicroVM", r))
        .boxed();
        Some(Self {
            store,
            watch,
            for_vms,
            for_workloads,
            for_orphans,
        })
    }
}

/// The MicroVM controller, reconciling also what the monitor sends on the
/// returned channel.
fn microvm_controller(
    vms: ReflectHandle<MicroVM>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (mpsc::Sender<ObjectRef<MicroVM>>, BoxFuture<'static, ()>) {
    let (trigger, triggered) = mpsc::channel::<ObjectRef<MicroVM>>(4096);
    let controller = Controller::for_shared_stream(vms, ctx.microvms.clone())
        .reconcile_on(receiver_stream(triggered))
        .graceful_shutdown_on(shutdown)
        .run(reconcile_microvm, microvm_error_policy, ctx)
        .for_each(|_| future::ready(()))
        .boxed();
    (trigger, controller)
}

/// kube-runtime holds a controller only until its own cache is filled; both
/// controllers also read the Node, Lease and MicroVM caches, so every
/// reconcile first waits for those (see Context::caches_synced). The copy
/// handed in was read before the wait: the current one is reconciled.
async fn reconcile_microvm(
    vm: Arc<MicroVM>,
    ctx: Arc<Context>,
) -> Result<Action, microvm::ReconcileError> {
    if !ctx.caches_synced().await {
        return Ok(Action::await_change());
    }
    let key = ObjectRef::from_obj(vm.as_ref());
    let result = match ctx.microvms.get(&key) {
        Some(vm) => microvm::reconcile(vm, ctx.clone()).await,
        None => Ok(Action::await_change()),
    };
    if result.is_ok() {
        ctx.microvm_retry.succeeded(&key);
    }
    result
}

fn microvm_error_policy(
    vm: Arc<MicroVM>,
    err: &microvm::ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.error(microvm::CONTROLLER, err.metric_reason());
    retry_after(&ctx.microvm_retry, ObjectRef::from_obj(vm.as_ref()), err)
}

/// The SecureWorkload controller and the task that wakes it for orphans its
/// selector selects.
struct WorkloadController {
    controller: BoxFuture<'static, ()>,
    orphans: BoxFuture<'static, ()>,
}

impl WorkloadController {
    fn start(
        client: &Client,
        owned: ReflectHandle<MicroVM>,
        orphans: ReflectHandle<MicroVM>,
        (adopt, adopt_rx): (
            mpsc::Sender<ObjectRef<SecureWorkload>>,
            mpsc::Receiver<ObjectRef<SecureWorkload>>,
        ),
        synced: watch::Sender<bool>,
        ctx: Arc<Context>,
        shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> Self {
        // A SecureWorkload hears of its own replicas through their
        // ownerReference (of those deleted, through `adopt_rx` too, see
        // MicroVMWatch), and of an orphan its selector selects through
        // `adopt`, so it adopts it at once rather than at its next timed requeue.
        // The cache is built here rather than by Controller::new so that its
        // first list can be noticed without awaiting the store, which the
        // controller itself awaits (see context::Synced).
        let (store, writer) = reflector::store::<SecureWorkload>();
        let watch = watcher(
            Api::<SecureWorkload>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        // Its own annotations and managedFields are never read; the
        // template's annotations (copied into replicas) are kept.
        .modify(strip_unread)
        .reflect(writer)
        .inspect(mark_synced(synced))
        .applied_objects();
        let controller = Controller::for_stream(watch, store)
            .owns_shared_stream(owned)
            .reconcile_on(receiver_stream(adopt_rx))
            .graceful_shutdown_on(shutdown);
        let store = controller.store();
        let workloads = store.clone();
        let orphans = orphans
            .for_each(move |vm| {
                let state = workloads.state();
                for adopter in claim::adopters(&vm, state.iter().map(AsRef::as_ref)) {
                    // A full channel means a reconcile is queued already.
                    let _ = adopt.try_send(adopter);
                }
                future::ready(())
            })
            .boxed();
        let controller = controller
            .run(
                move |swl, ctx| reconcile_workload(swl, ctx, store.clone()),
                workload_error_policy,
                ctx,
            )
            .for_each(|r| log_controller_error("SecureWorkload", r))
            .boxed();
        Self {
            controller,
            orphans,
        }
    }
}

/// As [`reconcile_microvm`], for a SecureWorkload.
async fn reconcile_workload(
    swl: Arc<SecureWorkload>,
    ctx: Arc<Context>,
    store: Store<SecureWorkload>,
) -> Result<Action, workload::ReconcileError> {
    if !ctx.caches_synced().await {
        return Ok(Action::await_change());
    }
    let key = ObjectRef::from_obj(swl.as_ref());
    let result = match store.get(&key) {
        Some(swl) => workload::reconcile(swl, ctx.clone()).await,
        None => Ok(Action::await_change()),
    };
    if result.is_ok() {
        ctx.workload_retry.succeeded(&key);
    }
    result
}

fn workload_error_policy(
    swl: Arc<SecureWorkload>,
    err: &workload::ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.error(workload::CONTROLLER, err.metric_reason());
    retry_after(&ctx.workload_retry, ObjectRef::from_obj(swl.as_ref()), err)
}

/// Logs a failed reconcile and retries the object after its backoff.
fn retry_after<K: kube::Resource<DynamicType = ()>>(
    retry: &Retry<ObjectRef<K>>,
    key: ObjectRef<K>,
    err: &(dyn std::error::Error + 'static),
) -> Action {
    let object = key.to_string();
    let delay = retry.failed(key);
    tracing::warn!(%object, error = %Chain(err), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The stream of what `rx` receives.
fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
}

/// What the placer sees of one node, to notice when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeView {
    agent_ready: bool,
    fenced: bool,
    cordoned: bool,
    vcpus: u64,
    memory: u64,
    /// MicroVMs bound to it (each holds capacity, whatever its phase).
    used: usize,
    /// What nodeSelectors and tolerations read (see [`placement_labels_hash`]).
    labels_hash: u64,
}

/// The placer's view of the cluster, by node name.
type Fingerprint = BTreeMap<String, NodeView>;

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
            let info = nodes::node_info(&node, lease.as_deref(), now, ctx.lease_watch.since());
            fencing::fence(&ctx, &node, lease.as_deref(), now).await;
            let used = vms
                .iter()
                .filter(|vm| microvm::bound_node(vm) == Some(name.as_str()))
                .count();
            names.insert(name.clone());
            fp.insert(
                name,
                NodeView {
                    agent_ready: info.agent_ready,
                    fenced: info.fenced,
                    cordoned: info.cordoned,
                    vcpus: info.vcpus,
                    memory: info.memory,
                    used,
                    labels_hash: placement_labels_hash(&node),
                },
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
        tracing::warn!(error = %Chain(&e), "{kind} watch failed; retrying");
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
            tracing::warn!(error = %Chain(&e), "{kind} watch failed; retrying");
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

#[cfg(test)]
mod tests;

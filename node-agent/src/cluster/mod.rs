//! Cluster mode (`runv-agent run --node NAME`): registers the node, renews its
//! Lease (stopping its VMs only when its Node carries a fencing taint, never
//! because the API cannot be reached), watches the MicroVMs bound to the
//! node (field selector `status.nodeName=<node>`), realizes each through the
//! [`Runtime`], reports status by server-side apply under `runv-agent`, emits
//! Events, serves `/metrics`, and removes VMs that are no longer bound here.
//!
//! The operator and the agent meet only in the API (docs/operations.md).

pub mod controller;
pub mod exits;
pub mod node;
pub mod outbox;
pub mod secrets;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use runv_crds::retry::Retry;
use runv_crds::{MicroVM, MicroVMStatus};

use crate::metrics::{self, VmSample};
use crate::runtime::{self, Runtime, VmRef};

/// The field manager of every write the agent makes.
pub use runv_crds::contract::AGENT_MANAGER as MANAGER;
/// The agent's finalizer on MicroVMs bound to its node.
pub use runv_crds::contract::FINALIZER;

/// Why cluster mode failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An API request failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// The metrics endpoint could not be served.
    #[error("serving {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Settings of cluster mode.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name.
    pub node: String,
    /// Namespace of the agent Leases.
    pub namespace: String,
    /// Who holds the Lease (the pod name).
    pub holder: String,
    /// What the node offers to microVMs.
    pub capacity: node::Capacity,
    /// Address of `/metrics` and `/healthz`.
    pub http_addr: SocketAddr,
    /// The Lease's duration, as written in it (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How often the Lease is renewed (and the Node read for fencing taints).
    pub renew_every: Duration,
}

/// Shared by the controller, the heartbeat and the metrics endpoint.
pub struct Context {
    /// The API.
    pub client: Client,
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// Settings.
    pub config: ClusterConfig,
    /// Events.
    pub recorder: Recorder,
    /// The last status reported per VM, for metrics.
    pub statuses: Mutex<BTreeMap<VmRef, MicroVMStatus>>,
    /// Statuses decided but not yet written (the API could not be reached):
    /// the next decision starts from these, so restarts are counted and
    /// backed off locally through an outage, and they are written once the
    /// API is back.
    pub unsent: Mutex<BTreeMap<VmRef, MicroVMStatus>>,
    /// Failed reconciles in a row per MicroVM, for the error policy's backoff.
    pub retry: Retry<ObjectRef<MicroVM>>,
    /// Failed reconciles, by reason, for metrics.
    pub errors: metrics::ReconcileErrors,
    /// The running VMMs waited on, so that an exit is acted on at once.
    pub exits: exits::Exits,
    /// Events not yet published (the API could not be reached).
    pub outbox: outbox::Outbox,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish()
    }
}

fn vm_ref(vm: &MicroVM) -> VmRef {
    VmRef {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        uid: vm.uid().unwrap_or_default(),
    }
}

/// Removes every VM on this host whose MicroVM is not bound to this node any
/// more (deleted, or moved while the agent was away).
pub async fn collect_orphans(ctx: &Context) -> Result<usize, ClusterError> {
    let api: Api<MicroVM> = Api::all(ctx.client.clone());
    let bound = api
        .list(&ListParams::default().fields(&format!("status.nodeName={}", ctx.config.node)))
        .await?;
    let keep: Vec<VmRef> = bound.items.iter().map(vm_ref).collect();
    let mut removed = 0;
    for known in ctx.runtime.known() {
        let still = keep.iter().any(|k| {
            k.namespace == known.namespace
                && k.name == known.name
                && (known.uid.is_empty() || k.uid == known.uid)
        });
        if !still {
            let rt = ctx.runtime.clone();
            let r = known.clone();
            let res = tokio::task::spawn_blocking(move || rt.cleanup(&r)).await;
            match res {
                Ok(Ok(())) => {
                    tracing::info!(vm = %known, "removed a VM no longer bound to this node");
                    forget(&ctx.unsent, &known);
                    forget(&ctx.statuses, &known);
                    removed += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %known, error = %runv_crds::retry::Chain(&e), "cannot remove orphan")
                }
                Err(e) => tracing::warn!(vm = %known, error = %e, "cleanup task failed"),
            }
        }
    }
    Ok(removed)
}

fn forget(map: &Mutex<BTreeMap<VmRef, MicroVMStatus>>, vm: &VmRef) {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(vm);
}

/// Renews the Lease every `renew_every`, and reads the Node for evidence that
/// its VMs must not run here. A failed renewal changes nothing on the node:
/// VMs keep running through an API outage of any length, and only a fencing
/// taint seen on the Node stops them (see docs/operations.md, "Failures").
async fn heartbeat(ctx: Arc<Context>) {
    // Each request is bounded: one sent into a partition that drops packets
    // would otherwise wait for TCP to give up, long after the partition heals.
    let bound = ctx
        .config
        .renew_every
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let renewed = tokio::time::timeout(
            bound,
            node::renew(
                &ctx.client,
                &ctx.config.namespace,
                &ctx.config.node,
                &ctx.config.holder,
                ctx.config.lease_duration,
            ),
        )
        .await;
        match renewed {
            Ok(Ok(())) => ctx.outbox.flush(&ctx.recorder).await,
            Ok(Err(e)) => {
                tracing::warn!(error = %runv_crds::retry::Chain(&e), "cannot renew the Lease; the VMs keep running");
            }
            Err(_) => {
                tracing::warn!(timeout = ?bound, "renewing the Lease timed out; the VMs keep running")
            }
        }
        let taint = tokio::time::timeout(bound, node::fencing_taint(&ctx.client, &ctx.config.node));
        match taint.await {
            Err(_) => tracing::debug!("reading the Node timed out; fencing unchanged"),
            Ok(Ok(Some(taint))) => fence(&ctx, &taint).await,
            Ok(Ok(None)) => {
                if ctx.runtime.set_fenced(None) {
                    tracing::warn!("the node's fencing taint is gone: VMs may start again");
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the Node; fencing unchanged"),
        }
        tokio::time::sleep(ctx.config.renew_every).await;
    }
}

/// How often unused images are collected (when the disk is full enough).
const IMAGE_GC_EVERY: Duration = Duration::from_secs(300);

/// Collects unused images every [`IMAGE_GC_EVERY`], as kubelet's image GC.
async fn collect_images(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(IMAGE_GC_EVERY).await;
        let rt = ctx.runtime.clone();
        match tokio::task::spawn_blocking(move || rt.collect_images()).await {
            Ok(Some(Ok(report))) => tracing::info!("image garbage collection: {report}"),
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "image garbage collection failed"),
            Ok(None) | Err(_) => {}
        }
    }
}

/// Stops every VM of a node that carries the fencing taint `taint`, once.
/// From then on, until the taint is gone, each reconcile reports its VM
/// stopped (`NodeFenced`) and starts nothing; the VMMs' exits ask for those
/// reconciles at once. Set only on reading the taint, never because the API
/// cannot be reached.
async fn fence(ctx: &Context, taint: &str) {
    let why = format!(
        "node {} carries the taint {taint}: the agent stopped the VM and starts none here \
         until the taint is removed",
        ctx.config.node
    );
    if !ctx.runtime.set_fenced(Some(why)) {
        return;
    }
    tracing::error!(%taint, "the node is fenced: stopping every VM, starting none");
    let rt = ctx.runtime.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for vm in rt.known() {
            if let Err(e) = rt.stop(&vm, Duration::ZERO) {
                tracing::warn!(vm = %vm, error = %runv_crds::retry::Chain(&e), "cannot stop");
            }
        }
    })
    .await;
}

/// How soon the MicroVM watch reconnects after a failure: 0.5 s doubling to
/// 5 s (kube's default waits up to 30 s), so status catches up within seconds
/// of the API's return. One watch per node is cheap for the API server.
#[derive(Debug)]
struct Reconnect {
    next: Duration,
}

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for Reconnect {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for Reconnect {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The samples behind `/metrics`.
pub fn samples(ctx: &Context) -> Vec<VmSample> {
    let statuses = ctx
        .statuses
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let host = ctx.runtime.host();
    statuses
        .iter()
        .map(|(r, s)| {
            let dir = ctx.runtime.dir(r);
            let id = ctx.runtime.record(r).and_then(|rec| rec.vmm);
            let usage = id.and_then(|id| host.processes().usage(id));
            let view = usage
                .zip(id)
                .and_then(|(_, id)| host.control().view(&runtime::control_target(&dir, id)).ok());
            VmSample {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                cpu_seconds: usage.map(|u| u.cpu_seconds),
                rss_bytes: usage.map(|u| u.rss_bytes),
                boot_seconds: s.boot_duration_millis.map(|m| m as f64 / 1000.0),
                restarts: u64::try_from(s.restart_count).unwrap_or(0),
                running: usage.is_some(),
                counters: view.map(|v| v.counters).unwrap_or_default(),
            }
        })
        .collect()
}

async fn serve(ctx: Arc<Context>) -> Result<(), ClusterError> {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    let addr = ctx.config.http_addr;
    let cache = Arc::new(crate::scrape::ScrapeCache::default());
    let metrics = move || {
        let (ctx, cache) = (ctx.clone(), cache.clone());
        async move {
            let node = ctx.config.node.clone();
            let render = move || metrics::render(&node, &samples(&ctx)) + &ctx.errors.render(&node);
            match cache.page(render).await {
                Ok(page) => (
                    [("content-type", "text/plain; version=0.0.4")],
                    page.to_string(),
                )
                    .into_response(),
                Err(busy) => (StatusCode::SERVICE_UNAVAILABLE, busy.to_string()).into_response(),
            }
        }
    };
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ClusterError::Http { addr, source })?;
    axum::serve(listener, app)
        .await
        .map_err(|source| ClusterError::Http { addr, source })
}

/// Runs cluster mode until `shutdown` resolves. VMs keep running when it returns.
pub async fn run(
    client: Client,
    config: ClusterConfig,
    runtime: Arc<Runtime>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), ClusterError> {
    let reporter = Reporter {
        controller: "runv.dev/agent".into(),
        instance: Some(config.node.clone()),
    };
    let (exits, exited) = exits::Exits::new();
    if let Some(links) = runtime.guest_links() {
        links.set_on_change(exits.requester());
    }
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        runtime,
        config,
        statuses: Mutex::new(BTreeMap::new()),
        unsent: Mutex::new(BTreeMap::new()),
        retry: Retry::default(),
        errors: metrics::ReconcileErrors::default(),
        exits,
        outbox: outbox::Outbox::default(),
    });
    // Before reporting ready: nothing runs here that is not bound here.
    collect_orphans(&ctx).await?;
    node::register(&client, &ctx.config.node, ctx.config.capacity).await?;
    node::renew(
        &client,
        &ctx.config.namespace,
        &ctx.config.node,
        &ctx.config.holder,
        ctx.config.lease_duration,
    )
    .await?;
    let beat = tokio::spawn(heartbeat(ctx.clone()));
    let http = tokio::spawn(serve(ctx.clone()));
    let gc_ctx = ctx.clone();
    let gc = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if let Err(e) = collect_orphans(&gc_ctx).await {
                tracing::warn!(error = %runv_crds::retry::Chain(&e), "orphan collection failed");
            }
        }
    });
    let images = tokio::spawn(collect_images(ctx.clone()));
    let api: Api<MicroVM> = Api::all(client);
    let selector = format!("status.nodeName={}", ctx.config.node);
    let shutdown = shutdown.shared();
    let controller = Controller::new(api, watcher::Config::default().fields(&selector))
        .trigger_backoff(Reconnect::default())
        .reconcile_on(exited)
        .graceful_shutdown_on(shutdown.clone())
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile failed");
            }
            futures::future::ready(())
        });
    let result = tokio::select! {
        () = controller => Ok(()),
        r = http => match r {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        },
    };
    beat.abort();
    gc.abort();
    images.abort();
    result
}

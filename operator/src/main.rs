//! `runv-operator`: places MicroVMs on nodes and runs SecureWorkloads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use runv_crds::retry::Chain;
use runv_operator::context::Config;
use runv_operator::metrics::Metrics;
use runv_operator::{http, run};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The runv operator.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Namespace of the node agents' Leases and of the leader-election Lease.
    #[arg(long, env = "RUNV_NAMESPACE", default_value = "runv-system")]
    namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Elect a leader through a Lease, so that only one replica acts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Seconds an agent's Lease may be expired before its node is fenced.
    #[arg(long, default_value_t = 300)]
    fence_after_seconds: u64,
    /// Fence nodes automatically (only while a clear majority of the other
    /// agents' Leases are fresh); when false (the default) an administrator or a
    /// fencing system adds the taint runv.dev/fenced or
    /// node.kubernetes.io/out-of-service.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    auto_fence: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (kubeconfig or in-cluster config)")?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(http::serve(
        args.http_addr,
        http::router(metrics.clone(), ready.clone()),
    ));
    let (leadership, lost_rx) = if args.leader_elect {
        Some(Leadership::acquire(&client, &args.namespace, &ready).await?)
    } else {
        None
    }
    .unzip();
    let config = Config {
        lease_namespace: args.namespace,
        fence_after: Duration::from_secs(args.fence_after_seconds),
        auto_fence: args.auto_fence,
        ..Config::default()
    };
    let lost = Arc::new(AtomicBool::new(false));
    let shutdown = shutdown(lost_rx, lost.clone());
    tokio::select! {
        () = run::run(client, config, metrics, ready, shutdown) => {}
        r = server => anyhow::bail!("HTTP server stopped: {r:?}"),
    }
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    if lost.load(Ordering::Relaxed) {
        anyhow::bail!("lost leadership");
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_env_filter(filter)
            .init(),
    }
}

/// This replica leads: the task that follows the leader-election Lease and
/// the one that notices when leadership is lost.
struct Leadership {
    follower: JoinHandle<()>,
    task: JoinHandle<Result<LeaseManager, kube_lease_manager::LeaseManagerError>>,
}

impl Leadership {
    /// Waits until this replica holds the leader-election Lease; the
    /// receiver hears when it is lost.
    async fn acquire(
        client: &Client,
        namespace: &str,
        ready: &AtomicBool,
    ) -> anyhow::Result<(Self, oneshot::Receiver<()>)> {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| default_identity());
        let manager = LeaseManagerBuilder::new(client.clone(), "runv-operator")
            .with_namespace(namespace)
            .with_identity(&identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .context("cannot set up leader election")?;
        let (mut leader, task) = manager.watch().await;
        tracing::info!(%identity, "waiting to become the leader");
        // A healthy standby is ready (see http.rs); the leader is ready again
        // once its caches have synced.
        ready.store(true, Ordering::Relaxed);
        while !*leader.borrow_and_update() {
            leader.changed().await.context("leader election stopped")?;
        }
        ready.store(false, Ordering::Relaxed);
        tracing::info!("leading");
        let (lost_tx, lost_rx) = oneshot::channel::<()>();
        // Holds the only receiver of the leadership channel: when it ends, the
        // lease manager releases the Lease.
        let follower = tokio::spawn(async move {
            while leader.changed().await.is_ok() {
                if !*leader.borrow_and_update() {
                    break;
                }
            }
            let _ = lost_tx.send(());
        });
        Ok((Self { follower, task }, lost_rx))
    }

    /// Releases the Lease rather than let it expire, so a standby takes over
    /// at once instead of after the Lease duration.
    async fn release(self) {
        self.follower.abort();
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("leader Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %Chain(&e), "cannot release the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("timed out releasing the leader Lease"),
        }
    }
}

/// Resolves on SIGINT, SIGTERM or, if `lost` resolves, lost leadership
/// (which it records in `lost_flag`).
async fn shutdown(lost: Option<oneshot::Receiver<()>>, lost_flag: Arc<AtomicBool>) {
    let lost = async move {
        // Without leader election nothing is lost.
        let Some(lost) = lost else {
            return std::future::pending().await;
        };
        if lost.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = terminate() => tracing::info!("terminated, shutting down"),
        () = lost => {
            tracing::error!("lost leadership, shutting down");
            lost_flag.store(true, Ordering::Relaxed);
        }
    }
}

/// The leader-election identity without `POD_NAME`: the host name and a
/// random suffix (a process id alone is 1 in every container).
fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "runv-operator".to_owned());
    // RandomState is seeded from the OS's randomness.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{host}-{:08x}", hasher.finish() as u32)
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

//! `runv-operator`: places MicroVMs on nodes and runs SecureWorkloads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use runv_operator::context::Config;
use runv_operator::metrics::Metrics;
use runv_operator::{http, run};
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
    /// Fence nodes automatically; when false an administrator or a fencing system
    /// adds the taint runv.dev/fenced.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    auto_fence: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
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

    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (kubeconfig or in-cluster config)")?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(http::serve(
        args.http_addr,
        http::router(metrics.clone(), ready.clone()),
    ));

    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let mut leadership = None;
    if args.leader_elect {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| default_identity());
        let manager = LeaseManagerBuilder::new(client.clone(), "runv-operator")
            .with_namespace(&args.namespace)
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
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        while !*leader.borrow_and_update() {
            leader.changed().await.context("leader election stopped")?;
        }
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("leading");
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
        leadership = Some((follower, task));
    } else {
        drop(lost_tx);
    }

    let config = Config {
        lease_namespace: args.namespace,
        fence_after: Duration::from_secs(args.fence_after_seconds),
        auto_fence: args.auto_fence,
        ..Config::default()
    };
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
            _ = terminate() => tracing::info!("terminated, shutting down"),
            Ok(()) = lost_rx => {
                tracing::error!("lost leadership, shutting down");
                lost_flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    tokio::select! {
        () = run::run(client, config, metrics, ready, shutdown) => {}
        r = server => anyhow::bail!("HTTP server stopped: {r:?}"),
    }
    if let Some((follower, task)) = leadership {
        // Release the Lease rather than let it expire, so a standby takes over
        // at once instead of after the Lease duration.
        follower.abort();
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("leader Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot release the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("timed out releasing the leader Lease"),
        }
    }
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("lost leadership");
    }
    Ok(())
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

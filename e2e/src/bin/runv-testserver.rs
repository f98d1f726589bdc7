//! `runv-testserver --port PORT --kubeconfig FILE`: serves the Kubernetes API
//! test server on 127.0.0.1 until SIGINT (Ctrl-C) or SIGTERM, for pointing
//! kubectl at it by hand or from a test. Either signal shuts it down cleanly:
//! watches end and the state file, if any, is written.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Kubernetes API test server for runv's end-to-end tests (not a control plane).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write a kubeconfig for kubectl.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Keep objects in this file across restarts.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Create runv's CRDs (MicroVM, SecureWorkload) at start.
    #[arg(long)]
    runv_crds: bool,
    /// Watch events kept before compaction (older versions get 410 Gone).
    #[arg(long, default_value_t = 100_000)]
    history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut opts = runv_e2e::Options {
        port: args.port,
        kubeconfig: Some(args.kubeconfig.clone()),
        state_file: args.state_file,
        history: args.history,
        ..Default::default()
    };
    if args.runv_crds {
        for crd in runv_crds::generate::crds() {
            opts.preload
                .push(serde_json::to_value(crd).context("encoding a runv CRD")?);
        }
    }
    let server = runv_e2e::TestServer::start(opts).await?;
    println!(
        "serving {} (kubeconfig {})",
        server.url(),
        server.kubeconfig_path().display()
    );
    stop_requested().await?;
    server.shutdown().await?;
    Ok(())
}

/// Returns on the first SIGINT or SIGTERM.
#[cfg(unix)]
async fn stop_requested() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Returns on the first Ctrl-C.
#[cfg(not(unix))]
async fn stop_requested() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}

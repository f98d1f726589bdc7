//! Operator benchmark: placements per second for 1,000 MicroVMs over 10 nodes,
//! all pending when the operator starts, and the operator's resident memory
//! when idle (after /readyz), with 10,000 MicroVMs, and with 1,000 MicroVMs
//! carrying 64 KiB of annotations each. Runs the real
//! binary against the Kubernetes API test server; prints numbers, asserts nothing
//! about time. `cargo bench -p runv-operator --bench placement`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{Cluster, microvm, wait_bound};
use kube::api::PostParams;

/// Resident set of `pid` in KiB, from /proc/PID/statm (pages of 4 KiB).
fn rss_kib(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

async fn placements() -> Result<()> {
    let names: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
    let nodes: Vec<(&str, u32, &str)> = names.iter().map(|n| (n.as_str(), 256, "64Gi")).collect();
    // The MicroVMs are all pending before the operator starts, so what is timed
    // is placement alone, not how fast this client creates them.
    let mut cluster = Cluster::without_operator(&nodes).await?;
    let api = cluster.microvms();
    for i in 0..1000u32 {
        api.create(
            &PostParams::default(),
            &microvm(&format!("vm-{i:04}"), 1, "256Mi", "Once"),
        )
        .await?;
    }
    let kubeconfig = cluster.server.kubeconfig_path().to_owned();
    let start = Instant::now();
    cluster.start_operator(&["--leader-elect=false"], &kubeconfig)?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let ready = start.elapsed();
    wait_bound(&api, 1000, Duration::from_secs(300)).await?;
    let total = start.elapsed();
    println!(
        "placement: 1000 pending MicroVMs over 10 nodes all bound {:.2} s after the operator started ({:.2} s to its /readyz): {:.0} placements/s",
        total.as_secs_f64(),
        ready.as_secs_f64(),
        1000.0 / total.as_secs_f64()
    );
    Ok(())
}

async fn memory() -> Result<()> {
    let names: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
    let nodes: Vec<(&str, u32, &str)> = names.iter().map(|n| (n.as_str(), 2000, "1Ti")).collect();
    let cluster = Cluster::start(&nodes, &["--leader-elect=false"]).await?;
    let pid = cluster.operator_pid();
    // Idle: once its caches have synced (/readyz answers 200) and it has settled.
    cluster.wait_ready(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid).unwrap_or(0);
    let api = cluster.microvms();
    for i in 0..10_000u32 {
        api.create(
            &PostParams::default(),
            &microvm(&format!("vm-{i:05}"), 1, "64Mi", "Once"),
        )
        .await?;
    }
    wait_bound(&api, 10_000, Duration::from_secs(900)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded = rss_kib(pid).unwrap_or(0);
    println!(
        "operator RSS: {:.1} MiB idle, {:.1} MiB with 10000 MicroVMs placed ({:.1} KiB per MicroVM)",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        (loaded.saturating_sub(idle)) as f64 / 10_000.0
    );
    Ok(())
}

/// 1,000 MicroVMs carrying 64 KiB of annotations each (what a large
/// `kubectl.kubernetes.io/last-applied-configuration`, or a SecureWorkload
/// template's annotations copied into every replica, weigh): the operator's
/// memory must not grow with them, since it caches no annotations.
async fn memory_with_annotations() -> Result<()> {
    let names: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
    let nodes: Vec<(&str, u32, &str)> = names.iter().map(|n| (n.as_str(), 2000, "1Ti")).collect();
    let cluster = Cluster::start(&nodes, &["--leader-elect=false"]).await?;
    let pid = cluster.operator_pid();
    cluster.wait_ready(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid).unwrap_or(0);
    let api = cluster.microvms();
    let big = "x".repeat(64 << 10);
    for i in 0..1000u32 {
        let mut vm = microvm(&format!("big-{i:04}"), 1, "64Mi", "Once");
        vm.metadata.annotations = Some([("example.com/blob".to_owned(), big.clone())].into());
        api.create(&PostParams::default(), &vm).await?;
    }
    wait_bound(&api, 1000, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded = rss_kib(pid).unwrap_or(0);
    println!(
        "operator RSS: {:.1} MiB idle, {:.1} MiB with 1000 MicroVMs of 64 KiB annotations placed \
         ({:.1} KiB per MicroVM; 62.5 MiB of annotations in the API)",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        (loaded.saturating_sub(idle)) as f64 / 1000.0
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench ... -- NAME` runs one part: placements, memory, annotations.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runs = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if runs("placements") {
        placements().await?;
    }
    if runs("memory") {
        memory().await?;
    }
    if runs("annotations") {
        memory_with_annotations().await?;
    }
    Ok(())
}

//! `runv-testserver-bench`: measures the test server with runv's CRDs and
//! prints the numbers: create rate of N MicroVMs, list latency (whole and
//! paged), resident memory, and W concurrent watchers each receiving every
//! event in order. Nothing is asserted on time; mistakes in delivery
//! (a missing, duplicated or out-of-order event) fail the run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::json;

/// Benchmark of the Kubernetes API test server.
#[derive(Debug, Parser)]
struct Args {
    /// Custom objects to create.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent create requests.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Modifications each watcher must receive.
    #[arg(long, default_value_t = 1_000)]
    events: usize,
    /// Serve from this process instead of the `runv-testserver` binary next
    /// to this one (memory then counts the client too).
    #[arg(long)]
    in_process: bool,
}

/// The server under test: in this process, or a child process.
enum Server {
    InProcess(runv_e2e::TestServer, u64),
    Child(tokio::process::Child, tempfile::TempDir),
}

impl Server {
    async fn start(args: &Args) -> Result<(Self, kube::Client)> {
        let sibling = std::env::current_exe()?.with_file_name("runv-testserver");
        if !args.in_process && sibling.is_file() {
            let dir = tempfile::tempdir()?;
            let kubeconfig = dir.path().join("kubeconfig");
            let child = tokio::process::Command::new(&sibling)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--runv-crds")
                .arg("--history")
                .arg(((args.objects + args.events) * 2).to_string())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting runv-testserver")?;
            for _ in 0..200 {
                if kubeconfig.is_file() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
                .context("reading the server's kubeconfig")?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            return Ok((Self::Child(child, dir), kube::Client::try_from(config)?));
        }
        let mut opts = runv_e2e::Options {
            history: (args.objects + args.events) * 2,
            ..Default::default()
        };
        for crd in runv_crds::generate::crds() {
            opts.preload.push(serde_json::to_value(crd)?);
        }
        let rss_start = rss_kib(None);
        let server = runv_e2e::TestServer::start(opts).await?;
        let client = server.client()?;
        Ok((Self::InProcess(server, rss_start), client))
    }

    fn memory(&self) -> String {
        match self {
            Self::InProcess(_, start) => format!(
                "RSS {} MiB (+{} MiB since start; server and client share the process)",
                rss_kib(None) / 1024,
                rss_kib(None).saturating_sub(*start) / 1024
            ),
            Self::Child(child, _) => {
                format!("server process RSS {} MiB", rss_kib(child.id()) / 1024)
            }
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Self::InProcess(server, _) => server.shutdown().await?,
            Self::Child(mut child, dir) => {
                child.kill().await?;
                dir.close()?;
            }
        }
        Ok(())
    }
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(
        || "/proc/self/status".to_string(),
        |p| format!("/proc/{p}/status"),
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (server, client) = Server::start(&args).await?;
    let gvk = GroupVersionKind::gvk("runv.dev", "v1alpha1", "MicroVM");
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, "microvms"),
    );

    let start = Instant::now();
    stream::iter(0..args.objects)
        .map(|i| {
            let api = api.clone();
            async move {
                let obj: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
                    "metadata": { "name": format!("vm-{i:05}"), "labels": { "bench": "yes", "shard": (i % 10).to_string() } },
                    "spec": { "resources": { "vcpus": 1, "memory": "64Mi" }, "boot": { "kernel": "/var/lib/runv/guests/runv-test-guest" } },
                }))?;
                api.create(&PostParams::default(), &obj).await.context("create")?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let took = start.elapsed();
    println!(
        "create: {} MicroVMs in {:.2} s = {:.0} objects/s ({} concurrent)",
        args.objects,
        took.as_secs_f64(),
        args.objects as f64 / took.as_secs_f64(),
        args.concurrency
    );
    println!("memory: {} after create", server.memory());

    let mut lat = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let list = api.list(&ListParams::default()).await?;
        lat.push(t.elapsed());
        if list.items.len() != args.objects {
            bail!(
                "list returned {} objects, want {}",
                list.items.len(),
                args.objects
            );
        }
    }
    lat.sort();
    println!(
        "list: all {} objects, median {:.1} ms (min {:.1}, max {:.1})",
        args.objects,
        ms(lat[2]),
        ms(lat[0]),
        ms(lat[4])
    );
    let t = Instant::now();
    let sel = api.list(&ListParams::default().labels("shard=3")).await?;
    println!(
        "list: labelSelector shard=3 -> {} objects in {:.1} ms",
        sel.items.len(),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let mut token: Option<String> = None;
    let mut pages = 0;
    let mut total = 0;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(tk) = &token {
            lp = lp.continue_token(tk);
        }
        let page = api.list(&lp).await?;
        pages += 1;
        total += page.items.len();
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    println!(
        "list: {total} objects in {pages} pages of 500 in {:.1} ms",
        ms(t.elapsed())
    );

    println!("memory: {} after the lists", server.memory());

    // Watchers from one resourceVersion; then `events` modifications.
    let from = api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut handles = Vec::new();
    let t_watch = Instant::now();
    for w in 0..args.watchers {
        let api = api.clone();
        let from = from.clone();
        let want = args.events;
        handles.push(tokio::spawn(async move {
            let mut s = api
                .watch(&WatchParams::default().timeout(600), &from)
                .await?
                .boxed();
            let mut last = 0u64;
            let mut got = 0usize;
            while got < want {
                match s.try_next().await? {
                    Some(WatchEvent::Modified(o)) => {
                        let rv: u64 = o.metadata.resource_version.unwrap_or_default().parse()?;
                        if rv <= last {
                            bail!("watcher {w}: version {rv} after {last}");
                        }
                        last = rv;
                        got += 1;
                    }
                    Some(WatchEvent::Bookmark(_)) => {}
                    Some(other) => bail!("watcher {w}: unexpected {other:?}"),
                    None => bail!("watcher {w}: stream ended after {got} events"),
                }
            }
            Ok::<_, anyhow::Error>(Instant::now())
        }));
    }
    let t_write = Instant::now();
    stream::iter(0..args.events)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("vm-{:05}", i % args.objects.max(1));
                let p = json!({ "metadata": { "annotations": { "bench/step": i.to_string() } } });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&p))
                    .await
                    .context("patch")?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let writes = t_write.elapsed();
    let mut last_done = t_write;
    for h in handles {
        let done = h.await??;
        last_done = last_done.max(done);
    }
    let delivered = last_done - t_write;
    println!(
        "watch: {} watchers each received all {} events in order; writes took {:.2} s, last delivery {:.2} s after the first write ({:.0} events/s delivered in total; watchers started {:.0} ms before)",
        args.watchers,
        args.events,
        writes.as_secs_f64(),
        delivered.as_secs_f64(),
        (args.watchers * args.events) as f64 / delivered.as_secs_f64(),
        ms(t_write - t_watch)
    );
    println!("memory: {} at the end", server.memory());
    server.stop().await?;
    Ok(())
}

//! Agent benchmark: `kubectl apply` → Ready latency (median, p99) for one
//! MicroVM at a time and for many at once, the agent's resident memory per VM,
//! and how many 64 MiB microVMs one node runs at once. Real binaries (test
//! server in-process, `runv-operator`, `runv-agent run`, `runv-vmm`), the
//! in-repo test guest in its `test=idle` mode (it prints one line and sleeps in
//! `hlt`, so many VMs fit on few cores), real `kubectl`. Prints numbers,
//! asserts nothing about time.
//!
//! ```sh
//! cargo build --release -p runv-vmm -p runv-operator -p runv-node-agent
//! cargo run --release -p runv-node-agent --example bench -- [--single 10] [--many 100] [--capacity-max 300] [--capacity-seconds 900]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use runv_crds::MicroVM;
use runv_crds::conditions as cond;
use serde_json::json;

struct Killer(Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The test guest the build left beside this binary.
fn test_guest() -> Result<PathBuf> {
    runv_node_agent::dev::find_test_guest(&std::env::current_exe()?)
        .context("the test guest (cargo build --release -p runv-vmm)")
}

/// Its directory, which the benchmark's agent allows kernels from.
fn guest_dir() -> Result<PathBuf> {
    Ok(test_guest()?
        .parent()
        .context("the test guest's directory")?
        .to_owned())
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("target directory")?;
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} missing: cargo build --release -p runv-vmm -p runv-operator -p runv-node-agent",
            p.display()
        );
    }
    Ok(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

fn manifest(name: &str, guest: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: bench\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {}\n    cmdline: test=idle\n  runPolicy: Always\n  terminationGracePeriodSeconds: 0\n",
        guest
    )
}

fn kubectl_apply(kubeconfig: &Path, file: &Path) -> Result<()> {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f"])
        .arg(file)
        .output()?;
    if !out.status.success() {
        bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn is_ready(vm: &MicroVM) -> bool {
    vm.status
        .as_ref()
        .is_some_and(|s| cond::is_true(&s.conditions, cond::READY))
}

/// Applies `names` in one kubectl call; returns each VM's apply→Ready latency.
async fn apply_and_time(
    api: &Api<MicroVM>,
    kubeconfig: &Path,
    dir: &Path,
    names: &[String],
    timeout: Duration,
) -> Result<Vec<Duration>> {
    let file = dir.join("batch.yaml");
    let guest = test_guest()?;
    let guest = guest.display().to_string();
    let text: Vec<String> = names.iter().map(|n| manifest(n, &guest)).collect();
    std::fs::write(&file, text.join("---\n"))?;
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    kubectl_apply(kubeconfig, &file)?;
    let mut ready: BTreeMap<String, Duration> = BTreeMap::new();
    while ready.len() < names.len() {
        let left = timeout.checked_sub(start.elapsed()).unwrap_or_default();
        let Ok(Some(ev)) = tokio::time::timeout(left, stream.next()).await else {
            break;
        };
        let vm = ev?;
        let name = vm.metadata.name.clone().unwrap_or_default();
        if names.contains(&name) && is_ready(&vm) {
            ready.entry(name).or_insert_with(|| start.elapsed());
        }
    }
    Ok(ready.into_values().collect())
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// The host's MemAvailable, KiB.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Summed RSS of every running runv-vmm process, and how many there are.
fn vmm_rss_kib() -> (u64, usize) {
    let mut total = (0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "runv-vmm" {
            total.0 += rss_kib(pid);
            total.1 += 1;
        }
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn delete_all(api: &Api<MicroVM>) -> Result<()> {
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let start = Instant::now();
    while !api.list(&ListParams::default()).await?.items.is_empty() {
        if start.elapsed() > Duration::from_secs(300) {
            bail!("MicroVMs not deleted within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let single = arg("--single", 10);
    let many = arg("--many", 100);
    let capacity_max = arg("--capacity-max", 300);
    let capacity_budget = Duration::from_secs(arg("--capacity-seconds", 900) as u64);
    let (agent_bin, operator_bin, vmm_bin) =
        (bin("runv-agent")?, bin("runv-operator")?, bin("runv-vmm")?);

    let mut opts = runv_e2e::Options::default();
    for crd in runv_crds::generate::crds() {
        opts.preload.push(serde_json::to_value(crd)?);
    }
    let server = runv_e2e::TestServer::start(opts).await?;
    let client = server.client()?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "runv-system"}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let kubeconfig = server.kubeconfig_path().to_owned();
    let tmp = tempfile::tempdir()?;
    let mut procs = Killer(Vec::new());
    procs.0.push(
        Command::new(&operator_bin)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--namespace", "runv-system", "--leader-elect", "false"])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    procs.0.push(
        Command::new(&agent_bin)
            .env("KUBECONFIG", &kubeconfig)
            .arg("--root")
            .arg(tmp.path().join("agent"))
            .args(["run", "--node", "bench", "--vmm"])
            .arg(&vmm_bin)
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--vcpus", "100000", "--memory", "1Ti"])
            // The test guest stays where the build left it.
            .arg("--allowed-kernel-dir")
            .arg(guest_dir()?)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let agent_pid = procs.0[1].id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<MicroVM> = Api::namespaced(client.clone(), "default");
    println!("runv-agent benchmark (test guest, 1 vCPU, 64 MiB, test=idle); times in ms");
    let idle_rss = rss_kib(agent_pid);
    let host_avail_before = mem_available_kib();

    let mut lat = Vec::new();
    for i in 0..single {
        let names = vec![format!("single-{i}")];
        lat.extend(
            apply_and_time(
                &api,
                &kubeconfig,
                tmp.path(),
                &names,
                Duration::from_secs(120),
            )
            .await?,
        );
        delete_all(&api).await?;
    }
    println!(
        "apply→Ready, one VM at a time ({} runs): median {:.0} ms, p99 {:.0} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99)
    );

    let names: Vec<String> = (0..many).map(|i| format!("many-{i}")).collect();
    let mut lat = apply_and_time(
        &api,
        &kubeconfig,
        tmp.path(),
        &names,
        Duration::from_secs(600),
    )
    .await?;
    println!(
        "apply→Ready, {many} VMs in one apply: {} Ready, median {:.0} ms, p99 {:.0} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99)
    );
    let busy_rss = rss_kib(agent_pid);
    println!(
        "agent RSS: {} KiB idle, {} KiB with {} VMs: {:.1} KiB per VM",
        idle_rss,
        busy_rss,
        lat.len(),
        (busy_rss.saturating_sub(idle_rss)) as f64 / lat.len().max(1) as f64
    );

    // Capacity: keep adding 50 VMs while every batch becomes Ready.
    let mut running = lat.len();
    let mut next = many;
    let capacity_start = Instant::now();
    while running < capacity_max {
        if capacity_start.elapsed() > capacity_budget {
            println!("capacity: stopped after {capacity_budget:?} (--capacity-seconds)");
            break;
        }
        let batch: Vec<String> = (next..next + 50).map(|i| format!("many-{i}")).collect();
        next += 50;
        let batch_start = Instant::now();
        let ok = apply_and_time(
            &api,
            &kubeconfig,
            tmp.path(),
            &batch,
            Duration::from_secs(300),
        )
        .await?;
        running += ok.len();
        let (vmm_rss, vmms) = vmm_rss_kib();
        println!(
            "capacity: {running} VMs Ready at once (last batch {}/50 in {:.0} s); {vmms} runv-vmm processes, {:.1} MiB RSS each, host MemAvailable down {} MiB; load {}",
            ok.len(),
            batch_start.elapsed().as_secs_f64(),
            vmm_rss as f64 / 1024.0 / vmms.max(1) as f64,
            host_avail_before.saturating_sub(mem_available_kib()) / 1024,
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or("?")
        );
        if ok.len() < batch.len() {
            break;
        }
    }
    println!(
        "capacity: {running} 64 MiB microVMs ran at once on this node (limit tried {capacity_max})"
    );
    delete_all(&api).await?;
    drop(procs);
    server.shutdown().await?;
    Ok(())
}

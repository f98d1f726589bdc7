//! Harness for running the real `runv-operator` binary against the Kubernetes
//! API test server, with simulated node agents: Nodes advertising capacity, Leases
//! renewed on a timer, and a stand-in that reports bound MicroVMs as running.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use runv_crds::MicroVM;
use runv_e2e::{Options, TestServer};
use serde_json::json;

/// The runv namespace of the agents' Leases.
pub const NS: &str = "runv-system";

/// A test server with runv's CRDs, a running operator and simulated agents.
pub struct Cluster {
    pub server: TestServer,
    pub client: Client,
    operator: Option<Child>,
    pub metrics_port: u16,
    /// Nodes whose agents renew their Lease and report VMs as running.
    pub live: Arc<Mutex<BTreeSet<String>>>,
    agents: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_operator();
        self.agents.abort();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Cluster {
    /// Starts the server, creates `nodes` runv nodes (vCPUs, memory), starts
    /// their agents and the operator with `operator_args`.
    pub async fn start(nodes: &[(&str, u32, &str)], operator_args: &[&str]) -> Result<Self> {
        let mut cluster = Self::without_operator(nodes).await?;
        let kubeconfig = cluster.server.kubeconfig_path().to_owned();
        cluster.start_operator(operator_args, &kubeconfig)?;
        // Tests create objects at once, while the operator is still listing:
        // its start-up must not miss them.
        Ok(cluster)
    }

    /// The server, the nodes and their agents, but no operator yet (see
    /// [`Cluster::start_operator`]).
    pub async fn without_operator(nodes: &[(&str, u32, &str)]) -> Result<Self> {
        let mut opts = Options::default();
        for crd in runv_crds::generate::crds() {
            opts.preload.push(serde_json::to_value(crd)?);
        }
        let server = TestServer::start(opts).await?;
        let client = server.client()?;
        for ns in [NS, "default"] {
            let api: Api<Namespace> = Api::all(client.clone());
            let obj: Namespace = serde_json::from_value(json!({ "metadata": { "name": ns } }))?;
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e).context("creating namespace"),
            }
        }
        let live = Arc::new(Mutex::new(BTreeSet::new()));
        for (name, vcpus, memory) in nodes {
            add_node(&client, name, *vcpus, memory).await?;
            renew(&client, name).await?;
            live.lock().unwrap().insert((*name).to_owned());
        }
        let agents = tokio::spawn(simulate_agents(client.clone(), live.clone()));
        Ok(Self {
            server,
            client,
            operator: None,
            metrics_port: free_port(),
            live,
            agents,
        })
    }

    /// Starts the operator (after stopping one still running) with
    /// `operator_args`, talking to the API server named in `kubeconfig`.
    pub fn start_operator(&mut self, operator_args: &[&str], kubeconfig: &Path) -> Result<()> {
        self.stop_operator();
        let log = std::env::temp_dir().join(format!(
            "runv-operator-test-{}.log",
            u64::from(std::process::id()) * 1000 + u64::from(self.metrics_port)
        ));
        let operator = Command::new(env!("CARGO_BIN_EXE_runv-operator"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .args([
                "--namespace",
                NS,
                "--http-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(operator_args)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()
            .context("starting runv-operator")?;
        self.operator = Some(operator);
        Ok(())
    }

    /// Kills the operator (SIGKILL), if it runs.
    pub fn stop_operator(&mut self) {
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the operator as the kubelet does (SIGTERM) and waits until it exits.
    pub async fn terminate_operator(
        &mut self,
        limit: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self.operator.take().context("no operator running")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM failed: {status}");
        }
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(exit) = child.try_wait()? {
                return Ok(exit);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the operator did not exit within {limit:?} of SIGTERM")
    }

    /// The operator process id.
    pub fn operator_pid(&self) -> u32 {
        self.operator.as_ref().map_or(0, Child::id)
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        self.get("/metrics").await
    }

    /// The HTTP status of the operator's `/readyz`.
    pub async fn readyz(&self) -> Result<u16> {
        let response = self.get("/readyz").await?;
        response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status line in {response:?}"))
    }

    /// Waits until the operator's `/readyz` answers 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        eventually(limit, "the operator to be ready", || async {
            Ok((self.readyz().await.ok() == Some(200)).then_some(()))
        })
        .await
    }

    async fn get(&self, path: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Stops the agent of `node`: its Lease is no longer renewed.
    pub fn kill_agent(&self, node: &str) {
        self.live.lock().unwrap().remove(node);
    }

    pub fn microvms(&self) -> Api<MicroVM> {
        Api::namespaced(self.client.clone(), "default")
    }
}

/// Creates a runv Node advertising `vcpus` and `memory` to microVMs.
pub async fn add_node(client: &Client, name: &str, vcpus: u32, memory: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "runv.dev/agent": "true" } }
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let status = json!({ "status": { "capacity": { "runv.dev/vcpus": vcpus.to_string(), "runv.dev/memory": memory },
                                      "allocatable": { "runv.dev/vcpus": vcpus.to_string(), "runv.dev/memory": memory } } });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// Seconds an agent Lease is valid.
pub const LEASE_SECONDS: i32 = 6;

/// Creates or renews the agent Lease of `node` (valid [`LEASE_SECONDS`]).
pub async fn renew(client: &Client, node: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": format!("runv-agent-{node}"), "namespace": NS },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        }
    });
    leases
        .patch(
            &format!("runv-agent-{node}"),
            &PatchParams::apply("sim-agent").force(),
            &Patch::Apply(lease),
        )
        .await?;
    Ok(())
}

/// Simulated agents: every second the live nodes renew their Leases; every
/// 500 ms every MicroVM bound to a live node is reported Running and Ready.
async fn simulate_agents(client: Client, live: Arc<Mutex<BTreeSet<String>>>) {
    let leases = {
        let (client, live) = (client.clone(), live.clone());
        async move {
            for _ in 0..100_000 {
                let nodes: Vec<String> = live.lock().unwrap().iter().cloned().collect();
                for n in &nodes {
                    let _ = renew(&client, n).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let report = async move {
        let vms: Api<MicroVM> = Api::all(client.clone());
        for _ in 0..100_000 {
            let nodes: Vec<String> = live.lock().unwrap().iter().cloned().collect();
            if let Ok(list) = vms.list(&ListParams::default()).await {
                for vm in list {
                    report_running(&client, &vm, &nodes).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    futures::future::join(leases, report).await;
}

async fn report_running(client: &Client, vm: &MicroVM, live: &[String]) {
    let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return;
    };
    let running =
        vm.status.as_ref().and_then(|s| s.phase) == Some(runv_crds::microvm::Phase::Running);
    if running || !live.contains(&node) || vm.metadata.deletion_timestamp.is_some() {
        return;
    }
    let now = Timestamp::now();
    let mut body = json!({
        "apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
        "status": {
            "phase": "Running",
            "observedGeneration": vm.metadata.generation,
            "conditions": [
                { "type": "Ready", "status": "True", "reason": "Running", "message": "",
                  "lastTransitionTime": now, "observedGeneration": vm.metadata.generation },
            ]
        }
    });
    // A replica's container runs too, as runv-init reports it to the agent.
    if let Some(c) = &vm.spec.container {
        body["status"]["container"] = json!({
            "image": c.image, "imageID": format!("{}@sha256:00", c.image),
            "ready": true, "restartCount": 0,
            "state": { "running": { "startedAt": now } },
        });
    }
    let api: Api<MicroVM> = Api::namespaced(client.clone(), &vm.namespace().unwrap_or_default());
    let _ = api
        .patch_status(
            &vm.name_any(),
            &PatchParams::apply("sim-agent").force(),
            &Patch::Apply(body),
        )
        .await;
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = std::time::Instant::now();
    let mut last_err = None;
    while start.elapsed() < limit {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("timed out after {limit:?} waiting for {what} (last error: {last_err:?})")
}

/// A MicroVM manifest.
pub fn microvm(name: &str, vcpus: u32, memory: &str, policy: &str) -> MicroVM {
    serde_json::from_value(json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "MicroVM",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "resources": { "vcpus": vcpus, "memory": memory },
            "boot": { "kernel": "/var/lib/runv/guests/runv-test-guest" },
            "runPolicy": policy
        }
    }))
    .expect("a valid MicroVM")
}

/// Per node: (vCPUs, memory bytes) used by bound MicroVMs that hold capacity.
pub fn usage(vms: &[MicroVM]) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for vm in vms {
        if let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) {
            let e = out.entry(node).or_insert((0, 0));
            e.0 += u64::from(vm.spec.resources.vcpus);
            e.1 += vm.spec.resources.memory_bytes().unwrap();
        }
    }
    out
}

/// How many of `vms` have a node.
pub fn bound_count(vms: &[MicroVM]) -> usize {
    vms.iter()
        .filter(|v| {
            v.status
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some()
        })
        .count()
}

/// Waits until `n` MicroVMs in `default` have a node.
pub async fn wait_bound(api: &Api<MicroVM>, n: usize, limit: Duration) -> Result<()> {
    eventually(limit, &format!("{n} placements"), || async {
        let list = api.list(&ListParams::default()).await?;
        Ok((bound_count(&list.items) == n).then_some(()))
    })
    .await
}

/// A TCP proxy in front of the API server that holds back the initial list
/// (not the watch) of chosen resources until the test releases it, to start
/// the operator with caches that fill in a chosen order.
pub struct GatedProxy {
    /// A kubeconfig pointing at the proxy.
    pub kubeconfig: std::path::PathBuf,
    gates: Arc<Gates>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

/// The held lists (by path suffix) and what became of them.
#[derive(Debug)]
struct Gates {
    suffixes: Vec<&'static str>,
    /// The suffixes released so far.
    open: tokio::sync::watch::Sender<BTreeSet<&'static str>>,
    /// Lists asked for (and held until released), in order.
    asked: Mutex<Vec<&'static str>>,
    /// Lists let through, in order.
    served: Mutex<Vec<&'static str>>,
}

impl Drop for GatedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl GatedProxy {
    /// Proxies to `upstream`, holding each list whose path ends with one of
    /// `gated` (`/nodes`, `/leases`, ...) until [`GatedProxy::release`].
    pub async fn start(upstream: std::net::SocketAddr, gated: Vec<&'static str>) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let dir = std::env::temp_dir().join(format!(
            "runv-gated-proxy-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, runv_e2e::kubeconfig(&format!("http://{addr}")))?;
        let gates = Arc::new(Gates {
            suffixes: gated,
            open: tokio::sync::watch::Sender::new(BTreeSet::new()),
            asked: Mutex::new(Vec::new()),
            served: Mutex::new(Vec::new()),
        });
        let shared = gates.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(forward(client, server, shared.clone()));
            }
        });
        Ok(Self {
            kubeconfig,
            gates,
            task,
            _dir: TempDir(dir),
        })
    }

    /// Lets the held lists ending with `suffix` through, and any later ones.
    pub fn release(&self, suffix: &'static str) {
        self.gates.open.send_modify(|open| {
            open.insert(suffix);
        });
    }

    /// The gated lists asked for so far, in order.
    pub fn asked(&self) -> Vec<&'static str> {
        self.gates.asked.lock().unwrap().clone()
    }

    /// The gated lists let through so far, in order.
    pub fn served(&self) -> Vec<&'static str> {
        self.gates.served.lock().unwrap().clone()
    }
}

async fn forward(client: tokio::net::TcpStream, server: tokio::net::TcpStream, gates: Arc<Gates>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // A request head arrives in one read; hyper neither pipelines nor splits it.
        let line = String::from_utf8_lossy(&buf[..n.min(2048)]);
        let target = line
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if !query.contains("watch=")
            && let Some(suffix) = gates.suffixes.iter().find(|s| path.ends_with(*s))
        {
            gates.asked.lock().unwrap().push(suffix);
            let mut open = gates.open.subscribe();
            if open.wait_for(|open| open.contains(suffix)).await.is_err() {
                break;
            }
            gates.served.lock().unwrap().push(suffix);
        }
        if to_server.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to_server.shutdown().await;
    let _ = back.await;
}

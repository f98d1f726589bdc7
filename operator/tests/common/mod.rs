//! Harness for running the real `runv-operator` binary against the Kubernetes
//! API test server, with simulated node agents: Nodes advertising capacity, Leases
//! renewed on a timer, and a stand-in that reports bound MicroVMs as running.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
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
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "runv-operator-test-{}.log",
            std::process::id() as u64 * 1000 + u64::from(metrics_port)
        ));
        let operator = Command::new(env!("CARGO_BIN_EXE_runv-operator"))
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("RUST_LOG", "info")
            .args([
                "--namespace",
                NS,
                "--http-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .args(operator_args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting runv-operator")?;
        Ok(Self {
            server,
            client,
            operator: Some(operator),
            metrics_port,
            live,
            agents,
        })
    }

    /// The operator process id.
    pub fn operator_pid(&self) -> u32 {
        self.operator.as_ref().map_or(0, Child::id)
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
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
    let body = json!({
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

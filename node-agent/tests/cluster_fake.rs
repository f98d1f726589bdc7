//! Cluster mode in-process against the Kubernetes API test server, with the
//! fake host (KVM is not the point here): node registration and Lease, the
//! finalizer, status by server-side apply beside the operator's fields, a
//! missing kernel, Events, `/metrics`, deletion cleanup and orphan removal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use runv_crds::MicroVM;
use runv_crds::conditions as cond;
use runv_e2e::{Options, TestServer};
use runv_node_agent::cluster::node::Capacity;
use runv_node_agent::cluster::{self, ClusterConfig};
use runv_node_agent::host::Host;
use runv_node_agent::host::fake::FakeHost;
use runv_node_agent::runtime::{Runtime, RuntimeConfig, VmRef};
use serde_json::json;

async fn server() -> Result<TestServer> {
    let mut opts = Options::default();
    for crd in runv_crds::generate::crds() {
        opts.preload.push(serde_json::to_value(crd)?);
    }
    let server = TestServer::start(opts).await?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "runv-system"}}))?;
    Api::<Namespace>::all(server.client()?)
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(server)
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds a VM to a node as the operator does.
async fn bind(api: &Api<MicroVM>, name: &str, node: &str) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::apply("runv-operator").force(),
        &Patch::Apply(json!({
            "apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
            "status": {"nodeName": node, "phase": "Scheduled", "conditions": [{
                "type": "Scheduled", "status": "True", "reason": "Placed", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        })),
    )
    .await?;
    Ok(())
}

fn manifest(name: &str, kernel: &str) -> MicroVM {
    serde_json::from_value(json!({
        "apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"boot": {"kernel": kernel}, "resources": {"vcpus": 1, "memory": "64Mi"},
                 "runPolicy": "Always", "terminationGracePeriodSeconds": 1, "interfaces": [{"name": "eth0", "type": "Nat"}]}
    }))
    .unwrap()
}

/// The Events the agent published about `vm`: (type, reason, note), oldest
/// first, each checked to name the VM (kind, namespace, name, uid) and the
/// agent of this node as its reporter.
async fn events_of(client: &kube::Client, vm: &MicroVM) -> Result<Vec<(String, String, String)>> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut out = Vec::new();
    for e in api.list(&ListParams::default()).await? {
        let regarding = e.regarding.clone().context("regarding")?;
        if regarding.name != vm.metadata.name {
            continue;
        }
        assert_eq!(regarding.kind.as_deref(), Some("MicroVM"), "{e:?}");
        assert_eq!(
            regarding.api_version.as_deref(),
            Some("runv.dev/v1alpha1"),
            "{e:?}"
        );
        assert_eq!(regarding.namespace.as_deref(), Some("default"), "{e:?}");
        assert_eq!(regarding.uid, vm.metadata.uid, "{e:?}");
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some("runv.dev/agent"),
            "{e:?}"
        );
        assert_eq!(e.reporting_instance.as_deref(), Some("n1"), "{e:?}");
        out.push((
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.note.unwrap_or_default(),
        ));
    }
    Ok(out)
}

/// Waits until `vm` has an Event with `reason`; returns its type and note.
async fn event(client: &kube::Client, vm: &MicroVM, reason: &str) -> Result<(String, String)> {
    eventually(&format!("the {reason} Event"), || async {
        Ok(events_of(client, vm)
            .await?
            .into_iter()
            .find(|(_, r, _)| r == reason)
            .map(|(t, _, n)| (t, n)))
    })
    .await
}

fn ready(vm: &MicroVM) -> Option<(String, String, String)> {
    let c = cond::find(&vm.status.as_ref()?.conditions, cond::READY)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_realizes_reports_and_cleans_up_its_vms() -> Result<()> {
    let server = server().await?;
    let client = server.client()?;
    let root = tempfile::tempdir()?;
    let host = Arc::new(FakeHost::new());
    host.add_file("/k/vmlinux", 1 << 20);
    let mut config = RuntimeConfig::new(root.path().to_owned(), "/bin/runv-vmm".into());
    config.allowed.kernels = vec!["/k".into()];
    let runtime = Arc::new(Runtime::new(config, host.clone() as Arc<dyn Host>)?);

    // A VM left on the host from before, no longer bound here: removed at start.
    let orphan = VmRef {
        namespace: "default".into(),
        name: "gone".into(),
        uid: "old".into(),
    };
    runtime.reconcile(
        &orphan,
        &manifest("gone", "/k/vmlinux").spec,
        1,
        &Default::default(),
        k8s_openapi::jiff::Timestamp::now(),
    );
    assert_eq!(host.running().len(), 1);

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = ClusterConfig {
        node: "n1".into(),
        namespace: "runv-system".into(),
        holder: "agent-test".into(),
        capacity: Capacity {
            vcpus: 8,
            memory: 16 << 30,
        },
        http_addr: format!("127.0.0.1:{port}").parse()?,
        lease_duration: runv_crds::contract::LEASE_DURATION,
        renew_every: runv_crds::contract::LEASE_RENEW_EVERY,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(cluster::run(
        client.clone(),
        config,
        runtime.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));

    // Node and Lease.
    let nodes: Api<Node> = Api::all(client.clone());
    let node = eventually("the Node", || async {
        Ok(nodes.get_opt("n1").await?.filter(|n| n.status.is_some()))
    })
    .await?;
    assert_eq!(node.metadata.labels.unwrap()["runv.dev/agent"], "true");
    let alloc = node.status.unwrap().allocatable.unwrap();
    assert_eq!(alloc["runv.dev/vcpus"].0, "8");
    assert_eq!(alloc["runv.dev/memory"].0, (16u64 << 30).to_string());
    // The agent renews its Lease just after it publishes the Node's status.
    let leases = Api::<Lease>::namespaced(client.clone(), "runv-system");
    let lease = eventually("the Lease", || async {
        Ok(leases.get_opt("runv-agent-n1").await?)
    })
    .await?;
    assert_eq!(
        lease.spec.as_ref().unwrap().lease_duration_seconds,
        Some(40)
    );
    assert!(lease.spec.unwrap().renew_time.is_some());
    assert!(host.running().is_empty(), "the orphan VMM was stopped");
    assert!(runtime.known().is_empty(), "the orphan's state was removed");

    // A VM bound to another node is not ours.
    let vms: Api<MicroVM> = Api::namespaced(client.clone(), "default");
    vms.create(&PostParams::default(), &manifest("other", "/k/vmlinux"))
        .await?;
    bind(&vms, "other", "n2").await?;
    // Ours: started, then Ready once the guest boots.
    vms.create(&PostParams::default(), &manifest("web", "/k/vmlinux"))
        .await?;
    bind(&vms, "web", "n1").await?;
    let vm = eventually("VMMStarted", || async {
        let vm = vms.get("web").await?;
        let started = vm
            .status
            .as_ref()
            .is_some_and(|s| cond::is_true(&s.conditions, cond::VMM_STARTED));
        Ok(started.then_some(vm))
    })
    .await?;
    assert!(vm.finalizers().contains(&cluster::FINALIZER.to_owned()));
    assert_eq!(host.running().len(), 1);
    let dir = runtime.dir(&VmRef {
        namespace: "default".into(),
        name: "web".into(),
        uid: String::new(),
    });
    host.boot(&dir.control_socket());
    let vm = eventually("Ready", || async {
        let vm = vms.get("web").await?;
        Ok(ready(&vm).filter(|r| r.0 == "True").map(|_| vm))
    })
    .await?;
    let status = vm.status.clone().unwrap();
    assert_eq!(
        status.node_name.as_deref(),
        Some("n1"),
        "the operator's field is kept"
    );
    assert!(
        cond::is_true(&status.conditions, cond::SCHEDULED),
        "the operator's condition is kept"
    );
    assert_eq!(status.observed_generation, vm.metadata.generation);
    let ip = status.interfaces[0].ip.clone().context("an IP")?;
    assert!(ip.starts_with("10.213."), "{ip}");
    let managers: Vec<_> = vm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"runv-agent".to_owned()), "{managers:?}");
    assert_eq!(vms.get("other").await?.finalizers().len(), 0);

    // Events: the VMM started, then the guest booted.
    assert_eq!(
        event(&client, &vm, "Started").await?,
        ("Normal".into(), "VMM started".into())
    );
    let (kind, note) = event(&client, &vm, "Booted").await?;
    assert_eq!(kind, "Normal");
    assert!(note.starts_with("guest booted"), "{note}");
    let other = vms.get("other").await?;
    assert!(
        events_of(&client, &other).await?.is_empty(),
        "no Event for a VM of another node"
    );

    // Metrics.
    let metrics = http_get(port, "/metrics").await?;
    assert!(
        metrics.contains("runv_vm_running{namespace=\"default\",name=\"web\",node=\"n1\"} 1"),
        "{metrics}"
    );

    // A missing kernel: Ready=False naming the file, Stalled.
    vms.create(
        &PostParams::default(),
        &manifest("nokernel", "/k/missing-vmlinux"),
    )
    .await?;
    bind(&vms, "nokernel", "n1").await?;
    let (_, reason, message) = eventually("KernelNotFound", || async {
        Ok(ready(&vms.get("nokernel").await?).filter(|r| r.1 == "KernelNotFound"))
    })
    .await?;
    assert_eq!(reason, "KernelNotFound");
    assert!(message.contains("/k/missing-vmlinux"), "{message}");
    let (kind, note) = event(&client, &vms.get("nokernel").await?, "KernelNotFound").await?;
    assert_eq!(
        (kind.as_str(), note.as_str()),
        ("Warning", message.as_str())
    );

    // Delete: VMM, tap, address and state gone, then the object.
    vms.delete("web", &DeleteParams::default()).await?;
    eventually("deletion", || async {
        Ok(vms.get_opt("web").await?.is_none().then_some(()))
    })
    .await?;
    assert!(host.running().is_empty());
    assert!(runv_node_agent::host::fake::taps(&host).is_empty());
    assert!(runtime.ipam().lookup("default/web/eth0").is_none());
    assert!(!dir.path().exists());
    let (kind, note) = event(&client, &vm, "Deleted").await?;
    assert_eq!(kind, "Normal");
    assert!(note.contains("state removed"), "{note}");

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    server.shutdown().await?;
    Ok(())
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

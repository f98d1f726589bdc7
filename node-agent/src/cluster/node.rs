//! The agent's Node and Lease: the label `runv.dev/agent=true`, the extended
//! resources `runv.dev/vcpus` and `runv.dev/memory` in the Node's capacity and
//! allocatable, and the Lease `runv-agent-<node>` renewed every 10 s with a
//! 40 s duration (docs/operations.md). All writes are server-side applies
//! under the field manager `runv-agent`, so they touch only these fields.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{ClusterError, MANAGER};

/// Label an agent sets on its Node.
pub const AGENT_LABEL: &str = "runv.dev/agent";
/// How often the Lease is renewed.
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The Lease's duration.
pub const LEASE_SECONDS: i32 = 40;

/// The name of a node agent's Lease.
pub fn lease_name(node: &str) -> String {
    format!("runv-agent-{node}")
}

/// What the node offers to microVMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in bytes.
    pub memory: u64,
}

impl Capacity {
    /// This host's CPUs and memory, less `reserved_memory` bytes for the host.
    pub fn of_host(reserved_memory: u64) -> Self {
        let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        Self {
            vcpus,
            memory: total.saturating_sub(reserved_memory),
        }
    }
}

/// Labels the Node and publishes its capacity (creating the Node if it does
/// not exist yet, as a kubelet registers its own).
pub async fn register(client: &Client, node: &str, cap: Capacity) -> Result<(), ClusterError> {
    let api: Api<Node> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    api.patch(
        node,
        &params,
        &Patch::Apply(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": node, "labels": { AGENT_LABEL: "true" } },
        })),
    )
    .await?;
    let resources = json!({
        "runv.dev/vcpus": cap.vcpus.to_string(),
        "runv.dev/memory": cap.memory.to_string(),
    });
    api.patch_status(
        node,
        &params,
        &Patch::Apply(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "status": { "capacity": resources, "allocatable": resources },
        })),
    )
    .await?;
    Ok(())
}

/// Renews (or creates) the Lease.
pub async fn renew(
    client: &Client,
    namespace: &str,
    node: &str,
    holder: &str,
) -> Result<(), ClusterError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let now = MicroTime(Timestamp::now());
    api.patch(
        &lease_name(node),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": lease_name(node), "namespace": namespace },
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now,
            },
        })),
    )
    .await?;
    Ok(())
}

//! The agent's Node and Lease: the label, the extended resources in the
//! Node's capacity and allocatable, and the Lease with its timings, all as
//! [`runv_crds::contract`] defines them (docs/operations.md). All writes are
//! server-side applies under the agent's field manager, so they touch only
//! these fields.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use runv_crds::contract::{
    AGENT_LABEL, AGENT_LABEL_VALUE, RESOURCE_MEMORY, RESOURCE_VCPUS, lease_name,
};

use super::{ClusterError, MANAGER};

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
            "metadata": { "name": node, "labels": { AGENT_LABEL: AGENT_LABEL_VALUE } },
        })),
    )
    .await?;
    let resources = json!({
        RESOURCE_VCPUS: cap.vcpus.to_string(),
        RESOURCE_MEMORY: cap.memory.to_string(),
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
    duration: std::time::Duration,
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
                "leaseDurationSeconds": duration.as_secs().max(1),
                "renewTime": now,
            },
        })),
    )
    .await?;
    Ok(())
}

/// The key of a fencing taint on the Node, if it carries one
/// ([`runv_crds::contract::is_fencing_taint`]).
pub async fn fencing_taint(client: &Client, node: &str) -> Result<Option<String>, ClusterError> {
    let node = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(node
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .find(|t| runv_crds::contract::is_fencing_taint(&t.key))
        .map(|t| t.key))
}

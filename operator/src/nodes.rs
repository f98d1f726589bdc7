//! How node agents advertise themselves, and how the operator reads it.
//!
//! An agent labels its Node `runv.dev/agent=true`, publishes the vCPUs and
//! memory it offers to microVMs as extended resources in the Node's
//! `status.allocatable` (`runv.dev/vcpus`, `runv.dev/memory`), and renews a
//! Lease `runv-agent-<node>` in the runv namespace. The operator turns a Node
//! and its Lease into a [`NodeInfo`]. docs/operations.md describes the contract.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use runv_crds::quantity;

use crate::placement::NodeInfo;

pub use runv_crds::contract::{
    AGENT_LABEL, FENCED_TAINT, RESOURCE_MEMORY, RESOURCE_VCPUS, lease_name, node_of_lease,
};

/// What a node's agent Lease says about the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentLease {
    /// Renewed within its duration: the agent is alive.
    Current,
    /// Expired this long ago.
    Expired(Duration),
    /// No Lease, or one that was never renewed: how long it has been missing
    /// is for the caller to track (see [`crate::context::Context::lease_missing_for`]).
    Missing,
}

impl AgentLease {
    /// Whether the agent is alive.
    pub fn is_current(self) -> bool {
        self == AgentLease::Current
    }
}

/// The state of a node's agent according to its Lease at `now`, counting the
/// Lease as renewed no earlier than `seen_since`: the time since which this
/// operator has been able to watch Leases. An agent cannot renew while the
/// API is down, so time in which the operator could not see the API either is
/// not held against it (as kube-controller-manager's node lifecycle
/// controller times Leases by its own observations).
pub fn agent_lease(lease: Option<&Lease>, now: Timestamp, seen_since: Timestamp) -> AgentLease {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return AgentLease::Missing;
    };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return AgentLease::Missing;
    };
    let default = i32::try_from(runv_crds::contract::LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(default).max(0));
    let expiry = renewed
        .0
        .max(seen_since)
        .as_second()
        .saturating_add(duration);
    let now_s = now.as_second();
    if now_s > expiry {
        AgentLease::Expired(Duration::from_secs(now_s.abs_diff(expiry)))
    } else {
        AgentLease::Current
    }
}

/// Whether the node carries evidence that its VMs must not run there: runv's
/// fencing taint or Kubernetes' out-of-service taint
/// ([`runv_crds::contract::is_fencing_taint`]).
pub fn is_fenced(node: &Node) -> bool {
    taints(node)
        .iter()
        .any(|t| runv_crds::contract::is_fencing_taint(&t.key))
}

/// Whether the node carries runv's own fencing taint (the one the operator
/// adds and removes).
pub fn has_fenced_taint(node: &Node) -> bool {
    taints(node).iter().any(|t| t.key == FENCED_TAINT)
}

fn taints(node: &Node) -> &[k8s_openapi::api::core::v1::Taint] {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
}

/// The placer's view of a node. A node without the agent label is not a
/// candidate at all; callers filter those out before calling this.
pub fn node_info(
    node: &Node,
    lease: Option<&Lease>,
    now: Timestamp,
    seen_since: Timestamp,
) -> NodeInfo {
    let name = node.metadata.name.clone().unwrap_or_default();
    let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |key: &str| alloc.and_then(|a| a.get(key)).map(|q| q.0.as_str());
    // A malformed advertisement offers nothing rather than failing the placement loop.
    let vcpus = get(RESOURCE_VCPUS)
        .and_then(|q| quantity::millicores(RESOURCE_VCPUS, q).ok())
        .map_or(0, |m| m / 1000);
    let memory = get(RESOURCE_MEMORY)
        .and_then(|q| quantity::bytes(RESOURCE_MEMORY, q).ok())
        .unwrap_or(0);
    NodeInfo {
        labels: node.metadata.labels.clone().unwrap_or_default(),
        taints: taints(node).to_vec(),
        vcpus,
        memory,
        agent_ready: agent_lease(lease, now, seen_since).is_current(),
        fenced: is_fenced(node),
        cordoned: node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        name,
    }
}

/// Whether a Node runs a runv agent.
pub fn is_runv_node(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(AGENT_LABEL))
        .is_some_and(|v| v == runv_crds::contract::AGENT_LABEL_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(renewed: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(at(renewed))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn lease_expiry() {
        let l = lease(1000, 40);
        assert_eq!(agent_lease(Some(&l), at(1040), at(0)), AgentLease::Current);
        assert_eq!(
            agent_lease(Some(&l), at(1041), at(0)),
            AgentLease::Expired(Duration::from_secs(1))
        );
        // A missing Lease is not "expired forever": its grace is counted by the caller.
        assert_eq!(agent_lease(None, at(0), at(0)), AgentLease::Missing);
        // The operator could not watch Leases until 2000: the agent gets a
        // whole duration from then, however old its last renewal.
        assert_eq!(
            agent_lease(Some(&l), at(2040), at(2000)),
            AgentLease::Current
        );
        assert_eq!(
            agent_lease(Some(&l), at(2041), at(2000)),
            AgentLease::Expired(Duration::from_secs(1))
        );
        let empty = Lease::default();
        assert_eq!(agent_lease(Some(&empty), at(0), at(0)), AgentLease::Missing);
    }

    #[test]
    fn node_info_reads_the_advertisement() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some([(AGENT_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(true),
                taints: Some(vec![Taint {
                    key: FENCED_TAINT.into(),
                    effect: "NoExecute".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(
                    [
                        (RESOURCE_VCPUS.to_owned(), Quantity("6".into())),
                        (RESOURCE_MEMORY.to_owned(), Quantity("8Gi".into())),
                    ]
                    .into(),
                ),
                ..NodeStatus::default()
            }),
        };
        assert!(is_runv_node(&node));
        let info = node_info(&node, Some(&lease(100, 40)), at(120), at(0));
        assert_eq!(info.name, "n1");
        assert_eq!((info.vcpus, info.memory), (6, 8 << 30));
        assert!(info.agent_ready && info.fenced && info.cordoned);
        let info = node_info(&node, None, at(120), at(0));
        assert!(!info.agent_ready);
    }

    #[test]
    fn malformed_advertisement_offers_nothing() {
        let node = Node {
            status: Some(NodeStatus {
                allocatable: Some([(RESOURCE_MEMORY.to_owned(), Quantity("lots".into()))].into()),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let info = node_info(&node, None, at(0), at(0));
        assert_eq!((info.vcpus, info.memory), (0, 0));
        assert!(!is_runv_node(&node));
    }
}

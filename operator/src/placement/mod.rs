//! Placement: which node runs a MicroVM. Pure functions over a snapshot of the
//! nodes and of what is already bound to them; no API calls.
//!
//! A node is a candidate when its agent is alive, it is neither fenced nor
//! cordoned, it matches the VM's nodeSelector, its taints are tolerated, the
//! VM fits in what its agent advertises minus what bound VMs use, and tenant
//! isolation allows the VM beside the ones already there. Among candidates the
//! one with the fewest replicas of the same owner wins (spread), then the one
//! left with the most free memory, then the name (so decisions are repeatable).

pub mod taints;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Taint, Toleration};
use runv_crds::microvm::NodeIsolation;

/// What the placer knows about one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// vCPUs the agent advertises for microVMs.
    pub vcpus: u64,
    /// Memory in bytes the agent advertises for microVMs.
    pub memory: u64,
    /// The agent's Lease is current.
    pub agent_ready: bool,
    /// The node is fenced: its VMs may run elsewhere, nothing new goes there.
    pub fenced: bool,
    /// The node is cordoned (`spec.unschedulable`).
    pub cordoned: bool,
}

/// A tenant and its isolation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRef {
    /// Tenant name.
    pub name: String,
    /// Whether it shares nodes.
    pub isolation: NodeIsolation,
}

/// What a VM asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in bytes.
    pub memory: u64,
    /// Required node labels.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerated taints.
    pub tolerations: Vec<Toleration>,
    /// Tenant, if any.
    pub tenant: Option<TenantRef>,
    /// The owning SecureWorkload's uid, to spread its replicas.
    pub group: Option<String>,
}

/// A VM already bound to a node, as the placer accounts it.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    /// The node.
    pub node: String,
    /// vCPUs it uses.
    pub vcpus: u64,
    /// Memory it uses, in bytes.
    pub memory: u64,
    /// Its tenant.
    pub tenant: Option<TenantRef>,
    /// Its owner's uid.
    pub group: Option<String>,
}

/// Why a node cannot take the VM. Ordered as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    /// The agent's Lease expired or never existed.
    AgentNotReady,
    /// The node is fenced.
    Fenced,
    /// The node is cordoned.
    Cordoned,
    /// A nodeSelector label is missing or different.
    NodeSelector,
    /// A taint is not tolerated.
    Taint,
    /// Not enough free vCPUs.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Tenant isolation forbids it.
    Tenant,
}

impl Reject {
    fn describe(self) -> &'static str {
        match self {
            Reject::AgentNotReady => "have no ready runv agent",
            Reject::Fenced => "are fenced",
            Reject::Cordoned => "are cordoned",
            Reject::NodeSelector => "do not match the nodeSelector",
            Reject::Taint => "have a taint the VM does not tolerate",
            Reject::Cpu => "have too few free vCPUs",
            Reject::Memory => "have too little free memory",
            Reject::Tenant => "run VMs of another tenant that cannot share",
        }
    }
}

/// No node can take the VM; says how many nodes failed for each reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// Nodes considered.
    pub nodes: usize,
    /// Count of nodes per first failing reason.
    pub reasons: BTreeMap<Reject, usize>,
    /// The request's size, for the message.
    pub vcpus: u64,
    /// The request's memory in bytes, for the message.
    pub memory: u64,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return write!(
                f,
                "no node runs a runv agent (nodes are found by the label {})",
                crate::nodes::AGENT_LABEL
            );
        }
        write!(
            f,
            "0/{} nodes can run it ({} vCPUs, {} MiB):",
            self.nodes,
            self.vcpus,
            self.memory.div_ceil(1 << 20)
        )?;
        let mut first = true;
        for (reason, count) in &self.reasons {
            write!(
                f,
                "{} {count} {}",
                if first { "" } else { "," },
                reason.describe()
            )?;
            first = false;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Usage {
    vcpus: u64,
    memory: u64,
    group: usize,
    foreign_tenant: bool,
    foreign_exclusive: bool,
}

/// Chooses a node for `req`, given the nodes and every VM already bound.
pub fn place<'b>(
    req: &Request,
    nodes: &[NodeInfo],
    bound: impl IntoIterator<Item = &'b Bound>,
) -> Result<String, Unschedulable> {
    let mut usage: BTreeMap<&str, Usage> = BTreeMap::new();
    let my_tenant = req.tenant.as_ref().map(|t| t.name.as_str());
    for b in bound {
        let u = usage.entry(b.node.as_str()).or_default();
        u.vcpus += b.vcpus;
        u.memory += b.memory;
        if req.group.is_some() && b.group == req.group {
            u.group += 1;
        }
        let theirs = b.tenant.as_ref().map(|t| t.name.as_str());
        if theirs != my_tenant {
            u.foreign_tenant = true;
            if b.tenant
                .as_ref()
                .is_some_and(|t| t.isolation == NodeIsolation::Exclusive)
            {
                u.foreign_exclusive = true;
            }
        }
    }
    let exclusive = req
        .tenant
        .as_ref()
        .is_some_and(|t| t.isolation == NodeIsolation::Exclusive);

    let none = Usage::default();
    let mut reasons = BTreeMap::new();
    let mut best: Option<(usize, u128, &str)> = None;
    for node in nodes {
        let u = usage.get(node.name.as_str()).unwrap_or(&none);
        let free_cpu = node.vcpus.saturating_sub(u.vcpus);
        let free_mem = node.memory.saturating_sub(u.memory);
        let reject = if !node.agent_ready {
            Some(Reject::AgentNotReady)
        } else if node.fenced {
            Some(Reject::Fenced)
        } else if node.cordoned {
            Some(Reject::Cordoned)
        } else if !req
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        {
            Some(Reject::NodeSelector)
        } else if taints::untolerated(&node.taints, &req.tolerations).is_some() {
            Some(Reject::Taint)
        } else if free_cpu < req.vcpus {
            Some(Reject::Cpu)
        } else if free_mem < req.memory {
            Some(Reject::Memory)
        } else if u.foreign_exclusive || (exclusive && u.foreign_tenant) {
            Some(Reject::Tenant)
        } else {
            None
        };
        if let Some(r) = reject {
            *reasons.entry(r).or_insert(0) += 1;
            continue;
        }
        // Fewest replicas of the same owner first, then most memory left
        // (as a fraction, scaled), then the name.
        let left = free_mem - req.memory;
        let frac = (u128::from(left) << 32) / u128::from(node.memory.max(1));
        let key = (u.group, u128::MAX - frac, node.name.as_str());
        if best.as_ref().is_none_or(|b| key < *b) {
            best = Some(key);
        }
    }
    best.map(|(_, _, name)| name.to_owned())
        .ok_or(Unschedulable {
            nodes: nodes.len(),
            reasons,
            vcpus: req.vcpus,
            memory: req.memory,
        })
}

#[cfg(test)]
mod tests;

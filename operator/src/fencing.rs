//! Fencing: with `--auto-fence` (off by default) the operator taints a node
//! whose agent has been gone past the grace period (`runv.dev/fenced`,
//! NoExecute), so its `Always` MicroVMs are placed elsewhere, and removes the
//! taint once the agent is back.
//!
//! A stale Lease is weak evidence: the agent, the node's network or the
//! control plane itself may be what failed, and in the last two cases the
//! VMs still run. So the operator fences only when this node's agent is gone
//! while a clear majority of the other nodes' agents keep their Leases fresh
//! (the control plane is up and reachable from elsewhere), never on a node
//! that is the only one, and never for time in which the operator could not
//! watch Leases itself. A partitioned node that still runs keeps its VMs, so
//! enable auto-fencing only where a node cut off from the API is also cut
//! off from its users, or powered off by a fencing system (docs/operations.md).
//!
//! [`decide`] is the whole policy, a pure function of what was observed
//! ([`Observed`]); [`fence`] observes one node, asks it, and carries the
//! answer out (the Node patch and an Event). The decision never reads the
//! clock or the API itself.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;

use crate::context::{Context, MANAGER};
use crate::nodes::{self, AgentLease};

/// What a node's agent Lease says, with the time a missing Lease has been
/// missing (tracked by the caller, see [`Context::lease_missing_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// Renewed within its duration.
    Current,
    /// Expired this long ago.
    Expired(Duration),
    /// No Lease (or one never renewed) for this long.
    Missing(Duration),
}

impl Agent {
    /// How long the agent has been gone; `None` while it is alive.
    pub fn gone_for(self) -> Option<Duration> {
        match self {
            Agent::Current => None,
            Agent::Expired(d) | Agent::Missing(d) => Some(d),
        }
    }
}

/// Everything the fencing policy reads about one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Whether the operator fences at all (`--auto-fence`).
    pub auto_fence: bool,
    /// How long an agent may be gone before its node is fenced.
    pub grace: Duration,
    /// The node's agent.
    pub agent: Agent,
    /// Whether the node already carries the fencing taint.
    pub fenced: bool,
    /// The other runv nodes.
    pub peers: usize,
    /// How many of them have a current agent Lease.
    pub peers_alive: usize,
}

impl Observed {
    /// A clear majority of the other agents are alive: the control plane is
    /// up and reachable, so this agent's silence is about this node.
    pub fn peers_agree(&self) -> bool {
        self.peers > 0 && self.peers_alive * 2 > self.peers
    }
}

/// What to do with one node's fencing taint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leave the node as it is.
    Keep,
    /// Add the taint: the agent has been gone at least the grace period.
    Fence,
    /// Remove the taint: the agent is back.
    Unfence,
}

impl Decision {
    /// The Event reason announcing it.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Decision::Keep => None,
            Decision::Fence => Some("NodeFenced"),
            Decision::Unfence => Some("NodeUnfenced"),
        }
    }
}

/// The fencing policy.
pub fn decide(o: &Observed) -> Decision {
    if !o.auto_fence {
        return Decision::Keep;
    }
    match o.agent.gone_for() {
        Some(gone) if !o.fenced && gone >= o.grace && o.peers_agree() => Decision::Fence,
        None if o.fenced => Decision::Unfence,
        _ => Decision::Keep,
    }
}

/// What the operator sees of `node` at `now`. Notes when a Lease is missing
/// (and forgets it once one is found), so a missing Lease gets the same grace
/// as an expired one.
fn observe(ctx: &Context, node: &Node, lease: Option<&Lease>, now: Timestamp) -> Observed {
    let name = node.name_any();
    let agent = match nodes::agent_lease(lease, now, ctx.lease_watch.since()) {
        AgentLease::Current => {
            ctx.lease_found(&name);
            Agent::Current
        }
        AgentLease::Expired(for_) => {
            ctx.lease_found(&name);
            Agent::Expired(for_)
        }
        AgentLease::Missing => Agent::Missing(ctx.lease_missing_for(node, now)),
    };
    let (peers, peers_alive) = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| nodes::is_runv_node(n) && n.name_any() != name)
        .fold((0, 0), |(all, alive), n| {
            let current = ctx.agent_lease(&n.name_any(), now).is_current();
            (all + 1, alive + usize::from(current))
        });
    Observed {
        auto_fence: ctx.config.auto_fence,
        grace: ctx.config.fence_after,
        agent,
        fenced: nodes::has_fenced_taint(node),
        peers,
        peers_alive,
    }
}

/// The node's taints after `decision`.
fn taints_after(node: &Node, decision: Decision, now: Timestamp) -> Vec<Taint> {
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    match decision {
        Decision::Keep => {}
        Decision::Fence => taints.push(Taint {
            key: nodes::FENCED_TAINT.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(now)),
            value: None,
        }),
        Decision::Unfence => taints.retain(|t| t.key != nodes::FENCED_TAINT),
    }
    taints
}

/// Decides on `node` and carries the decision out: the taint list is written
/// with the cached Node's resourceVersion as a precondition, so if the Node
/// changed since (someone added a taint) the API answers 409 and the next
/// round decides again on the fresh copy, rather than overwriting the other
/// writer's taints. An Event announces each change made.
pub async fn fence(ctx: &Context, node: &Node, lease: Option<&Lease>, now: Timestamp) {
    let observed = observe(ctx, node, lease, now);
    let decision = decide(&observed);
    let Some(reason) = decision.reason() else {
        return;
    };
    let name = node.name_any();
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": node.resource_version() },
        "spec": { "taints": taints_after(node, decision, now) },
    });
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match Api::<Node>::all(ctx.client.clone())
        .patch(&name, &params, &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            let note = match decision {
                Decision::Unfence => "runv agent is back: fencing taint removed".to_owned(),
                _ => format!(
                    "runv agent gone for more than {}s: node fenced, Always MicroVMs move elsewhere",
                    observed.grace.as_secs()
                ),
            };
            tracing::warn!(node = %name, "{note}");
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name),
                uid: node.uid(),
                ..Default::default()
            };
            ctx.publish(&reference, EventType::Warning, reason, note, "Fence")
                .await;
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(node = %name, "node changed since it was cached; fencing decided again next round");
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %runv_crds::retry::Chain(&e), "cannot update fencing taint")
        }
    }
}

#[cfg(test)]
mod tests;

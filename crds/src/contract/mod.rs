//! The contract between the operator and the node agents, defined once.
//!
//! The two meet only in the Kubernetes API (DESIGN.md): an agent labels its
//! Node, advertises what it offers as extended resources, renews a Lease and
//! holds a finalizer on the MicroVMs bound to it; the operator reads those,
//! binds VMs and taints fenced nodes. Every name, timing and rule that both
//! sides must agree on lives here, with the reasons both write
//! ([`reason`]), how a VM's exit is named ([`exit`]) and who writes which
//! status field ([`ownership`]). This module makes no API calls.

pub mod exit;
pub mod ownership;
pub mod reason;

use std::time::Duration;

use crate::MicroVMSpec;
use crate::microvm::{PowerState, RunPolicy};

pub use exit::ExitReason;
pub use ownership::{Binding, StatusField, Writer};
pub use reason::Reason;

/// Label an agent sets on its Node; the operator places only on such nodes.
pub const AGENT_LABEL: &str = "runv.dev/agent";
/// The value of [`AGENT_LABEL`] on a runv node.
pub const AGENT_LABEL_VALUE: &str = "true";

/// Label an administrator sets on a Namespace: the tenant its MicroVMs
/// belong to. Without it the tenant is the namespace's name. A MicroVM's
/// `spec.tenant.name` may only repeat it.
pub const TENANT_LABEL: &str = "runv.dev/tenant";
/// Label an administrator sets on a Namespace (value [`ALLOW_VALUE`]) to let
/// its MicroVMs pin themselves to a node with `spec.nodeName`.
pub const ALLOW_NODE_NAME_LABEL: &str = "runv.dev/allow-node-name";
/// Label an administrator sets on a Namespace (value [`ALLOW_VALUE`]) to let
/// its MicroVMs ask for nodes of their own (`spec.tenant.nodeIsolation:
/// Exclusive`).
pub const ALLOW_EXCLUSIVE_LABEL: &str = "runv.dev/allow-exclusive";
/// The value of an allow label that allows.
pub const ALLOW_VALUE: &str = "true";

/// Extended resource in a Node's `status.allocatable`: vCPUs offered to microVMs.
pub const RESOURCE_VCPUS: &str = "runv.dev/vcpus";
/// Extended resource in a Node's `status.allocatable`: memory offered, in bytes.
pub const RESOURCE_MEMORY: &str = "runv.dev/memory";

/// The agent's finalizer on MicroVMs bound to its node: it removes the VMM,
/// taps, addresses and state before the object goes.
pub const FINALIZER: &str = "runv.dev/agent-cleanup";

/// Taint the operator (or an administrator) puts on a node whose VMs are to
/// be started elsewhere.
pub const FENCED_TAINT: &str = "runv.dev/fenced";

/// Kubernetes' taint for a node that is shut down and will not come back on
/// its own (non-graceful node shutdown): what runs there is known not to run.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// Whether a taint with this key is evidence that the node's VMs must not run
/// there (and may run elsewhere): runv's fencing taint, or Kubernetes'
/// out-of-service taint.
pub fn is_fencing_taint(key: &str) -> bool {
    key == FENCED_TAINT || key == OUT_OF_SERVICE_TAINT
}

/// Field manager of the operator's writes.
pub const OPERATOR_MANAGER: &str = "runv-operator";
/// Field manager of the agent's writes.
pub const AGENT_MANAGER: &str = "runv-agent";

const LEASE_PREFIX: &str = "runv-agent-";
/// How long an agent's Lease is valid after a renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(40);
/// How often an agent renews its Lease.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(10);

/// The name of a node agent's Lease.
pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// The node a Lease name belongs to, if it is an agent Lease.
pub fn node_of_lease(lease: &str) -> Option<&str> {
    lease.strip_prefix(LEASE_PREFIX).filter(|n| !n.is_empty())
}

/// Why a VM does not ask to run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRequested {
    /// `runPolicy: Halted`.
    Halted,
    /// `powerState: Stopped`.
    Stopped,
}

impl NotRequested {
    /// What the spec says, for messages.
    pub fn message(self) -> &'static str {
        match self {
            NotRequested::Halted => "runPolicy is Halted",
            NotRequested::Stopped => "powerState is Stopped",
        }
    }
}

/// Whether the VM asks to run: the one rule the operator places by and the
/// agent starts and stops by. `None` means it wants to run.
pub fn not_requested(spec: &MicroVMSpec) -> Option<NotRequested> {
    if spec.run_policy == RunPolicy::Halted {
        Some(NotRequested::Halted)
    } else if spec.power_state == PowerState::Stopped {
        Some(NotRequested::Stopped)
    } else {
        None
    }
}

/// Whether the VM wants a node and a running VMM now.
pub fn wants_to_run(spec: &MicroVMSpec) -> bool {
    not_requested(spec).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_round_trip() {
        assert_eq!(lease_name("n1"), "runv-agent-n1");
        assert_eq!(node_of_lease(&lease_name("n1")), Some("n1"));
        assert_eq!(node_of_lease("runv-agent-"), None);
        assert_eq!(node_of_lease("other"), None);
    }

    #[test]
    fn lease_is_renewed_several_times_per_duration() {
        assert!(LEASE_RENEW_EVERY * 3 <= LEASE_DURATION);
    }

    #[test]
    fn halted_wins_over_power_state() {
        let mut spec: MicroVMSpec =
            serde_json::from_value(serde_json::json!({"boot": {"kernel": "/k"}})).unwrap();
        assert!(wants_to_run(&spec));
        spec.power_state = PowerState::Stopped;
        assert_eq!(not_requested(&spec), Some(NotRequested::Stopped));
        spec.run_policy = RunPolicy::Halted;
        assert_eq!(not_requested(&spec), Some(NotRequested::Halted));
        assert!(!wants_to_run(&spec));
        spec.power_state = PowerState::Paused;
        assert_eq!(not_requested(&spec), Some(NotRequested::Halted));
    }
}

//! Admission: whether a VM may start on this node, beside the VMs that hold a
//! place here, as kubelet admits a pod (`OutOfcpu`) before it runs it. Pure.
//!
//! The operator's placement keeps a node within what its agent advertises
//! and keeps tenants apart, but a VM pinned with `spec.nodeName` (where an
//! administrator allows it) bypasses that, and two writers can race: this is
//! the node's own last check, made before every start and restart. A VM holds
//! its place ([`Claim`]) from its first admission until it is removed from
//! the node: running, stopped, or ended (Succeeded, Failed), as the operator
//! counts it.

use runv_crds::contract::Reason;
use runv_crds::microvm::{NodeIsolation, Tenant};
use serde::{Deserialize, Serialize};

/// The place one VM holds on the node: what it was admitted with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// Namespace of the MicroVM.
    pub namespace: String,
    /// Name of the MicroVM.
    pub name: String,
    /// Its uid (empty in standalone mode).
    #[serde(default)]
    pub uid: String,
    /// vCPUs.
    pub vcpus: u64,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Its tenant, as the operator resolved it (`status.tenant`); `None` for
    /// a VM placed without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Tenant>,
}

impl Claim {
    fn who(&self) -> String {
        let tenant = self
            .tenant
            .as_ref()
            .map_or_else(|| "no tenant".to_owned(), |t| format!("tenant {}", t.name));
        format!("{}/{} ({tenant})", self.namespace, self.name)
    }

    fn exclusive(&self) -> bool {
        self.tenant
            .as_ref()
            .is_some_and(|t| t.node_isolation == NodeIsolation::Exclusive)
    }

    fn same_tenant(&self, other: &Claim) -> bool {
        self.tenant.as_ref().map(|t| &t.name) == other.tenant.as_ref().map(|t| &t.name)
    }
}

/// What the node's agent advertises to placement (the Node's allocatable
/// `runv.dev/vcpus` and `runv.dev/memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocatable {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in bytes.
    pub memory: u64,
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Why `want` may not start beside `holders` (every other VM holding a place
/// here) on a node that allocates `node`: `IsolationConflict` when it, or one
/// of them, is of an `Exclusive` tenant and the other of another tenant;
/// `OutOfCapacity` when their vCPUs or memory with its own exceed the node's.
/// `None`: it may start.
pub fn admit(want: &Claim, holders: &[Claim], node: Allocatable) -> Option<(Reason, String)> {
    let foreign = holders.iter().filter(|h| !h.same_tenant(want));
    if want.exclusive()
        && let Some(h) = foreign.clone().next()
    {
        return Some((
            Reason::IsolationConflict,
            format!(
                "the VM's tenant has nodes of its own (nodeIsolation Exclusive), but VM {} holds a \
                 place on this node: the VM is not started here while it does",
                h.who()
            ),
        ));
    }
    if let Some(h) = foreign.clone().find(|h| h.exclusive()) {
        return Some((
            Reason::IsolationConflict,
            format!(
                "VM {} holds a place on this node and its tenant has nodes of its own \
                 (nodeIsolation Exclusive): the VM is not started here while it does",
                h.who()
            ),
        ));
    }
    let vcpus: u64 = holders.iter().map(|h| h.vcpus).sum();
    let memory: u64 = holders.iter().map(|h| h.memory).sum();
    let fits = vcpus.saturating_add(want.vcpus) <= node.vcpus
        && memory.saturating_add(want.memory) <= node.memory;
    (!fits).then(|| {
        (
            Reason::OutOfCapacity,
            format!(
                "the VM needs {} vCPUs and {} MiB; this node allocates {} vCPUs and {} MiB to VMs, \
                 of which {} VMs holding a place here (running, stopped or ended) hold {vcpus} vCPUs \
                 and {} MiB: the VM is started when they fit",
                want.vcpus,
                mib(want.memory),
                node.vcpus,
                mib(node.memory),
                holders.len(),
                mib(memory),
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn claim(name: &str, vcpus: u64, mem_mi: u64, tenant: Option<(&str, bool)>) -> Claim {
        Claim {
            namespace: "ns".into(),
            name: name.into(),
            uid: String::new(),
            vcpus,
            memory: mem_mi * MI,
            tenant: tenant.map(|(n, exclusive)| Tenant {
                name: n.into(),
                node_isolation: if exclusive {
                    NodeIsolation::Exclusive
                } else {
                    NodeIsolation::Shared
                },
            }),
        }
    }

    const NODE: Allocatable = Allocatable {
        vcpus: 4,
        memory: 1024 * MI,
    };

    #[test]
    fn capacity_counts_every_holder_and_exactly_full_fits() {
        let holders = [
            claim("a", 2, 512, Some(("t", false))),
            claim("b", 1, 256, Some(("t", false))),
        ];
        assert_eq!(
            admit(&claim("c", 1, 256, Some(("t", false))), &holders, NODE),
            None
        );
        let (reason, msg) = admit(&claim("c", 2, 64, Some(("t", false))), &holders, NODE).unwrap();
        assert_eq!(reason, Reason::OutOfCapacity);
        assert!(
            msg.contains("needs 2 vCPUs and 64 MiB")
                && msg.contains("allocates 4 vCPUs and 1024 MiB")
                && msg.contains("2 VMs holding a place here")
                && msg.contains("hold 3 vCPUs and 768 MiB"),
            "{msg}"
        );
        let (reason, _) = admit(&claim("c", 1, 257, Some(("t", false))), &holders, NODE).unwrap();
        assert_eq!(reason, Reason::OutOfCapacity);
    }

    #[test]
    fn an_exclusive_tenant_starts_beside_none_of_another() {
        let mine = claim("x", 1, 64, Some(("acme", true)));
        // Its own tenant's VMs, of either isolation, are no conflict.
        let own = [claim("a", 1, 64, Some(("acme", false)))];
        assert_eq!(admit(&mine, &own, NODE), None);
        for other in [Some(("mallory", false)), None] {
            let holders = [claim("m", 1, 64, other)];
            let (reason, msg) = admit(&mine, &holders, NODE).unwrap();
            assert_eq!(reason, Reason::IsolationConflict);
            assert!(msg.contains("VM ns/m"), "{msg}");
        }
    }

    #[test]
    fn no_other_tenant_starts_beside_an_exclusive_one() {
        let holders = [claim("x", 1, 64, Some(("acme", true)))];
        let (reason, msg) =
            admit(&claim("m", 1, 64, Some(("mallory", false))), &holders, NODE).unwrap();
        assert_eq!(reason, Reason::IsolationConflict);
        assert!(msg.contains("ns/x (tenant acme)"), "{msg}");
        assert!(admit(&claim("n", 1, 64, None), &holders, NODE).is_some());
        assert_eq!(
            admit(&claim("y", 1, 64, Some(("acme", false))), &holders, NODE),
            None
        );
        // Shared tenants share.
        let shared = [claim("s", 1, 64, Some(("blue", false)))];
        assert_eq!(
            admit(&claim("g", 1, 64, Some(("green", false))), &shared, NODE),
            None
        );
    }
}

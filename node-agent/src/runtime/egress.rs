//! The node's egress rules, kept in step with the VMs: who a VM belongs to
//! ([`tenant_of`]), its network record (`net.json`: tenant, taps, MACs,
//! addresses), and the one rebuild of the rules ([`Runtime::apply_egress`])
//! from every VM's record, never from memory.
//!
//! The rules are rebuilt whenever the node's set of VM interfaces changes (a
//! VM's network is prepared or released, or its tenant changes) and when the
//! agent starts, so a restarted agent, or a flushed ruleset, has them back
//! before any VM is reconciled. What the rules say, and why nftables, is
//! [`crate::host::egress`]'s. Must not create or delete devices (that is
//! `prepare.rs` and `cleanup.rs`).

use runv_crds::{MicroVMSpec, MicroVMStatus};

use super::{Runtime, RuntimeError, VmRef};
use crate::host::egress::{self, Port};
use crate::state::{self, NetInterface, NetRecord};
use crate::vmconfig::{self, NetPlan};

/// The tenant a VM belongs to on this node: `status.tenant` (the operator's,
/// resolved at placement from the Namespace's `runv.dev/tenant` label), else
/// `spec.tenant` (standalone mode, or before the operator wrote it), else the
/// VM's namespace. VMs of different tenants have no path to each other.
pub fn tenant_of(vm: &VmRef, spec: &MicroVMSpec, status: &MicroVMStatus) -> String {
    status
        .tenant
        .as_ref()
        .or(spec.tenant.as_ref())
        .map_or_else(|| vm.namespace.clone(), |t| t.name.clone())
}

impl Runtime {
    /// Rebuilds the node's egress rules from every VM's network record, in
    /// one transaction. Serialized, so the last apply always read the
    /// newest records.
    pub fn apply_egress(&self) -> Result<(), RuntimeError> {
        let _one_at_a_time = self
            .egress_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ports: Vec<Port> = state::list_net(&self.config.root)
            .into_iter()
            .flat_map(|(_, r)| {
                let tenant = r.tenant;
                r.interfaces.into_iter().filter_map(move |i| {
                    // A MAC that cannot be read gives no port: its tap then
                    // sends nothing (the rules drop unknown `rv` taps).
                    let mac = runv_vmm_api::config::parse_mac(&i.mac).ok()?;
                    Some(Port {
                        tap: i.tap,
                        mac,
                        ip: i.ip,
                        tenant: tenant.clone(),
                    })
                })
            })
            .collect();
        let text = egress::render(&self.config.bridge, &self.config.egress, &ports)?;
        self.host.network().apply_egress(&text)?;
        Ok(())
    }

    /// Writes the VM's network record for `plan` (its `Nat` interfaces,
    /// with the addresses the IPAM gave them) and rebuilds the rules.
    pub(super) fn record_network(
        &self,
        vm: &VmRef,
        plan: &[NetPlan],
        tenant: &str,
    ) -> Result<(), RuntimeError> {
        let prefix = vmconfig::owner_prefix(&vm.namespace, &vm.name);
        let interfaces = plan
            .iter()
            .filter(|n| n.managed)
            .filter_map(|n| {
                let ip = self.ipam.lookup(&format!("{prefix}{}", n.name))?;
                Some(NetInterface {
                    name: n.name.clone(),
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                    ip,
                })
            })
            .collect();
        let record = NetRecord {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            tenant: tenant.to_owned(),
            interfaces,
        };
        let dir = self.dir(vm);
        if dir.read_net().as_ref() != Some(&record) {
            dir.write_net(&record)?;
        }
        self.apply_egress()
    }

    /// Keeps the rules in step with a VM whose network is in place: when its
    /// tenant changed (the operator wrote `status.tenant`), or its recorded
    /// taps exist but it has no network record (an agent from before records
    /// started it), the record is written again and the rules rebuilt.
    /// Otherwise nothing is written.
    pub(super) fn sync_network(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: &str,
    ) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        let stale = match dir.read_net() {
            Some(r) => r.tenant != tenant,
            None => dir
                .read_taps()
                .is_some_and(|t| t.iter().any(|t| self.host.network().link_exists(t))),
        };
        if !stale {
            return Ok(());
        }
        let plan = vmconfig::net_plan(&vm.namespace, &vm.name, spec);
        self.record_network(vm, &plan, tenant)
    }

    /// Refuses `plan` when one of its `Nat` MACs is another interface's: of
    /// this VM, or of another VM on the node (its record). The bridge learns
    /// where a MAC is from the frames it sees, so a second VM with a
    /// neighbour's MAC could draw the neighbour's traffic to itself.
    pub(super) fn check_macs(&self, vm: &VmRef, plan: &[NetPlan]) -> Result<(), RuntimeError> {
        let others: Vec<NetRecord> = state::list_net(&self.config.root)
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| (r.namespace.as_str(), r.name.as_str()) != (&vm.namespace, &vm.name))
            .collect();
        let managed: Vec<&NetPlan> = plan.iter().filter(|n| n.managed).collect();
        for (i, n) in managed.iter().enumerate() {
            let owner = managed[..i]
                .iter()
                .find(|m| m.mac == n.mac)
                .map(|m| (vm.to_string(), m.name.clone()))
                .or_else(|| {
                    others.iter().find_map(|r| {
                        let i = r.interfaces.iter().find(|i| i.mac == n.mac)?;
                        Some((format!("{}/{}", r.namespace, r.name), i.name.clone()))
                    })
                });
            if let Some((vm_name, iface)) = owner {
                return Err(RuntimeError::MacInUse {
                    field: format!("spec.interfaces[{}].mac", n.name),
                    mac: n.mac.clone(),
                    vm: vm_name,
                    interface: iface,
                });
            }
        }
        Ok(())
    }

    /// Forgets the VM's network record and rebuilds the rules without it
    /// (its taps are gone).
    pub(super) fn forget_network(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        if !dir.net_path().exists() {
            return Ok(());
        }
        dir.remove_net()?;
        self.apply_egress()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::jiff::Timestamp;
    use runv_crds::conditions as cond;
    use runv_crds::microvm::Tenant;

    use super::*;
    use crate::host::Host;
    use crate::host::fake::FakeHost;
    use crate::host::hostfile::AllowedDirs;
    use crate::runtime::RuntimeConfig;

    fn vm(name: &str) -> VmRef {
        VmRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    /// A Nat VM of `tenant` (none: the namespace's), with `mac` if given.
    fn spec(tenant: Option<&str>, mac: Option<&str>) -> MicroVMSpec {
        let mut s: MicroVMSpec = serde_json::from_str(
            r#"{"boot":{"kernel":"/k/vmlinux"},"resources":{"vcpus":1,"memory":"64Mi"},
                "interfaces":[{"name":"eth0","type":"Nat"}]}"#,
        )
        .unwrap();
        s.tenant = tenant.map(tenant_named);
        s.interfaces[0].mac = mac.map(str::to_owned);
        s
    }

    fn tenant_named(name: &str) -> Tenant {
        serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
    }

    fn runtime(root: &std::path::Path, host: &Arc<FakeHost>) -> Runtime {
        let mut cfg = RuntimeConfig::new(root.to_owned(), "/bin/runv-vmm".into());
        cfg.allowed = AllowedDirs {
            kernels: vec!["/k".into()],
            images: vec![],
        };
        Runtime::new(cfg, host.clone() as Arc<dyn Host>).unwrap()
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn last_rules(host: &FakeHost) -> String {
        host.state().egress.last().cloned().unwrap_or_default()
    }

    #[test]
    fn the_tenant_is_the_operators_then_the_specs_then_the_namespace() {
        let v = vm("a");
        let mut status = MicroVMStatus::default();
        assert_eq!(tenant_of(&v, &spec(None, None), &status), "default");
        assert_eq!(tenant_of(&v, &spec(Some("blue"), None), &status), "blue");
        status.tenant = Some(tenant_named("red"));
        assert_eq!(tenant_of(&v, &spec(Some("blue"), None), &status), "red");
        assert_eq!(tenant_of(&v, &spec(None, None), &status), "red");
    }

    #[test]
    fn rules_follow_starts_tenants_cleanups_and_restarts() {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::new());
        host.add_file("/k/vmlinux", 1 << 20);
        let rt = runtime(root.path(), &host);
        assert!(host.state().egress.is_empty(), "no records: nft untouched");
        let none = MicroVMStatus::default();
        let a = spec(Some("a"), Some("02:00:00:00:00:0a"));
        rt.reconcile(&vm("one"), &a, 1, &none, at(0));
        let rules = last_rules(&host);
        let tap = vmconfig::tap_name("default", "one", 0);
        assert!(
            rules.contains(&format!("iifname \"{tap}\" jump port0")),
            "{rules}"
        );
        assert!(rules.contains("ether saddr != 02:00:00:00:00:0a counter drop"));
        assert!(rules.contains("ip saddr 10.213.0.2 accept"), "{rules}");
        let record = rt.dir(&vm("one")).read_net().unwrap();
        assert_eq!(record.tenant, "a");

        // The operator's tenant replaces the spec's: the record and rules follow.
        let applied = host.state().egress.len();
        let mut placed = none.clone();
        placed.tenant = Some(tenant_named("z"));
        rt.reconcile(&vm("one"), &a, 1, &placed, at(1));
        assert_eq!(rt.dir(&vm("one")).read_net().unwrap().tenant, "z");
        assert_eq!(host.state().egress.len(), applied + 1);
        rt.reconcile(&vm("one"), &a, 1, &placed, at(2));
        assert_eq!(
            host.state().egress.len(),
            applied + 1,
            "nothing changed, nothing applied"
        );

        // A restarted agent applies the same rules before any reconcile.
        let before = last_rules(&host);
        let _again = runtime(root.path(), &host);
        assert_eq!(last_rules(&host), before);

        // Cleanup takes the port out.
        rt.cleanup(&vm("one")).unwrap();
        let rules = last_rules(&host);
        assert!(!rules.contains("jump port0"), "{rules}");
        assert!(rules.contains("iifname \"rv*\" counter drop"));
    }

    #[test]
    fn a_mac_another_vm_has_is_refused_with_a_reason() {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::new());
        host.add_file("/k/vmlinux", 1 << 20);
        let rt = runtime(root.path(), &host);
        let none = MicroVMStatus::default();
        let mac = "02:00:00:00:00:0a";
        rt.reconcile(&vm("one"), &spec(Some("a"), Some(mac)), 1, &none, at(0));
        let d = rt.reconcile(&vm("two"), &spec(Some("b"), Some(mac)), 1, &none, at(0));
        let ready = cond::find(&d.status.conditions, cond::READY).unwrap();
        assert_eq!(ready.reason, "StartFailed");
        assert!(
            ready.message.contains(&format!(
                "spec.interfaces[eth0].mac: {mac} is already the MAC of default/one's interface eth0"
            )),
            "{}",
            ready.message
        );
        assert_eq!(host.state().spawned.len(), 1, "the second VM never ran");
        assert!(rt.dir(&vm("two")).read_net().is_none());
        // Once the first is gone, the MAC is free.
        rt.cleanup(&vm("one")).unwrap();
        let d = rt.reconcile(
            &vm("two"),
            &spec(Some("b"), Some(mac)),
            1,
            &d.status,
            at(600),
        );
        let vmm = cond::find(&d.status.conditions, cond::VMM_STARTED).unwrap();
        assert_eq!(vmm.status, "True", "{:?}", d.status.conditions);
    }

    #[test]
    fn a_vm_an_older_agent_wired_gets_its_record_at_the_next_reconcile() {
        let root = tempfile::tempdir().unwrap();
        let host = Arc::new(FakeHost::new());
        host.add_file("/k/vmlinux", 1 << 20);
        let rt = runtime(root.path(), &host);
        let none = MicroVMStatus::default();
        let s = spec(None, Some("02:00:00:00:00:0b"));
        rt.reconcile(&vm("old"), &s, 1, &none, at(0));
        // As an agent from before network records left it: taps, no record.
        let dir = rt.dir(&vm("old"));
        dir.remove_net().unwrap();
        rt.reconcile(&vm("old"), &s, 1, &none, at(1));
        let record = dir.read_net().expect("the record is written again");
        assert_eq!(
            record.tenant, "default",
            "the namespace, with no tenant given"
        );
        assert_eq!(record.interfaces[0].mac, "02:00:00:00:00:0b");
        assert!(last_rules(&host).contains("ether saddr != 02:00:00:00:00:0b"));
        // Its taps gone (the network released), nothing is recorded again.
        rt.release_network(&vm("old")).unwrap();
        rt.sync_network(&vm("old"), &s, "default").unwrap();
        assert!(dir.read_net().is_none());
    }
}

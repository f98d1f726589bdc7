//! Admit: the node's last check before a VM starts or restarts, against what
//! the agent advertises and the VMs holding a place here
//! ([`crate::reconcile::admit`]), and the record of the place it then holds
//! (`claim.json`).
//!
//! Each VM's place is read from its own state directory, not from the API
//! or the agent's memory, so a restarted agent, or one cut off from the API,
//! admits the same. Checks and claims are made under one lock, so two VMs
//! can never both be admitted into the same room. Must not start, stop or
//! prepare anything.

use runv_crds::MicroVMSpec;
use runv_crds::contract::Reason;
use runv_crds::microvm::Tenant;

use super::{Runtime, RuntimeError, VmRef};
use crate::reconcile::admit::{self, Claim};
use crate::state::{self, VmDir};

/// Why the node does not admit a VM: its reason and message.
pub type Refusal = (Reason, String);

impl Runtime {
    /// Whether the VM may start now, as `tenant` (its `status.tenant`): when
    /// it may, its claim is written (it holds its place from then on, until
    /// it is removed from the node) and `None` is returned. Without an
    /// [`super::RuntimeConfig::allocatable`] (standalone mode), every VM is
    /// admitted and nothing is written.
    pub(super) fn admit(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: Option<&Tenant>,
    ) -> Result<Option<Refusal>, RuntimeError> {
        let Some(node) = self.config.allocatable else {
            return Ok(None);
        };
        let want = Claim {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            uid: vm.uid.clone(),
            vcpus: u64::from(spec.resources.vcpus),
            memory: spec.resources.memory_bytes()?,
            tenant: tenant.cloned(),
        };
        let _held = self
            .admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = self.dir(vm);
        let holders = self.holders(&dir);
        if let Some(refusal) = admit::admit(&want, &holders, node) {
            return Ok(Some(refusal));
        }
        dir.create()?;
        dir.write_claim(&want)?;
        Ok(None)
    }

    /// The places held on this node by every VM but the one in `except`: its
    /// claim; for a VM an agent from before claims started, its size from
    /// the config it runs (and no tenant).
    fn holders(&self, except: &VmDir) -> Vec<Claim> {
        state::dirs(&self.config.root)
            .into_iter()
            .filter(|d| d.path() != except.path())
            .filter_map(|d| {
                d.read_claim().or_else(|| {
                    let record = d.read_record()?;
                    let config = d.read_config()?;
                    Some(Claim {
                        namespace: record.namespace,
                        name: record.name,
                        uid: record.uid,
                        vcpus: u64::from(config.vcpus),
                        memory: u64::from(config.memory_mib) << 20,
                        tenant: None,
                    })
                })
            })
            .collect()
    }

    /// VMs that hold a place here without a record (admitted, but their start
    /// failed before a VMM was recorded), for [`Runtime::known`].
    pub(super) fn claimed_without_record(&self) -> Vec<VmRef> {
        state::dirs(&self.config.root)
            .into_iter()
            .filter(|d| d.read_record().is_none())
            .filter_map(|d| d.read_claim())
            .map(|c| VmRef {
                namespace: c.namespace,
                name: c.name,
                uid: c.uid,
            })
            .collect()
    }
}

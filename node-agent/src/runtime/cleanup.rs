//! Clean up: give back what a VM held on the host once it no longer runs —
//! its taps and addresses, its cgroup, a finished run's files, and in the
//! end its whole state directory.
//!
//! Must not start anything, and releases nothing of a VM whose VMM still
//! runs but the VMM itself (through [`Runtime::kill`] first, in
//! [`Runtime::cleanup`]).

use super::{Runtime, RuntimeError, VmRef};
use crate::vmconfig;

impl Runtime {
    /// Stops the VM for good and removes everything it had on the host: the VMM
    /// (and anything in its cgroup), its taps, its addresses, its cgroup and
    /// its state directory.
    pub fn cleanup(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        if let Some(why) = self.foreign_record(vm) {
            // Another VM's: nothing here is this VM's to give back.
            tracing::warn!(vm = %vm, "{why}; leaving it");
            return Ok(());
        }
        self.kill(vm)?;
        self.release_network(vm)?;
        self.release_cgroup(vm)?;
        dir.remove()?;
        self.exits_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm);
        Ok(())
    }

    /// Ends whatever is still in the VM's cgroup and removes it; the VMM
    /// must not run.
    pub fn release_cgroup(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        let name = self.recorded_cgroup(vm);
        self.host.cgroups().kill_all(&name)?;
        self.host.cgroups().remove(&name)?;
        Ok(())
    }

    /// Deletes the VM's taps, releases its addresses and drops its ports
    /// from the egress rules; the VM must not run.
    pub fn release_network(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        // Only the taps the agent recorded creating for this VM; a VM that
        // ran under an agent from before taps were recorded (a record and no
        // taps.json) has the hashed names of its interfaces.
        let taps = match self.dir(vm).read_taps() {
            Some(taps) => taps,
            None if self.record(vm).is_some() => (0..4)
                .map(|i| vmconfig::tap_name(&vm.namespace, &vm.name, i))
                .collect(),
            None => Vec::new(),
        };
        for tap in taps {
            if self.host.network().link_exists(&tap) {
                self.host.network().delete_tap(&tap)?;
            }
        }
        self.ipam
            .release_prefix(&vmconfig::owner_prefix(&vm.namespace, &vm.name))?;
        self.forget_network(vm)
    }

    /// Forgets a finished run (record, exit file, serial log) so the VM starts
    /// afresh; keeps its disks. Does nothing while a VMM runs for it (that one is
    /// adopted). Returns whether it forgot anything.
    pub fn forget_finished_run(&self, vm: &VmRef) -> Result<bool, RuntimeError> {
        let dir = self.dir(vm);
        let Some(record) = self.record(vm) else {
            return Ok(false);
        };
        if record
            .vmm
            .is_some_and(|id| self.host.processes().is_alive(id))
        {
            return Ok(false);
        }
        dir.forget_run()?;
        Ok(true)
    }
}

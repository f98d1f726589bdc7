//! Prepare: everything a VMM needs on the host before it is spawned — the
//! VM's directory and jail ids, its disks, the bridge, its taps and
//! addresses (and the egress rules that hold them), its config file and its
//! cgroup with the spec's limits.
//!
//! Every step is idempotent, so a start that failed halfway is retried from
//! the top. Must not spawn, signal or talk to a VMM (that is `act.rs`),
//! and must not release anything (that is `cleanup.rs`).

use std::path::PathBuf;

use runv_crds::MicroVMSpec;
use runv_crds::microvm::{PowerState, Toggle};

use super::{Runtime, RuntimeError, VmRef, spec_limits};
use crate::host::HostError;
use crate::state::{self, CgroupRecord};
use crate::vmconfig;

impl Runtime {
    /// The VM's directory, jail ids, disks and network (for a VM of `tenant`).
    pub(super) fn prepare(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: &str,
    ) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        dir.create()?;
        if spec.isolation.jail == Toggle::Enabled {
            // The jailed VMM writes its exit file and removes its control
            // socket in run/, and nowhere else.
            let ids = self.jail_ids.ensure(&self.config.root, &dir)?;
            self.host
                .disks()
                .give_dir(&dir.run_dir(), ids.uid, ids.gid)?;
        }
        self.prepare_disks(vm, spec)?;
        self.prepare_network(vm, spec, tenant)?;
        Ok(())
    }

    /// A private copy of every writable file disk, and every empty disk,
    /// each within the node's size limit and all within what is left of its
    /// ephemeral storage.
    fn prepare_disks(&self, vm: &VmRef, spec: &MicroVMSpec) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        let disks = self.host.disks();
        let mut todo = Vec::new();
        for d in &spec.disks {
            let path = dir.disk(&d.name);
            if disks.exists(&path) {
                continue;
            }
            match (&d.file, &d.empty) {
                (Some(f), _) if !d.read_only => {
                    let field = format!("spec.disks[{}].file.path", d.name);
                    let base = self.open_host_file(&field, &f.path)?;
                    let size = base
                        .file
                        .metadata()
                        .map_err(|e| HostError::io("reading", &base.path, e))?
                        .len();
                    self.check_disk_size(field, size)?;
                    todo.push((path, size, Some(base)));
                }
                (None, Some(e)) => {
                    let size = runv_crds::quantity::bytes("spec.disks[].empty.size", &e.size)?;
                    self.check_disk_size(format!("spec.disks[{}].empty.size", d.name), size)?;
                    todo.push((path, size, None));
                }
                _ => {}
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let _storage = self
            .storage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.check_storage(todo.iter().map(|(_, size, _)| *size).sum())?;
        for (path, size, base) in todo {
            match base {
                Some(base) => {
                    disks.copy_image(&base, &path, self.config.disk_copy_timeout)?;
                }
                None => disks.create_empty(&path, size)?,
            }
        }
        Ok(())
    }

    /// Refuses new disks of `needed` bytes when every VM's disks on the node
    /// could then grow past its ephemeral storage.
    fn check_storage(&self, needed: u64) -> Result<(), HostError> {
        let capacity = self.config.ephemeral_storage;
        if capacity == u64::MAX {
            return Ok(());
        }
        let disks = self.host.disks();
        let used: u64 = state::dirs(&self.config.root)
            .iter()
            .map(|d| disks.apparent_size(&d.disks()))
            .sum();
        if used.saturating_add(needed) > capacity {
            return Err(HostError::OutOfStorage {
                needed,
                used,
                capacity,
            });
        }
        Ok(())
    }

    /// Refuses a disk larger than the node allows one to be.
    fn check_disk_size(&self, field: String, size: u64) -> Result<(), HostError> {
        let limit = self.config.max_disk_bytes;
        if size > limit {
            return Err(HostError::DiskTooLarge { field, size, limit });
        }
        Ok(())
    }

    /// The bridge, a tap and an address per `Nat` interface, and the egress
    /// rules with them (before the VMM is spawned): no MAC another
    /// interface on the node has.
    fn prepare_network(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: &str,
    ) -> Result<(), RuntimeError> {
        let plan = vmconfig::net_plan(&vm.namespace, &vm.name, spec);
        if !plan.iter().any(|n| n.managed) {
            return Ok(());
        }
        self.check_macs(vm, &plan)?;
        self.host.network().ensure_bridge(&self.config.bridge)?;
        let prefix = vmconfig::owner_prefix(&vm.namespace, &vm.name);
        let dir = self.dir(vm);
        let recorded = dir.read_taps();
        // A VM an older agent started has taps it never recorded: its own.
        let legacy = recorded.is_none() && self.record(vm).is_some();
        let mut taps = recorded.unwrap_or_default();
        for n in plan.iter().filter(|n| n.managed) {
            self.ipam.allocate(&format!("{prefix}{}", n.name))?;
            if !taps.contains(&n.tap) {
                if !legacy && self.host.network().link_exists(&n.tap) {
                    // Tap names are a hash of the VM's name: another VM's
                    // device under the same name is never taken over.
                    return Err(HostError::Invalid {
                        what: "tap device",
                        value: format!("{} exists and was not created for this VM", n.tap),
                    }
                    .into());
                }
                taps.push(n.tap.clone());
                dir.write_taps(&taps)?;
            }
            self.host
                .network()
                .ensure_tap(&n.tap, &self.config.bridge.name)?;
        }
        self.record_network(vm, &plan, tenant)
    }

    /// Writes the VMM's config for this start and clears what the last run
    /// left in `run/`. Returns the config file.
    pub(super) fn prepare_config(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
    ) -> Result<PathBuf, RuntimeError> {
        let dir = self.dir(vm);
        let mut config = self.vm_config(vm, spec).ok_or_else(|| HostError::Invalid {
            what: "spec",
            value: format!("{vm}"),
        })?;
        // A VM asked to be Paused runs no guest code before it is resumed.
        config.start_paused = spec.power_state == PowerState::Paused;
        dir.write_config(&config)?;
        dir.clear_run_files()?;
        Ok(dir.config())
    }

    /// Creates the VM's cgroup with its limits and returns the files the VMM
    /// joins. A VM without limits runs without a cgroup of its own where the
    /// node has none to give; one with limits does not run at all then.
    pub(super) fn prepare_cgroup(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
    ) -> Result<Vec<PathBuf>, RuntimeError> {
        let want = spec_limits(spec)?;
        let name = self.cgroup_name(vm);
        let cgroups = self.host.cgroups();
        let limits = want.unwrap_or_default();
        let result = cgroups
            .available()
            .and_then(|()| cgroups.ensure(&name, &limits));
        let dir = self.dir(vm);
        match result {
            Ok(procs) => {
                dir.write_cgroup_record(&CgroupRecord { name, limits })?;
                Ok(procs)
            }
            Err(e) if want.is_none() => {
                if !matches!(e, HostError::CgroupsUnavailable(_)) {
                    tracing::warn!(vm = %vm, error = %runv_crds::retry::Chain(&e), "running the VMM without a cgroup of its own");
                }
                dir.remove_cgroup_record()?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.into()),
        }
    }
}

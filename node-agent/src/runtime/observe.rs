//! Observe: what runs for a VM now, what the node offers it, and the
//! addresses and config it would get, read from the host and the VM's state
//! directory.
//!
//! Owns [`Runtime::observe`] and [`Runtime::facts`], and the comparison of the
//! running VMM's config and limits with the spec. Must not change anything on
//! the host: the one write is bookkeeping in `vm.json` (when the guest was
//! first seen booted, when an exit was first seen and whether the OOM killer
//! caused it), facts that can only be seen once.

use k8s_openapi::jiff::Timestamp;
use runv_crds::MicroVMSpec;
use runv_crds::microvm::{InterfaceStatus, Toggle};
use runv_vmm_api::{SerialConfig, SerialRotation, VmConfig};

use super::image::attach_rootfs;
use super::{Runtime, VmRef, control_target, from_ms, limits_message, ms, spec_limits};
use crate::host::VmmIdentity;
use crate::host::hostfile::HostFileError;
use crate::jail;
use crate::reconcile::{Facts, Observed, ObservedExit, sandbox_refusal};
use crate::state::VmRecord;
use crate::vmconfig;
use runv_crds::contract::Reason;

fn prefix_mask(prefix: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.min(32))))
}

/// Why a host file keeps the VM from starting, if one does.
type HostFileVerdict = Option<(Reason, String)>;

impl Runtime {
    /// What the node says about the spec before anything runs: missing
    /// files, an invalid spec, limits it cannot enforce, a sandbox switched
    /// off where the node does not allow it.
    pub(super) fn facts(&self, vm: &VmRef, spec: &MicroVMSpec) -> Facts {
        let (missing_files, mut host_file) = self.check_host_files(spec);
        if host_file.is_none() {
            host_file = self.check_taps(spec);
        }
        let invalid = vmconfig::build(&vm.namespace, &vm.name, spec, &self.dir(vm), "")
            .err()
            .map(|e| e.to_string())
            .or_else(|| spec_limits(spec).err().map(|e| e.to_string()));
        // Limits the node cannot enforce keep the VM from starting: it never
        // runs unlimited when it asked for limits.
        let limits_error = match spec_limits(spec) {
            Ok(Some(_)) => self
                .host
                .cgroups()
                .available()
                .err()
                .map(|e| limits_message(&e)),
            _ => None,
        };
        Facts {
            missing_files,
            invalid,
            limits_error,
            sandbox_refused: sandbox_refusal(spec, self.config.sandbox),
            start_error: None,
            state_error: self
                .dir(vm)
                .record_unreadable()
                .or_else(|| self.foreign_record(vm)),
            fenced: self.fenced(),
            host_file,
            admission: None,
            image: None,
        }
    }

    /// The first `Tap` interface whose device the VM may not use, and why.
    fn check_taps(&self, spec: &MicroVMSpec) -> HostFileVerdict {
        spec.interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| i.kind == runv_crds::microvm::InterfaceType::Tap)
            .find_map(|(n, i)| {
                let tap = i.tap_device.as_deref().unwrap_or_default();
                self.tap_refusal(&format!("spec.interfaces[{n}].tapDevice"), tap)
            })
            .map(|why| (Reason::DeviceNotAllowed, why))
    }

    /// The host files the spec names that do not exist (field, path), and
    /// the first one it may not use or that cannot be opened.
    fn check_host_files(&self, spec: &MicroVMSpec) -> (Vec<(String, String)>, HostFileVerdict) {
        let mut missing = Vec::new();
        let mut refused = None;
        for (field, path) in vmconfig::host_files(spec) {
            match self.open_host_file(&field, &path) {
                Ok(_) => {}
                Err(HostFileError::NotFound { .. }) => missing.push((field, path)),
                Err(e) if e.is_refusal() => {
                    let flag = if field.starts_with("spec.boot.") {
                        "--allowed-kernel-dir"
                    } else {
                        "--allowed-image-dir"
                    };
                    refused.get_or_insert((
                        Reason::HostPathNotAllowed,
                        format!(
                            "{field}: {e}; use a file from an allowed directory, or ask the \
                             node's administrator to allow its directory (runv-agent {flag})"
                        ),
                    ));
                }
                Err(e) => {
                    refused.get_or_insert((
                        Reason::StartFailed,
                        format!("{field}: {}", runv_crds::retry::Chain(&e)),
                    ));
                }
            }
        }
        (missing, refused)
    }

    /// Whether the running VMM has the limits the spec asks for now.
    fn limits_current(&self, vm: &VmRef, spec: &MicroVMSpec) -> bool {
        let Ok(want) = spec_limits(spec) else {
            return true; // an invalid spec is reported, not restarted for
        };
        let have = self.dir(vm).read_cgroup_record().map(|r| r.limits);
        want.unwrap_or_default() == have.unwrap_or_default()
    }

    /// The VMM recorded for this VM, and a future that resolves when it
    /// exits (see [`crate::host::Processes::exited`]); `None` when none is
    /// recorded.
    pub fn exit_watch(
        &self,
        vm: &VmRef,
    ) -> Option<(VmmIdentity, futures::future::BoxFuture<'static, ()>)> {
        let id = self.record(vm)?.vmm?;
        Some((id, self.host.processes().exited(id)))
    }

    /// What runs for this VM now.
    pub fn observe(&self, vm: &VmRef, spec: &MicroVMSpec, now: Timestamp) -> Observed {
        let dir = self.dir(vm);
        let Some(mut record) = self.record(vm) else {
            return Observed::NotRunning {
                exit: None,
                last_generation: None,
            };
        };
        let Some(id) = record.vmm else {
            return Observed::NotRunning {
                exit: None,
                last_generation: Some(record.generation),
            };
        };
        if self.host.processes().is_alive(id) {
            return self.observe_running(vm, spec, &mut record, id, now);
        }
        let exit = dir.read_exit();
        let at = match (&exit, dir.exit_written_at()) {
            (Some(_), Some(t)) => Timestamp::try_from(t).unwrap_or(now),
            _ => match record.exit_seen_ms {
                Some(t) => from_ms(t),
                None => {
                    let (seen, oom) = self.first_seen_exit(vm, id, &record, now);
                    record.exit_seen_ms = Some(seen);
                    record.oom_killed = oom;
                    let _ = dir.write_record(&record);
                    from_ms(seen)
                }
            },
        };
        Observed::NotRunning {
            exit: Some(ObservedExit {
                oom_killed: exit.is_none() && record.oom_killed,
                record: exit,
                at,
                requested: record.stop_requested,
                container: spec
                    .container
                    .as_ref()
                    .map(|_| self.container_exit_code(vm)),
            }),
            last_generation: Some(record.generation),
        }
    }

    /// When the exit of VMM `id` (killed by a signal) was first seen, and
    /// whether the OOM killer did it (its cgroup's count rose): decided once.
    /// Kept in memory as well as in `vm.json`, so that on a full disk, where
    /// the record cannot be written, the exit does not look new each time
    /// (its restart backoff would never end).
    fn first_seen_exit(
        &self,
        vm: &VmRef,
        id: VmmIdentity,
        record: &VmRecord,
        now: Timestamp,
    ) -> (i64, bool) {
        let mut seen = self
            .exits_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get(vm) {
            Some(&(known, at, oom)) if known == id => (at, oom),
            _ => {
                let first = (ms(now), self.oom_killed_since_start(vm, record));
                seen.insert(vm.clone(), (id, first.0, first.1));
                first
            }
        }
    }

    /// What a running VMM says, and whether it runs what the spec asks for.
    fn observe_running(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        record: &mut VmRecord,
        id: VmmIdentity,
        now: Timestamp,
    ) -> Observed {
        let dir = self.dir(vm);
        let mut control_mismatch = None;
        let view = match self.host.control().view(&control_target(&dir, id)) {
            Ok(v) => Some(v),
            Err(e) if e.is_control_mismatch() => {
                control_mismatch = Some(e.to_string());
                None
            }
            Err(_) => None,
        };
        // A container VM's guest is up when runv-init said Hello (its link
        // recorded when); another's when its first serial byte came.
        let booted = match spec.container {
            Some(_) => crate::host::guest::RunRecord::read(&dir.container_run())
                .and_then(|r| r.booted_at_ms),
            None => view
                .as_ref()
                .is_some_and(|v| v.serial_bytes > 0)
                .then(|| ms(now)),
        };
        if record.booted_at_ms.is_none()
            && let Some(at) = booted
        {
            record.booted_at_ms = Some(at.max(record.started_at_ms));
            let _ = dir.write_record(record);
        }
        let config_current = dir
            .read_config()
            .is_some_and(|have| self.config_matches(vm, spec, have))
            && self.limits_current(vm, spec);
        Observed::Running {
            started_at: from_ms(record.started_at_ms),
            paused: view.is_some_and(|v| v.paused),
            booted_at: record.booted_at_ms.map(from_ms),
            config_current,
            shutdown_since: record.shutdown_at_ms.map(from_ms),
            control_mismatch,
        }
    }

    /// Whether the OOM killer killed a process in the VM's cgroup since its
    /// last VMM started (the count then is in `record`).
    fn oom_killed_since_start(&self, vm: &VmRef, record: &VmRecord) -> bool {
        let Some(before) = record.oom_kills_at_start else {
            return false;
        };
        self.host
            .cgroups()
            .oom_kills(&self.recorded_cgroup(vm))
            .is_some_and(|now| now > before)
    }

    /// The addresses of the VM's `Nat` interfaces: `ip=` kernel parameter for the first.
    fn ip_cmdline(&self, vm: &VmRef, spec: &MicroVMSpec) -> String {
        let plan = vmconfig::net_plan(&vm.namespace, &vm.name, spec);
        plan.iter()
            .enumerate()
            .find(|(_, n)| n.managed)
            .and_then(|(i, n)| {
                let owner = format!(
                    "{}{}",
                    vmconfig::owner_prefix(&vm.namespace, &vm.name),
                    n.name
                );
                self.ipam.lookup(&owner).map(|ip| {
                    format!(
                        "ip={ip}::{}:{}::eth{i}:off",
                        self.ipam.gateway(),
                        prefix_mask(self.ipam.prefix())
                    )
                })
            })
            .unwrap_or_default()
    }

    /// The VMM config the spec asks for: jailed as the VM's `jail.json` says
    /// when `isolation.jail` is Enabled (`None` until it has ids).
    pub(super) fn vm_config(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<VmConfig> {
        let mut c = self.vm_config_without_image(vm, spec)?;
        vmconfig::use_passed_files(&mut c, spec);
        if spec.container.is_some() {
            // The root filesystem is the descriptor after the spec's files.
            self.current_image(vm, spec)?;
            let passed = i32::try_from(vmconfig::passed_files(spec).len()).ok()?;
            let fd = vmconfig::FIRST_PASSED_FD + passed;
            attach_rootfs(&mut c, format!("/proc/self/fd/{fd}").into());
        }
        Some(c)
    }

    /// The config with host paths where the VMM now gets descriptors: what a
    /// VMM started by an agent from before descriptors were passed has.
    fn vm_config_with_paths(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<VmConfig> {
        let mut c = self.vm_config_without_image(vm, spec)?;
        if spec.container.is_some() {
            attach_rootfs(&mut c, self.current_image(vm, spec)?.rootfs);
        }
        Some(c)
    }

    /// The config with host paths, and no root filesystem disk.
    fn vm_config_without_image(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<VmConfig> {
        let extra = self.ip_cmdline(vm, spec);
        let dir = self.dir(vm);
        let mut c = vmconfig::build(&vm.namespace, &vm.name, spec, &dir, &extra).ok()?;
        if let SerialConfig::File { rotate, .. } = &mut c.serial {
            *rotate = Some(SerialRotation {
                limit_bytes: self.config.serial_limit,
                previous: dir.serial_log_old(),
            });
        }
        if spec.isolation.jail == Toggle::Enabled {
            c.jail = Some(vmconfig::jail(&dir, jail::read(&dir)?));
        }
        Some(c)
    }

    /// Whether the config a VMM was started with (`have`) is the one the
    /// spec asks for now. `startPaused` only matters at start: a change of
    /// `powerState` restarts nothing.
    fn config_matches(&self, vm: &VmRef, spec: &MicroVMSpec, mut have: VmConfig) -> bool {
        let Some(want) = self.vm_config(vm, spec) else {
            return false;
        };
        have.start_paused = want.start_paused;
        // The serial log is the agent's choice, not the spec's: a VMM an
        // older agent started without a rotation limit is the same VM (the
        // agent rotates its log, see `Runtime::reconcile`).
        have.serial = want.serial.clone();
        // A VMM an older agent started names the host paths themselves: the
        // same VM, not restarted for it.
        have == want || Some(&have) == self.vm_config_with_paths(vm, spec).as_ref()
    }

    /// The interfaces and vsock CID the status reports.
    pub fn addresses(&self, vm: &VmRef, spec: &MicroVMSpec) -> (Vec<InterfaceStatus>, Option<i64>) {
        let prefix = vmconfig::owner_prefix(&vm.namespace, &vm.name);
        let ifaces = vmconfig::net_plan(&vm.namespace, &vm.name, spec)
            .into_iter()
            .map(|n| InterfaceStatus {
                ip: n
                    .managed
                    .then(|| self.ipam.lookup(&format!("{prefix}{}", n.name)))
                    .flatten()
                    .map(|ip| ip.to_string()),
                mac: Some(n.mac),
                host_interface: Some(n.tap),
                name: n.name,
            })
            .collect();
        let cid = vmconfig::has_vsock(spec)
            .then(|| i64::from(vmconfig::vsock_cid(&vm.namespace, &vm.name)));
        (ifaces, cid)
    }
}

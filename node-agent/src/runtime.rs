//! Realizing MicroVMs on this host: observe what runs, [`decide`], act, and
//! observe again. Shared by standalone and cluster mode; knows nothing of the
//! Kubernetes API (callers pass the spec and the previous status, and publish
//! the result).
//!
//! Every side effect goes through [`Host`]; what a VM needs to be re-adopted
//! after an agent restart is in its state directory ([`crate::state`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions as cond;
use runv_crds::microvm::{InterfaceStatus, PowerState, Toggle};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{Request, VmConfig};

use crate::host::cgroup::CgroupLimits;
use crate::host::ipam::FileIpam;
use crate::host::{BridgeSpec, ControlTarget, Host, HostError, SpawnRequest, VmmIdentity};
use crate::jail::{self, JailIdAllocator};
use crate::reconcile::{Action, Backoff, Decision, Facts, Observed, ObservedExit, decide};
use crate::state::{self, VmDir, VmRecord};
use crate::vmconfig;

/// Why the runtime could not be set up or a VM not cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host operation failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Settings of a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The agent's state directory.
    pub root: PathBuf,
    /// The `runv-vmm` binary.
    pub vmm: PathBuf,
    /// The node bridge for `Nat` interfaces; its gateway and prefix define the subnet.
    pub bridge: BridgeSpec,
    /// Restart backoff.
    pub backoff: Backoff,
    /// Serial log bound per VM (kept: about twice this).
    pub serial_limit: u64,
}

impl RuntimeConfig {
    /// Defaults for a state directory and VMM binary.
    pub fn new(root: PathBuf, vmm: PathBuf) -> Self {
        Self {
            root,
            vmm,
            bridge: BridgeSpec {
                name: "runvbr0".into(),
                gateway: Ipv4Addr::new(10, 213, 0, 1),
                prefix: 16,
            },
            backoff: Backoff::default(),
            serial_limit: 1 << 20,
        }
    }
}

/// The Ready message for limits the node cannot enforce.
fn limits_message(e: &HostError) -> String {
    format!("spec.isolation.limits cannot be enforced on this node: {e}")
}

/// How the agent reaches the VMM `id` of the VM in `dir`: its control socket,
/// checked against `id` and the jail uid in the config it was started with.
pub fn control_target(dir: &VmDir, id: VmmIdentity) -> ControlTarget {
    let jail_uid = std::fs::read_to_string(dir.config())
        .ok()
        .and_then(|text| serde_json::from_str::<VmConfig>(&text).ok())
        .and_then(|c| c.jail)
        .map(|j| j.uid);
    ControlTarget {
        socket: dir.control_socket(),
        vmm: id,
        jail_uid,
    }
}

/// Identifies one VM.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid (empty in standalone mode).
    pub uid: String,
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Realizes VMs on one host.
pub struct Runtime {
    config: RuntimeConfig,
    host: Arc<dyn Host>,
    ipam: FileIpam,
    jail_ids: JailIdAllocator,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish()
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn from_ms(v: i64) -> Timestamp {
    Timestamp::from_millisecond(v).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.min(32))))
}

/// The cgroup limits a spec asks for; `None` when it asks for none.
pub fn spec_limits(
    spec: &MicroVMSpec,
) -> Result<Option<CgroupLimits>, runv_crds::quantity::QuantityError> {
    match &spec.isolation.limits {
        Some(l) => CgroupLimits::from_spec(l).map(|c| c.is_limited().then_some(c)),
        None => Ok(None),
    }
}

/// What the VM's running VMM was given: its cgroup and that cgroup's limits
/// (`<vm dir>/cgroup.json`, written at start; absent: no cgroup).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CgroupRecord {
    name: String,
    limits: CgroupLimits,
}

impl Runtime {
    /// A runtime over `host`, with its state in `config.root`.
    pub fn new(config: RuntimeConfig, host: Arc<dyn Host>) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(config.root.join("vms"))
            .map_err(|e| HostError::io("creating", &config.root, e))?;
        let ipam = FileIpam::open(
            &config.root.join("ipam.json"),
            config.bridge.gateway,
            config.bridge.prefix,
        )?;
        Ok(Self {
            config,
            host,
            ipam,
            jail_ids: JailIdAllocator::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The host.
    pub fn host(&self) -> &dyn Host {
        self.host.as_ref()
    }

    /// The VM's state directory.
    pub fn dir(&self, vm: &VmRef) -> VmDir {
        VmDir::new(&self.config.root, &vm.namespace, &vm.name)
    }

    /// The node-local IPAM.
    pub fn ipam(&self) -> &FileIpam {
        &self.ipam
    }

    fn facts(&self, vm: &VmRef, spec: &MicroVMSpec) -> Facts {
        let missing_files = vmconfig::host_files(spec)
            .into_iter()
            .filter(|(_, path)| !self.host.disks().exists(Path::new(path)))
            .collect();
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
            start_error: None,
        }
    }

    /// The name of the VM's cgroup (under the agent's parent cgroup).
    pub fn cgroup_name(&self, vm: &VmRef) -> String {
        state::dir_name(&vm.namespace, &vm.name)
    }

    fn cgroup_record_path(&self, vm: &VmRef) -> PathBuf {
        self.dir(vm).path().join("cgroup.json")
    }

    fn read_cgroup_record(&self, vm: &VmRef) -> Option<CgroupRecord> {
        let text = std::fs::read_to_string(self.cgroup_record_path(vm)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether the running VMM has the limits the spec asks for now.
    fn limits_current(&self, vm: &VmRef, spec: &MicroVMSpec) -> bool {
        let Ok(want) = spec_limits(spec) else {
            return true; // an invalid spec is reported, not restarted for
        };
        let have = self.read_cgroup_record(vm).map(|r| r.limits);
        want.unwrap_or_default() == have.unwrap_or_default()
    }

    /// Creates the VM's cgroup with its limits and returns the files the VMM
    /// joins. A VM without limits runs without a cgroup of its own where the
    /// node has none to give; one with limits does not run at all then.
    fn prepare_cgroup(&self, vm: &VmRef, spec: &MicroVMSpec) -> Result<Vec<PathBuf>, HostError> {
        let want = spec_limits(spec).map_err(|e| HostError::Invalid {
            what: "limits",
            value: e.to_string(),
        })?;
        let name = self.cgroup_name(vm);
        let cgroups = self.host.cgroups();
        let limits = want.unwrap_or_default();
        let result = cgroups
            .available()
            .and_then(|()| cgroups.ensure(&name, &limits));
        let record = self.cgroup_record_path(vm);
        match result {
            Ok(procs) => {
                let text = serde_json::to_string(&CgroupRecord { name, limits })
                    .map_err(|e| HostError::io("writing", &record, std::io::Error::other(e)))?;
                state::write_atomic(&record, text.as_bytes())?;
                Ok(procs)
            }
            Err(e) if want.is_none() => {
                if !matches!(e, HostError::CgroupsUnavailable(_)) {
                    tracing::warn!(vm = %vm, error = %e, "running the VMM without a cgroup of its own");
                }
                match std::fs::remove_file(&record) {
                    Ok(()) => Ok(Vec::new()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(HostError::io("removing", &record, e)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// What runs for this VM now.
    pub fn observe(&self, vm: &VmRef, spec: &MicroVMSpec, now: Timestamp) -> Observed {
        let dir = self.dir(vm);
        let Some(mut record) = dir.read_record() else {
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
            let mut control_mismatch = None;
            let view = match self.host.control().view(&control_target(&dir, id)) {
                Ok(v) => Some(v),
                Err(e) if e.is_control_mismatch() => {
                    control_mismatch = Some(e.to_string());
                    None
                }
                Err(_) => None,
            };
            if record.booted_at_ms.is_none() && view.as_ref().is_some_and(|v| v.serial_bytes > 0) {
                record.booted_at_ms = Some(ms(now));
                let _ = dir.write_record(&record);
            }
            let config_current = std::fs::read_to_string(dir.config())
                .ok()
                .is_some_and(|text| self.config_matches(vm, spec, &text))
                && self.limits_current(vm, spec);
            return Observed::Running {
                started_at: from_ms(record.started_at_ms),
                paused: view.is_some_and(|v| v.paused),
                booted_at: record.booted_at_ms.map(from_ms),
                config_current,
                shutdown_since: record.shutdown_at_ms.map(from_ms),
                control_mismatch,
            };
        }
        let exit = dir.read_exit();
        let at = match (
            &exit,
            std::fs::metadata(dir.exit_file()).and_then(|m| m.modified()),
        ) {
            (Some(_), Ok(t)) => Timestamp::try_from(t).unwrap_or(now),
            _ => match record.exit_seen_ms {
                Some(t) => from_ms(t),
                None => {
                    // Killed by a signal: by the OOM killer if its cgroup's
                    // count rose. Decided once, when the exit is first seen.
                    record.exit_seen_ms = Some(ms(now));
                    record.oom_killed = self.oom_killed_since_start(vm, &record);
                    let _ = dir.write_record(&record);
                    now
                }
            },
        };
        Observed::NotRunning {
            exit: Some(ObservedExit {
                oom_killed: exit.is_none() && record.oom_killed,
                record: exit,
                at,
                requested: record.stop_requested,
            }),
            last_generation: Some(record.generation),
        }
    }

    /// Whether the OOM killer killed a process in the VM's cgroup since its
    /// last VMM started (the count then is in `record`).
    fn oom_killed_since_start(&self, vm: &VmRef, record: &VmRecord) -> bool {
        let Some(before) = record.oom_kills_at_start else {
            return false;
        };
        let name = self
            .read_cgroup_record(vm)
            .map_or_else(|| self.cgroup_name(vm), |r| r.name);
        self.host
            .cgroups()
            .oom_kills(&name)
            .is_some_and(|now| now > before)
    }

    /// Logs `e` when it says the VM's control socket is not its VMM's.
    fn log_control_mismatch(vm: &VmRef, e: &HostError) {
        if let HostError::ControlSocketMismatch {
            expected_pid,
            found_pid,
            ..
        } = e
        {
            tracing::error!(
                vm = %vm,
                expected_pid,
                found_pid,
                error = %e,
                "the control socket is not the VMM's: nothing is sent to it"
            );
        }
    }

    /// Sends `request` to the VM's recorded VMM; refuses (and logs) when
    /// something else serves its control socket.
    fn send(&self, vm: &VmRef, request: Request) -> Result<(), HostError> {
        let dir = self.dir(vm);
        let id = dir.read_record().and_then(|r| r.vmm).ok_or_else(|| {
            HostError::io(
                "control socket",
                dir.control_socket(),
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        self.send_to(vm, &dir, id, request)
    }

    fn send_to(
        &self,
        vm: &VmRef,
        dir: &VmDir,
        id: VmmIdentity,
        request: Request,
    ) -> Result<(), HostError> {
        let result = self.host.control().send(&control_target(dir, id), request);
        if let Err(e) = &result {
            Self::log_control_mismatch(vm, e);
        }
        result
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
    fn vm_config(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<VmConfig> {
        let extra = self.ip_cmdline(vm, spec);
        let dir = self.dir(vm);
        let mut c = vmconfig::build(&vm.namespace, &vm.name, spec, &dir, &extra).ok()?;
        if spec.isolation.jail == Toggle::Enabled {
            c.jail = Some(vmconfig::jail(&dir, jail::read(&dir)?));
        }
        Some(c)
    }

    /// Whether the config a VMM was started with (`text`) is the one the
    /// spec asks for now. `startPaused` only matters at start: a change of
    /// `powerState` restarts nothing.
    fn config_matches(&self, vm: &VmRef, spec: &MicroVMSpec, text: &str) -> bool {
        let (Ok(mut have), Some(want)) = (
            serde_json::from_str::<VmConfig>(text),
            self.vm_config(vm, spec),
        ) else {
            return false;
        };
        have.start_paused = want.start_paused;
        have == want
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
        let cid = spec
            .vsock
            .as_ref()
            .filter(|v| v.enabled)
            .map(|_| i64::from(vmconfig::vsock_cid(&vm.namespace, &vm.name)));
        (ifaces, cid)
    }

    fn prepare(&self, vm: &VmRef, spec: &MicroVMSpec) -> Result<(), HostError> {
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
        let disks = self.host.disks();
        for d in &spec.disks {
            let path = dir.disk(&d.name);
            if disks.exists(&path) {
                continue;
            }
            match (&d.file, &d.empty) {
                (Some(f), _) if !d.read_only => {
                    disks.copy_image(Path::new(&f.path), &path)?;
                }
                (None, Some(e)) => {
                    let size = runv_crds::quantity::bytes("spec.disks[].empty.size", &e.size)
                        .map_err(|q| HostError::Invalid {
                            what: "disk size",
                            value: q.to_string(),
                        })?;
                    disks.create_empty(&path, size)?;
                }
                _ => {}
            }
        }
        let plan = vmconfig::net_plan(&vm.namespace, &vm.name, spec);
        if plan.iter().any(|n| n.managed) {
            self.host.network().ensure_bridge(&self.config.bridge)?;
        }
        let prefix = vmconfig::owner_prefix(&vm.namespace, &vm.name);
        for n in plan.iter().filter(|n| n.managed) {
            self.ipam.allocate(&format!("{prefix}{}", n.name))?;
            self.host
                .network()
                .ensure_tap(&n.tap, &self.config.bridge.name)?;
        }
        Ok(())
    }

    fn start(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        generation: i64,
        now: Timestamp,
    ) -> Result<(), HostError> {
        self.prepare(vm, spec)?;
        let dir = self.dir(vm);
        let mut config = self.vm_config(vm, spec).ok_or_else(|| HostError::Invalid {
            what: "spec",
            value: format!("{vm}"),
        })?;
        // A VM asked to be Paused runs no guest code before it is resumed.
        config.start_paused = spec.power_state == PowerState::Paused;
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        state::write_atomic(&dir.config(), text.as_bytes())?;
        dir.clear_run_files()?;
        let cgroup = self.prepare_cgroup(vm, spec)?;
        // The OOM killer's count before this run, to tell an OOM kill later.
        let oom_kills_at_start = if cgroup.is_empty() {
            None
        } else {
            self.host.cgroups().oom_kills(&self.cgroup_name(vm))
        };
        let id = self.host.processes().spawn(&SpawnRequest {
            vmm: self.config.vmm.clone(),
            config: dir.config(),
            log: dir.vmm_log(),
            cgroup,
        })?;
        dir.write_record(&VmRecord {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            uid: vm.uid.clone(),
            vmm: Some(id),
            started_at_ms: ms(now),
            generation,
            booted_at_ms: None,
            shutdown_at_ms: None,
            stop_requested: false,
            exit_seen_ms: None,
            oom_kills_at_start,
            oom_killed: false,
        })
    }

    /// Ends the VMM now: through its control socket, else (no answer, or the
    /// socket is not the VMM's) SIGKILL to the recorded process. Waits
    /// (bounded) until it is gone.
    fn kill(&self, vm: &VmRef) -> Result<(), HostError> {
        let dir = self.dir(vm);
        let Some(mut record) = dir.read_record() else {
            return Ok(());
        };
        let Some(id) = record.vmm else {
            return Ok(());
        };
        record.stop_requested = true;
        dir.write_record(&record)?;
        let procs = self.host.processes();
        if procs.is_alive(id) && self.send_to(vm, &dir, id, Request::Kill).is_ok() {
            for _ in 0..200 {
                if !procs.is_alive(id) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        procs.kill(id)
    }

    fn act(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        generation: i64,
        action: &Action,
        now: Timestamp,
    ) -> Result<(), HostError> {
        let dir = self.dir(vm);
        match action {
            Action::Start { .. } => self.start(vm, spec, generation, now),
            Action::Kill => self.kill(vm),
            Action::Shutdown => {
                if let Some(mut record) = dir.read_record() {
                    record.stop_requested = true;
                    record.shutdown_at_ms = Some(ms(now));
                    dir.write_record(&record)?;
                }
                // The VMM ends the VM itself if the guest ignores the button.
                let grace = Duration::from_secs(
                    u64::try_from(spec.termination_grace_period_seconds).unwrap_or(0),
                );
                self.send(vm, Request::shutdown_within(grace))
            }
            Action::Pause => self.send(vm, Request::Pause),
            Action::Resume => self.send(vm, Request::Resume),
        }
    }

    /// One reconcile of one VM: decide, act, observe again, decide the status.
    pub fn reconcile(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        generation: i64,
        previous: &MicroVMStatus,
        now: Timestamp,
    ) -> Decision {
        let _ = self.dir(vm).rotate_serial(self.config.serial_limit);
        let mut facts = self.facts(vm, spec);
        let obs = self.observe(vm, spec, now);
        if let Observed::Running {
            control_mismatch: Some(why),
            ..
        } = &obs
        {
            // Once, when it is new (the status keeps saying it): reconciles
            // may come every 200 ms.
            let known = cond::find(&previous.conditions, cond::READY)
                .is_some_and(|c| c.reason == "ControlSocketMismatch");
            if !known {
                tracing::error!(vm = %vm, error = %why, "the control socket is not the VMM's: nothing is sent to it");
            }
        }
        let first = decide(
            spec,
            generation,
            previous,
            &obs,
            &facts,
            &self.config.backoff,
            now,
        );
        let mut acted = false;
        for action in &first.actions {
            acted = true;
            if let Err(e) = self.act(vm, spec, generation, action, now) {
                tracing::warn!(vm = %vm, ?action, error = %e, "action failed");
                if matches!(action, Action::Start { .. }) {
                    if e.is_cgroup() {
                        facts.limits_error = Some(limits_message(&e));
                    } else {
                        facts.start_error = Some(e.to_string());
                    }
                }
                break;
            }
        }
        let mut decision = if acted {
            let obs = self.observe(vm, spec, now);
            let mut second = decide(
                spec,
                generation,
                &first.status,
                &obs,
                &facts,
                &self.config.backoff,
                now,
            );
            if !second.actions.is_empty() {
                second.requeue = Some(Duration::from_millis(100));
            }
            second
        } else {
            first
        };
        let (interfaces, cid) = self.addresses(vm, spec);
        decision.status.interfaces = interfaces;
        decision.status.vsock_cid = cid;
        decision
    }

    /// Stops the VM for good and removes everything it had on the host: the VMM,
    /// its taps, its addresses, its cgroup and its state directory.
    pub fn cleanup(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        self.kill(vm)?;
        self.release_network(vm)?;
        self.release_cgroup(vm)?;
        dir.remove()?;
        Ok(())
    }

    /// Removes the VM's cgroup; the VM must not run.
    pub fn release_cgroup(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        let name = self
            .read_cgroup_record(vm)
            .map_or_else(|| self.cgroup_name(vm), |r| r.name);
        self.host.cgroups().remove(&name)?;
        Ok(())
    }

    /// Deletes the VM's taps and releases its addresses; the VM must not run.
    pub fn release_network(&self, vm: &VmRef) -> Result<(), RuntimeError> {
        for i in 0..4 {
            let tap = vmconfig::tap_name(&vm.namespace, &vm.name, i);
            if self.host.network().link_exists(&tap) {
                self.host.network().delete_tap(&tap)?;
            }
        }
        self.ipam
            .release_prefix(&vmconfig::owner_prefix(&vm.namespace, &vm.name))?;
        Ok(())
    }

    /// Stops the VM: the power button, up to `grace`, then kill. Keeps its state.
    pub fn stop(&self, vm: &VmRef, grace: Duration) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        let Some(mut record) = dir.read_record() else {
            return Ok(());
        };
        let Some(id) = record.vmm else {
            return Ok(());
        };
        if !self.host.processes().is_alive(id) {
            return Ok(());
        }
        record.stop_requested = true;
        dir.write_record(&record)?;
        if self
            .send_to(vm, &dir, id, Request::shutdown_within(grace))
            .is_ok()
        {
            let start = std::time::Instant::now();
            while start.elapsed() < grace {
                if !self.host.processes().is_alive(id) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill(vm)?;
        Ok(())
    }

    /// Forgets a finished run (record, exit file, serial log) so the VM starts
    /// afresh; keeps its disks. Does nothing while a VMM runs for it (that one is
    /// adopted). Returns whether it forgot anything.
    pub fn forget_finished_run(&self, vm: &VmRef) -> Result<bool, RuntimeError> {
        let dir = self.dir(vm);
        let Some(record) = dir.read_record() else {
            return Ok(false);
        };
        if record
            .vmm
            .is_some_and(|id| self.host.processes().is_alive(id))
        {
            return Ok(false);
        }
        dir.clear_run_files()?;
        for p in [dir.record_path(), dir.serial_log(), dir.serial_log_old()] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HostError::io("removing", &p, e).into()),
            }
        }
        Ok(true)
    }

    /// Every VM with a state directory here.
    pub fn known(&self) -> Vec<VmRef> {
        state::list(&self.config.root)
            .into_iter()
            .map(|(_, r)| VmRef {
                namespace: r.namespace,
                name: r.name,
                uid: r.uid,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

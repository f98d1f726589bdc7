//! Realizing MicroVMs on this host, one reconcile at a time, in phases, one
//! file each: `observe` what runs, [`decide`] (pure, in [`crate::reconcile`]),
//! `admit` a start against the node's room and tenants, `prepare` the host
//! and `act`, observe again; `cleanup` gives back what a VM held; `egress`
//! keeps the node's network rules in step with the VMs. Shared by standalone
//! and cluster mode; knows nothing of
//! the Kubernetes API (callers pass the spec and the previous status, and
//! publish the result).
//!
//! This file owns the [`Runtime`] itself, its settings, [`VmRef`], the
//! conversion of a spec's limits into host terms, and [`Runtime::reconcile`],
//! which runs the phases in order. Every side effect goes through [`Host`] or
//! the VM's state directory ([`crate::state`]); nothing here or in the phase
//! files makes a syscall itself.

mod act;
mod admit;
mod cleanup;
mod container;
mod egress;
mod image;
mod kit;
mod observe;
mod prepare;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions as cond;
use runv_crds::microvm::VmmLimits;
use runv_crds::quantity::{self, QuantityError};
use runv_crds::{MicroVMSpec, MicroVMStatus};

pub use self::egress::tenant_of;
pub use self::kit::{GuestKitConfig, KIT_CMDLINE};
use crate::host::cgroup::{CPU_PERIOD_US, Limits, MIN_CPU_QUOTA_US};
use crate::host::egress::{EgressError, EgressPolicy};
use crate::host::hostfile::{AllowedDirs, HostFile, HostFileError};
use crate::host::ipam::FileIpam;
use crate::host::{BridgeSpec, ControlTarget, Host, HostError, VmmIdentity};
use crate::jail::JailIdAllocator;
use crate::reconcile::admit::Allocatable;
use crate::reconcile::{Action, Backoff, Decision, Facts, Observed, SandboxPolicy, decide};
use crate::state::{self, VmDir};

/// Why the runtime could not be set up, or a VM not started, stopped or
/// cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host operation failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A quantity in the spec (a limit, a disk size) cannot be read.
    #[error(transparent)]
    Quantity(#[from] QuantityError),
    /// A host file the spec names cannot be used.
    #[error(transparent)]
    HostFile(#[from] HostFileError),
    /// The egress rules cannot be rendered from the records.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// A `Nat` interface asks for a MAC another interface on the node has.
    #[error(
        "{field}: {mac} is already the MAC of {vm}'s interface {interface} on this node; \
         give this interface another MAC"
    )]
    MacInUse {
        /// The spec field.
        field: String,
        /// The MAC.
        mac: String,
        /// The VM that has it.
        vm: String,
        /// Its interface.
        interface: String,
    },
}

impl RuntimeError {
    /// Whether this is a cgroup failure: limits asked for cannot be enforced.
    pub fn is_cgroup(&self) -> bool {
        matches!(self, Self::Host(e) if e.is_cgroup())
    }
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
    /// Serial log bound per VM, which the VMM enforces (kept: about twice this).
    pub serial_limit: u64,
    /// Where the host files a spec names may come from.
    pub allowed: AllowedDirs,
    /// Tap devices a `Tap` interface may name: exact names, or prefixes
    /// ending in `*`. Empty: none.
    pub allowed_taps: Vec<String>,
    /// Which parts of the VMM's sandbox a spec may switch off here (none by
    /// default).
    pub sandbox: SandboxPolicy,
    /// Largest disk a VM may have here, in bytes: an empty disk's size or a
    /// writable copy's base.
    pub max_disk_bytes: u64,
    /// Longest a writable disk's copy may take before it is given up.
    pub disk_copy_timeout: Duration,
    /// Bytes every VM's disks together may grow to on this node (their
    /// files' lengths: sparse disks never outgrow them). `u64::MAX`: no bound.
    pub ephemeral_storage: u64,
    /// Where `Nat` VMs may send beyond the node.
    pub egress: EgressPolicy,
    /// What the node advertises to placement (cluster mode): no VM starts
    /// beyond it, nor against tenant isolation (see `admit.rs`). `None`
    /// (standalone mode): no such check.
    pub allocatable: Option<Allocatable>,
    /// The guest kit container VMs without a kernel boot (`None`: such a
    /// VM does not start here, and says why).
    pub guest_kit: Option<GuestKitConfig>,
}

/// Default [`RuntimeConfig::max_disk_bytes`]: 256 GiB.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 256 << 30;
/// Default [`RuntimeConfig::disk_copy_timeout`]: 10 minutes.
pub const DEFAULT_DISK_COPY_TIMEOUT: Duration = Duration::from_secs(600);

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
            allowed: AllowedDirs::default(),
            allowed_taps: Vec::new(),
            sandbox: SandboxPolicy::default(),
            max_disk_bytes: DEFAULT_MAX_DISK_BYTES,
            disk_copy_timeout: DEFAULT_DISK_COPY_TIMEOUT,
            ephemeral_storage: u64::MAX,
            egress: EgressPolicy::default(),
            allocatable: None,
            guest_kit: None,
        }
    }
}

/// The Ready message for limits the node cannot enforce.
fn limits_message(e: &(dyn std::error::Error + 'static)) -> String {
    format!(
        "spec.isolation.limits cannot be enforced on this node: {}",
        runv_crds::retry::Chain(e)
    )
}

/// How the agent reaches the VMM `id` of the VM in `dir`: its control socket,
/// checked against `id` and the jail uid in the config it was started with.
pub fn control_target(dir: &VmDir, id: VmmIdentity) -> ControlTarget {
    ControlTarget {
        socket: dir.control_socket(),
        vmm: id,
        jail_uid: dir.read_config().and_then(|c| c.jail).map(|j| j.uid),
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
    /// Per VM: the VMM whose exit (by a signal) was seen, when, and whether
    /// the OOM killer did it.
    exits_seen: std::sync::Mutex<std::collections::HashMap<VmRef, (VmmIdentity, i64, bool)>>,
    /// Why the node is fenced, while it is.
    fence: std::sync::Mutex<Option<String>>,
    /// Held while a VM's disks are measured against the node's ephemeral
    /// storage and created, so two starts cannot both take the last of it.
    storage: std::sync::Mutex<()>,
    /// Held while the egress rules are rebuilt.
    egress_lock: std::sync::Mutex<()>,
    /// Held while a start is admitted and its claim written.
    admission: std::sync::Mutex<()>,
    /// Where container images come from (`None`: VMs with `spec.container`
    /// do not start here).
    images: Option<Arc<dyn crate::images::ImageSource>>,
    /// The channels to container VMs' guests (`None`: their containers'
    /// output and exits are not recorded).
    links: Option<Arc<crate::host::guest::GuestLinks>>,
    /// The kit's kernel and initramfs, once built.
    kit_files: std::sync::Mutex<Option<(String, String)>>,
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

/// The cgroup limits `spec.isolation.limits` asks for, in the kernel's
/// units: CPU `500m` is 50 ms per 100 ms (at least 1 ms), memory is rounded
/// up to whole 4 KiB pages (the kernel rounds down what it is given).
pub fn limits_from_spec(limits: &VmmLimits) -> Result<Limits, QuantityError> {
    let cpu_quota_us = limits
        .cpu
        .as_deref()
        .map(|c| quantity::millicores("spec.isolation.limits.cpu", c))
        .transpose()?
        .map(|m| (m.saturating_mul(CPU_PERIOD_US) / 1000).max(MIN_CPU_QUOTA_US));
    let memory_bytes = limits
        .memory
        .as_deref()
        .map(|m| quantity::bytes("spec.isolation.limits.memory", m))
        .transpose()?
        .map(|b| b.div_ceil(4096).saturating_mul(4096));
    Ok(Limits {
        cpu_quota_us,
        memory_bytes,
    })
}

/// The cgroup limits a spec asks for; `None` when it asks for none.
pub fn spec_limits(spec: &MicroVMSpec) -> Result<Option<Limits>, QuantityError> {
    match &spec.isolation.limits {
        Some(l) => limits_from_spec(l).map(|c| c.is_limited().then_some(c)),
        None => Ok(None),
    }
}

impl Runtime {
    /// A runtime over `host`, with its state in `config.root`. When VMs have
    /// network records, the node's egress rules are rebuilt from them first:
    /// a restarted agent re-establishes them before it reconciles anything.
    pub fn new(config: RuntimeConfig, host: Arc<dyn Host>) -> Result<Self, RuntimeError> {
        state::create_root(&config.root)?;
        let ipam = FileIpam::open(
            &config.root.join("ipam.json"),
            config.bridge.gateway,
            config.bridge.prefix,
        )?;
        let rt = Self {
            config,
            host,
            ipam,
            jail_ids: JailIdAllocator::default(),
            exits_seen: std::sync::Mutex::default(),
            fence: std::sync::Mutex::default(),
            storage: std::sync::Mutex::default(),
            egress_lock: std::sync::Mutex::default(),
            admission: std::sync::Mutex::default(),
            images: None,
            links: None,
            kit_files: std::sync::Mutex::default(),
        };
        if !state::list_net(&rt.config.root).is_empty() {
            rt.apply_egress()?;
        }
        Ok(rt)
    }

    /// The same runtime with container images from `images`.
    pub fn with_images(mut self, images: Arc<dyn crate::images::ImageSource>) -> Self {
        self.images = Some(images);
        self
    }

    /// The same runtime with links to container VMs' guests.
    pub fn with_guest_links(mut self, links: Arc<crate::host::guest::GuestLinks>) -> Self {
        self.links = Some(links);
        self
    }

    /// The links to container VMs' guests, if there are.
    pub fn guest_links(&self) -> Option<&Arc<crate::host::guest::GuestLinks>> {
        self.links.as_ref()
    }

    /// The VM's record (`vm.json`), only when it is this VM's: a directory
    /// name can be shared (a long name is a prefix and a hash) and a MicroVM
    /// re-created under a name has a new uid, and another VM's VMM must never
    /// be taken for this one's.
    pub fn record(&self, vm: &VmRef) -> Option<state::VmRecord> {
        self.dir(vm)
            .read_record()
            .filter(|r| r.belongs_to(&vm.namespace, &vm.name, &vm.uid))
    }

    /// Why the VM's directory is not its own, if it holds another VM's record.
    pub fn foreign_record(&self, vm: &VmRef) -> Option<String> {
        let dir = self.dir(vm);
        let r = dir.read_record()?;
        (!r.belongs_to(&vm.namespace, &vm.name, &vm.uid)).then(|| {
            format!(
                "the state directory {} holds the record of {}/{} (uid {:?}), not of this VM (uid {:?}); \
                 nothing is started until that VM is removed from the node",
                dir.path().display(),
                r.namespace,
                r.name,
                r.uid,
                vm.uid
            )
        })
    }

    /// Why the `Tap` interface on `tap` may not be used, if it may not: its
    /// name must be one the node's administrator allowed, and never one of
    /// the agent's own (the bridge, or the `rv` names of its taps).
    pub fn tap_refusal(&self, field: &str, tap: &str) -> Option<String> {
        let own = tap == self.config.bridge.name || tap.starts_with("rv");
        let allowed = self
            .config
            .allowed_taps
            .iter()
            .any(|a| match a.strip_suffix('*') {
                Some(prefix) => tap.starts_with(prefix),
                None => a == tap,
            });
        if own {
            Some(format!(
                "{field}: {tap} is a name the agent uses for its own devices (the bridge {} and \
                 the rv... taps); name another tap device",
                self.config.bridge.name
            ))
        } else if !allowed {
            Some(format!(
                "{field}: tap device {tap} is not one this node allows VMs to use ({}); ask the \
                 node's administrator to allow it (runv-agent --allowed-tap-device)",
                if self.config.allowed_taps.is_empty() {
                    "none".to_owned()
                } else {
                    self.config.allowed_taps.join(", ")
                }
            ))
        } else {
            None
        }
    }

    /// Marks the node fenced (`Some(why)`), or not: while it is, every
    /// reconcile kills the VM's VMM, starts none, and reports `NodeFenced`
    /// with `why`. Returns whether this changed anything.
    pub fn set_fenced(&self, why: Option<String>) -> bool {
        let mut fence = self
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *fence != why;
        *fence = why;
        changed
    }

    /// Why the node is fenced, if it is.
    pub fn fenced(&self) -> Option<String> {
        self.fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Opens the host file `path` that the spec's `field` names, beneath the
    /// directories allowed for its kind (kernels and initrds, or disk images).
    pub fn open_host_file(&self, field: &str, path: &str) -> Result<HostFile, HostFileError> {
        let (allowed, what) = if field.starts_with("spec.boot.") {
            (&self.config.allowed.kernels, "kernels and initrds")
        } else {
            (&self.config.allowed.images, "disk images")
        };
        self.host
            .disks()
            .open_host_file(allowed, what, std::path::Path::new(path))
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

    /// The name of the VM's cgroup (under the agent's parent cgroup).
    pub fn cgroup_name(&self, vm: &VmRef) -> String {
        state::dir_name(&vm.namespace, &vm.name)
    }

    /// The cgroup the VM's VMM was given, as recorded; else its name.
    fn recorded_cgroup(&self, vm: &VmRef) -> String {
        self.dir(vm)
            .read_cgroup_record()
            .map_or_else(|| self.cgroup_name(vm), |r| r.name)
    }

    /// Every VM with a state directory here: a record, or a claim.
    pub fn known(&self) -> Vec<VmRef> {
        let mut known: Vec<VmRef> = state::list(&self.config.root)
            .into_iter()
            .map(|(_, r)| VmRef {
                namespace: r.namespace,
                name: r.name,
                uid: r.uid,
            })
            .collect();
        known.extend(self.claimed_without_record());
        known
    }

    /// Whether `first` starts the VM and the node does not admit it (or
    /// cannot record its claim): then `facts` says why, and the decision is
    /// to be made again, to start nothing. Admitted before any action, so a
    /// refused restart is not counted as one.
    fn start_refused(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        previous: &MicroVMStatus,
        first: &Decision,
        facts: &mut Facts,
    ) -> bool {
        let starts = first
            .actions
            .iter()
            .any(|a| matches!(a, Action::Start { .. }));
        if !starts {
            return false;
        }
        match self.admit(vm, spec, previous.tenant.as_ref()) {
            Ok(None) => return false,
            Ok(Some(refusal)) => facts.admission = Some(refusal),
            Err(e) => facts.start_error = Some(runv_crds::retry::Chain(&e).to_string()),
        }
        true
    }

    /// Rotates the serial log of a VMM that does not bound it itself (one an
    /// older agent started, whose config has no rotation limit). A VMM this
    /// agent starts rotates its own log, so only one writer ever truncates it.
    fn rotate_legacy_serial(&self, vm: &VmRef) {
        let dir = self.dir(vm);
        let legacy = dir.read_config().is_some_and(|c| {
            matches!(
                c.serial,
                runv_vmm_api::SerialConfig::File { rotate: None, .. }
            )
        });
        if legacy {
            let _ = dir.rotate_serial(self.config.serial_limit);
        }
    }

    /// One reconcile of one VM: observe, decide, act, observe again, decide
    /// the status.
    pub fn reconcile(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        generation: i64,
        previous: &MicroVMStatus,
        now: Timestamp,
    ) -> Decision {
        let (booted, kit_error) = match self.boot_spec(spec) {
            Ok(s) => (s, None),
            Err(why) => (std::borrow::Cow::Borrowed(spec), Some(why)),
        };
        let spec = &*booted;
        self.rotate_legacy_serial(vm);
        let tenant = tenant_of(vm, spec, previous);
        if let Err(e) = self.sync_network(vm, spec, &tenant) {
            tracing::warn!(vm = %vm, error = %runv_crds::retry::Chain(&e), "egress rules not rebuilt");
        }
        let mut facts = self.facts(vm, spec);
        if let Some(why) = kit_error {
            facts
                .missing_files
                .retain(|(field, _)| field != "spec.boot.kernel");
            facts.host_file = Some((runv_crds::contract::Reason::KernelNotFound, why));
        }
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
        let backoff = &self.config.backoff;
        let mut first = decide(spec, generation, previous, &obs, &facts, backoff, now);
        if self.start_refused(vm, spec, previous, &first, &mut facts) {
            first = decide(spec, generation, previous, &obs, &facts, backoff, now);
        }
        let mut events = Vec::new();
        if first
            .actions
            .iter()
            .any(|a| matches!(a, Action::Start { .. }))
            && let Some(container) = &spec.container
        {
            match self.prepare_image(vm, spec, container) {
                Ok(pulled) => events.extend(pulled),
                Err(failure) => {
                    facts.image = Some(failure);
                    first = decide(spec, generation, previous, &obs, &facts, backoff, now);
                }
            }
        }
        let mut acted = false;
        for action in &first.actions {
            acted = true;
            if let Err(e) = self.act(vm, spec, &tenant, generation, action, now) {
                tracing::warn!(vm = %vm, ?action, error = %runv_crds::retry::Chain(&e), "action failed");
                if matches!(action, Action::Start { .. }) {
                    if e.is_cgroup() {
                        facts.limits_error = Some(limits_message(&e));
                    } else {
                        facts.start_error = Some(runv_crds::retry::Chain(&e).to_string());
                    }
                }
                break;
            }
        }
        let (mut decision, obs) = if acted {
            let obs = self.observe(vm, spec, now);
            let mut second = decide(spec, generation, &first.status, &obs, &facts, backoff, now);
            if !second.actions.is_empty() {
                second.requeue = Some(Duration::from_millis(100));
            }
            (second, obs)
        } else {
            (first, obs)
        };
        self.keep_link(vm, spec, &obs);
        let (interfaces, cid) = self.addresses(vm, spec);
        decision.status.interfaces = interfaces;
        decision.status.vsock_cid = cid;
        let restarts = decision.status.restart_count;
        decision.status.container = self.container_status(vm, spec, &obs, restarts, now);
        decision.events = events;
        decision
    }
}

#[cfg(test)]
mod tests;

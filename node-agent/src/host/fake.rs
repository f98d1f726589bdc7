//! In-memory fakes of the host traits, for reconcile tests without root,
//! `/dev/kvm`, `/dev/net/tun` or a writable cgroup filesystem. They record what was asked and let a test
//! make a VMM exit ([`FakeHost::exit`]) or be OOM-killed ([`FakeHost::oom_kill`]),
//! its control socket be served by another process ([`FakeHost::hijack`]), or a
//! file appear ([`FakeHost::add_file`]).
//!
//! Test support only: nothing here touches the machine.

use super::hostfile::{HostFile, HostFileError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::cgroup::Limits;
use super::{
    BridgeSpec, Cgroups, Control, ControlTarget, CopyKind, Disks, Host, HostError, Network,
    ProcessUsage, Processes, SpawnRequest, VmmIdentity, VmmView,
};

/// Where the fake cgroups "live": `<FAKE_CGROUPS>/<name>/cgroup.procs`.
pub const FAKE_CGROUPS: &str = "/fake/cgroup/runv";

/// One fake cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeCgroup {
    /// Its limits.
    pub limits: Limits,
    /// Fake VMM pids in it.
    pub pids: BTreeSet<u32>,
    /// Processes the OOM killer killed in it (its `oom_kill` counter).
    pub oom_kills: u64,
}

/// What the fake host holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Running fake VMMs: pid → the request that started them.
    pub running: BTreeMap<u32, SpawnRequest>,
    /// Every spawn, in order.
    pub spawned: Vec<SpawnRequest>,
    /// Pids killed through [`Processes::kill`].
    pub killed: Vec<u32>,
    /// Files that exist.
    pub files: BTreeMap<PathBuf, u64>,
    /// Directories given to a jail user: path → (uid, gid).
    pub owners: BTreeMap<PathBuf, (u32, u32)>,
    /// Network devices that exist, with their bridge for taps.
    pub links: BTreeMap<String, Option<String>>,
    /// Bridges set up, with their spec.
    pub bridges: Vec<BridgeSpec>,
    /// Every ruleset applied through [`Network::apply_egress`], in order.
    pub egress: Vec<String>,
    /// Paused fake VMMs, by control socket.
    pub paused: BTreeSet<PathBuf>,
    /// Serial bytes written by each fake guest, by control socket.
    pub serial: BTreeMap<PathBuf, u64>,
    /// Control requests received: (socket, op).
    pub requests: Vec<(PathBuf, runv_vmm_api::Request)>,
    /// Every control target asked for (views and requests), in order.
    pub targets: Vec<ControlTarget>,
    /// Control sockets another process serves (a link to another VM's
    /// socket, say): socket → that process's pid.
    pub socket_peers: BTreeMap<PathBuf, u32>,
    /// When set, spawning fails with this message.
    pub fail_spawn: Option<String>,
    /// cgroups that exist, by name.
    pub cgroups: BTreeMap<String, FakeCgroup>,
    /// When set, the node has no usable cgroups, for this reason.
    pub no_cgroups: Option<String>,
    /// When set, creating or limiting a cgroup fails with this OS error.
    pub fail_cgroups: Option<std::io::ErrorKind>,
    /// Every [`Cgroups::kill_all`] of a cgroup with processes in it: its
    /// name and the pids it ended.
    pub cgroup_kills: Vec<(String, Vec<u32>)>,
    next_pid: u32,
}

/// A fake [`Host`].
#[derive(Debug, Default)]
pub struct FakeHost {
    state: Mutex<FakeState>,
}

impl FakeHost {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state, for assertions and changes.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a file exist (a kernel, a base image).
    pub fn add_file(&self, path: impl Into<PathBuf>, size: u64) {
        self.state().files.insert(path.into(), size);
    }

    /// The fake VMM `pid` exits on its own.
    pub fn exit(&self, pid: u32) {
        let mut s = self.state();
        s.running.remove(&pid);
        Self::leave_cgroups(&mut s, pid);
    }

    /// The kernel's OOM killer kills the fake VMM `pid` in its cgroup: the
    /// cgroup's `oom_kill` counter rises and the process is gone, with no
    /// exit record.
    pub fn oom_kill(&self, pid: u32) {
        let mut s = self.state();
        for cg in s.cgroups.values_mut().filter(|cg| cg.pids.contains(&pid)) {
            cg.oom_kills += 1;
        }
        s.running.remove(&pid);
        Self::leave_cgroups(&mut s, pid);
    }

    /// A process that is not a VMM (one a VMM started, say) joins the
    /// cgroup `name`; returns its pid. Only a kill of the cgroup ends it.
    pub fn stray(&self, name: &str) -> u32 {
        let mut s = self.state();
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        s.cgroups
            .entry(name.to_owned())
            .or_default()
            .pids
            .insert(pid);
        pid
    }

    /// From now on the process `pid` (not the VM's VMM) serves `socket`.
    pub fn hijack(&self, socket: &Path, pid: u32) {
        self.state().socket_peers.insert(socket.to_owned(), pid);
    }

    /// A process that ends leaves its cgroup.
    fn leave_cgroups(s: &mut FakeState, pid: u32) {
        for cg in s.cgroups.values_mut() {
            cg.pids.remove(&pid);
        }
    }

    /// The fake guest behind `socket` writes to its console (it booted).
    pub fn boot(&self, socket: &Path) {
        self.state().serial.insert(socket.to_owned(), 100);
    }

    /// The control socket of a running fake VMM, from its config file.
    fn socket_running(s: &FakeState, socket: &Path) -> Option<u32> {
        s.running
            .iter()
            .find(|(_, r)| r.config.parent().is_some_and(|d| socket.starts_with(d)))
            .map(|(pid, _)| *pid)
    }

    /// The running fake VMM behind `target`, checked as the real control
    /// client checks it: whoever serves the socket must be the recorded VMM.
    fn reach(s: &mut FakeState, target: &ControlTarget) -> Result<u32, HostError> {
        s.targets.push(target.clone());
        let socket = &target.socket;
        let served_by = s
            .socket_peers
            .get(socket)
            .copied()
            .or_else(|| Self::socket_running(s, socket));
        match served_by {
            None => Err(HostError::io(
                "connecting to",
                socket,
                std::io::ErrorKind::NotFound.into(),
            )),
            Some(pid) if pid != target.vmm.pid => Err(HostError::ControlSocketMismatch {
                socket: socket.clone(),
                expected_pid: target.vmm.pid,
                found_pid: Some(pid),
                found: format!("another process listens on it: pid {pid} (uid 0)"),
            }),
            Some(pid) => Ok(pid),
        }
    }

    /// Pids of running fake VMMs.
    pub fn running(&self) -> Vec<u32> {
        self.state().running.keys().copied().collect()
    }
}

impl Processes for FakeHost {
    fn spawn(
        &self,
        req: &SpawnRequest,
        files: Vec<std::fs::File>,
    ) -> Result<VmmIdentity, HostError> {
        drop(files);
        let mut s = self.state();
        if let Some(msg) = &s.fail_spawn {
            return Err(HostError::io(
                "spawning",
                &req.vmm,
                std::io::Error::other(msg.clone()),
            ));
        }
        // Join the cgroups first, as the real child does before exec.
        let mut names = Vec::new();
        for procs in &req.cgroup {
            let name = procs
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| s.cgroups.contains_key(n))
                .ok_or_else(|| {
                    HostError::io(
                        "spawning (in its cgroup)",
                        &req.vmm,
                        std::io::ErrorKind::NotFound.into(),
                    )
                })?;
            names.push(name);
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        for n in names {
            if let Some(cg) = s.cgroups.get_mut(&n) {
                cg.pids.insert(pid);
            }
        }
        // Like the real VMM, one whose config says `startPaused` starts paused.
        if let Some(cfg) = std::fs::read_to_string(&req.config)
            .ok()
            .and_then(|t| serde_json::from_str::<runv_vmm_api::VmConfig>(&t).ok())
            .filter(|c| c.start_paused)
            && let Some(socket) = cfg.control_socket
        {
            s.paused.insert(socket);
        }
        s.running.insert(pid, req.clone());
        s.spawned.push(req.clone());
        Ok(VmmIdentity {
            pid,
            start_ticks: u64::from(pid) * 7,
        })
    }

    fn is_alive(&self, id: VmmIdentity) -> bool {
        id.start_ticks == u64::from(id.pid) * 7 && self.state().running.contains_key(&id.pid)
    }

    fn kill(&self, id: VmmIdentity) -> Result<(), HostError> {
        let mut s = self.state();
        if s.running.remove(&id.pid).is_some() {
            s.killed.push(id.pid);
            Self::leave_cgroups(&mut s, id.pid);
        }
        Ok(())
    }

    fn usage(&self, id: VmmIdentity) -> Option<ProcessUsage> {
        self.is_alive(id).then_some(ProcessUsage {
            rss_bytes: 4 << 20,
            cpu_seconds: 0.5,
        })
    }

    /// Never resolves: fake exits are seen by the next reconcile.
    fn exited(&self, _id: VmmIdentity) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }
}

impl Disks for FakeHost {
    fn exists(&self, path: &Path) -> bool {
        self.state().files.contains_key(path)
    }

    fn apparent_size(&self, dir: &Path) -> u64 {
        let s = self.state();
        s.files
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(_, len)| *len)
            .sum()
    }

    /// The allowed-directory rule as the real host has it, on paths alone:
    /// a `..` component counts as leading out; a file the fake has opens
    /// as `/dev/null`.
    fn open_host_file(
        &self,
        allowed: &[PathBuf],
        what: &'static str,
        path: &Path,
    ) -> Result<HostFile, HostFileError> {
        let (root, rest) = super::hostfile::beneath(allowed, what, path)?;
        if rest
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(HostFileError::Escapes {
                path: path.into(),
                root,
                source: std::io::Error::from_raw_os_error(libc::EXDEV),
            });
        }
        if !self.exists(path) {
            return Err(HostFileError::NotFound { path: path.into() });
        }
        let file = std::fs::File::open("/dev/null").map_err(|source| HostFileError::Io {
            path: path.into(),
            source,
        })?;
        Ok(HostFile {
            path: path.into(),
            file,
        })
    }

    fn copy_image(
        &self,
        base: &HostFile,
        dst: &Path,
        _timeout: std::time::Duration,
    ) -> Result<CopyKind, HostError> {
        let base = base.path.as_path();
        let mut s = self.state();
        let size = *s
            .files
            .get(base)
            .ok_or_else(|| HostError::io("opening", base, std::io::ErrorKind::NotFound.into()))?;
        if s.files.contains_key(dst) {
            return Err(HostError::io(
                "creating",
                dst,
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        s.files.insert(dst.to_owned(), size);
        Ok(CopyKind::Sparse)
    }

    fn create_empty(&self, dst: &Path, size: u64) -> Result<(), HostError> {
        let mut s = self.state();
        if s.files.contains_key(dst) {
            return Err(HostError::io(
                "creating",
                dst,
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        s.files.insert(dst.to_owned(), size);
        Ok(())
    }

    fn give_dir(&self, dir: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        self.state().owners.insert(dir.to_owned(), (uid, gid));
        Ok(())
    }
}

impl Network for FakeHost {
    fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<(), HostError> {
        super::check_ifname(&bridge.name)?;
        let mut s = self.state();
        if matches!(s.links.get(&bridge.name), Some(Some(_))) {
            return Err(HostError::Invalid {
                what: "node bridge",
                value: format!("{} exists and is not a bridge", bridge.name),
            });
        }
        s.links.insert(bridge.name.clone(), None);
        if !s.bridges.contains(bridge) {
            s.bridges.push(bridge.clone());
        }
        Ok(())
    }

    fn ensure_tap(&self, tap: &str, bridge: &str) -> Result<(), HostError> {
        super::check_ifname(tap)?;
        let mut s = self.state();
        if !s.links.contains_key(bridge) {
            return Err(HostError::Command {
                command: format!("ip link set {tap} master {bridge}"),
                stderr: format!("Cannot find device \"{bridge}\""),
            });
        }
        s.links.insert(tap.to_owned(), Some(bridge.to_owned()));
        Ok(())
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        self.state().links.remove(tap);
        Ok(())
    }

    fn apply_egress(&self, ruleset: &str) -> Result<(), HostError> {
        self.state().egress.push(ruleset.to_owned());
        Ok(())
    }

    fn link_exists(&self, name: &str) -> bool {
        self.state().links.contains_key(name)
    }
}

impl Control for FakeHost {
    fn view(&self, target: &ControlTarget) -> Result<VmmView, HostError> {
        let mut s = self.state();
        Self::reach(&mut s, target)?;
        let socket = target.socket.as_path();
        let serial = s.serial.get(socket).copied().unwrap_or(0);
        Ok(VmmView {
            paused: s.paused.contains(socket),
            serial_bytes: serial,
            counters: [("serial_tx_bytes_total".to_owned(), serial)].into(),
        })
    }

    fn send(
        &self,
        target: &ControlTarget,
        request: runv_vmm_api::Request,
    ) -> Result<(), HostError> {
        use runv_vmm_api::Request;
        let mut s = self.state();
        let pid = Self::reach(&mut s, target)?;
        let socket = target.socket.as_path();
        s.requests.push((socket.to_owned(), request.clone()));
        match request {
            Request::Pause => {
                s.paused.insert(socket.to_owned());
            }
            Request::Resume => {
                s.paused.remove(socket);
            }
            Request::Kill => {
                s.running.remove(&pid);
                s.paused.remove(socket);
                Self::leave_cgroups(&mut s, pid);
            }
            // The fake guest ignores the power button unless a test exits it.
            _ => {}
        }
        Ok(())
    }
}

impl Cgroups for FakeHost {
    fn available(&self) -> Result<(), HostError> {
        match &self.state().no_cgroups {
            Some(why) => Err(HostError::CgroupsUnavailable(why.clone())),
            None => Ok(()),
        }
    }

    fn ensure(&self, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, HostError> {
        self.available()?;
        let dir = Path::new(FAKE_CGROUPS).join(name);
        let mut s = self.state();
        if let Some(kind) = s.fail_cgroups {
            return Err(HostError::Cgroup {
                what: "creating",
                path: dir,
                source: kind.into(),
            });
        }
        s.cgroups.entry(name.to_owned()).or_default().limits = *limits;
        Ok(vec![dir.join("cgroup.procs")])
    }

    fn current(&self, name: &str) -> Option<Limits> {
        self.state().cgroups.get(name).map(|c| c.limits)
    }

    fn procs(&self, name: &str) -> Vec<u32> {
        self.state()
            .cgroups
            .get(name)
            .map(|c| c.pids.iter().copied().collect())
            .unwrap_or_default()
    }

    fn oom_kills(&self, name: &str) -> Option<u64> {
        self.state().cgroups.get(name).map(|c| c.oom_kills)
    }

    fn kill_all(&self, name: &str) -> Result<(), HostError> {
        let mut s = self.state();
        let Some(cg) = s.cgroups.get_mut(name) else {
            return Ok(());
        };
        let pids: Vec<u32> = std::mem::take(&mut cg.pids).into_iter().collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            s.running.remove(pid);
            Self::leave_cgroups(&mut s, *pid);
        }
        s.cgroup_kills.push((name.to_owned(), pids));
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), HostError> {
        let mut s = self.state();
        if s.cgroups.get(name).is_some_and(|c| !c.pids.is_empty()) {
            return Err(HostError::Cgroup {
                what: "removing",
                path: Path::new(FAKE_CGROUPS).join(name),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        s.cgroups.remove(name);
        Ok(())
    }
}

impl Host for FakeHost {
    fn control(&self) -> &dyn Control {
        self
    }
    fn processes(&self) -> &dyn Processes {
        self
    }
    fn disks(&self) -> &dyn Disks {
        self
    }
    fn network(&self) -> &dyn Network {
        self
    }
    fn cgroups(&self) -> &dyn Cgroups {
        self
    }
}

/// Names of the taps that exist on a fake host.
pub fn taps(host: &FakeHost) -> BTreeSet<String> {
    host.state()
        .links
        .iter()
        .filter(|(_, br)| br.is_some())
        .map(|(n, _)| n.clone())
        .collect()
}

//! In-memory fakes of the host traits, for reconcile tests without root,
//! `/dev/kvm` or `/dev/net/tun`. They record what was asked and let a test
//! make a VMM exit ([`FakeHost::exit`]) or a file appear ([`FakeHost::add_file`]).
//!
//! Test support only: nothing here touches the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    BridgeSpec, Control, CopyKind, Disks, Host, HostError, Network, ProcessUsage, Processes,
    SpawnRequest, VmmIdentity, VmmView,
};

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
    /// Network devices that exist, with their bridge for taps.
    pub links: BTreeMap<String, Option<String>>,
    /// Bridges set up, with their spec.
    pub bridges: Vec<BridgeSpec>,
    /// Paused fake VMMs, by control socket.
    pub paused: BTreeSet<PathBuf>,
    /// Serial bytes written by each fake guest, by control socket.
    pub serial: BTreeMap<PathBuf, u64>,
    /// Control requests received: (socket, op).
    pub requests: Vec<(PathBuf, runv_vmm_api::Request)>,
    /// When set, spawning fails with this message.
    pub fail_spawn: Option<String>,
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
        self.state().running.remove(&pid);
    }

    /// The fake guest behind `socket` writes to its console (it booted).
    pub fn boot(&self, socket: &Path) {
        self.state().serial.insert(socket.to_owned(), 100);
    }

    /// The control socket of a running fake VMM, from its config file.
    fn socket_running(s: &FakeState, socket: &Path) -> Option<u32> {
        s.running
            .iter()
            .find(|(_, r)| r.config.parent() == socket.parent())
            .map(|(pid, _)| *pid)
    }

    /// Pids of running fake VMMs.
    pub fn running(&self) -> Vec<u32> {
        self.state().running.keys().copied().collect()
    }
}

impl Processes for FakeHost {
    fn spawn(&self, req: &SpawnRequest) -> Result<VmmIdentity, HostError> {
        let mut s = self.state();
        if let Some(msg) = &s.fail_spawn {
            return Err(HostError::io(
                "spawning",
                &req.vmm,
                std::io::Error::other(msg.clone()),
            ));
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
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
        }
        Ok(())
    }

    fn usage(&self, id: VmmIdentity) -> Option<ProcessUsage> {
        self.is_alive(id).then_some(ProcessUsage {
            rss_bytes: 4 << 20,
            cpu_seconds: 0.5,
        })
    }
}

impl Disks for FakeHost {
    fn exists(&self, path: &Path) -> bool {
        self.state().files.contains_key(path)
    }

    fn copy_image(&self, base: &Path, dst: &Path) -> Result<CopyKind, HostError> {
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
}

impl Network for FakeHost {
    fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<(), HostError> {
        super::check_ifname(&bridge.name)?;
        let mut s = self.state();
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

    fn link_exists(&self, name: &str) -> bool {
        self.state().links.contains_key(name)
    }
}

impl Control for FakeHost {
    fn view(&self, socket: &Path) -> Option<VmmView> {
        let s = self.state();
        Self::socket_running(&s, socket)?;
        let serial = s.serial.get(socket).copied().unwrap_or(0);
        Some(VmmView {
            paused: s.paused.contains(socket),
            serial_bytes: serial,
            counters: [("serial_tx_bytes_total".to_owned(), serial)].into(),
        })
    }

    fn send(&self, socket: &Path, request: runv_vmm_api::Request) -> Result<(), HostError> {
        use runv_vmm_api::Request;
        let mut s = self.state();
        let pid = Self::socket_running(&s, socket).ok_or_else(|| {
            HostError::io(
                "control socket",
                socket,
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
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
            }
            // The fake guest ignores the power button unless a test exits it.
            _ => {}
        }
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

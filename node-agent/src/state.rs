//! The agent's state directory and one directory per VM in it.
//!
//! ```text
//! <root>/ipam.json                 node-local IPAM (host::ipam)
//! <root>/vms/<ns>_<name>/vm.json    who the VM is and which VMM process runs it
//!                      config.json  the runv-vmm config
//!                      cgroup.json  the cgroup its running VMM was given, with its limits
//!                      net.json     its tenant and Nat interfaces (tap, MAC, address):
//!                                   what the node's egress rules are rebuilt from
//!                      jail.json    the uid/gid of its jailed VMM (crate::jail)
//!                      claim.json   the place it holds on the node, written when
//!                                   it is admitted (crate::reconcile::admit)
//!                      run/         what the VMM writes itself: ctl.sock (control
//!                                   socket), ctl.sock.exit (exit record), vsock.sock
//!                      serial.log   console output (serial.log.1: the previous part)
//!                      vmm.log      the VMM's stdout and stderr
//!                      disks/       private disk copies and empty disks
//! ```
//!
//! `vm.json` holds the VMM's pid and kernel start time, so a restarted agent
//! re-adopts the running process and never starts a second one. A jailed VMM
//! has the VM directory as its root and owns `run/` only: everything else
//! there stays root's, so a compromised VMM cannot plant links the agent
//! would follow when it writes or rotates its files; what the agent reads
//! from `run/` it reads without following links. This module owns the
//! layout and what its files say; it does not start or stop anything, and
//! it writes and removes through [`crate::host::files`], never itself.

use std::path::{Path, PathBuf};

use runv_vmm_api::{ExitRecord, VmConfig};
use serde::{Deserialize, Serialize};

use crate::host::cgroup::Limits;
pub use crate::host::files::write_atomic;
use crate::host::{HostError, VmmIdentity, files};
use crate::reconcile::admit::Claim;

/// Longest unix socket path Linux accepts (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Longest exit record read (the VMM writes one short line).
const MAX_EXIT_FILE: u64 = 64 * 1024;

impl VmRecord {
    /// Whether this is the record of MicroVM `namespace/name` with `uid`
    /// (an empty uid, in standalone mode, matches any).
    pub fn belongs_to(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.namespace == namespace
            && self.name == name
            && (uid.is_empty() || self.uid.is_empty() || self.uid == uid)
    }
}

/// Who a VM directory belongs to and which VMM runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// Namespace of the MicroVM.
    pub namespace: String,
    /// Name of the MicroVM.
    pub name: String,
    /// Its uid (empty in standalone mode).
    #[serde(default)]
    pub uid: String,
    /// The running (or last) VMM process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmIdentity>,
    /// When that VMM was started, Unix milliseconds.
    #[serde(default)]
    pub started_at_ms: i64,
    /// The `metadata.generation` the VMM was started for.
    #[serde(default)]
    pub generation: i64,
    /// When the guest was first seen booted in this run, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_at_ms: Option<i64>,
    /// When the agent asked the guest to power off, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_at_ms: Option<i64>,
    /// The agent ended (or is ending) this run itself.
    #[serde(default)]
    pub stop_requested: bool,
    /// When the agent first saw this run ended, Unix milliseconds (for an exit
    /// without an exit file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_seen_ms: Option<i64>,
    /// The `oom_kill` count of the VM's cgroup when this VMM started (`None`:
    /// no cgroup of its own, or a kernel without the counter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills_at_start: Option<u64>,
    /// This run ended without an exit file and the count had risen by then:
    /// the OOM killer ended it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

/// One VM's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDir {
    dir: PathBuf,
}

/// What the VM's running VMM was given: its cgroup and that cgroup's limits
/// (`cgroup.json`, written at start; absent: no cgroup of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupRecord {
    /// The cgroup's name.
    pub name: String,
    /// Its limits.
    pub limits: Limits,
}

/// Creates the state directory `root` (and `vms/` in it).
pub fn create_root(root: &Path) -> Result<(), HostError> {
    files::create_dir(&root.join("vms"))
}

/// The directory name of a VM: `<ns>_<name>` (neither may contain `_`), or,
/// when that would make the control socket path too long, a prefix plus a hash.
pub fn dir_name(namespace: &str, name: &str) -> String {
    let plain = format!("{namespace}_{name}");
    if plain.len() <= 40 {
        return plain;
    }
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in plain.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{h:016x}", &plain[..23])
}

impl VmDir {
    /// The directory of `namespace/name` under `root`.
    pub fn new(root: &Path, namespace: &str, name: &str) -> Self {
        Self {
            dir: root.join("vms").join(dir_name(namespace, name)),
        }
    }

    /// An existing directory.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (and `disks/`, `run/`), checking the socket path fits.
    pub fn create(&self) -> Result<(), HostError> {
        let sock = self.control_socket();
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HostError::Invalid {
                what: "state directory (the control socket path is too long)",
                value: sock.display().to_string(),
            });
        }
        files::create_dir(&self.disks())?;
        files::create_dir(&self.run_dir())
    }

    /// `vm.json`.
    pub fn record_path(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// `cgroup.json`: the cgroup of the running VMM.
    pub fn cgroup_record_path(&self) -> PathBuf {
        self.dir.join("cgroup.json")
    }
    /// `taps.json`: the tap devices the agent created for this VM.
    pub fn taps_path(&self) -> PathBuf {
        self.dir.join("taps.json")
    }
    /// `image.json`: the container image the VM's root filesystem disk is
    /// made from ([`crate::images::ImageRecord`]).
    pub fn image_record_path(&self) -> PathBuf {
        self.dir.join("image.json")
    }
    /// `container/run.json`: what the guest reported of the container's
    /// current run (`host::guest::RunRecord`).
    pub fn container_run(&self) -> PathBuf {
        self.dir.join("container/run.json")
    }

    /// The run record of the container's previous run.
    pub fn container_run_previous(&self) -> PathBuf {
        self.dir.join("container/previous.json")
    }

    /// The container's log (CRI format), rotated as `current.log.N`.
    pub fn container_log(&self) -> PathBuf {
        self.dir.join("container/current.log")
    }

    /// The previous run's log.
    pub fn container_log_previous(&self) -> PathBuf {
        self.dir.join("container/previous.log")
    }

    /// `container.json`: the merged container config for the guest
    /// (`runv_image::container`'s versioned format).
    pub fn container_config(&self) -> PathBuf {
        self.dir.join("container.json")
    }
    /// `jail.json`: the VM's jail uid and gid.
    pub fn jail_ids(&self) -> PathBuf {
        self.dir.join("jail.json")
    }
    /// `run/`: the sockets and the exit file, the one directory a jailed VMM
    /// may write to (it owns it).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// The control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("ctl.sock")
    }
    /// The exit file (the VMM's default: next to the control socket).
    pub fn exit_file(&self) -> PathBuf {
        self.run_dir().join("ctl.sock.exit")
    }
    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// The previous part of the serial log.
    pub fn serial_log_old(&self) -> PathBuf {
        self.dir.join("serial.log.1")
    }
    /// The VMM's own output.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// The hybrid vsock socket; host services for guest port P listen on
    /// `vsock.sock_P` beside it (reachable to a jailed VMM when its jail
    /// user may write to that socket).
    pub fn vsock(&self) -> PathBuf {
        self.run_dir().join("vsock.sock")
    }
    /// Disk files.
    pub fn disks(&self) -> PathBuf {
        self.dir.join("disks")
    }
    /// The private file of disk `name`.
    pub fn disk(&self, name: &str) -> PathBuf {
        self.disks().join(format!("{name}.img"))
    }

    /// Reads `vm.json`; `None` when it does not exist or cannot be parsed.
    pub fn read_record(&self) -> Option<VmRecord> {
        let text = std::fs::read_to_string(self.record_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Why `vm.json` exists but cannot be read as a record, if it does.
    pub fn record_unreadable(&self) -> Option<String> {
        let path = self.record_path();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(format!("{}: {e}", path.display())),
        };
        serde_json::from_slice::<VmRecord>(&text).err().map(|e| {
            format!(
                "{} is not a valid record ({e}): a VMM may still run for this VM, so none is started; \
                 end any runv-vmm of this VM, then remove the file or delete the MicroVM",
                path.display()
            )
        })
    }

    /// Writes `vm.json` atomically.
    pub fn write_record(&self, record: &VmRecord) -> Result<(), HostError> {
        let text = serde_json::to_vec_pretty(record).unwrap_or_default();
        write_atomic(&self.record_path(), &text)
    }

    /// The VMM config the running (or last) VMM was started with; `None`
    /// when absent or unreadable.
    pub fn read_config(&self) -> Option<VmConfig> {
        let text = std::fs::read_to_string(self.config()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The image record; `None` when absent or unreadable.
    pub fn read_image_record(&self) -> Option<crate::images::ImageRecord> {
        let text = std::fs::read_to_string(self.image_record_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `image.json` atomically.
    pub fn write_image_record(&self, record: &crate::images::ImageRecord) -> Result<(), HostError> {
        let text = serde_json::to_string_pretty(record).unwrap_or_default();
        write_atomic(&self.image_record_path(), text.as_bytes())
    }

    /// Writes `config.json` atomically.
    pub fn write_config(&self, config: &VmConfig) -> Result<(), HostError> {
        let text = serde_json::to_string_pretty(config).unwrap_or_default();
        write_atomic(&self.config(), text.as_bytes())
    }

    /// Reads `cgroup.json`; `None` when absent (no cgroup) or unreadable.
    pub fn read_cgroup_record(&self) -> Option<CgroupRecord> {
        let text = std::fs::read_to_string(self.cgroup_record_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The tap devices the agent created for this VM (`taps.json`); `None`
    /// when the VM has no such record (never started, or started by an agent
    /// from before taps were recorded).
    pub fn read_taps(&self) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.taps_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// `claim.json`: the place the VM holds on the node.
    pub fn claim_path(&self) -> PathBuf {
        self.dir.join("claim.json")
    }

    /// The VM's claim; `None` when it has none (never admitted, or admitted
    /// by an agent from before claims were written).
    pub fn read_claim(&self) -> Option<Claim> {
        let text = std::fs::read_to_string(self.claim_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `claim.json` atomically.
    pub fn write_claim(&self, claim: &Claim) -> Result<(), HostError> {
        let text = serde_json::to_vec(claim).unwrap_or_default();
        write_atomic(&self.claim_path(), &text)
    }

    /// Writes `taps.json` atomically.
    pub fn write_taps(&self, taps: &[String]) -> Result<(), HostError> {
        let text = serde_json::to_vec(taps).unwrap_or_default();
        write_atomic(&self.taps_path(), &text)
    }

    /// `net.json`: the VM's tenant and `Nat` interfaces, for the egress rules.
    pub fn net_path(&self) -> PathBuf {
        self.dir.join("net.json")
    }

    /// The VM's network record (`net.json`), if it has a readable one.
    pub fn read_net(&self) -> Option<NetRecord> {
        let text = std::fs::read_to_string(self.net_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `net.json` atomically.
    pub fn write_net(&self, record: &NetRecord) -> Result<(), HostError> {
        let text = serde_json::to_vec(record).unwrap_or_default();
        write_atomic(&self.net_path(), &text)
    }

    /// Removes `net.json` (a missing one is not an error).
    pub fn remove_net(&self) -> Result<(), HostError> {
        files::remove_file(&self.net_path())
    }

    /// Writes `cgroup.json` atomically.
    pub fn write_cgroup_record(&self, record: &CgroupRecord) -> Result<(), HostError> {
        let text = serde_json::to_vec(record).unwrap_or_default();
        write_atomic(&self.cgroup_record_path(), &text)
    }

    /// Removes `cgroup.json`: the next VMM runs without a cgroup of its own.
    pub fn remove_cgroup_record(&self) -> Result<(), HostError> {
        files::remove_file(&self.cgroup_record_path())
    }

    /// When the VMM wrote its exit file, if it did.
    pub fn exit_written_at(&self) -> Option<std::time::SystemTime> {
        std::fs::symlink_metadata(self.exit_file())
            .and_then(|m| m.modified())
            .ok()
    }

    /// The exit record the VMM left, if any. `run/` belongs to the VMM, so
    /// only a regular file is read (no link, no FIFO), and at most 64 KiB.
    pub fn read_exit(&self) -> Option<ExitRecord> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.exit_file())
            .ok()?;
        if !f.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        f.take(MAX_EXIT_FILE).read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Removes what one VMM run leaves behind before the next run starts
    /// (and where an agent from before `run/` had them).
    pub fn clear_run_files(&self) -> Result<(), HostError> {
        let legacy = ["ctl.sock", "ctl.sock.exit", "vsock.sock"].map(|f| self.dir.join(f));
        for p in [self.exit_file(), self.control_socket(), self.vsock()]
            .into_iter()
            .chain(legacy)
        {
            files::remove_file(&p)?;
        }
        Ok(())
    }

    /// Forgets a finished run: its run files, its record and its serial
    /// output. Keeps the disks, the config and the jail ids.
    pub fn forget_run(&self) -> Result<(), HostError> {
        self.clear_run_files()?;
        for p in [self.record_path(), self.serial_log(), self.serial_log_old()] {
            files::remove_file(&p)?;
        }
        Ok(())
    }

    /// Removes the whole directory.
    pub fn remove(&self) -> Result<(), HostError> {
        files::remove_dir_all(&self.dir)
    }

    /// Keeps the serial log under about `2 * limit` bytes: once it passes
    /// `limit`, its content moves to `serial.log.1` and it is truncated. The VMM
    /// appends (O_APPEND), so its next write lands at the new end.
    pub fn rotate_serial(&self, limit: u64) -> Result<bool, HostError> {
        let log = self.serial_log();
        let len = match log.metadata() {
            Ok(m) => m.len(),
            Err(_) => return Ok(false),
        };
        if len <= limit {
            return Ok(false);
        }
        files::rotate(&log, &self.serial_log_old())?;
        Ok(true)
    }

    /// The kept serial output: the previous part, then the current one.
    pub fn read_serial(&self) -> Vec<u8> {
        let mut out = std::fs::read(self.serial_log_old()).unwrap_or_default();
        out.extend(std::fs::read(self.serial_log()).unwrap_or_default());
        out
    }
}

/// Every VM directory under `root`.
pub fn dirs(root: &Path) -> Vec<VmDir> {
    let Ok(entries) = std::fs::read_dir(root.join("vms")) else {
        return Vec::new();
    };
    let mut out: Vec<VmDir> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| VmDir::at(e.path()))
        .collect();
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

/// Every VM directory under `root` with a readable record.
pub fn list(root: &Path) -> Vec<(VmDir, VmRecord)> {
    let Ok(entries) = std::fs::read_dir(root.join("vms")) else {
        return Vec::new();
    };
    let mut out: Vec<(VmDir, VmRecord)> = entries
        .filter_map(Result::ok)
        .map(|e| VmDir::at(e.path()))
        .filter_map(|d| d.read_record().map(|r| (d, r)))
        .collect();
    out.sort_by(|a, b| a.0.path().cmp(b.0.path()));
    out
}

/// A VM's tenant and its `Nat` interfaces, as the agent wired them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetRecord {
    /// Namespace of the MicroVM.
    pub namespace: String,
    /// Name of the MicroVM.
    pub name: String,
    /// The tenant the VM belongs to (see `runtime::tenant_of`).
    pub tenant: String,
    /// Its `Nat` interfaces.
    pub interfaces: Vec<NetInterface>,
}

/// One `Nat` interface of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetInterface {
    /// The interface's name in the spec.
    pub name: String,
    /// Its tap on the bridge.
    pub tap: String,
    /// The guest's MAC, lower case.
    pub mac: String,
    /// The guest's address.
    pub ip: std::net::Ipv4Addr,
}

/// Every VM directory under `root` with a network record (whether or not a
/// VMM was ever recorded for it), in directory order.
pub fn list_net(root: &Path) -> Vec<(VmDir, NetRecord)> {
    let Ok(entries) = std::fs::read_dir(root.join("vms")) else {
        return Vec::new();
    };
    let mut out: Vec<(VmDir, NetRecord)> = entries
        .filter_map(Result::ok)
        .map(|e| VmDir::at(e.path()))
        .filter_map(|d| d.read_net().map(|r| (d, r)))
        .collect();
    out.sort_by(|a, b| a.0.path().cmp(b.0.path()));
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn layout_record_and_listing() {
        let root = tempfile::tempdir().unwrap();
        let d = VmDir::new(root.path(), "default", "hello");
        assert!(d.path().ends_with("vms/default_hello"));
        d.create().unwrap();
        assert!(d.run_dir().is_dir() && d.disks().is_dir());
        for p in [d.control_socket(), d.exit_file(), d.vsock()] {
            assert_eq!(p.parent(), Some(d.run_dir().as_path()), "{}", p.display());
        }
        assert!(d.read_record().is_none());
        let rec = VmRecord {
            namespace: "default".into(),
            name: "hello".into(),
            uid: "u1".into(),
            vmm: Some(VmmIdentity {
                pid: 42,
                start_ticks: 9,
            }),
            started_at_ms: 1000,
            generation: 3,
            booted_at_ms: None,
            shutdown_at_ms: None,
            stop_requested: false,
            exit_seen_ms: None,
            oom_kills_at_start: Some(0),
            oom_killed: false,
        };
        d.write_record(&rec).unwrap();
        assert_eq!(d.read_record(), Some(rec.clone()));
        let all = list(root.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, rec);
        std::fs::write(
            d.exit_file(),
            r#"{"reason":"powerOff","exitCode":0,"message":"bye"}"#,
        )
        .unwrap();
        assert_eq!(d.read_exit().unwrap().message, "bye");
        d.clear_run_files().unwrap();
        assert!(d.read_exit().is_none());
        // run/ is the VMM's: a link or a FIFO there is never followed or read.
        let elsewhere = root.path().join("elsewhere.json");
        std::fs::write(
            &elsewhere,
            r#"{"reason":"powerOff","exitCode":0,"message":"not mine"}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.exit_file()).unwrap();
        assert!(d.read_exit().is_none());
        d.clear_run_files().unwrap();
        assert!(elsewhere.exists(), "removing the link keeps its target");
        let made = std::process::Command::new("mkfifo")
            .arg(d.exit_file())
            .status()
            .unwrap();
        assert!(made.success());
        assert!(d.read_exit().is_none(), "a FIFO must not block the agent");
        d.clear_run_files().unwrap();
        d.remove().unwrap();
        assert!(!d.path().exists());
        d.remove().unwrap();
    }

    #[test]
    fn long_names_are_hashed_and_distinct() {
        let a = dir_name("team-payments-production", &"x".repeat(200));
        let b = dir_name("team-payments-production", &"y".repeat(200));
        assert!(a.len() <= 40 && b.len() <= 40);
        assert_ne!(a, b);
        assert_eq!(a, dir_name("team-payments-production", &"x".repeat(200)));
    }

    #[test]
    fn serial_log_stays_bounded() {
        let root = tempfile::tempdir().unwrap();
        let d = VmDir::new(root.path(), "ns", "vm");
        d.create().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.serial_log())
            .unwrap();
        for i in 0..100 {
            writeln!(f, "line {i:04} {}", "x".repeat(90)).unwrap();
            d.rotate_serial(1000).unwrap();
            let total = d.serial_log().metadata().unwrap().len()
                + d.serial_log_old().metadata().map_or(0, |m| m.len());
            assert!(total <= 2 * 1000 + 200, "{total}");
        }
        let text = String::from_utf8(d.read_serial()).unwrap();
        assert!(
            text.ends_with(&format!("line 0099 {}\n", "x".repeat(90))),
            "{text}"
        );
        assert!(!text.contains("line 0000"));
    }
}

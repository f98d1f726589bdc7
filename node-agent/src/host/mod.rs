//! Host side effects, behind traits: VMM processes ([`Processes`]), disk images
//! ([`Disks`]), networking ([`Network`], its rules rendered by [`egress`]),
//! per-VM cgroups ([`Cgroups`]) and the VMMs' control sockets ([`Control`],
//! speaking [`vmm_client`]), plus the node-local IPAM ([`ipam`]), the
//! agent's own files ([`files`]) and the guest kit's initramfs ([`guestkit`],
//! laid out by [`initramfs`]).
//!
//! Reconcile logic talks to a [`Host`] only, so it runs against the in-memory
//! fakes in `fake` (built for tests and with the `testing` feature) without
//! root, `/dev/kvm` or `/dev/net/tun`. The real Linux implementations live in
//! [`process`], [`disk`], [`net`], [`cgroup`] and [`control`]; nothing outside
//! this module makes a syscall with a side effect on the node (the state
//! directory writes through [`files`]).
//!
//! This module is the bottom layer: it depends on nothing else in the agent
//! and knows no API type (`runv_crds`); callers convert what a spec asks for
//! into host terms (such as [`cgroup::Limits`]). Tests below hold the agent
//! to both rules.

pub mod cgroup;
pub mod control;
pub mod disk;
pub mod egress;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod files;
pub mod guest;
pub mod guestkit;
pub mod hostfile;
pub mod initramfs;
pub mod ipam;
pub mod logs;
pub mod net;
pub mod process;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vmm_client;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A filesystem or process operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or program involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A host command (`ip`, `iptables`) failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A call on a VMM's control socket failed.
    #[error("control socket {}", socket.display())]
    Client {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        source: vmm_client::ClientError,
    },
    /// A state file of the agent's cannot be parsed.
    #[error("parsing {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The process is not the VMM that was recorded (gone, or its pid reused).
    #[error("process {0} is not the recorded VMM")]
    NotOurs(u32),
    /// A VMM's control socket is not served by the VMM the agent recorded (a
    /// link, not a socket, or another process listens): nothing was sent.
    #[error("control socket {} is not the recorded VMM's (pid {expected_pid}): {found}", socket.display())]
    ControlSocketMismatch {
        /// The socket.
        socket: PathBuf,
        /// The pid of the recorded VMM.
        expected_pid: u32,
        /// The pid of the process that listens on it, when one does.
        found_pid: Option<u32>,
        /// What was found instead, for people.
        found: String,
    },
    /// A name or value the host cannot use.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What kind of value.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The node-local address pool has no free address.
    #[error("no free address left in {0}")]
    PoolExhausted(String),
    /// A cgroup could not be created, limited or removed.
    #[error("cgroup: {what} {}", path.display())]
    Cgroup {
        /// What was being done.
        what: &'static str,
        /// The cgroup file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// This node has no cgroups the agent can use.
    #[error("{0}")]
    CgroupsUnavailable(String),
    /// A disk is larger than the node allows one to be.
    #[error(
        "{field} is {size} bytes, more than this node's limit of {limit} bytes per disk \
         (runv-agent --max-disk-size)"
    )]
    DiskTooLarge {
        /// The spec field the size comes from.
        field: String,
        /// The disk's size.
        size: u64,
        /// The node's limit.
        limit: u64,
    },
    /// The VM's new disks do not fit in what is left of the node's ephemeral
    /// storage for VM disks.
    #[error(
        "the VM's new disks need {needed} bytes, and the node's VM disks already take {used} \
         of its {capacity} bytes of ephemeral storage (runv-agent --ephemeral-storage)"
    )]
    OutOfStorage {
        /// What this VM's disks not yet created need.
        needed: u64,
        /// What every VM's disks on the node may grow to now.
        used: u64,
        /// The node's ephemeral storage for VM disks.
        capacity: u64,
    },
    /// A disk copy did not finish in the time the node allows; nothing of it is left.
    #[error(
        "copying {} did not finish within {}s (runv-agent --disk-copy-timeout); the partial copy was removed",
        path.display(), after.as_secs()
    )]
    CopyTimedOut {
        /// The disk being written.
        path: PathBuf,
        /// The time allowed.
        after: std::time::Duration,
    },
}

impl HostError {
    /// An [`HostError::Io`] from its parts.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// Whether this is a cgroup failure: limits asked for cannot be enforced.
    pub fn is_cgroup(&self) -> bool {
        matches!(self, Self::Cgroup { .. } | Self::CgroupsUnavailable(_))
    }

    /// Whether a control socket turned out not to be the recorded VMM's.
    pub fn is_control_mismatch(&self) -> bool {
        matches!(self, Self::ControlSocketMismatch { .. })
    }
}

/// Identifies one VMM process beyond its pid: the kernel's start time of the
/// process (clock ticks since boot, `/proc/PID/stat` field 22), so a recycled
/// pid is never mistaken for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmmIdentity {
    /// Process id.
    pub pid: u32,
    /// Process start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// What the agent asks when it spawns a VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnRequest {
    /// The `runv-vmm` binary.
    pub vmm: PathBuf,
    /// The config file it gets with `--config`.
    pub config: PathBuf,
    /// Where its stdout and stderr go (appended).
    pub log: PathBuf,
    /// `cgroup.procs` files (one per hierarchy) the VMM joins before it execs;
    /// empty: it stays in the agent's cgroup.
    pub cgroup: Vec<PathBuf>,
}

/// The descriptor number a VMM inherits the first of its passed files at.
pub const FIRST_PASSED_FD: i32 = 3;

/// Spawning, finding and killing VMM processes. A spawned VMM is its own
/// session and process group, so it outlives the agent.
pub trait Processes: Send + Sync {
    /// Starts a VMM and returns its identity. It inherits `files` as
    /// descriptors numbered from [`FIRST_PASSED_FD`], in order.
    fn spawn(
        &self,
        req: &SpawnRequest,
        files: Vec<std::fs::File>,
    ) -> Result<VmmIdentity, HostError>;
    /// Whether the process still runs and is the same process (not a reused pid).
    /// A zombie child counts as exited and is reaped.
    fn is_alive(&self, id: VmmIdentity) -> bool;
    /// Sends SIGKILL to the VMM, if it is still the recorded process.
    fn kill(&self, id: VmmIdentity) -> Result<(), HostError>;
    /// Resident memory and CPU time of the process, when it runs.
    fn usage(&self, id: VmmIdentity) -> Option<ProcessUsage>;
    /// A future that resolves once the VMM has exited (at once if it does not
    /// run, or its pid is another process now). Awaited on a tokio runtime.
    fn exited(&self, id: VmmIdentity) -> futures::future::BoxFuture<'static, ()>;
}

/// Resource use of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessUsage {
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time in seconds.
    pub cpu_seconds: f64,
}

/// How a disk image was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// A copy-on-write clone (FICLONE): no data copied.
    Reflink,
    /// A sparse copy: zero blocks left as holes.
    Sparse,
}

/// Disk images, and the one directory of a VM its jailed VMM owns.
pub trait Disks: Send + Sync {
    /// Whether a regular file exists at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// The sum of the lengths of the regular files directly in `dir` (what
    /// its sparse disks may grow to); 0 when it does not exist.
    fn apparent_size(&self, dir: &Path) -> u64;
    /// Opens a file a spec names, only beneath one of `allowed` and only if
    /// it is a regular file ([`hostfile::open`]); `what` names the kind of
    /// file in a refusal.
    fn open_host_file(
        &self,
        allowed: &[PathBuf],
        what: &'static str,
        path: &Path,
    ) -> Result<hostfile::HostFile, hostfile::HostFileError>;
    /// A private copy of `base` (opened by [`Disks::open_host_file`]) at
    /// `dst`: reflink where the filesystem can, else a sparse copy, given up
    /// (and removed) when it takes longer than `timeout`. `dst` must not exist.
    fn copy_image(
        &self,
        base: &hostfile::HostFile,
        dst: &Path,
        timeout: std::time::Duration,
    ) -> Result<CopyKind, HostError>;
    /// A new sparse zero-filled file of `size` bytes at `dst`. `dst` must not exist.
    fn create_empty(&self, dst: &Path, size: u64) -> Result<(), HostError>;
    /// Gives the directory `dir` (a VM's `run/`) to a jail's `uid`/`gid`,
    /// mode 0700. Refuses anything but a directory; follows no link.
    fn give_dir(&self, dir: &Path, uid: u32, gid: u32) -> Result<(), HostError>;
}

/// The node's bridge with its gateway address and NAT to the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Bridge device name (at most 15 bytes).
    pub name: String,
    /// The bridge's own address, the guests' gateway.
    pub gateway: std::net::Ipv4Addr,
    /// Prefix length of the guest subnet.
    pub prefix: u8,
}

/// Node networking for `Nat` interfaces.
pub trait Network: Send + Sync {
    /// Creates the bridge if missing, gives it the gateway address, brings it up,
    /// and masquerades traffic from the subnet leaving through other interfaces.
    /// Idempotent.
    fn ensure_bridge(&self, bridge: &BridgeSpec) -> Result<(), HostError>;
    /// Creates a persistent tap owned by the VMM-to-be, attached to `bridge` and
    /// up. Idempotent.
    fn ensure_tap(&self, tap: &str, bridge: &str) -> Result<(), HostError>;
    /// Deletes the tap; a missing tap is not an error.
    fn delete_tap(&self, tap: &str) -> Result<(), HostError>;
    /// Whether a network device of this name exists.
    fn link_exists(&self, name: &str) -> bool;
    /// Replaces the agent's own nftables tables with `ruleset` (rendered by
    /// [`egress::render`]) in one transaction: all of it holds, or none of it
    /// changed. Touches no other table.
    fn apply_egress(&self, ruleset: &str) -> Result<(), HostError>;
}

/// What a running VMM says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmView {
    /// The vCPUs are paused.
    pub paused: bool,
    /// Bytes the guest wrote to its serial console (the boot signal: see docs/agent.md).
    pub serial_bytes: u64,
    /// Every counter the VMM exports.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Which VMM the agent means to reach through a control socket: the socket
/// lives in a directory the (jailed) VMM owns, so what listens there is
/// checked against the VMM the agent recorded before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlTarget {
    /// The control socket (`run/ctl.sock` in the VM's directory).
    pub socket: PathBuf,
    /// The VMM process recorded for the VM (`vm.json`).
    pub vmm: VmmIdentity,
    /// The uid of its jail, when it was started jailed.
    pub jail_uid: Option<u32>,
}

/// A VMM's control socket. Every call first checks that the socket is served
/// by `target.vmm` (see [`control`]); when it is not, it fails with
/// [`HostError::ControlSocketMismatch`] and sends nothing.
pub trait Control: Send + Sync {
    /// State and counters. An error other than a mismatch means the VMM does
    /// not answer (yet).
    fn view(&self, target: &ControlTarget) -> Result<VmmView, HostError>;
    /// Sends pause, resume, shutdown or kill.
    fn send(&self, target: &ControlTarget, request: runv_vmm_api::Request)
    -> Result<(), HostError>;
}

/// Per-VM cgroups under the agent's parent cgroup. A VM's cgroup is named
/// after the VM and outlives its VMM (restarts and re-adoption reuse it);
/// processes join it themselves when spawned (see [`SpawnRequest::cgroup`]).
pub trait Cgroups: Send + Sync {
    /// `Ok` when this node has cgroups the agent can use, else why not.
    fn available(&self) -> Result<(), HostError>;
    /// Creates the cgroup if missing and sets its limits (only what differs;
    /// `None` fields mean unlimited). Never moves a process. Returns the
    /// `cgroup.procs` files a new process writes to join it.
    fn ensure(&self, name: &str, limits: &cgroup::Limits) -> Result<Vec<PathBuf>, HostError>;
    /// The limits the cgroup has now; `None` when it does not exist.
    fn current(&self, name: &str) -> Option<cgroup::Limits>;
    /// The processes in the cgroup.
    fn procs(&self, name: &str) -> Vec<u32>;
    /// How many processes the kernel's OOM killer has killed in the cgroup
    /// since it was created (v2 `memory.events`, v1 `memory.oom_control`,
    /// `oom_kill`); `None` when the cgroup or the counter does not exist.
    fn oom_kills(&self, name: &str) -> Option<u64>;
    /// Ends every process in the cgroup with SIGKILL (the VMM and whatever
    /// it started) and waits, about a second at most, until none is left:
    /// one write to `cgroup.kill` where the kernel has it (v2, Linux 5.14),
    /// else a SIGKILL to each member of `cgroup.procs` (of every hierarchy),
    /// round after round. A missing cgroup is not an error.
    fn kill_all(&self, name: &str) -> Result<(), HostError>;
    /// Removes the cgroup (a missing one is not an error); fails while a
    /// process is still in it.
    fn remove(&self, name: &str) -> Result<(), HostError>;
}

/// Everything on the host the agent changes, in one handle.
pub trait Host: Send + Sync {
    /// VMM control sockets.
    fn control(&self) -> &dyn Control;
    /// VMM processes.
    fn processes(&self) -> &dyn Processes;
    /// Disk images.
    fn disks(&self) -> &dyn Disks;
    /// Networking.
    fn network(&self) -> &dyn Network;
    /// cgroups.
    fn cgroups(&self) -> &dyn Cgroups;
}

/// The real Linux host.
#[derive(Debug, Default)]
pub struct LinuxHost {
    control: control::SocketControl,
    processes: process::LinuxProcesses,
    disks: disk::LinuxDisks,
    network: net::IpNetwork,
    cgroups: cgroup::LinuxCgroups,
}

impl LinuxHost {
    /// A host whose networking runs in the network namespace `netns` (`None`:
    /// the agent's own).
    pub fn new(netns: Option<String>) -> Self {
        Self {
            control: control::SocketControl,
            processes: process::LinuxProcesses,
            disks: disk::LinuxDisks,
            network: net::IpNetwork::new(netns),
            cgroups: cgroup::LinuxCgroups::default(),
        }
    }

    /// The same host with the VMs' cgroups where `config` says (detected now).
    pub fn with_cgroups(mut self, config: &cgroup::CgroupConfig) -> Self {
        self.cgroups = cgroup::LinuxCgroups::detect(config);
        self
    }

    /// The cgroups as detected, for logs.
    pub fn describe_cgroups(&self) -> String {
        self.cgroups.describe()
    }
}

impl Host for LinuxHost {
    fn control(&self) -> &dyn Control {
        &self.control
    }
    fn processes(&self) -> &dyn Processes {
        &self.processes
    }
    fn disks(&self) -> &dyn Disks {
        &self.disks
    }
    fn network(&self) -> &dyn Network {
        &self.network
    }
    fn cgroups(&self) -> &dyn Cgroups {
        &self.cgroups
    }
}

/// Checks a Linux interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`.
pub fn check_ifname(name: &str) -> Result<(), HostError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(HostError::Invalid {
            what: "interface name",
            value: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    /// Every source file of this module, by name.
    const SOURCES: &[(&str, &str)] = &[
        ("cgroup.rs", include_str!("cgroup.rs")),
        ("control.rs", include_str!("control.rs")),
        ("disk.rs", include_str!("disk.rs")),
        ("egress.rs", include_str!("egress.rs")),
        ("fake.rs", include_str!("fake.rs")),
        ("files.rs", include_str!("files.rs")),
        ("guest.rs", include_str!("guest.rs")),
        ("guestkit.rs", include_str!("guestkit.rs")),
        ("hostfile.rs", include_str!("hostfile.rs")),
        ("initramfs.rs", include_str!("initramfs.rs")),
        ("ipam.rs", include_str!("ipam.rs")),
        ("logs.rs", include_str!("logs.rs")),
        ("mod.rs", include_str!("mod.rs")),
        ("net.rs", include_str!("net.rs")),
        ("process.rs", include_str!("process.rs")),
        ("testing.rs", include_str!("testing.rs")),
        ("vmm_client.rs", include_str!("vmm_client.rs")),
    ];

    #[test]
    fn the_host_layer_depends_on_nothing_above_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/host");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = SOURCES.iter().map(|(n, _)| *n).collect();
        assert_eq!(on_disk, listed, "list every file of src/host here");
        // Spelled in pieces so this test's own text does not match.
        let krate = "crate";
        let path = format!("{krate}::");
        let host = format!("{krate}::host::");
        let api = concat!("runv", "_crds");
        for (name, text) in SOURCES {
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let mut rest = code;
                while let Some(at) = rest.find(krate) {
                    let tail = &rest[at..];
                    let word_start = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
                    assert!(
                        !word_start || !tail.starts_with(&path) || tail.starts_with(&host),
                        "src/host/{name}:{}: reaches above the host layer: {line}",
                        i + 1
                    );
                    rest = &tail[krate.len()..];
                }
                assert!(
                    !code.contains(api),
                    "src/host/{name}:{}: imports the API types: {line}",
                    i + 1
                );
            }
        }
    }

    /// The `.rs` files under `dir`, recursively.
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn nothing_outside_the_host_layer_makes_a_side_effect() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        // main.rs installs the process's own signal handlers; dev.rs is
        // developer tooling, not in release builds (see its module doc).
        let exempt = ["host", "main.rs", "dev.rs", "tests.rs"];
        // Writes, removals, renames, permission changes, programs and libc
        // calls (a lower-case name after `libc::`; its constants are fine).
        let effects = [
            "fs::write",
            "fs::create_dir",
            "fs::remove_",
            "fs::rename",
            "fs::copy",
            "set_permissions",
            "File::create",
            ".set_len(",
            "Command::new",
        ];
        let mut checked = 0;
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let name = rel.file_name().unwrap();
            if exempt.iter().any(|x| first == *x || name == *x) {
                continue;
            }
            checked += 1;
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or("");
                let libc_call = line.match_indices("libc::").any(|(at, m)| {
                    line[at + m.len()..].starts_with(|c: char| c.is_ascii_lowercase())
                });
                let effect = effects.iter().find(|e| line.contains(*e));
                assert!(
                    effect.is_none() && !libc_call,
                    "src/{}:{}: a side effect outside the host layer: {line}",
                    rel.display(),
                    i + 1
                );
            }
        }
        assert!(checked >= 10, "only {checked} files checked");
    }
}

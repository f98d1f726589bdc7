//! The versioned VM configuration (`runv-vmm --config FILE`).
//!
//! Owns parsing and validation of the JSON document, and the lexical mapping
//! of host paths to paths inside the VMM's jail ([`JailConfig`]); it must not
//! touch the filesystem beyond reading the file it is given (paths are checked
//! by the VMM when it opens them).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::API_VERSION;

/// Upper bound on vCPUs a config may ask for.
pub const MAX_VCPUS: u8 = 32;
/// Most virtio devices (disks, rng, net, vsock) one VM gets: one IOAPIC pin
/// each, between the serial port's and the ACPI power button's.
pub const MAX_VIRTIO_DEVICES: usize = 18;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEMORY_MIB: u32 = 8;
/// Largest guest memory accepted, in MiB: 64 GiB, the most a MicroVM may ask
/// for (RAM beyond 3 GiB is mapped from 4 GiB up, above the device gap).
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;

/// Errors from reading or validating a [`VmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid JSON")]
    Json(#[from] serde_json::Error),
    #[error("unsupported apiVersion {found:?}, expected {API_VERSION:?}")]
    ApiVersion { found: String },
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("memoryMib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {0}")]
    Memory(u32),
    #[error("{0} virtio devices (disks, rng, net, vsock); at most {MAX_VIRTIO_DEVICES} fit")]
    VirtioDevices(usize),
    #[error("vsock guestCid must be at least 3, got {0}")]
    GuestCid(u32),
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    #[error("invalid size {0:?} (expected e.g. 128M, 1G or a byte count)")]
    Size(String),
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("serial.rotate.limitBytes must be at least {MIN_SERIAL_LIMIT}, got {0}")]
    SerialLimit(u64),
    #[error("jail.root must be an absolute path other than /, without `..`: {0:?}")]
    JailRoot(PathBuf),
    #[error("jail.{field} must not be 0 (root): the jail runs the VMM as an unprivileged user")]
    JailId { field: &'static str },
    #[error(
        "{field} {path:?} is used after the VMM enters its jail, so it must be an absolute \
         path inside jail.root {root:?} (without `..`)"
    )]
    OutsideJail {
        field: &'static str,
        path: PathBuf,
        root: PathBuf,
    },
}

/// A complete description of one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Kernel image: ELF vmlinux (PVH note or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Attach a virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Unix socket for the control protocol ([`crate::control`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Where to write the [`crate::ExitRecord`]; defaults to next to the control socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_file: Option<PathBuf>,
    /// Per-thread seccomp filters (on unless explicitly turned off).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Which CPUID policy the vCPUs get.
    #[serde(default)]
    pub cpu_policy: CpuPolicy,
    /// Confine the VMM once its host resources are open (absent: no jail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
    /// Create everything but keep the vCPUs paused until a `resume` request.
    #[serde(default, skip_serializing_if = "is_false")]
    pub start_paused: bool,
    /// Seconds a `shutdown` request without its own grace gives the guest to
    /// power off before the VM is ended (absent: [`DEFAULT_SHUTDOWN_GRACE_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_seconds: Option<u32>,
}

/// How long the guest gets to power off after `shutdown` when nobody says.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u32 = 10;

/// The jail: once every host resource is open (kernel, initrd, disks, taps,
/// `/dev/kvm`, the bound sockets), the VMM enters a private mount namespace,
/// chroots into `root` and becomes `uid`/`gid` with no supplementary groups,
/// no capabilities and `no_new_privs`. Paths it uses after that point (the
/// exit file, the control socket it removes at exit, the `<udsPath>_<port>`
/// sockets of guest-initiated vsock connections) must lie inside `root`;
/// [`JailConfig::inside`] maps them to where they are seen from in the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JailConfig {
    /// The directory that becomes `/` (the VM's state directory).
    pub root: PathBuf,
    /// The unprivileged user the VMM runs as (not 0).
    pub uid: u32,
    /// Its group (not 0).
    pub gid: u32,
}

impl JailConfig {
    /// Checks the root and the ids.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.root.is_absolute()
            || self.root.components().any(|c| c == Component::ParentDir)
            || self.root.components().all(|c| c == Component::RootDir)
        {
            return Err(ConfigError::JailRoot(self.root.clone()));
        }
        if self.uid == 0 {
            return Err(ConfigError::JailId { field: "uid" });
        }
        if self.gid == 0 {
            return Err(ConfigError::JailId { field: "gid" });
        }
        Ok(())
    }

    /// The in-jail path of host path `path` (of config field `field`): the
    /// part below `root`, made absolute (`<root>/run/ctl.sock` → `/run/ctl.sock`).
    /// Lexical: `path` must be absolute, free of `..` and strictly below
    /// `root`. Symlinks are not followed; whoever prepares the jail creates
    /// these directories itself.
    pub fn inside(&self, field: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
        let outside = || ConfigError::OutsideJail {
            field,
            path: path.to_owned(),
            root: self.root.clone(),
        };
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(outside());
        }
        let rest = path.strip_prefix(&self.root).map_err(|_| outside())?;
        if rest.as_os_str().is_empty() {
            return Err(outside());
        }
        Ok(Path::new("/").join(rest))
    }
}

/// The CPUID policy (the VMM's docs list what each one hides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CpuPolicy {
    /// `compat` on a shadow-paging KVM (`kvm_pvm`), `host` elsewhere.
    #[default]
    Auto,
    /// Everything KVM supports, with topology normalised.
    Host,
    /// `host` minus the features a shadow-paging KVM cannot emulate.
    Compat,
}

/// A virtio-blk device backed by a raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net device backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`; a locally administered address is derived if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A virtio-vsock device whose host side is a unix socket (hybrid vsock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// Where the 8250 serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "mode", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file; with `rotate`, kept under about twice its limit by
    /// the VMM itself.
    File {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotate: Option<SerialRotation>,
    },
    /// Streamed to clients of a unix socket the VMM listens on.
    Socket { path: PathBuf },
    /// Discarded.
    Off,
}

/// The smallest serial log limit.
pub const MIN_SERIAL_LIMIT: u64 = 1024;

/// How the VMM bounds a serial log file: once the file passes `limitBytes`,
/// its content moves to `previous` (replacing what was there) and the file
/// starts again empty, so the two hold at most about `2 × limitBytes`.
/// Readers see the same two files whoever rotates them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SerialRotation {
    pub limit_bytes: u64,
    pub previous: PathBuf,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u32 {
    128
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            disks: Vec::new(),
            net: Vec::new(),
            vsock: None,
            rng: false,
            serial: SerialConfig::default(),
            control_socket: None,
            exit_file: None,
            seccomp: true,
            cpu_policy: CpuPolicy::Auto,
            jail: None,
            start_paused: false,
            shutdown_grace_seconds: None,
        }
    }

    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_version != API_VERSION {
            return Err(ConfigError::ApiVersion {
                found: self.api_version.clone(),
            });
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::Empty { field: "kernel" });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if let Some(v) = &self.vsock
            && v.guest_cid < 3
        {
            return Err(ConfigError::GuestCid(v.guest_cid));
        }
        let virtio = self.disks.len()
            + usize::from(self.rng)
            + self.net.len()
            + usize::from(self.vsock.is_some());
        if virtio > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::VirtioDevices(virtio));
        }
        for n in &self.net {
            if n.tap.is_empty() {
                return Err(ConfigError::Empty { field: "net.tap" });
            }
            if let Some(mac) = &n.mac {
                parse_mac(mac)?;
            }
        }
        if let SerialConfig::File {
            rotate: Some(r), ..
        } = &self.serial
            && r.limit_bytes < MIN_SERIAL_LIMIT
        {
            return Err(ConfigError::SerialLimit(r.limit_bytes));
        }
        if let Some(j) = &self.jail {
            j.validate()?;
            for (field, path) in self.paths_used_in_jail() {
                j.inside(field, &path)?;
            }
        }
        Ok(())
    }

    /// The host paths the VMM still uses once it is jailed, with the field
    /// naming each: the exit file, the control socket (removed at exit) and
    /// the vsock socket (`<udsPath>_<port>` is connected to on the guest's
    /// behalf). Everything else is opened before the jail.
    pub fn paths_used_in_jail(&self) -> Vec<(&'static str, PathBuf)> {
        let mut out = Vec::new();
        if let Some(p) = self.exit_file_path() {
            out.push(("exitFile", p));
        }
        if let Some(p) = &self.control_socket {
            out.push(("controlSocket", p.clone()));
        }
        if let Some(v) = &self.vsock {
            out.push(("vsock.udsPath", v.uds_path.clone()));
        }
        out
    }

    /// How long `shutdown` waits for the guest when the request does not say.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.shutdown_grace_seconds
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS),
        ))
    }

    /// The exit file path: explicit, else `<control socket>.exit`, else none.
    pub fn exit_file_path(&self) -> Option<PathBuf> {
        self.exit_file.clone().or_else(|| {
            self.control_socket.as_ref().map(|s| {
                let mut p = s.clone().into_os_string();
                p.push(".exit");
                PathBuf::from(p)
            })
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| ConfigError::Mac(text.into()))?;
        if part.len() != 2 {
            return Err(ConfigError::Mac(text.into()));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| ConfigError::Mac(text.into()))?;
    }
    if parts.next().is_some() {
        return Err(ConfigError::Mac(text.into()));
    }
    Ok(mac)
}

/// Parses a size such as `128M`, `1G`, `64MiB` or a plain byte count into MiB.
pub fn parse_size_mib(text: &str) -> Result<u32, ConfigError> {
    let err = || ConfigError::Size(text.into());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mib = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => {
            if !n.is_multiple_of(1 << 20) {
                return Err(err());
            }
            n >> 20
        }
        "K" | "k" => {
            if !n.is_multiple_of(1024) {
                return Err(err());
            }
            n / 1024
        }
        "M" | "m" => n,
        "G" | "g" => n.checked_mul(1024).ok_or_else(err)?,
        _ => return Err(err()),
    };
    u32::try_from(mib).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> VmConfig {
        let mut c = VmConfig::new("/k/vmlinux");
        c.initrd = Some("/k/initrd".into());
        c.cmdline = "console=ttyS0".into();
        c.vcpus = 2;
        c.memory_mib = 256;
        c.disks.push(DiskConfig {
            path: "/d/root.img".into(),
            read_only: true,
        });
        c.net.push(NetConfig {
            tap: "tap0".into(),
            mac: Some("02:00:00:00:00:01".into()),
        });
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/run/v.sock".into(),
        });
        c.rng = true;
        c.serial = SerialConfig::File {
            path: "/log/serial".into(),
            rotate: Some(SerialRotation {
                limit_bytes: 1 << 20,
                previous: "/log/serial.1".into(),
            }),
        };
        c.control_socket = Some("/run/vm.sock".into());
        c
    }

    #[test]
    fn round_trips_through_json() {
        let c = full();
        let text = serde_json::to_string_pretty(&c).unwrap();
        assert!(text.contains("\"apiVersion\": \"runv.dev/vmm/v1alpha1\""));
        assert!(text.contains("\"memoryMib\": 256"));
        assert_eq!(VmConfig::from_json(&text).unwrap(), c);
    }

    #[test]
    fn minimal_document_gets_defaults() {
        let c =
            VmConfig::from_json(r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k"}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert!(c.seccomp);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert_eq!(c.exit_file_path(), None);
    }

    #[test]
    fn rejects_wrong_version_unknown_fields_and_bad_values() {
        let e = VmConfig::from_json(r#"{"apiVersion":"v0","kernel":"/k"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::ApiVersion { .. }), "{e}");
        let e =
            VmConfig::from_json(r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k","cpus":2}"#)
                .unwrap_err();
        let ConfigError::Json(json) = &e else {
            panic!("{e:?}")
        };
        assert!(json.to_string().contains("unknown field"), "{json}");
        let e = VmConfig::from_json(
            r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k","vcpus":0}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Vcpus(0)));
        let e = VmConfig::from_json(
            r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k","memoryMib":4}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Memory(4)));
        let mut c = full();
        c.memory_mib = 64 * 1024;
        c.validate().unwrap();
        c.memory_mib = 64 * 1024 + 1;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "memoryMib must be between 8 and 65536, got 65537"
        );
        let mut c = full();
        c.vsock.as_mut().unwrap().guest_cid = 2;
        assert!(matches!(c.validate(), Err(ConfigError::GuestCid(2))));
        let mut c = full();
        c.net[0].mac = Some("02:00:00:00:00".into());
        assert!(matches!(c.validate(), Err(ConfigError::Mac(_))));
        let mut c = full();
        if let SerialConfig::File {
            rotate: Some(r), ..
        } = &mut c.serial
        {
            r.limit_bytes = 100;
        }
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "serial.rotate.limitBytes must be at least 1024, got 100"
        );
        assert!(VmConfig::from_json("{not json").is_err());
    }

    fn jail() -> JailConfig {
        JailConfig {
            root: "/var/lib/runv/vms/ns_vm".into(),
            uid: 1_879_048_192,
            gid: 1_879_048_192,
        }
    }

    #[test]
    fn jail_paths_translate_to_their_place_inside_the_root() {
        let j = jail();
        let inside = |p: &str| j.inside("f", Path::new(p));
        assert_eq!(
            inside("/var/lib/runv/vms/ns_vm/run/ctl.sock").unwrap(),
            PathBuf::from("/run/ctl.sock")
        );
        assert_eq!(
            inside("/var/lib/runv/vms/ns_vm/./run//x.exit").unwrap(),
            PathBuf::from("/run/x.exit")
        );
        // Outside, escaping, relative, a sibling with the same prefix, the root itself.
        for bad in [
            "/tmp/ctl.sock",
            "/var/lib/runv/vms/ns_vm/../ns_other/ctl.sock",
            "run/ctl.sock",
            "/var/lib/runv/vms/ns_vm2/ctl.sock",
            "/var/lib/runv/vms/ns_vm",
            "/var/lib/runv/vms/ns_vm/",
        ] {
            let e = inside(bad).unwrap_err();
            assert!(matches!(e, ConfigError::OutsideJail { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("inside jail.root"), "{e}");
        }
    }

    #[test]
    fn a_jailed_config_must_keep_its_late_paths_inside_the_root() {
        let mut c = full();
        let root = PathBuf::from("/var/lib/runv/vms/ns_vm");
        c.control_socket = Some(root.join("run/ctl.sock"));
        c.vsock.as_mut().unwrap().uds_path = root.join("run/vsock.sock");
        c.jail = Some(jail());
        c.validate().unwrap();
        // Kernel, disks and the serial file are opened before the jail: anywhere.
        assert_eq!(c.disks[0].path, PathBuf::from("/d/root.img"));
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("\"jail\":{\"root\":\"/var/lib/runv/vms/ns_vm\""));
        assert_eq!(VmConfig::from_json(&text).unwrap(), c);

        let mut bad = c.clone();
        bad.exit_file = Some("/tmp/vm.exit".into());
        let e = bad.validate().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::OutsideJail {
                    field: "exitFile",
                    ..
                }
            ),
            "{e}"
        );
        let mut bad = c.clone();
        bad.vsock.as_mut().unwrap().uds_path = "/run/v.sock".into();
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::OutsideJail {
                field: "vsock.udsPath",
                ..
            })
        ));
        let mut bad = c.clone();
        bad.control_socket = Some("/run/vm.sock".into());
        bad.exit_file = Some(root.join("run/x.exit"));
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::OutsideJail {
                field: "controlSocket",
                ..
            })
        ));
        for (root, uid, gid) in [("relative", 5, 5), ("/", 5, 5), ("/a/../b", 5, 5)] {
            let mut bad = c.clone();
            bad.jail = Some(JailConfig {
                root: root.into(),
                uid,
                gid,
            });
            assert!(
                matches!(bad.validate(), Err(ConfigError::JailRoot(_))),
                "{root}"
            );
        }
        let mut bad = c.clone();
        bad.jail.as_mut().unwrap().uid = 0;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::JailId { field: "uid" })
        ));
        let mut bad = c;
        bad.jail.as_mut().unwrap().gid = 0;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::JailId { field: "gid" })
        ));
    }

    #[test]
    fn new_fields_are_optional_and_left_out_when_unset() {
        // A document from before the jail, start-paused and grace fields still parses...
        let c = VmConfig::from_json(
            r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k","controlSocket":"/r/s"}"#,
        )
        .unwrap();
        assert_eq!((c.jail.as_ref(), c.start_paused), (None, false));
        assert_eq!(c.shutdown_grace(), std::time::Duration::from_secs(10));
        // ...and a config that uses none of them reads as one from before them.
        let text = serde_json::to_string(&c).unwrap();
        for field in ["jail", "startPaused", "shutdownGraceSeconds"] {
            assert!(!text.contains(field), "{text}");
        }
        let c = VmConfig::from_json(
            r#"{"apiVersion":"runv.dev/vmm/v1alpha1","kernel":"/k","startPaused":true,"shutdownGraceSeconds":3}"#,
        )
        .unwrap();
        assert!(c.start_paused);
        assert_eq!(c.shutdown_grace(), std::time::Duration::from_secs(3));
    }

    #[test]
    fn exit_file_sits_next_to_the_control_socket() {
        let c = full();
        assert_eq!(c.exit_file_path(), Some(PathBuf::from("/run/vm.sock.exit")));
    }

    #[test]
    fn sizes_and_macs_parse() {
        assert_eq!(parse_size_mib("128M").unwrap(), 128);
        assert_eq!(parse_size_mib("1G").unwrap(), 1024);
        assert_eq!(parse_size_mib("64MiB").unwrap(), 64);
        assert_eq!(parse_size_mib("2097152").unwrap(), 2);
        assert!(parse_size_mib("12X").is_err());
        assert!(parse_size_mib("1000").is_err());
        assert!(parse_size_mib("").is_err());
        assert_eq!(
            parse_mac("02:0a:00:00:00:ff").unwrap(),
            [2, 10, 0, 0, 0, 255]
        );
        assert!(parse_mac("02:0a:00:00:00:ff:01").is_err());
        assert!(parse_mac("zz:0a:00:00:00:ff").is_err());
    }
}

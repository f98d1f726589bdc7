//! From a MicroVM spec to the `runv-vmm` config (`runv.dev/vmm/v1alpha1`),
//! plus the names the agent derives for a VM: tap devices, MAC addresses, the
//! vsock CID and IPAM owner keys. All pure: no file is read or written here.

use runv_crds::microvm::{Disk, InterfaceType, Toggle};
use runv_crds::{MicroVMSpec, quantity};
use runv_vmm_api::config::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
use runv_vmm_api::{DiskConfig, JailConfig, NetConfig, SerialConfig, VmConfig, VsockConfig};

use crate::jail::JailIds;
use crate::state::VmDir;

// Every MicroVM the API accepts fits the VMM: each disk and interface, the
// entropy device and vsock take one virtio-mmio slot each, and the vCPU limits
// agree.
const _: () = assert!(
    runv_crds::microvm::MAX_DISKS + runv_crds::microvm::MAX_INTERFACES + 2
        <= runv_vmm_api::config::MAX_VIRTIO_DEVICES
);
const _: () = assert!(runv_crds::microvm::MAX_VCPUS == MAX_VCPUS as u32);

/// Why a spec cannot become a VMM config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmConfigError {
    /// A quantity the API should have refused.
    #[error(transparent)]
    Quantity(#[from] quantity::QuantityError),
    /// The VMM cannot give the VM this many vCPUs.
    #[error("spec.resources.vcpus: {0} is more than the VMM supports ({MAX_VCPUS})")]
    Vcpus(u32),
    /// The VMM cannot give the VM this much memory.
    #[error(
        "spec.resources.memory: {0} MiB is outside what the VMM supports ({MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB)"
    )]
    Memory(u64),
}

fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The IPAM owner key prefix of a VM: release this prefix to free all its addresses.
pub fn owner_prefix(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}/")
}

/// The host tap of the `index`-th interface: `rv` + 10 hex digits + `-` + index.
pub fn tap_name(namespace: &str, name: &str, index: usize) -> String {
    let h = fnv(&format!("{namespace}/{name}")) & 0xff_ffff_ffff;
    format!("rv{h:010x}-{}", index % 10)
}

/// A stable locally administered unicast MAC for an interface with none in the spec.
pub fn default_mac(namespace: &str, name: &str, iface: &str) -> String {
    let h = fnv(&format!("{namespace}/{name}/{iface}")).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// A stable guest CID (3 and up, below 2^31).
pub fn vsock_cid(namespace: &str, name: &str) -> u32 {
    let h = fnv(&format!("vsock/{namespace}/{name}"));
    3 + u32::try_from(h % (0x7fff_fff0)).unwrap_or(0)
}

/// Guest memory in MiB (rounded up), checked against what the VMM accepts.
pub fn memory_mib(spec: &MicroVMSpec) -> Result<u32, VmConfigError> {
    let bytes = spec.resources.memory_bytes()?;
    let mib = bytes.div_ceil(1 << 20);
    u32::try_from(mib)
        .ok()
        .filter(|m| (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(m))
        .ok_or(VmConfigError::Memory(mib))
}

/// Where a disk's data lives on the node: the base image for a read-only file
/// disk, the VM's private file otherwise.
pub fn disk_path(dir: &VmDir, disk: &Disk) -> std::path::PathBuf {
    match &disk.file {
        Some(f) if disk.read_only => f.path.clone().into(),
        _ => dir.disk(&disk.name),
    }
}

/// Files on the node the spec refers to, with the field naming each.
pub fn host_files(spec: &MicroVMSpec) -> Vec<(String, String)> {
    let mut out = vec![("spec.boot.kernel".to_owned(), spec.boot.kernel.clone())];
    if let Some(i) = &spec.boot.initrd {
        out.push(("spec.boot.initrd".to_owned(), i.clone()));
    }
    for d in &spec.disks {
        if let Some(f) = &d.file {
            out.push((format!("spec.disks[{}].file.path", d.name), f.path.clone()));
        }
    }
    out
}

pub use crate::host::FIRST_PASSED_FD;

/// The host files the agent opens (beneath the allowed directories) and
/// hands to the VMM as inherited descriptors, numbered from
/// [`FIRST_PASSED_FD`] in this order: the kernel, the initrd, and every
/// read-only file disk. (A writable file disk is a private copy the agent
/// makes from the opened base, in the VM's own directory.)
pub fn passed_files(spec: &MicroVMSpec) -> Vec<(String, String)> {
    let mut out = vec![("spec.boot.kernel".to_owned(), spec.boot.kernel.clone())];
    if let Some(i) = &spec.boot.initrd {
        out.push(("spec.boot.initrd".to_owned(), i.clone()));
    }
    for d in spec.disks.iter().filter(|d| d.read_only) {
        if let Some(f) = &d.file {
            out.push((format!("spec.disks[{}].file.path", d.name), f.path.clone()));
        }
    }
    out
}

/// Points the config's passed host files (see [`passed_files`]) at the
/// descriptors the VMM inherits (`/proc/self/fd/N`), so the VMM opens
/// exactly the files the agent checked, never a path again.
pub fn use_passed_files(c: &mut VmConfig, spec: &MicroVMSpec) {
    let mut next = FIRST_PASSED_FD;
    let mut fd = || {
        let p = std::path::PathBuf::from(format!("/proc/self/fd/{next}"));
        next += 1;
        p
    };
    c.kernel = fd();
    if c.initrd.is_some() {
        c.initrd = Some(fd());
    }
    for (disk, d) in c.disks.iter_mut().zip(&spec.disks) {
        if d.read_only && d.file.is_some() {
            disk.path = fd();
        }
    }
}

/// One interface as the agent wires it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPlan {
    /// Interface name from the spec.
    pub name: String,
    /// Host tap device.
    pub tap: String,
    /// Guest MAC.
    pub mac: String,
    /// Whether the agent owns the tap (Nat) or the user does (Tap).
    pub managed: bool,
}

/// The interfaces of a VM, in spec order.
pub fn net_plan(namespace: &str, name: &str, spec: &MicroVMSpec) -> Vec<NetPlan> {
    spec.interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| {
            let managed = iface.kind == InterfaceType::Nat;
            NetPlan {
                name: iface.name.clone(),
                tap: match (&iface.tap_device, managed) {
                    (Some(t), false) => t.clone(),
                    _ => tap_name(namespace, name, i),
                },
                mac: iface
                    .mac
                    .clone()
                    .unwrap_or_else(|| default_mac(namespace, name, &iface.name))
                    .to_ascii_lowercase(),
                managed,
            }
        })
        .collect()
}

/// Whether the VM gets a vsock device: asked for, or a container VM (its
/// `runv-init` talks to the agent over it).
pub fn has_vsock(spec: &MicroVMSpec) -> bool {
    spec.vsock.as_ref().is_some_and(|v| v.enabled) || spec.container.is_some()
}

/// The jail of a VM whose directory is `dir`: that directory becomes the
/// VMM's root, and it runs as `ids` (`spec.isolation.jail: Enabled`). Its
/// control socket, exit file and vsock socket are in `run/`, inside the root.
pub fn jail(dir: &VmDir, ids: JailIds) -> JailConfig {
    JailConfig {
        root: dir.path().to_owned(),
        uid: ids.uid,
        gid: ids.gid,
    }
}

/// The VMM config of a VM whose directory is `dir`; `extra_cmdline` (the
/// agent's `ip=` parameter) is appended to the spec's command line. Without
/// a jail and not paused at start: the runtime adds those.
pub fn build(
    namespace: &str,
    name: &str,
    spec: &MicroVMSpec,
    dir: &VmDir,
    extra_cmdline: &str,
) -> Result<VmConfig, VmConfigError> {
    let mut c = VmConfig::new(&spec.boot.kernel);
    c.initrd = spec.boot.initrd.as_ref().map(Into::into);
    c.cmdline = match (spec.boot.cmdline.as_str(), extra_cmdline) {
        (a, "") => a.to_owned(),
        ("", b) => b.to_owned(),
        (a, b) => format!("{a} {b}"),
    };
    c.vcpus = u8::try_from(spec.resources.vcpus)
        .ok()
        .filter(|v| (1..=MAX_VCPUS).contains(v))
        .ok_or(VmConfigError::Vcpus(spec.resources.vcpus))?;
    c.memory_mib = memory_mib(spec)?;
    c.disks = spec
        .disks
        .iter()
        .map(|d| DiskConfig {
            path: disk_path(dir, d),
            read_only: d.read_only,
        })
        .collect();
    c.net = net_plan(namespace, name, spec)
        .into_iter()
        .map(|n| NetConfig {
            tap: n.tap,
            mac: Some(n.mac),
        })
        .collect();
    // A container VM's guest reports its container over vsock.
    if has_vsock(spec) {
        c.vsock = Some(VsockConfig {
            guest_cid: vsock_cid(namespace, name),
            uds_path: dir.vsock(),
        });
    }
    c.rng = true;
    c.serial = SerialConfig::File {
        path: dir.serial_log(),
        rotate: None,
    };
    c.control_socket = Some(dir.control_socket());
    c.exit_file = Some(dir.exit_file());
    c.seccomp = spec.isolation.seccomp == Toggle::Enabled;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> MicroVMSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn full_spec_becomes_a_valid_config() {
        let s = spec(
            r#"{"resources":{"vcpus":2,"memory":"100M"},
                "boot":{"kernel":"/k/vmlinux","initrd":"/k/initrd","cmdline":"console=ttyS0"},
                "disks":[{"name":"root","file":{"path":"/img/root.ext4"}},
                         {"name":"base","readOnly":true,"file":{"path":"/img/ro.img"}},
                         {"name":"scratch","empty":{"size":"1Gi"}}],
                "interfaces":[{"name":"eth0","type":"Nat"},
                              {"name":"up","type":"Tap","tapDevice":"tap-up","mac":"02:AA:00:00:00:01"}],
                "vsock":{"enabled":true},
                "isolation":{"seccomp":"Disabled"}}"#,
        );
        let dir = VmDir::new(std::path::Path::new("/state"), "ns", "web");
        let c = build(
            "ns",
            "web",
            &s,
            &dir,
            "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
        )
        .unwrap();
        assert_eq!(
            c.cmdline,
            "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"
        );
        c.validate().unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 96)); // 100 MB rounds up to 96 MiB
        assert_eq!(c.disks[0].path, dir.disk("root"));
        assert_eq!(c.disks[1].path, std::path::PathBuf::from("/img/ro.img"));
        assert!(c.disks[1].read_only);
        assert_eq!(c.disks[2].path, dir.disk("scratch"));
        assert_eq!(c.net[0].tap, tap_name("ns", "web", 0));
        assert!(c.net[0].tap.len() <= 15);
        assert_eq!(c.net[1].tap, "tap-up");
        assert_eq!(c.net[1].mac.as_deref(), Some("02:aa:00:00:00:01"));
        assert_eq!(c.vsock.as_ref().unwrap().guest_cid, vsock_cid("ns", "web"));
        assert!(!c.seccomp);
        assert_eq!(c.exit_file_path(), Some(dir.exit_file()));
        assert_eq!((c.jail.as_ref(), c.start_paused), (None, false));
        // Jailed: every path the VMM uses after its jail is inside the VM directory.
        let mut jailed = c.clone();
        jailed.jail = Some(jail(
            &dir,
            JailIds {
                uid: crate::jail::JAIL_ID_BASE,
                gid: crate::jail::JAIL_ID_BASE,
            },
        ));
        jailed.validate().unwrap();
        let j = jailed.jail.as_ref().unwrap();
        assert_eq!(
            j.inside("exitFile", &dir.exit_file()).unwrap(),
            std::path::PathBuf::from("/run/ctl.sock.exit")
        );
        let files = host_files(&s);
        assert_eq!(files[0], ("spec.boot.kernel".into(), "/k/vmlinux".into()));
        assert_eq!(files.len(), 4);
    }

    #[test]
    fn derived_names_are_stable_and_valid() {
        assert_eq!(tap_name("a", "b", 0), tap_name("a", "b", 0));
        assert_ne!(tap_name("a", "b", 0), tap_name("a", "c", 0));
        let mac = default_mac("ns", "vm", "eth0");
        runv_vmm_api::config::parse_mac(&mac).unwrap();
        assert!(mac.starts_with("02:"));
        assert!(vsock_cid("ns", "vm") >= 3);
    }

    #[test]
    fn out_of_range_shapes_are_errors() {
        let s = spec(r#"{"resources":{"vcpus":1,"memory":"65Gi"},"boot":{"kernel":"/k"}}"#);
        let dir = VmDir::new(std::path::Path::new("/s"), "ns", "vm");
        assert_eq!(
            build("ns", "vm", &s, &dir, ""),
            Err(VmConfigError::Memory(66560))
        );
        let s = spec(r#"{"resources":{"vcpus":300,"memory":"64Mi"},"boot":{"kernel":"/k"}}"#);
        assert_eq!(
            build("ns", "vm", &s, &dir, ""),
            Err(VmConfigError::Vcpus(300))
        );
    }
}

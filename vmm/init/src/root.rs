//! Filesystems: the guest's own (`/proc`, `/sys`, `/dev`) before anything
//! else, then the container's root: the image's disk read-only under a
//! tmpfs overlay, switched into, with the container's `/proc`, `/sys`,
//! `/dev` (a small tmpfs with only the usual nodes), `/dev/pts`, `/dev/shm`
//! and `/run` mounted inside it.
//!
//! Everything inside the new root is done after switching into it, so a
//! symlink in the image resolves within the image and nothing reaches the
//! initramfs (or, as a host process, the host).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{chdir, chroot, pivot_root};
use runv_vmm_api::guest::RootFs;

use crate::Fatal;

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Fatal> {
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| Fatal::new(format!("mounting {fstype} {src} on {target}"), e))
}

/// Mounts the guest's `/proc`, `/sys` and `/dev` where the initramfs has
/// their directories, and makes every mount private.
pub fn mount_guest() -> Result<(), Fatal> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nosuid, None)?;
    // EBUSY: the same filesystem is mounted there already (one superblock
    // cannot be mounted over itself): devtmpfs on a host or with a kernel
    // that mounts it, the network namespace's sysfs under `ip netns exec`.
    let again = |fs: &str, target: &str, flags: MsFlags| match mount(
        Some(fs),
        target,
        Some(fs),
        flags,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(Fatal::new(format!("mounting {fs} on {target}"), e)),
    };
    again("sysfs", "/sys", nosuid)?;
    again("devtmpfs", "/dev", MsFlags::MS_NOSUID)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Fatal::new("making mounts private", e))?;
    Ok(())
}

fn mkdir(path: &Path, mode: u32) -> Result<(), Fatal> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(Fatal::new(format!("creating {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Puts the new root together under `stage` and returns its path:
/// `stage/lower` the image, `stage/rw` the writable tmpfs, `stage/root`
/// the overlay.
pub fn assemble(stage: &Path, rootfs: &RootFs) -> Result<std::path::PathBuf, Fatal> {
    let s = |p: &str| stage.join(p).to_string_lossy().into_owned();
    mkdir(stage, 0o700)?;
    mnt(
        "runv",
        &s(""),
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0700"),
    )?;
    for d in ["lower", "rw", "root"] {
        mkdir(&stage.join(d), 0o755)?;
    }
    match rootfs.fstype.as_str() {
        "erofs" | "ext4" => {}
        other => {
            return Err(Fatal::msg(format!(
                "the root filesystem's type {other:?} is not erofs or ext4"
            )));
        }
    }
    mnt(
        &rootfs.source,
        &s("lower"),
        &rootfs.fstype,
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    )?;
    mnt(
        "rw",
        &s("rw"),
        "tmpfs",
        MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mkdir(&stage.join("rw/upper"), 0o755)?;
    mkdir(&stage.join("rw/work"), 0o755)?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        s("lower"),
        s("rw/upper"),
        s("rw/work")
    );
    mnt(
        "overlay",
        &s("root"),
        "overlay",
        MsFlags::MS_NODEV,
        Some(&opts),
    )?;
    Ok(stage.join("root"))
}

/// Makes `root` the root. pivot_root where the old root can be let go
/// (runv-init as a host process); the initramfs cannot be pivoted away,
/// so there the new root is moved over `/` and chrooted into, as
/// switch_root does.
pub fn switch(root: &Path) -> Result<(), Fatal> {
    chdir(root).map_err(|e| Fatal::new(format!("entering {}", root.display()), e))?;
    match pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH)
            .map_err(|e| Fatal::new("letting go of the old root", e))?,
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| Fatal::new("moving the new root over /", e))?;
            chroot(".").map_err(|e| Fatal::new("entering the new root", e))?;
        }
        Err(e) => return Err(Fatal::new("pivot_root into the new root", e)),
    }
    chdir("/").map_err(|e| Fatal::new("entering /", e))
}

/// The device nodes a container's `/dev` has (Docker's set).
const NODES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Mounts the container's filesystems inside the current (new) root.
pub fn mount_container() -> Result<(), Fatal> {
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        mkdir(Path::new(d), 0o755)?;
    }
    let _ = std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777));
    mnt("proc", "/proc", "proc", hard, None)?;
    mnt("sysfs", "/sys", "sysfs", hard | MsFlags::MS_RDONLY, None)?;
    mnt(
        "tmpfs",
        "/dev",
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=64k"),
    )?;
    for (name, major, minor) in NODES {
        let path = Path::new("/dev").join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(|e| Fatal::new(format!("creating {}", path.display()), e))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, link)
            .map_err(|e| Fatal::new(format!("linking {link}"), e))?;
    }
    mkdir(Path::new("/dev/pts"), 0o755)?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mkdir(Path::new("/dev/shm"), 0o1777)?;
    mnt("shm", "/dev/shm", "tmpfs", hard, Some("mode=1777"))?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
}

/// Writes `/etc/<name>` in the new root, replacing whatever the image has
/// there (a symlink included: it is removed, never followed).
pub fn write_etc(name: &str, contents: &str) -> Result<(), Fatal> {
    mkdir(Path::new("/etc"), 0o755)?;
    let path = Path::new("/etc").join(name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(Fatal::new(format!("replacing {}", path.display()), e));
        }
        _ => {}
    }
    std::fs::write(&path, contents)
        .map_err(|e| Fatal::new(format!("writing {}", path.display()), e))
}

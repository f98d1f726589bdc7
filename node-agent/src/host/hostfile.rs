//! Files of the node that a spec names (a kernel, an initrd, a disk image),
//! opened only beneath the directories the node's administrator allowed for
//! them: resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from
//! the allowed directory, so no `..`, symlink or `/proc` magic link leads out
//! of it, and accepted only when the result is a regular file. The open file
//! is what the agent copies or hands to the VMM, never the path again, so a
//! link swapped in after the check changes nothing.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The directories files of each kind may come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedDirs {
    /// For `spec.boot.kernel` and `spec.boot.initrd`.
    pub kernels: Vec<PathBuf>,
    /// For `spec.disks[].file.path`.
    pub images: Vec<PathBuf>,
}

impl Default for AllowedDirs {
    fn default() -> Self {
        Self {
            kernels: vec![
                PathBuf::from("/var/lib/runv/kernels"),
                PathBuf::from("/var/lib/runv/guests"),
            ],
            images: vec![PathBuf::from("/var/lib/runv/images")],
        }
    }
}

/// A host file the spec names, open.
#[derive(Debug)]
pub struct HostFile {
    /// The path as the spec names it.
    pub path: PathBuf,
    /// The file, opened read-only.
    pub file: File,
}

/// Why a host file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// Not an absolute path.
    #[error("{} is not an absolute path", path.display())]
    NotAbsolute {
        /// The path.
        path: PathBuf,
    },
    /// Not beneath any allowed directory.
    #[error("{} is not in a directory this node allows for {what} ({allowed})", path.display())]
    NotAllowed {
        /// The path.
        path: PathBuf,
        /// What the file is for ("kernels and initrds", "disk images").
        what: &'static str,
        /// The allowed directories, comma separated.
        allowed: String,
    },
    /// Resolving it leaves the allowed directory (`..`, a symlink pointing
    /// out, a `/proc` magic link).
    #[error("{} leads out of {} (through `..`, a symbolic link or a /proc link)", path.display(), root.display())]
    Escapes {
        /// The path.
        path: PathBuf,
        /// The allowed directory it is beneath.
        root: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a directory, a device, a FIFO, a socket).
    #[error("{} is not a regular file", path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// It does not exist.
    #[error("{} does not exist on the node", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// Another failure opening it.
    #[error("opening {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl HostFileError {
    /// Whether the spec may not use this file (as opposed to the file being
    /// missing or unreadable).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::NotFound { .. } | Self::Io { .. })
    }
}

/// The allowed directory `path` is beneath (component-wise) and the rest of
/// the path; a refusal when there is none.
pub fn beneath<'p>(
    allowed: &[PathBuf],
    what: &'static str,
    path: &'p Path,
) -> Result<(PathBuf, &'p Path), HostFileError> {
    if !path.is_absolute() {
        return Err(HostFileError::NotAbsolute { path: path.into() });
    }
    allowed
        .iter()
        .find_map(|root| {
            let rest = path.strip_prefix(root).ok()?;
            (!rest.as_os_str().is_empty()).then(|| (root.clone(), rest))
        })
        .ok_or_else(|| HostFileError::NotAllowed {
            path: path.into(),
            what,
            allowed: allowed
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Opens `path` read-only, only beneath one of `allowed` and only if it is
/// a regular file (see the module doc).
pub fn open(
    allowed: &[PathBuf],
    what: &'static str,
    path: &Path,
) -> Result<HostFile, HostFileError> {
    let (root, rest) = beneath(allowed, what, path)?;
    let io = |source: std::io::Error| HostFileError::Io {
        path: path.into(),
        source,
    };
    let dir = rustix::fs::open(
        &root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => HostFileError::NotFound { path: path.into() },
        e => io(e.into()),
    })?;
    // O_PATH first: nothing is opened for reading (no device, no FIFO) until
    // the target is known to be a regular file.
    let found = rustix::fs::openat2(
        dir.as_fd(),
        rest,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => {
            HostFileError::NotFound { path: path.into() }
        }
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => HostFileError::Escapes {
            path: path.into(),
            root: root.clone(),
            source: e.into(),
        },
        e => io(e.into()),
    })?;
    let stat = rustix::fs::fstat(&found).map_err(|e| io(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(HostFileError::NotRegular { path: path.into() });
    }
    // Reopen that very file for reading through its descriptor.
    let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&found));
    let file = File::open(fd_path).map_err(io)?;
    Ok(HostFile {
        path: path.into(),
        file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn allowed(dir: &Path) -> Vec<PathBuf> {
        vec![dir.join("images")]
    }

    #[test]
    fn only_regular_files_beneath_an_allowed_directory_open() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path().join("images");
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::write(images.join("sub/disk.img"), b"disk").unwrap();
        std::fs::write(tmp.path().join("secret"), b"secret").unwrap();
        symlink("disk.img", images.join("sub/inside")).unwrap();
        symlink(tmp.path().join("secret"), images.join("out-abs")).unwrap();
        symlink("../secret", images.join("out-rel")).unwrap();
        symlink("/proc/self/root/etc/hostname", images.join("magic")).unwrap();
        let a = allowed(tmp.path());
        let ok = open(&a, "disk images", &images.join("sub/disk.img")).unwrap();
        assert_eq!(std::io::read_to_string(&ok.file).unwrap(), "disk");
        // A link that stays inside is followed.
        assert!(open(&a, "disk images", &images.join("sub/inside")).is_ok());
        let refused = |p: PathBuf| open(&a, "disk images", &p).unwrap_err();
        for p in [
            images.join("out-abs"),
            images.join("out-rel"),
            images.join("../secret"),
            images.join("magic"),
        ] {
            let e = refused(p.clone());
            assert!(
                matches!(e, HostFileError::Escapes { .. }),
                "{}: {e:?}",
                p.display()
            );
            assert!(e.is_refusal());
        }
        assert!(matches!(
            refused(tmp.path().join("secret")),
            HostFileError::NotAllowed { .. }
        ));
        // A sibling whose name only starts like the allowed directory.
        assert!(matches!(
            refused(tmp.path().join("images2/x")),
            HostFileError::NotAllowed { .. }
        ));
        assert!(matches!(
            refused(images.join("sub")),
            HostFileError::NotRegular { .. }
        ));
        assert!(matches!(
            refused(images.clone()),
            HostFileError::NotAllowed { .. }
        ));
        assert!(matches!(
            refused(PathBuf::from("images/sub/disk.img")),
            HostFileError::NotAbsolute { .. }
        ));
        let missing = refused(images.join("nope"));
        assert!(matches!(missing, HostFileError::NotFound { .. }));
        assert!(!missing.is_refusal());
    }

    #[test]
    fn a_fifo_or_device_is_refused_without_being_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let fifo = images.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Opening a FIFO for reading would block: the O_PATH check returns.
        let e = open(&allowed(tmp.path()), "disk images", &fifo).unwrap_err();
        assert!(matches!(e, HostFileError::NotRegular { .. }), "{e:?}");
        let e = open(
            &[PathBuf::from("/dev")],
            "disk images",
            Path::new("/dev/null"),
        )
        .unwrap_err();
        assert!(matches!(e, HostFileError::NotRegular { .. }), "{e:?}");
    }
}

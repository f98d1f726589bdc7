//! Filesystem operations confined beneath a root directory.
//!
//! Every path is resolved from a directory fd one component at a time with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! so neither `..`, an absolute symlink, a relative symlink, nor a `/proc`
//! magic link can take a write outside the root: the kernel refuses the
//! lookup (`ELOOP`, `EXDEV`) instead of following. The final component is
//! only ever created or removed relative to its parent's fd, with
//! `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, so a symlink placed there by an
//! earlier entry is replaced, never written through.

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;

/// Resolution flags for every lookup: stay beneath, follow no symlink (the
/// last component included: a symlink there fails with `ELOOP`).
pub fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// Opens the directory `name` (one component) of `dir` as an `O_PATH` fd,
/// creating it (mode 0755) first when `create` is set and it is missing.
pub fn open_child_dir(dir: impl AsFd, name: &OsStr, create: bool) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::openat2(dir.as_fd(), name, flags, Mode::empty(), beneath()) {
        Err(Errno::NOENT) if create => {
            match rustix::fs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(rustix::fs::openat2(
                dir.as_fd(),
                name,
                flags,
                Mode::empty(),
                beneath(),
            )?)
        }
        other => Ok(other?),
    }
}

/// Opens the directory at `components` beneath `root`; creates missing ones
/// when `create` is set.
pub fn open_dir(root: impl AsFd, components: &[OsString], create: bool) -> io::Result<OwnedFd> {
    let mut fd = rustix::io::dup(root.as_fd())?;
    for c in components {
        fd = open_child_dir(&fd, c, create)?;
    }
    Ok(fd)
}

/// The type of `name` in `dir`, without following a symlink; `None` if absent.
pub fn file_type(dir: impl AsFd, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` from `dir`, recursively if it is a directory, following
/// no symlink. Missing is fine. `depth` bounds the recursion.
pub fn remove_all(dir: impl AsFd, name: &OsStr, depth: usize) -> io::Result<()> {
    let dir = dir.as_fd();
    match file_type(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth == 0 {
                return Err(io::Error::other("directory tree too deep to remove"));
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let child = rustix::fs::openat2(dir, name, flags, Mode::empty(), beneath())?;
            for entry in children(&child)? {
                remove_all(&child, &entry, depth - 1)?;
            }
            Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// The names in a directory opened for reading (not `.`/`..`).
pub fn children(dir: impl AsFd) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    let mut d = Dir::read_from(dir)?;
    while let Some(entry) = d.read() {
        let name = entry?.file_name().to_bytes().to_owned();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(&name).to_owned());
        }
    }
    Ok(out)
}

/// Opens a directory (by `O_PATH` fd to its parent and name) for reading, to
/// list it or set its metadata.
pub fn open_dir_rw(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::openat2(
        dir,
        name,
        flags,
        Mode::empty(),
        beneath(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    #[test]
    fn symlinked_parents_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, root.join("abs")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        let rootfd =
            rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for link in ["abs", "rel"] {
            let err = open_dir(&rootfd, &[os(link), os("x")], true).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{link}");
        }
        assert!(open_dir(&rootfd, &[os("..")], true).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let made = open_dir(&rootfd, &[os("a"), os("b")], true);
        assert!(made.is_ok() && root.join("a/b").is_dir());
    }

    #[test]
    fn remove_all_removes_links_not_their_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        symlink(&outside, root.join("d/e/link")).unwrap();
        let rootfd =
            rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        remove_all(&rootfd, OsStr::new("d"), 64).unwrap();
        assert!(!root.join("d").exists());
        assert!(outside.join("keep").exists());
        remove_all(&rootfd, OsStr::new("missing"), 64).unwrap();
    }
}

//! Real disk images: a reflink clone (FICLONE) where the filesystem offers it,
//! else a sparse copy that leaves zero blocks as holes; empty disks as sparse
//! files. Files are created exclusively (never overwritten) and written under a
//! temporary name first, so a crash never leaves a half-copied disk in place.
//!
//! Must not decide which disks a VM gets: the per-VM state directory does.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::hostfile::{self, HostFile, HostFileError};
use super::{CopyKind, Disks, HostError};

/// Block size of the sparse copy: zero blocks of this size become holes.
const BLOCK: usize = 64 * 1024;

/// The size in bytes of the filesystem holding `path`, or of its nearest
/// existing ancestor (the agent's root may not exist yet).
pub fn filesystem_size(path: &Path) -> Option<u64> {
    let at = path.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(at).ok()?;
    Some(st.f_blocks.saturating_mul(st.f_frsize))
}

/// Disks on this Linux host.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxDisks;

fn temp_name(dst: &Path) -> PathBuf {
    let mut name = dst.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn create_new(path: &Path) -> Result<File, HostError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| HostError::io("creating", path, e))
}

/// Moves the finished temporary file into place, refusing to replace a file.
fn publish(tmp: &Path, dst: &Path) -> Result<(), HostError> {
    if dst.exists() {
        let _ = std::fs::remove_file(tmp);
        return Err(HostError::io(
            "creating",
            dst,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    std::fs::rename(tmp, dst).map_err(|e| HostError::io("renaming", dst, e))
}

fn try_reflink(src: &File, dst: &File) -> bool {
    // SAFETY: FICLONE takes the source file descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    rc == 0
}

/// Copies `len` bytes block by block, leaving zero blocks as holes; gives up
/// once it took longer than `timeout`.
fn sparse_copy(
    src: &mut File,
    dst: &mut File,
    len: u64,
    path: &Path,
    timeout: Duration,
) -> Result<(), HostError> {
    let io = |e| HostError::io("copying to", path, e);
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    while offset < len {
        if Instant::now() >= deadline {
            return Err(HostError::CopyTimedOut {
                path: path.to_owned(),
                after: timeout,
            });
        }
        let want = usize::try_from((len - offset).min(BLOCK as u64)).unwrap_or(BLOCK);
        let block = &mut buf[..want];
        src.read_exact(block).map_err(io)?;
        if block.iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(offset)).map_err(io)?;
            dst.write_all(block).map_err(io)?;
        }
        offset += want as u64;
    }
    // Trailing holes: the length is set explicitly.
    dst.set_len(len).map_err(io)?;
    dst.sync_all().map_err(io)
}

impl Disks for LinuxDisks {
    fn exists(&self, path: &Path) -> bool {
        path.metadata().is_ok_and(|m| m.is_file())
    }

    fn apparent_size(&self, dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum()
    }

    fn open_host_file(
        &self,
        allowed: &[PathBuf],
        what: &'static str,
        path: &Path,
    ) -> Result<HostFile, HostFileError> {
        hostfile::open(allowed, what, path)
    }

    fn copy_image(
        &self,
        base: &HostFile,
        dst: &Path,
        timeout: Duration,
    ) -> Result<CopyKind, HostError> {
        let base_path = &base.path;
        let mut src = base
            .file
            .try_clone()
            .map_err(|e| HostError::io("opening", base_path, e))?;
        let base = base_path.as_path();
        let len = src
            .metadata()
            .map_err(|e| HostError::io("reading", base, e))?
            .len();
        let tmp = temp_name(dst);
        let _ = std::fs::remove_file(&tmp);
        let mut out = create_new(&tmp)?;
        let kind = if try_reflink(&src, &out) {
            CopyKind::Reflink
        } else {
            if let Err(e) = sparse_copy(&mut src, &mut out, len, &tmp, timeout) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            CopyKind::Sparse
        };
        drop(out);
        publish(&tmp, dst)?;
        Ok(kind)
    }

    fn create_empty(&self, dst: &Path, size: u64) -> Result<(), HostError> {
        let tmp = temp_name(dst);
        let _ = std::fs::remove_file(&tmp);
        let f = create_new(&tmp)?;
        if let Err(e) = f.set_len(size) {
            let _ = std::fs::remove_file(&tmp);
            return Err(HostError::io("sizing", dst, e));
        }
        drop(f);
        publish(&tmp, dst)
    }

    fn give_dir(&self, dir: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = dir
            .symlink_metadata()
            .map_err(|e| HostError::io("reading", dir, e))?;
        if !meta.is_dir() {
            return Err(HostError::Invalid {
                what: "jail directory (not a directory)",
                value: dir.display().to_string(),
            });
        }
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(|e| HostError::io("changing the owner of", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| HostError::io("changing the mode of", dir, e))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        // 8 MiB with data only in two places.
        let mut f = File::create(&base).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"boot sector").unwrap();
        f.seek(SeekFrom::Start((8 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let dst = dir.path().join("copy.img");
        let allowed = [dir.path().to_owned()];
        let base_file = LinuxDisks
            .open_host_file(&allowed, "disk images", &base)
            .unwrap();
        let kind = LinuxDisks
            .copy_image(&base_file, &dst, Duration::from_secs(600))
            .unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), std::fs::read(&dst).unwrap());
        let m = dst.metadata().unwrap();
        assert_eq!(m.len(), 8 << 20);
        if kind == CopyKind::Sparse {
            // Two 64 KiB blocks at most, not 8 MiB.
            assert!(
                m.blocks() * 512 <= 2 * BLOCK as u64 + 4096,
                "{} blocks",
                m.blocks()
            );
        }
        assert!(!temp_name(&dst).exists());
        // Never overwrites.
        assert!(
            LinuxDisks
                .copy_image(&base_file, &dst, Duration::from_secs(600))
                .is_err()
        );
        assert_eq!(std::fs::read(&base).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn a_copy_past_its_timeout_is_given_up_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![7u8; 3 * BLOCK]).unwrap();
        let base_file = LinuxDisks
            .open_host_file(&[dir.path().to_owned()], "disk images", &base)
            .unwrap();
        let dst = dir.path().join("copy.img");
        match LinuxDisks.copy_image(&base_file, &dst, Duration::ZERO) {
            Err(e @ HostError::CopyTimedOut { .. }) => {
                assert!(e.to_string().contains("--disk-copy-timeout"), "{e}");
                assert!(!dst.exists() && !temp_name(&dst).exists());
            }
            // A reflink is one ioctl, with no time to run over.
            Ok(CopyKind::Reflink) => {
                assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 3 * BLOCK]);
            }
            other => panic!("{other:?}"),
        }
        let mut src = File::open(&base).unwrap();
        let mut out = File::create(dir.path().join("direct.img")).unwrap();
        let e = sparse_copy(&mut src, &mut out, 3 * BLOCK as u64, &base, Duration::ZERO);
        assert!(matches!(e, Err(HostError::CopyTimedOut { .. })), "{e:?}");
    }

    #[test]
    fn empty_disk_is_sparse_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("scratch.img");
        LinuxDisks.create_empty(&dst, 1 << 30).unwrap();
        let m = dst.metadata().unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(m.blocks() < 64, "{} blocks allocated", m.blocks());
        assert!(LinuxDisks.exists(&dst));
        assert!(!LinuxDisks.exists(dir.path()));
        assert!(LinuxDisks.create_empty(&dst, 1).is_err());
        assert_eq!(dst.metadata().unwrap().len(), 1 << 30);
    }

    #[test]
    fn give_dir_owns_a_directory_and_refuses_links_and_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        // Our own ids need no privilege; root would give any (the jail ids).
        let (uid, gid) = {
            let m = dir.path().metadata().unwrap();
            (m.uid(), m.gid())
        };
        LinuxDisks.give_dir(&run, uid, gid).unwrap();
        let m = run.metadata().unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (uid, gid, 0o700)
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert!(LinuxDisks.give_dir(&link, uid, gid).is_err());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(LinuxDisks.give_dir(&file, uid, gid).is_err());
        assert!(
            LinuxDisks
                .give_dir(&dir.path().join("none"), uid, gid)
                .is_err()
        );
    }

    #[test]
    fn a_missing_base_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = [dir.path().to_owned()];
        let e = LinuxDisks
            .open_host_file(&allowed, "disk images", &dir.path().join("nope.img"))
            .unwrap_err();
        assert!(e.to_string().contains("nope.img"), "{e}");
    }
}

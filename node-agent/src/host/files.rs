//! The agent's own files on the node (its state directory, the IPAM file):
//! atomic writes, and removals where a missing file is no error.
//!
//! Plain functions, not a trait: the state directory is real files in tests
//! too (a temporary directory). Must not know what the files mean; that is
//! `crate::state`'s (the layout) and [`super::ipam`]'s.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::HostError;

/// Writes `data` to `path` through a temporary file and a rename, so a crash
/// leaves the old or the new content, never half of one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HostError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| HostError::io("writing", &tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| HostError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HostError::io("renaming", path, e))
}

/// Creates `dir` and its missing parents.
pub fn create_dir(dir: &Path) -> Result<(), HostError> {
    std::fs::create_dir_all(dir).map_err(|e| HostError::io("creating", dir, e))
}

/// Removes the file (or link, or socket) `path`; a missing one is no error.
pub fn remove_file(path: &Path) -> Result<(), HostError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::io("removing", path, e)),
    }
}

/// Removes the directory `dir` with everything in it; a missing one is no error.
pub fn remove_dir_all(dir: &Path) -> Result<(), HostError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::io("removing", dir, e)),
    }
}

/// Moves the content of the append-only log `log` to `old` (replacing it) and
/// truncates `log`; its writer appends, so its next write lands at the new end.
pub fn rotate(log: &Path, old: &Path) -> Result<(), HostError> {
    std::fs::copy(log, old).map_err(|e| HostError::io("copying", old, e))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .map_err(|e| HostError::io("opening", log, e))?;
    f.set_len(0)
        .map_err(|e| HostError::io("truncating", log, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_removes_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/b/f.json");
        create_dir(f.parent().unwrap()).unwrap();
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert!(!dir.path().join("a/b/f.json.tmp").exists());
        let old = dir.path().join("a/old");
        rotate(&f, &old).unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"two");
        assert_eq!(std::fs::read(&f).unwrap(), b"");
        remove_file(&f).unwrap();
        remove_file(&f).unwrap();
        assert!(!f.exists());
        remove_dir_all(&dir.path().join("a")).unwrap();
        remove_dir_all(&dir.path().join("a")).unwrap();
        assert!(!dir.path().join("a").exists());
    }
}

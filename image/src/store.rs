//! The content-addressed blob store: `blobs/sha256/<hex>` under the store's root.
//!
//! A blob becomes visible only by `rename(2)` of a temporary file in the same
//! directory after its bytes were fsynced and both its digest and its size
//! checked, and the directory is fsynced after the rename. So a crash leaves at
//! worst a `.tmp-*` file (removed when the store is next opened), never a file
//! under a digest name whose content does not match it.
//!
//! Pulls of the same digest are serialised by one in-process lock per digest
//! ([`BlobStore::lock`]): the second caller waits, then finds the blob present
//! and fetches nothing.

use crate::digest::{Digest, Hasher};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bytes do not hash to the digest they were stored under.
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The number of bytes differs from the descriptor's size.
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The descriptor's size.
        expected: u64,
        /// Bytes received (so far, if too many).
        actual: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A content-addressed store of verified blobs.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    locks: Mutex<HashMap<Digest, Weak<tokio::sync::Mutex<()>>>>,
    temp_seq: AtomicU64,
}

impl BlobStore {
    /// Opens (creating) the store under `root`, removing temporary files a
    /// crash may have left behind.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let entry = entry.map_err(io_err("read", &dir))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Self {
            dir,
            locks: Mutex::default(),
            temp_seq: AtomicU64::new(0),
        })
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is present (it is complete and verified if it is).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The in-process lock for `digest`; hold it while checking for and
    /// fetching the blob so that concurrent pulls fetch it once.
    pub async fn lock(&self, digest: &Digest) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, weak| weak.strong_count() > 0);
            match locks.get(digest).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(digest.clone(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Reads a whole (small) blob, checking its digest again.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes` under `digest` (verified).
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.writer(digest, bytes.len() as u64)?;
        w.write(bytes)?;
        w.commit()
    }

    /// A writer for the blob `digest` of `size` bytes.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!(
            ".tmp-{}-{}-{seq}",
            digest.hex(),
            std::process::id()
        ));
        let file = File::create(&temp).map_err(io_err("create", &temp))?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            target: self.path(digest),
            dir: self.dir.clone(),
            digest: digest.clone(),
            size,
            hasher: Hasher::default(),
        })
    }

    /// Removes the blob (GC).
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Every blob present.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))? {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            if let Ok(d) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse() {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// A blob being written; it is discarded unless [`BlobWriter::commit`] succeeds.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    digest: Digest,
    size: u64,
    hasher: Hasher,
}

impl BlobWriter {
    /// Appends bytes; fails as soon as more bytes arrive than the size allows.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        if self.hasher.len() > self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.hasher.len(),
            });
        }
        let file = self.file.as_mut().expect("file is present until commit");
        file.write_all(bytes).map_err(io_err("write", &self.temp))
    }

    /// Verifies size and digest, fsyncs, and renames the blob into place.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let hasher = std::mem::take(&mut self.hasher);
        if hasher.len() != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: hasher.len(),
            });
        }
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        let file = self.file.take().expect("file is present until commit");
        file.sync_all().map_err(io_err("fsync", &self.temp))?;
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(io_err("rename", &self.temp))?;
        sync_dir(&self.dir)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.temp.exists() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// fsyncs a directory so that a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_then_read_round_trips_and_leaves_no_temp_files() {
        let root = tempfile::tempdir().unwrap();
        let store = BlobStore::open(root.path()).unwrap();
        let d = Digest::of(b"layer");
        store.put(&d, b"layer").unwrap();
        assert!(store.contains(&d));
        assert_eq!(store.read(&d).unwrap(), b"layer");
        assert_eq!(store.list().unwrap(), vec![d]);
        assert_eq!(fs::read_dir(&store.dir).unwrap().count(), 1);
    }

    #[test]
    fn wrong_digest_short_and_long_blobs_are_never_visible() {
        let root = tempfile::tempdir().unwrap();
        let store = BlobStore::open(root.path()).unwrap();
        let d = Digest::of(b"abc");
        assert!(matches!(
            store.put(&d, b"abd"),
            Err(StoreError::DigestMismatch { .. })
        ));
        let mut w = store.writer(&d, 3).unwrap();
        w.write(b"ab").unwrap();
        assert!(matches!(
            w.commit(),
            Err(StoreError::SizeMismatch { actual: 2, .. })
        ));
        let mut w = store.writer(&d, 3).unwrap();
        assert!(matches!(
            w.write(b"abcd"),
            Err(StoreError::SizeMismatch { .. })
        ));
        drop(w);
        assert!(!store.contains(&d));
        assert_eq!(
            fs::read_dir(&store.dir).unwrap().count(),
            0,
            "temp files removed"
        );
    }

    #[test]
    fn a_crash_leftover_temp_file_is_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let store = BlobStore::open(root.path()).unwrap();
        let w = store.writer(&Digest::of(b"x"), 1).unwrap();
        std::mem::forget(w); // a crash: no commit, no cleanup
        assert_eq!(fs::read_dir(&store.dir).unwrap().count(), 1);
        let store = BlobStore::open(root.path()).unwrap();
        assert_eq!(fs::read_dir(&store.dir).unwrap().count(), 0);
    }

    #[test]
    fn a_corrupted_blob_on_disk_fails_verification_on_read() {
        let root = tempfile::tempdir().unwrap();
        let store = BlobStore::open(root.path()).unwrap();
        let d = Digest::of(b"good");
        store.put(&d, b"good").unwrap();
        fs::write(store.path(&d), b"evil").unwrap();
        assert!(matches!(
            store.read(&d),
            Err(StoreError::DigestMismatch { .. })
        ));
    }
}

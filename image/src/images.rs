//! The node's image service: what the agent calls. It pulls by the pull
//! policy, unpacks and builds the root filesystem image once per manifest
//! digest, keeps a record per image for lookups and garbage collection, and
//! collects least-recently-used images that no VM uses.
//!
//! Layout under the root: `blobs/sha256/<hex>` (the [`BlobStore`]),
//! `images/<manifest hex>.json` (records), `rootfs/<manifest hex>.img`,
//! `unpack/<manifest hex>` (a build in progress; removed after).

use crate::container::{ContainerError, ImageConfig};
use crate::digest::Digest;
use crate::pull::{PullConfig, PullError, PulledImage, Puller};
use crate::rootfs::{self, Format, RootfsError};
use crate::store::{BlobStore, StoreError};
use crate::unpack::{self, Limits, UnpackError};
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why an image could not be made ready, or collected.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Pulling failed.
    #[error("pull")]
    Pull(#[from] PullError),
    /// The policy is `Never` and the image is not on the node.
    #[error("image {0} is not present and the pull policy is Never")]
    NeverPull(String),
    /// Applying the layers failed.
    #[error("unpack layers")]
    Unpack(#[from] UnpackError),
    /// Building the filesystem image failed.
    #[error("build root filesystem image")]
    Rootfs(#[from] RootfsError),
    /// The image config is unusable.
    #[error("image config")]
    Config(#[from] ContainerError),
    /// The blob store failed.
    #[error("blob store")]
    Store(#[from] StoreError),
    /// A filesystem operation on records or build directories failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The blocking unpack task died.
    #[error("unpack task")]
    Task(#[source] tokio::task::JoinError),
}

impl ImageError {
    /// The kubelet reason for an Event or condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Pull(e) => e.reason(),
            Self::NeverPull(_) => "ErrImageNeverPull",
            _ => "ErrImagePull",
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Resolve with the registry every time (blobs present are not fetched).
    Always,
    /// Use the node's copy when there is one.
    IfNotPresent,
    /// Only the node's copy.
    Never,
}

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct ReadyImage {
    /// What was pulled.
    pub pulled: PulledImage,
    /// The read-only root filesystem image.
    pub rootfs: PathBuf,
    /// The image's config.
    pub config: ImageConfig,
}

/// What the node knows about one image (`images/<hex>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Format version (1).
    pub version: u32,
    /// References this image was pulled by.
    pub references: Vec<String>,
    /// The image.
    pub image: PulledImage,
    /// When a VM last asked for it (seconds since the epoch).
    pub last_used: u64,
}

/// How full the disk under the root may get (kubelet's image GC thresholds).
#[derive(Debug, Clone, Copy)]
pub struct GcPolicy {
    /// At or above this percentage of disk use, collection starts.
    pub high_percent: u8,
    /// Collection frees down to this percentage.
    pub low_percent: u8,
}

impl Default for GcPolicy {
    fn default() -> Self {
        // kubelet's defaults (imageGCHighThresholdPercent / LowThreshold).
        Self {
            high_percent: 85,
            low_percent: 80,
        }
    }
}

/// Disk capacity and use, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct DiskUsage {
    /// Size of the filesystem.
    pub capacity: u64,
    /// Bytes in use.
    pub used: u64,
}

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Manifest digests of the images removed, oldest first.
    pub removed: Vec<Digest>,
    /// Bytes of files removed.
    pub freed: u64,
}

/// kubelet's image pull back-off: after a failed pull of an image for a VM,
/// the next try waits 10 s, doubling per failure up to 300 s; a key that has
/// not failed for twice the maximum starts again at 10 s. While waiting, the
/// VM's reason is `ImagePullBackOff`.
#[derive(Debug, Default)]
pub struct PullBackoff {
    entries: std::collections::HashMap<String, (std::time::Duration, std::time::Instant)>,
}

impl PullBackoff {
    /// First delay after a failure.
    pub const INITIAL: std::time::Duration = std::time::Duration::from_secs(10);
    /// Longest delay.
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(300);

    /// Records a failed pull for `key` (e.g. VM and image) at `now`; returns
    /// the delay before the next try.
    pub fn failed(&mut self, key: &str, now: std::time::Instant) -> std::time::Duration {
        let delay = match self.entries.get(key) {
            Some((last, at)) if now.duration_since(*at) <= 2 * Self::MAX => {
                (*last * 2).min(Self::MAX)
            }
            _ => Self::INITIAL,
        };
        self.entries.insert(key.to_owned(), (delay, now));
        delay
    }

    /// How long `key` must still wait at `now`, if it must.
    pub fn waiting(&self, key: &str, now: std::time::Instant) -> Option<std::time::Duration> {
        let (delay, at) = self.entries.get(key)?;
        (*at + *delay)
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    /// Forgets `key` after a successful pull.
    pub fn succeeded(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

/// The image service.
#[derive(Debug)]
pub struct Images {
    root: PathBuf,
    /// Held shared by [`Images::ensure`], exclusively by [`Images::gc`], so a
    /// collection never removes a blob a pull has just found present.
    gate: tokio::sync::RwLock<()>,
    puller: Puller,
    limits: Limits,
    format: Format,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Images {
    /// Opens (creating) the service's directories under `root`.
    pub fn open(
        root: &Path,
        pull: PullConfig,
        limits: Limits,
        format: Format,
    ) -> Result<Self, ImageError> {
        let store = Arc::new(BlobStore::open(root)?);
        for dir in ["images", "rootfs", "unpack"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        }
        remove_leftovers(root)?;
        Ok(Self {
            root: root.to_owned(),
            gate: tokio::sync::RwLock::new(()),
            puller: Puller::new(store, pull),
            limits,
            format,
        })
    }

    /// The puller (its fetch counter shows de-duplication).
    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    /// Makes `reference` ready to boot by `policy`.
    pub async fn ensure(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
        policy: PullPolicy,
    ) -> Result<ReadyImage, ImageError> {
        let _gate = self.gate.read().await;
        let name = reference.whole();
        let local = self.find(&name)?.filter(|r| {
            rootfs::image_path(&self.root.join("rootfs"), &r.image.manifest_digest).is_file()
        });
        let pulled = match (policy, local) {
            (PullPolicy::IfNotPresent | PullPolicy::Never, Some(record)) => record.image,
            (PullPolicy::Never, None) => return Err(ImageError::NeverPull(name)),
            _ => self.puller.pull(reference, auth).await?,
        };
        let store = self.puller.store().clone();
        let _guard = store.lock(&pulled.manifest_digest).await;
        let rootfs_dir = self.root.join("rootfs");
        let mut rootfs = rootfs::image_path(&rootfs_dir, &pulled.manifest_digest);
        if !rootfs.is_file() {
            let (store, image, limits, format) =
                (store.clone(), pulled.clone(), self.limits, self.format);
            let work = self.root.join("unpack").join(pulled.manifest_digest.hex());
            rootfs = tokio::task::spawn_blocking(move || {
                build(&store, &image, &work, &rootfs_dir, limits, format)
            })
            .await
            .map_err(ImageError::Task)??;
        }
        let config = ImageConfig::parse(&store.read(&pulled.config_digest)?)?;
        self.touch(&pulled, &name)?;
        Ok(ReadyImage {
            pulled,
            rootfs,
            config,
        })
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    /// Every record; unreadable ones are skipped (a crash mid-write cannot
    /// leave one, as they are renamed into place).
    pub fn records(&self) -> Result<Vec<Record>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(bytes) = std::fs::read(&path)
                && let Ok(record) = serde_json::from_slice::<Record>(&bytes)
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn find(&self, reference: &str) -> Result<Option<Record>, ImageError> {
        Ok(self
            .records()?
            .into_iter()
            .find(|r| r.references.iter().any(|n| n == reference)))
    }

    /// Records `image` as used now, by `reference`.
    fn touch(&self, image: &PulledImage, reference: &str) -> Result<(), ImageError> {
        let path = self.record_path(&image.manifest_digest);
        let mut record = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .unwrap_or(Record {
                version: 1,
                references: Vec::new(),
                image: image.clone(),
                last_used: 0,
            });
        // A tag now naming another image moves to it.
        for other in self.records()? {
            if other.image.manifest_digest != image.manifest_digest
                && other.references.iter().any(|r| r == reference)
            {
                let mut other = other;
                other.references.retain(|r| r != reference);
                self.write_record(&other)?;
            }
        }
        if !record.references.iter().any(|r| r == reference) {
            record.references.push(reference.to_owned());
        }
        record.image = image.clone();
        record.last_used = now().max(record.last_used);
        self.write_record(&record)
    }

    fn write_record(&self, record: &Record) -> Result<(), ImageError> {
        let path = self.record_path(&record.image.manifest_digest);
        let temp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(record).expect("plain data serialises");
        std::fs::write(&temp, body).map_err(io_err("write", &temp))?;
        std::fs::File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &temp))?;
        std::fs::rename(&temp, &path).map_err(io_err("rename", &temp))
    }
}

impl Images {
    /// Disk capacity and use of the filesystem under the root.
    pub fn disk_usage(&self) -> Result<DiskUsage, ImageError> {
        let st =
            rustix::fs::statvfs(&self.root).map_err(|e| io_err("statvfs", &self.root)(e.into()))?;
        Ok(DiskUsage {
            capacity: st.f_blocks * st.f_frsize,
            used: (st.f_blocks - st.f_bfree) * st.f_frsize,
        })
    }

    /// Collects images as kubelet does: when disk use is at or above the high
    /// threshold, removes least-recently-used images not in `in_use`
    /// (manifest digests) until use is down to the low threshold, with their
    /// root filesystem images and every blob no remaining image references.
    pub async fn gc(
        &self,
        policy: GcPolicy,
        in_use: &HashSet<Digest>,
    ) -> Result<GcReport, ImageError> {
        let _gate = self.gate.write().await;
        let usage = self.disk_usage()?;
        self.collect(policy, usage, in_use)
    }

    /// [`Images::gc`] with a given disk usage (the caller holds the gate).
    fn collect(
        &self,
        policy: GcPolicy,
        usage: DiskUsage,
        in_use: &HashSet<Digest>,
    ) -> Result<GcReport, ImageError> {
        let mut report = GcReport::default();
        let percent = |p: u8| usage.capacity / 100 * u64::from(p);
        if usage.capacity == 0 || usage.used < percent(policy.high_percent) {
            return Ok(report);
        }
        let to_free = usage.used.saturating_sub(percent(policy.low_percent));
        let mut records = self.records()?;
        records.sort_by_key(|r| r.last_used);
        let victims: Vec<Record> = records
            .iter()
            .filter(|r| !in_use.contains(&r.image.manifest_digest))
            .cloned()
            .collect();
        for victim in victims {
            if report.freed >= to_free {
                break;
            }
            records.retain(|r| r.image.manifest_digest != victim.image.manifest_digest);
            let digest = &victim.image.manifest_digest;
            report.freed += remove_counted(&rootfs::image_path(&self.root.join("rootfs"), digest))?;
            remove_counted(&self.record_path(digest))?;
            report.freed += self.remove_unreferenced(&records)?;
            report.removed.push(digest.clone());
        }
        Ok(report)
    }

    /// Removes every blob none of `records` references; returns bytes freed.
    fn remove_unreferenced(&self, records: &[Record]) -> Result<u64, ImageError> {
        let mut live: HashSet<Digest> = HashSet::new();
        for r in records {
            let i = &r.image;
            live.extend([i.manifest_digest.clone(), i.config_digest.clone()]);
            live.extend(i.layers.iter().map(|l| l.digest.clone()));
            if let Some(top) = i
                .image_id
                .rsplit_once('@')
                .and_then(|(_, d)| d.parse().ok())
            {
                live.insert(top);
            }
        }
        let store = self.puller.store();
        let mut freed = 0;
        for blob in store.list()? {
            if !live.contains(&blob) {
                freed += remove_counted(&store.path(&blob))?;
            }
        }
        Ok(freed)
    }
}

/// Removes what a crash can leave: half-built disks, half-written records,
/// unpack directories.
fn remove_leftovers(root: &Path) -> Result<(), ImageError> {
    let unpack = root.join("unpack");
    std::fs::remove_dir_all(&unpack).map_err(io_err("remove", &unpack))?;
    std::fs::create_dir(&unpack).map_err(io_err("create", &unpack))?;
    for (dir, stale) in [("rootfs", ".tmp-"), ("images", ".json.tmp")] {
        let dir = root.join(dir);
        for entry in std::fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(stale) || name.ends_with(stale) {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
    }
    Ok(())
}

/// Removes a file, returning its size (0 if it was absent).
fn remove_counted(path: &Path) -> Result<u64, ImageError> {
    let size = match std::fs::symlink_metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    std::fs::remove_file(path).map_err(io_err("remove", path))?;
    Ok(size)
}

/// Unpacks into `work` and builds the image; `work` is removed after.
fn build(
    store: &BlobStore,
    image: &PulledImage,
    work: &Path,
    rootfs_dir: &Path,
    limits: Limits,
    format: Format,
) -> Result<PathBuf, ImageError> {
    if work.exists() {
        std::fs::remove_dir_all(work).map_err(io_err("remove stale", work))?;
    }
    std::fs::create_dir_all(work).map_err(io_err("create", work))?;
    let result = unpack::unpack_image(store, &image.layers, work, limits)
        .map_err(ImageError::from)
        .and_then(|()| {
            Ok(rootfs::build(
                work,
                rootfs_dir,
                &image.manifest_digest,
                format,
            )?)
        });
    std::fs::remove_dir_all(work).map_err(io_err("remove", work))?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::Layer;

    fn blob(store: &BlobStore, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        store.put(&d, bytes).unwrap();
        d
    }

    /// Registers an image without a registry: blobs, a rootfs file, a record.
    fn fake_image(images: &Images, name: &str, shared: &Digest, last_used: u64) -> Digest {
        let store = images.puller.store();
        let manifest = blob(store, format!("manifest {name}").as_bytes());
        let own = blob(store, format!("layer {name} {}", "x".repeat(40)).as_bytes());
        let layer = |digest: &Digest| Layer {
            digest: digest.clone(),
            media_type: "t".into(),
            size: 1,
        };
        let image = PulledImage {
            image_id: format!("reg/{name}@{manifest}"),
            manifest_digest: manifest.clone(),
            config_digest: blob(store, format!("config {name}").as_bytes()),
            layers: vec![layer(shared), layer(&own)],
        };
        std::fs::write(
            rootfs::image_path(&images.root.join("rootfs"), &manifest),
            vec![0u8; 60],
        )
        .unwrap();
        let record = Record {
            version: 1,
            references: vec![format!("reg/{name}:1")],
            image,
            last_used,
        };
        images.write_record(&record).unwrap();
        manifest
    }

    #[test]
    fn pull_backoff_doubles_to_five_minutes_and_resets() {
        use std::time::{Duration, Instant};
        let mut b = PullBackoff::default();
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..7)
            .map(|i| b.failed("vm/img", t0 + Duration::from_secs(i)).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        let last = t0 + Duration::from_secs(6);
        assert_eq!(
            b.waiting("vm/img", last + Duration::from_secs(100)),
            Some(Duration::from_secs(200))
        );
        assert_eq!(b.waiting("vm/img", last + Duration::from_secs(300)), None);
        assert_eq!(b.waiting("other", last), None);
        assert_eq!(
            b.failed("vm/img", last + Duration::from_secs(601))
                .as_secs(),
            10,
            "quiet for 2 x max"
        );
        b.succeeded("vm/img");
        assert_eq!(b.waiting("vm/img", last + Duration::from_secs(601)), None);
        assert_eq!(
            b.failed("vm/img", last + Duration::from_secs(602))
                .as_secs(),
            10
        );
    }

    #[test]
    fn opening_removes_what_a_crash_left() {
        let tmp = tempfile::tempdir().unwrap();
        let open = || {
            Images::open(
                tmp.path(),
                PullConfig::default(),
                Limits::default(),
                Format::Erofs,
            )
            .unwrap()
        };
        drop(open());
        let digest = Digest::of(b"m");
        let leftovers = [
            tmp.path()
                .join("rootfs")
                .join(format!(".tmp-{}-1.img", digest.hex())),
            tmp.path()
                .join("images")
                .join(format!("{}.json.tmp", digest.hex())),
            tmp.path()
                .join("unpack")
                .join(digest.hex())
                .join("etc/passwd"),
        ];
        for path in &leftovers {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"half").unwrap();
        }
        let kept = rootfs::image_path(&tmp.path().join("rootfs"), &digest);
        std::fs::write(&kept, b"complete").unwrap();
        drop(open());
        for path in &leftovers {
            assert!(!path.exists(), "{} survived", path.display());
        }
        assert!(kept.exists());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("unpack"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn gc_removes_least_recently_used_unused_images_down_to_the_low_threshold() {
        let tmp = tempfile::tempdir().unwrap();
        let images = Images::open(
            tmp.path(),
            PullConfig::default(),
            Limits::default(),
            Format::Erofs,
        )
        .unwrap();
        let shared = blob(images.puller.store(), b"shared base layer");
        let a = fake_image(&images, "a", &shared, 100);
        let b = fake_image(&images, "b", &shared, 200);
        let c = fake_image(&images, "c", &shared, 300);
        let in_use: HashSet<Digest> = [a.clone()].into();
        let policy = GcPolicy {
            high_percent: 85,
            low_percent: 80,
        };

        let calm = DiskUsage {
            capacity: 1000,
            used: 840,
        };
        assert_eq!(
            images.collect(policy, calm, &in_use).unwrap(),
            GcReport::default()
        );

        let full = DiskUsage {
            capacity: 1000,
            used: 900,
        };
        let report = images.collect(policy, full, &in_use).unwrap();
        assert_eq!(
            report.removed,
            vec![b.clone()],
            "a is in use, b is the oldest unused, c is spared"
        );
        assert!(report.freed >= 100, "down to 80%: {report:?}");
        let store = images.puller.store();
        assert!(store.contains(&shared), "a layer other images use stays");
        assert!(!store.contains(&b) && store.contains(&a) && store.contains(&c));
        let rootfs = |d: &Digest| rootfs::image_path(&tmp.path().join("rootfs"), d).exists();
        assert!(!rootfs(&b) && rootfs(&a) && rootfs(&c));
        let left: Vec<_> = images
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.image.manifest_digest)
            .collect();
        assert_eq!(left.len(), 2);

        let report = images
            .collect(
                policy,
                DiskUsage {
                    capacity: 1000,
                    used: 1000,
                },
                &in_use,
            )
            .unwrap();
        assert_eq!(
            report.removed,
            vec![c],
            "in-use images are never removed, however full"
        );
        assert!(store.contains(&a) && rootfs(&a));
    }
}

//! A VM's container image, made ready before its VMM starts: the runtime asks
//! an [`ImageSource`] for the image `spec.container` names, and gets back the
//! read-only root filesystem image to attach and the merged container config
//! for the guest, or a failure with kubelet's reason (`ErrImagePull`,
//! `ImagePullBackOff`, `InvalidImageName`, `ErrImageNeverPull`).
//!
//! [`NodeImages`] is the node's source: `runv-image`'s image service (pull
//! by policy, one root filesystem per manifest digest), kubelet's pull
//! back-off per VM and image, and credentials from the VM's
//! `imagePullSecrets` ([`PullSecrets`]: the Secrets through the API in
//! cluster mode, a docker config file in standalone mode).
//!
//! The runtime calls it from blocking threads (the controller's
//! `spawn_blocking`, or standalone's loop); the pull runs on the tokio
//! runtime whose handle the source holds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use runv_crds::contract::Reason;
use runv_crds::secureworkload::{Container, ImagePullPolicy};
use runv_image::Digest;
use runv_image::auth::Keyring;
use runv_image::container::{ContainerConfig, Overrides, merge};
use runv_image::images::{GcPolicy, Images, PullBackoff, PullPolicy};
use runv_image::pull::parse_reference;
use serde::{Deserialize, Serialize};

/// Why a VM's image is not ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFailure {
    /// kubelet's reason.
    pub reason: Reason,
    /// What went wrong, for people.
    pub message: String,
    /// When to try again, if trying again may help.
    pub retry: Option<Duration>,
}

/// An image ready for a VM.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// What the VM records and reports.
    pub record: ImageRecord,
    /// The merged container config for the guest.
    pub config: ContainerConfig,
    /// Whether anything was fetched (else the node's copy was used).
    pub pulled: bool,
    /// How long it took.
    pub took: Duration,
}

/// The image a VM's disk comes from (`image.json` in its directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// The image as the spec names it.
    pub image: String,
    /// `registry/repository@sha256:...`, as Pod status reports it.
    #[serde(rename = "imageID")]
    pub image_id: String,
    /// The linux/amd64 manifest's digest.
    pub manifest_digest: String,
    /// The read-only root filesystem image.
    pub rootfs: PathBuf,
    /// The `spec.container` this was made for, as JSON: another one needs
    /// the VM to start again.
    pub container: String,
}

impl ImageRecord {
    /// Whether this record was made for `container`.
    pub fn is_for(&self, container: &Container) -> bool {
        serde_json::to_string(container).is_ok_and(|c| c == self.container)
    }
}

/// Where a VM's image comes from.
pub trait ImageSource: Send + Sync {
    /// Makes `container.image` ready for the VM `key` (`namespace/name`) in
    /// `namespace`, with credentials from its `secrets`.
    fn prepare(
        &self,
        key: &str,
        namespace: &str,
        container: &Container,
        secrets: &[String],
    ) -> Result<Prepared, ImageFailure>;

    /// The directory the root filesystem images are in (the VMM is given them
    /// from there only).
    fn rootfs_dir(&self) -> PathBuf;

    /// Collects images no VM uses once the disk is as full as kubelet's image
    /// GC thresholds say (`in_use`: manifest digests); what it removed.
    fn collect(&self, in_use: &[String]) -> Result<String, String>;
}

/// Docker config JSON documents for a VM's pull, from its `imagePullSecrets`.
pub trait PullSecrets: Send + Sync {
    /// The documents of `names` in `namespace`; an error names what is wrong.
    fn docker_configs(&self, namespace: &str, names: &[String]) -> Result<Vec<Vec<u8>>, String>;
}

/// Standalone mode's credentials: one docker config file for every VM (or
/// none), whatever the VM's `imagePullSecrets` say.
#[derive(Debug, Default)]
pub struct DockerConfigFile(pub Option<PathBuf>);

impl PullSecrets for DockerConfigFile {
    fn docker_configs(&self, _: &str, _: &[String]) -> Result<Vec<Vec<u8>>, String> {
        match &self.0 {
            None => Ok(Vec::new()),
            Some(p) => std::fs::read(p)
                .map(|b| vec![b])
                .map_err(|e| format!("reading the docker config {}: {e}", p.display())),
        }
    }
}

/// The node's image source.
pub struct NodeImages {
    images: Images,
    root: PathBuf,
    runtime: tokio::runtime::Handle,
    backoff: Mutex<PullBackoff>,
    secrets: Box<dyn PullSecrets>,
}

impl std::fmt::Debug for NodeImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeImages")
            .field("root", &self.root)
            .finish()
    }
}

impl NodeImages {
    /// The image service under `root`, pulling on `runtime`.
    pub fn new(
        images: Images,
        root: &Path,
        runtime: tokio::runtime::Handle,
        secrets: Box<dyn PullSecrets>,
    ) -> Self {
        Self {
            images,
            root: root.to_owned(),
            runtime,
            backoff: Mutex::new(PullBackoff::default()),
            secrets,
        }
    }

    /// The image service.
    pub fn images(&self) -> &Images {
        &self.images
    }

    fn keyring(&self, namespace: &str, secrets: &[String]) -> Result<Keyring, ImageFailure> {
        let fail = |message: String| ImageFailure {
            reason: Reason::ErrImagePull,
            message,
            retry: None,
        };
        let mut keyring = Keyring::default();
        for doc in self
            .secrets
            .docker_configs(namespace, secrets)
            .map_err(fail)?
        {
            keyring
                .add_docker_config(&doc)
                .map_err(|e| fail(format!("imagePullSecrets: {}", runv_crds::retry::Chain(&e))))?;
        }
        Ok(keyring)
    }

    fn present(&self, name: &str) -> bool {
        self.images
            .records()
            .is_ok_and(|rs| rs.iter().any(|r| r.references.iter().any(|n| n == name)))
    }
}

fn policy(p: ImagePullPolicy) -> PullPolicy {
    match p {
        ImagePullPolicy::Always => PullPolicy::Always,
        ImagePullPolicy::IfNotPresent => PullPolicy::IfNotPresent,
        ImagePullPolicy::Never => PullPolicy::Never,
    }
}

/// `spec.container`'s overrides of the image's config.
fn overrides(c: &Container) -> Overrides {
    Overrides {
        command: c.command.clone(),
        args: c.args.clone(),
        env: c
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        working_dir: c.working_dir.clone(),
    }
}

impl ImageSource for NodeImages {
    fn prepare(
        &self,
        key: &str,
        namespace: &str,
        container: &Container,
        secrets: &[String],
    ) -> Result<Prepared, ImageFailure> {
        let reference = parse_reference(&container.image).map_err(|e| ImageFailure {
            reason: Reason::InvalidImageName,
            message: format!("spec.container.image: {}", runv_crds::retry::Chain(&e)),
            retry: None,
        })?;
        let backoff_key = format!("{key}/{}", container.image);
        let now = Instant::now();
        let lock = || {
            self.backoff
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(wait) = lock().waiting(&backoff_key, now) {
            return Err(ImageFailure {
                reason: Reason::ImagePullBackOff,
                message: format!("Back-off pulling image {:?}", container.image),
                retry: Some(wait),
            });
        }
        let auth = self
            .keyring(namespace, secrets)?
            .credential_for(reference.registry(), reference.repository());
        let policy = policy(container.pull_policy());
        let name = reference.whole();
        let pulled = policy == PullPolicy::Always || !self.present(&name);
        let started = Instant::now();
        let ready = self
            .runtime
            .block_on(self.images.ensure(&reference, &auth, policy))
            .map_err(|e| {
                let delay = lock().failed(&backoff_key, Instant::now());
                ImageFailure {
                    reason: Reason::parse(e.reason()).unwrap_or(Reason::ErrImagePull),
                    message: format!(
                        "pulling {:?}: {}",
                        container.image,
                        runv_crds::retry::Chain(&e)
                    ),
                    retry: Some(delay),
                }
            })?;
        lock().succeeded(&backoff_key);
        let image_id = ready.pulled.image_id.clone();
        let manifest_digest = ready.pulled.manifest_digest.to_string();
        let config = merge(
            &ready.config,
            &overrides(container),
            &image_id,
            &manifest_digest,
        )
        .map_err(|e| ImageFailure {
            reason: Reason::ErrImagePull,
            message: format!("{:?}: {}", container.image, runv_crds::retry::Chain(&e)),
            retry: None,
        })?;
        Ok(Prepared {
            record: ImageRecord {
                image: container.image.clone(),
                image_id,
                manifest_digest,
                rootfs: ready.rootfs,
                container: serde_json::to_string(container).unwrap_or_default(),
            },
            config,
            pulled,
            took: started.elapsed(),
        })
    }

    fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    fn collect(&self, in_use: &[String]) -> Result<String, String> {
        let in_use: HashSet<Digest> = in_use.iter().filter_map(|d| d.parse().ok()).collect();
        let report = self
            .runtime
            .block_on(self.images.gc(GcPolicy::default(), &in_use))
            .map_err(|e| runv_crds::retry::Chain(&e).to_string())?;
        Ok(format!(
            "{} image(s) removed, {} bytes freed",
            report.removed.len(),
            report.freed
        ))
    }
}

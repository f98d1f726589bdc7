//! The container image of a VM with `spec.container`: made ready just before
//! a start (never while the VM runs), recorded in the VM's directory
//! (`image.json`, with the merged config in `container.json`), attached as
//! the VM's first disk, read-only, and reported in `status.container`.

use runv_crds::MicroVMSpec;
use runv_crds::contract::Reason;
use runv_crds::microvm::ContainerStatus;
use runv_crds::secureworkload::Container;
use runv_vmm_api::{DiskConfig, VmConfig};

use super::{Runtime, VmRef};
use crate::host::HostError;
use crate::host::hostfile::HostFile;
use crate::images::{ImageFailure, ImageRecord};
use crate::reconcile::Transition;

/// How soon a VM whose image could not be recorded on the node tries again.
const RECORD_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl Runtime {
    /// Makes the VM's image ready and records it in the VM's directory;
    /// returns the Events of it (`Pulling`, `Pulled`).
    pub(super) fn prepare_image(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        container: &Container,
    ) -> Result<Vec<Transition>, ImageFailure> {
        let Some(images) = &self.images else {
            return Err(ImageFailure {
                reason: Reason::ErrImagePull,
                message:
                    "this node's agent has no image service, so spec.container cannot run here"
                        .into(),
                retry: None,
            });
        };
        let secrets: Vec<String> = spec
            .image_pull_secrets
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let prepared = images.prepare(&vm.to_string(), &vm.namespace, container, &secrets)?;
        let dir = self.dir(vm);
        let recorded = dir
            .create()
            .and_then(|()| {
                runv_image::container::write(&prepared.config, &dir.container_config()).map_err(
                    |e| HostError::Invalid {
                        what: "container config",
                        value: runv_crds::retry::Chain(&e).to_string(),
                    },
                )
            })
            .and_then(|()| dir.write_image_record(&prepared.record));
        if let Err(e) = recorded {
            return Err(ImageFailure {
                reason: Reason::ErrImagePull,
                message: format!(
                    "recording the image on the node: {}",
                    runv_crds::retry::Chain(&e)
                ),
                retry: Some(RECORD_RETRY),
            });
        }
        let image = &container.image;
        let pulled = |note: String| Transition {
            warning: false,
            reason: "Pulled".into(),
            note,
        };
        Ok(if prepared.pulled {
            vec![
                Transition {
                    warning: false,
                    reason: "Pulling".into(),
                    note: format!("Pulling image {image:?}"),
                },
                pulled(format!(
                    "Successfully pulled image {image:?} ({}) in {} ms",
                    prepared.record.image_id,
                    prepared.took.as_millis()
                )),
            ]
        } else {
            vec![pulled(format!(
                "Container image {image:?} already present on machine ({})",
                prepared.record.image_id
            ))]
        })
    }

    /// The image record of a VM with `spec.container`, when it is the one
    /// the spec asks for now.
    pub(super) fn current_image(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<ImageRecord> {
        let container = spec.container.as_ref()?;
        self.dir(vm)
            .read_image_record()
            .filter(|r| r.is_for(container))
    }

    /// `status.container`: the image the VM last started with.
    pub(super) fn container_status(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
    ) -> Option<ContainerStatus> {
        spec.container.as_ref()?;
        let r = self.dir(vm).read_image_record()?;
        Some(ContainerStatus {
            image: r.image,
            image_id: r.image_id,
        })
    }

    /// Collects the node's images that no VM's directory records, when the
    /// disk is full enough (kubelet's thresholds); `None` without an image
    /// service. An image a VM uses is never removed, whether it runs or not.
    pub fn collect_images(&self) -> Option<Result<String, String>> {
        let images = self.images.as_ref()?;
        let in_use: Vec<String> = crate::state::dirs(&self.config.root)
            .iter()
            .filter_map(crate::state::VmDir::read_image_record)
            .map(|r| r.manifest_digest)
            .collect();
        Some(images.collect(&in_use))
    }

    /// Opens the VM's root filesystem image, only from the image service's
    /// directory, to hand the VMM as a descriptor.
    pub(super) fn open_rootfs(&self, record: &ImageRecord) -> Result<HostFile, HostError> {
        let dir = self
            .images
            .as_ref()
            .map(|i| i.rootfs_dir())
            .ok_or_else(|| HostError::Invalid {
                what: "root filesystem image (no image service)",
                value: record.rootfs.display().to_string(),
            })?;
        self.host
            .disks()
            .open_host_file(&[dir], "root filesystem images", &record.rootfs)
            .map_err(|e| HostError::Invalid {
                what: "root filesystem image",
                value: runv_crds::retry::Chain(&e).to_string(),
            })
    }
}

/// Puts the root filesystem disk first (`/dev/vda`), read-only, at `path`.
pub(super) fn attach_rootfs(c: &mut VmConfig, path: std::path::PathBuf) {
    c.disks.insert(
        0,
        DiskConfig {
            path,
            read_only: true,
        },
    );
}

//! The guest kit: a VM with `spec.container` and no `spec.boot.kernel`
//! boots the node's kernel (`vmm/scripts/guest-kit.sh` installs it) with an
//! initramfs of `runv-init` and the modules it needs, built once and cached
//! beside the kit ([`crate::host::guestkit`]).

use std::borrow::Cow;
use std::path::PathBuf;

use runv_crds::MicroVMSpec;

use super::Runtime;

/// The kernel command line of a kit boot, before the spec's own.
pub const KIT_CMDLINE: &str = "console=ttyS0 panic=-1 runv.channel=vsock:1024";

/// Where the node's guest kit and `runv-init` are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestKitConfig {
    /// The kit (`vmlinux`, `modules/`, `version`).
    pub dir: PathBuf,
    /// The static `runv-init` binary.
    pub init: PathBuf,
}

impl GuestKitConfig {
    /// Where built initramfs files are kept: beside the kit, so they lie
    /// beneath the same allowed kernel directory.
    pub fn cache(&self) -> PathBuf {
        self.dir.join("initramfs")
    }
}

impl Runtime {
    /// The spec as the VM boots: a container VM without a kernel gets the
    /// kit's kernel and initramfs, and [`KIT_CMDLINE`] before its own
    /// command line. An error says why the kit cannot be used.
    pub(super) fn boot_spec<'a>(
        &self,
        spec: &'a MicroVMSpec,
    ) -> Result<Cow<'a, MicroVMSpec>, String> {
        if spec.container.is_none() || !spec.boot.kernel.is_empty() {
            return Ok(Cow::Borrowed(spec));
        }
        let (kernel, initrd) = self.kit()?;
        let mut s = spec.clone();
        s.boot.kernel = kernel;
        s.boot.initrd = Some(initrd);
        s.boot.cmdline = match spec.boot.cmdline.as_str() {
            "" => KIT_CMDLINE.to_owned(),
            own => format!("{KIT_CMDLINE} {own}"),
        };
        Ok(Cow::Owned(s))
    }

    /// The kit's kernel and initramfs, built the first time and kept.
    fn kit(&self) -> Result<(String, String), String> {
        let Some(kit) = &self.config.guest_kit else {
            return Err(
                "spec.boot.kernel is not set and this node's agent has no guest kit configured \
                 (runv-agent --guest-kit-dir); name a kernel or ask the node's administrator"
                    .into(),
            );
        };
        let mut cached = self
            .kit_files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(files) = &*cached {
            return Ok(files.clone());
        }
        let kernel = kit.dir.join("vmlinux");
        if !kernel.is_file() {
            return Err(format!(
                "spec.boot.kernel is not set and this node's guest kit has no kernel at {} \
                 (install it with vmm/scripts/guest-kit.sh)",
                kernel.display()
            ));
        }
        let initrd =
            crate::host::guestkit::initramfs(&kit.dir, &kit.init, &kit.cache()).map_err(|e| {
                format!(
                    "spec.boot.kernel is not set and this node's guest kit cannot be used: {}",
                    runv_crds::retry::Chain(&e)
                )
            })?;
        let files = (
            kernel.to_string_lossy().into_owned(),
            initrd.to_string_lossy().into_owned(),
        );
        *cached = Some(files.clone());
        Ok(files)
    }
}

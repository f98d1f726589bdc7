//! The whole guest path on a real Linux kernel: Debian's cloud kernel from
//! the node's guest kit, the initramfs the agent builds (`runv-init` plus the
//! kit's modules), and a root filesystem disk made from a busybox image pulled
//! from a real registry on loopback, booted under QEMU's software emulation
//! (TCG: a stock kernel does not boot on this host's `kvm_pvm`). The test is
//! the host end of the channel, over a virtio-console port named `runv.0`
//! (QEMU has no vsock without vhost), and checks that:
//! - the modules load (runv-init lists them on the serial console);
//! - the root filesystem mounts under its overlay: the container reads a file
//!   of the image and writes one into a directory of the read-only image;
//! - the entrypoint runs with the config's environment, arguments and user
//!   (`app`, named in the image's `/etc/passwd` and `/etc/group`);
//! - stdout and stderr arrive on their own streams;
//! - the exit code (3) is reported, and the VM powers off by itself.
//!
//! Needs root, `qemu-system-x86_64`, `docker-registry`, `skopeo`,
//! `mkfs.erofs`, `/bin/busybox` (Debian's `busybox-static`) and the guest kit
//! (`vmm/scripts/guest-kit.sh` into `$RUNV_GUEST_KIT_DIR`, default
//! `/var/lib/runv/guests/kit`). It builds the static `runv-init` with cargo.

mod common;

use std::path::Path;
use std::time::Instant;

use common::images::require_tools;
use common::tcg::{connect, converse, guest_config, image, runv_init, start_qemu, wait_power_off};
use runv_image::container::Overrides;
use runv_node_agent::host::guestkit;
use runv_node_agent::testing::{Need, require};

/// What the container runs: shows what its root is mounted as, reads the
/// image, writes into a directory of the (read-only) image as its user (`/`
/// is root's, as in any container), prints its user, environment and
/// arguments on stdout, a line on stderr, and exits 3.
const SCRIPT: &str = r#"
grep '^overlay / overlay ' /proc/mounts | cut -d' ' -f1-3
cat /etc/image-release
echo written-by-the-container > /home/app/note && cat /home/app/note
echo "user=$(id -un):$(id -gn) uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "IMAGE_VAR=$IMAGE_VAR WHO=$WHO pwd=$(pwd) arg0=$0 arg1=$1"
echo "to-stderr" >&2
exit 3
"#;

#[test]
fn a_container_runs_on_debians_kernel_and_the_vm_powers_off() {
    let test = "a_container_runs_on_debians_kernel_and_the_vm_powers_off";
    if !require(test, &[Need::Root])
        || !require_tools(
            test,
            &[
                "qemu-system-x86_64",
                "docker-registry",
                "skopeo",
                "mkfs.erofs",
                "busybox",
            ],
        )
    {
        return;
    }
    let Some(kit) = common::guest_kit(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let init = runv_init();
    let overrides = Overrides {
        command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        args: vec!["script".into(), "$(WHO)".into()],
        env: vec![("WHO".into(), "world".into())],
        working_dir: Some("/home/app".into()),
    };
    let (rootfs, container) = image(tmp.path(), &overrides, "app");
    let initrd = guestkit::initramfs(&kit, &init, &tmp.path().join("initramfs")).unwrap();
    let config = guest_config(container, "kernel-test");

    let spawned = Instant::now();
    let (mut qemu, serial) = start_qemu(tmp.path(), &kit, &initrd, &rootfs);
    let mut chan = connect(&mut qemu, &tmp.path().join("channel.sock"));
    let conv = converse(&mut chan, config, spawned).unwrap_or_else(|e| {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!("{e}; serial console:\n{console}")
    });
    wait_power_off(&mut qemu, &serial);
    let powered_off = spawned.elapsed();
    let console = std::fs::read_to_string(&serial).unwrap();
    let stdout = String::from_utf8_lossy(&conv.stdout);
    let stderr = String::from_utf8_lossy(&conv.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nconsole:\n{console}");

    // The modules, dependencies first.
    let loaded = console
        .lines()
        .find_map(|l| l.split("runv-init: loaded modules: ").nth(1))
        .unwrap_or_else(|| panic!("no module list on the console:\n{console}"));
    let loaded: Vec<&str> = loaded.split_whitespace().collect();
    for m in guestkit_wanted() {
        assert!(loaded.contains(&m.as_str()), "{m} not loaded: {loaded:?}");
    }
    let pos = |m: &str| loaded.iter().position(|l| *l == m).unwrap();
    assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_mmio"));
    // The root filesystem, its overlay, the process's user, env and args.
    assert!(conv.started, "{context}");
    assert!(stdout.contains("overlay / overlay\n"), "{context}");
    assert!(stdout.contains("busybox-test\n"), "{context}");
    assert!(stdout.contains("written-by-the-container\n"), "{context}");
    assert!(
        stdout.contains("user=app:app uid=1000 gid=1000 groups=1000 1001"),
        "{context}"
    );
    assert!(
        stdout.contains("IMAGE_VAR=from-image WHO=world pwd=/home/app arg0=script arg1=world"),
        "{context}"
    );
    // Two streams, kept apart.
    assert_eq!(stderr, "to-stderr\n", "{context}");
    assert!(!stdout.contains("to-stderr"), "{context}");
    let exited = conv.exited.unwrap();
    assert_eq!((exited.code, exited.signal), (Some(3), None), "{context}");
    assert!(exited.start_error.is_none(), "{exited:?}");

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "measured: runv-init's Hello {:.2?} after QEMU was spawned, powered off after {:.2?}; \
         initramfs {} bytes, runv-init {} bytes",
        conv.hello_after.unwrap(),
        powered_off,
        size(&initrd),
        size(&init)
    );
}

/// The modules the agent puts in every initramfs, as the kernel names them.
fn guestkit_wanted() -> Vec<String> {
    runv_node_agent::host::initramfs::WANTED
        .iter()
        .map(|m| m.to_string())
        .collect()
}

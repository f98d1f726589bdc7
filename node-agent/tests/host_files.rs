//! The tenant boundary for host files, through the real `runv-agent
//! standalone` and `runv-vmm`: a spec names kernels, initrds and disk images
//! only from the directories the node allows for them. A root-only file
//! elsewhere, a symlink in an allowed directory that points out of it, a
//! `..` path, `/proc/kcore` and `/proc/1/root/...` are all refused before
//! anything is opened for the VM (`HostPathNotAllowed`, a Warning Event), and
//! the guest never sees a byte of them. A disk from an allowed directory
//! reaches the guest through a descriptor the agent opened and the VMM
//! inherited.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, KillVmmOnDrop, vmm_binary};
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "HOST-SECRET-kubelet-key-material";

/// A 1 MiB image with `text` at sector 1 (where the test guest reads).
fn image(path: &Path, text: &str) {
    let mut data = vec![0u8; 1 << 20];
    data[512..512 + text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(path, data).unwrap();
}

fn manifest(name: &str, kernel: &str, extra: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\nspec:\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {kernel}\n    cmdline: \"console=ttyS0\"\n  runPolicy: Once\n{extra}"
    )
}

fn disk(path: &Path, read_only: bool) -> String {
    format!(
        "  disks:\n  - name: d\n    readOnly: {read_only}\n    file: {{ path: {} }}\n",
        path.display()
    )
}

/// Runs `runv-agent standalone` on `body` with `images` as the only allowed
/// image directory; its exit code and output.
fn run(tmp: &Path, name: &str, body: &str, images: &Path) -> (Option<i32>, String) {
    run_with(tmp, name, body, images, &[])
}

/// [`run`] with more agent flags.
fn run_with(
    tmp: &Path,
    name: &str,
    body: &str,
    images: &Path,
    flags: &[&str],
) -> (Option<i32>, String) {
    let file = tmp.join(format!("{name}.yaml"));
    std::fs::write(&file, body).unwrap();
    let root = tmp.join(format!("root-{name}"));
    let (root, file, vmm) = (
        root.display().to_string(),
        file.display().to_string(),
        vmm_binary().display().to_string(),
    );
    let images = images.display().to_string();
    let _guard = KillVmmOnDrop(Path::new(&root).join("vms").join(format!("default_{name}")));
    let mut args = vec!["--root", &root, "--allowed-image-dir", &images];
    args.extend_from_slice(flags);
    args.extend(["standalone", &file, "--vmm", &vmm]);
    let mut agent = Agent::start(&args);
    let code = agent.wait(WAIT);
    (code, agent.output())
}

#[test]
fn a_spec_reaches_no_host_file_outside_the_allowed_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let secret = tmp.path().join("secret.key");
    image(&secret, SECRET);
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("link.img")).unwrap();
    std::os::unix::fs::symlink("../secret.key", images.join("rel.img")).unwrap();
    let guest = common::test_guest();
    let cases = [
        (
            "ro-outside",
            "spec.disks[d].file.path",
            manifest("ro-outside", &guest, &disk(&secret, true)),
        ),
        (
            "rw-base-outside",
            "spec.disks[d].file.path",
            manifest("rw-base-outside", &guest, &disk(&secret, false)),
        ),
        (
            "symlink-out",
            "spec.disks[d].file.path",
            manifest("symlink-out", &guest, &disk(&images.join("link.img"), true)),
        ),
        (
            "relative-link-out",
            "spec.disks[d].file.path",
            manifest(
                "relative-link-out",
                &guest,
                &disk(&images.join("rel.img"), true),
            ),
        ),
        (
            "dot-dot",
            "spec.disks[d].file.path",
            manifest(
                "dot-dot",
                &guest,
                &disk(&images.join("../secret.key"), true),
            ),
        ),
        (
            "kcore-disk",
            "spec.disks[d].file.path",
            manifest("kcore-disk", &guest, &disk(Path::new("/proc/kcore"), true)),
        ),
        (
            "kcore-initrd",
            "spec.boot.initrd",
            manifest("kcore-initrd", &guest, "")
                .replace("    cmdline:", "    initrd: /proc/kcore\n    cmdline:"),
        ),
        (
            "proc-root-kernel",
            "spec.boot.kernel",
            manifest("proc-root-kernel", &format!("/proc/1/root{guest}"), ""),
        ),
        (
            "kernel-outside",
            "spec.boot.kernel",
            manifest("kernel-outside", &secret.display().to_string(), ""),
        ),
    ];
    let mut refused = Vec::new();
    for (name, field, body) in &cases {
        let (code, out) = run(tmp.path(), name, body, &images);
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains("reason=HostPathNotAllowed"), "{name}: {out}");
        assert!(out.contains("Warning HostPathNotAllowed"), "{name}: {out}");
        assert!(out.contains(field), "{name}: the field is named: {out}");
        assert!(
            !out.contains(SECRET),
            "{name}: the secret reached the console: {out}"
        );
        assert!(!out.contains("VMM started"), "{name}: a VMM ran: {out}");
        refused.push(*name);
    }
    println!("refused: {refused:?}");
}

#[test]
fn an_allowed_disk_reaches_the_guest_through_a_descriptor() {
    if !require(
        "an_allowed_disk_reaches_the_guest_through_a_descriptor",
        &[Need::Kvm],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("team")).unwrap();
    image(&images.join("team/disk.img"), "RUNV-ALLOWED-DISK");
    // A link that stays inside the allowed directory is followed.
    std::os::unix::fs::symlink("team/disk.img", images.join("current.img")).unwrap();
    let body = manifest(
        "allowed",
        &common::test_guest(),
        &disk(&images.join("current.img"), true),
    );
    let (code, out) = run(tmp.path(), "allowed", &body, &images);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("virtio-blk sector1=RUNV-ALLOWED-DISK"),
        "{out}"
    );
    // The VMM was given descriptors, not paths.
    let text = std::fs::read_to_string(
        tmp.path()
            .join("root-allowed/vms/default_allowed/config.json"),
    )
    .unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["kernel"], "/proc/self/fd/3", "{text}");
    assert_eq!(config["disks"][0]["path"], "/proc/self/fd/4", "{text}");
}

#[test]
fn a_disk_larger_than_the_node_allows_is_refused_before_it_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    image(&images.join("base.img"), "BASE");
    let guest = common::test_guest();
    let cases = [
        (
            "huge-empty",
            "spec.disks[d].empty.size is 2199023255552 bytes",
            manifest(
                "huge-empty",
                &guest,
                "  disks:\n  - name: d\n    empty: { size: 2Ti }\n",
            ),
            "256Gi",
        ),
        (
            "big-base",
            "spec.disks[d].file.path is 1048576 bytes",
            manifest("big-base", &guest, &disk(&images.join("base.img"), false)),
            "512Ki",
        ),
    ];
    for (name, says, body, limit) in &cases {
        let (code, out) = run_with(tmp.path(), name, body, &images, &["--max-disk-size", limit]);
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains(says), "{name}: {out}");
        assert!(
            out.contains("(runv-agent --max-disk-size)"),
            "{name}: {out}"
        );
        assert!(!out.contains("VMM started"), "{name}: a VMM ran: {out}");
        let disk = tmp
            .path()
            .join(format!("root-{name}/vms/default_{name}/disks/d.img"));
        assert!(!disk.exists(), "{name}: {} was written", disk.display());
    }
}

#[test]
fn disks_past_the_nodes_ephemeral_storage_are_refused() {
    if !require(
        "disks_past_the_nodes_ephemeral_storage_are_refused",
        &[Need::Kvm],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let guest = common::test_guest();
    let empty = |size: &str| format!("  disks:\n  - name: d\n    empty: {{ size: {size} }}\n");
    // Two VMs in one agent: the first takes 2 GiB of the node's 3 GiB.
    let body = [
        manifest("first", &guest, &empty("2Gi")),
        manifest("second", &guest, &empty("2Gi")),
    ]
    .join("---\n");
    let (code, out) = run_with(
        tmp.path(),
        "both",
        &body,
        &images,
        &["--ephemeral-storage", "3Gi"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "the VM's new disks need 2147483648 bytes, and the node's VM disks already take \
             2147483648 of its 3221225472 bytes of ephemeral storage (runv-agent --ephemeral-storage)"
        ),
        "{out}"
    );
    let root = tmp.path().join("root-both/vms");
    let disk = |vm: &str| root.join(format!("default_{vm}/disks/d.img"));
    assert!(disk("first").exists(), "{out}");
    assert!(!disk("second").exists(), "{out}");
    assert!(
        out.contains("first status phase=Succeeded"),
        "the first VM ran: {out}"
    );
}

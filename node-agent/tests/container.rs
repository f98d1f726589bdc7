//! A MicroVM with `spec.container`, through the real `runv-agent standalone`
//! and `runv-vmm`, with its image in a real registry on loopback (Debian's
//! `docker-registry`, pushed to with `skopeo`): the agent pulls the image,
//! builds its read-only root filesystem image (erofs), attaches it as the
//! VM's first disk and reports the resolved digest. The test guest reads the
//! disk's superblock and prints the erofs magic, which proves the disk the
//! VM got is the image's. A second run uses the node's copy; a reference that
//! does not parse, a `Never` policy without the image and a registry that
//! wants credentials the node does not have each fail with kubelet's reason,
//! and the credentials given in a docker config file make the pull work.
//!
//! In cluster mode (the test server, the real operator, `runv-agent run` and
//! `kubectl`), a SecureWorkload's replicas pull the image with the
//! credentials of a `kubectl create secret docker-registry` Secret named in
//! `imagePullSecrets`, and each replica's status shows the image's digest.
//!
//! Needs root, /dev/kvm, docker-registry, skopeo, htpasswd and mkfs.erofs.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::cluster::{Cluster, run_scenario_needing, wait_until};
use common::images::{Registry, require_tools};
use common::push_test_image;
use common::{Agent, KillVmmOnDrop, vmm_binary};
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(120);
/// erofs's superblock magic, at byte 1024 of the filesystem image.
const EROFS_MAGIC: &str = "magic1024=0xe0f5e1e2";

fn manifest(name: &str, image: &str, policy: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\nspec:\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {}\n    cmdline: \"console=ttyS0\"\n  runPolicy: Once\n  container:\n    image: \"{image}\"\n    args: [\"--greeting\", \"$(WHO)\"]\n    env: [{{ name: WHO, value: world }}]\n{policy}",
        common::test_guest()
    )
}

/// Runs `runv-agent standalone` on `body` with its state in `root`; its exit
/// code and output.
fn run(root: &Path, name: &str, body: &str, flags: &[&str]) -> (Option<i32>, String) {
    let file = root.with_extension(format!("{name}.yaml"));
    std::fs::write(&file, body).unwrap();
    let (root_s, file_s, vmm) = (
        root.display().to_string(),
        file.display().to_string(),
        vmm_binary().display().to_string(),
    );
    let _guard = KillVmmOnDrop(root.join("vms").join(format!("default_{name}")));
    let mut args = vec!["--root", &root_s];
    args.extend_from_slice(&["standalone", &file_s, "--vmm", &vmm]);
    args.extend_from_slice(flags);
    let mut agent = Agent::start(&args);
    let code = agent.wait(WAIT);
    (code, agent.output())
}

fn needs(test: &str) -> bool {
    require(test, &[Need::Kvm, Need::Root])
        && require_tools(
            test,
            &["docker-registry", "skopeo", "htpasswd", "mkfs.erofs"],
        )
}

#[test]
fn a_container_vm_boots_with_its_image_as_a_read_only_first_disk() {
    let test = "a_container_vm_boots_with_its_image_as_a_read_only_first_disk";
    if !needs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    push_test_image(&registry, tmp.path(), "1", &[]);
    let image = format!("{}/app:1", registry.addr);
    let root = tmp.path().join("root");

    let (code, out) = run(&root, "app", &manifest("app", &image, ""), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("app Normal Pulling: Pulling image {image:?}")),
        "{out}"
    );
    assert!(
        out.contains("app Normal Pulled: Successfully pulled image"),
        "{out}"
    );
    // The first disk is the image's filesystem, read-only.
    assert!(
        out.contains("virtio-blk sectors=") && out.contains(" ro\n"),
        "{out}"
    );
    assert!(out.contains("virtio-blk ro write refused"), "{out}");
    assert!(out.contains(EROFS_MAGIC), "{out}");
    let dir = root.join("vms/default_app");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("image.json")).unwrap()).unwrap();
    let image_id = record["imageID"].as_str().unwrap().to_owned();
    assert!(
        image_id.starts_with(&format!("{}/app@sha256:", registry.addr)),
        "{record}"
    );
    // The merged config for the guest: the image's entrypoint, the spec's
    // args with $(WHO) expanded, both environments.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("container.json")).unwrap()).unwrap();
    assert_eq!(
        config["argv"],
        serde_json::json!(["/bin/app", "--greeting", "world"]),
        "{config}"
    );
    assert!(config["env"].to_string().contains("A=1"), "{config}");
    assert!(config["env"].to_string().contains("WHO=world"), "{config}");
    assert_eq!(config["imageID"], image_id.as_str());
    // The VMM was handed the root filesystem as a descriptor, first.
    let vmm_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(vmm_config["disks"][0]["readOnly"], true, "{vmm_config}");
    assert!(
        vmm_config["disks"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/proc/self/fd/"),
        "{vmm_config}"
    );

    // Again, IfNotPresent (a tagged image): the node's copy, nothing pulled.
    let (code, out) = run(&root, "app", &manifest("app", &image, ""), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("Pulling image"), "{out}");
    assert!(out.contains("already present on machine"), "{out}");
    assert!(out.contains(EROFS_MAGIC), "{out}");
}

#[test]
fn image_failures_carry_kubelets_reasons() {
    let test = "image_failures_carry_kubelets_reasons";
    if !needs(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(Some(("alice", "s3cret")));
    push_test_image(
        &registry,
        tmp.path(),
        "1",
        &["--dest-creds", "alice:s3cret"],
    );
    let image = format!("{}/app:1", registry.addr);

    // A reference that does not parse: refused, nothing tried again.
    let (code, out) = run(
        &tmp.path().join("bad"),
        "bad",
        &manifest("bad", "UPPER/Case::x", ""),
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("reason=InvalidImageName"), "{out}");
    assert!(out.contains("spec.container.image"), "{out}");

    // Never, and the node has no copy.
    let (code, out) = run(
        &tmp.path().join("never"),
        "never",
        &manifest("never", &image, "    imagePullPolicy: Never\n"),
        &["--timeout", "5"],
    );
    assert!(out.contains("Warning ErrImageNeverPull"), "{code:?} {out}");
    assert!(out.contains("never stopped"), "{out}");

    // Credentials the node does not have: ErrImagePull, then the back-off.
    let (code, out) = run(
        &tmp.path().join("anon"),
        "anon",
        &manifest("anon", &image, ""),
        &["--timeout", "5"],
    );
    assert!(out.contains("Warning ErrImagePull"), "{code:?} {out}");
    assert!(out.contains("Warning ImagePullBackOff"), "{out}");
    assert!(!out.contains(EROFS_MAGIC), "{out}");

    // With a docker config naming them, the pull works.
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let config = tmp.path().join("docker-config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    let (code, out) = run(
        &tmp.path().join("auth"),
        "auth",
        &manifest("auth", &image, ""),
        &["--docker-config", &config.display().to_string()],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(EROFS_MAGIC), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secureworkload_pulls_its_image_with_its_pull_secret() -> anyhow::Result<()> {
    let test = "a_secureworkload_pulls_its_image_with_its_pull_secret";
    if !require_tools(
        test,
        &["docker-registry", "skopeo", "htpasswd", "mkfs.erofs"],
    ) {
        return Ok(());
    }
    run_scenario_needing(test, &[Need::Root], workload_pulls).await
}

fn workload_pulls(cluster: &Cluster) -> anyhow::Result<()> {
    let registry = Registry::start(Some(("bob", "hunter2")));
    push_test_image(
        &registry,
        cluster.tmp.path(),
        "1",
        &["--dest-creds", "bob:hunter2"],
    );
    let image = format!("{}/app:1", registry.addr);
    let server = registry.addr.to_string();
    cluster.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "--docker-server",
        &server,
        "--docker-username",
        "bob",
        "--docker-password",
        "hunter2",
    ])?;
    let mut agent = cluster.start_agent();
    let body = format!(
        "apiVersion: runv.dev/v1alpha1\nkind: SecureWorkload\nmetadata:\n  name: img\n  namespace: default\nspec:\n  replicas: 2\n  selector: {{ matchLabels: {{ app: img }} }}\n  template:\n    metadata: {{ labels: {{ app: img }} }}\n    spec:\n      resources: {{ vcpus: 1, memory: 64Mi }}\n      boot: {{ kernel: {}, cmdline: console=ttyS0 }}\n      runPolicy: Once\n      imagePullSecrets: [{{ name: regcred }}]\n  container:\n    image: \"{image}\"\n",
        common::test_guest()
    );
    let file = cluster.tmp.path().join("swl.yaml");
    std::fs::write(&file, body)?;
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    let ids = || -> anyhow::Result<Vec<String>> {
        let out = cluster.kubectl(&[
            "get",
            "mvm",
            "-l",
            "app=img",
            "-o",
            "jsonpath={range .items[*]}{.status.phase} {.status.container.imageID}{\"\\n\"}{end}",
        ])?;
        Ok(out.lines().map(str::to_owned).collect())
    };
    let done = |l: &String| l.starts_with("Succeeded ");
    wait_until("both replicas ran", Duration::from_secs(180), || {
        Ok(ids()?.iter().filter(|l| done(l)).count() == 2)
    })
    .map_err(|e| e.context(agent.output()))?;
    let prefix = format!("Succeeded {}/app@sha256:", registry.addr);
    for line in ids()? {
        if !line.starts_with(&prefix) {
            let all = cluster.kubectl(&["get", "mvm", "-o", "yaml"])?;
            panic!("{line}\n{all}\n{}", agent.output());
        }
    }
    // Each replica booted with the image's filesystem as its first disk.
    let names = cluster.kubectl(&["get", "mvm", "-l", "app=img", "-o", "name"])?;
    for name in names.lines() {
        let name = name.trim_start_matches("microvm.runv.dev/");
        let log = std::fs::read_to_string(cluster.vm_dir(name).join("serial.log"))?;
        assert!(log.contains(EROFS_MAGIC), "{name}: {log}");
    }
    let events = cluster.kubectl(&["get", "events", "-o", "jsonpath={.items[*].reason}"])?;
    assert!(events.contains("Pulled"), "{events}");
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    Ok(())
}

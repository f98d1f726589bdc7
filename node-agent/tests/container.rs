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

/// The test guest in its container mode: it checks its disks, then speaks
/// the guest side of the channel as runv-init would, and its "container"
/// exits with the code `guest` names (`exit=N`, `run=forever`, ...).
fn manifest_with(name: &str, image: &str, policy: &str, run: &str, guest: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\nspec:\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {}\n    cmdline: \"console=ttyS0 test=container disks=check out={name} {guest}\"\n  runPolicy: {run}\n  container:\n    image: \"{image}\"\n    args: [\"--greeting\", \"$(WHO)\"]\n    env: [{{ name: WHO, value: world }}]\n{policy}",
        common::test_guest()
    )
}

fn manifest(name: &str, image: &str, policy: &str) -> String {
    manifest_with(name, image, policy, "Once", "exit=0")
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
    // The guest took its config over the channel, and its output came back
    // through the agent's link, printed as the console is.
    assert!(
        out.contains("app | runv-test-guest stdout: app (config of "),
        "{out}"
    );
    assert!(out.contains("hostname app, argv[0] /bin/app)"), "{out}");
    assert!(out.contains("app | runv-test-guest stderr: app\n"), "{out}");
    assert!(out.contains("phase=Succeeded"), "{out}");
    assert!(
        out.contains("app Normal Started: Started container\n"),
        "{out}"
    );
    assert!(
        out.contains("app Normal Exited: Container exited with code 0 (Completed)\n"),
        "{out}"
    );
    let dir = root.join("vms/default_app");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("container/run.json")).unwrap()).unwrap();
    assert_eq!(record["exited"]["code"], 0, "{record}");
    assert!(record["bootedAtMs"].is_i64(), "{record}");
    let logs = Agent::run_to_end(&["--root", &root.display().to_string(), "logs", "app"]);
    assert_eq!(
        logs.lines().count(),
        2,
        "stdout and stderr lines, and nothing else: {logs}"
    );
    assert!(logs.contains("runv-test-guest stderr: app\n"), "{logs}");
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
        "apiVersion: runv.dev/v1alpha1\nkind: SecureWorkload\nmetadata:\n  name: img\n  namespace: default\nspec:\n  replicas: 2\n  selector: {{ matchLabels: {{ app: img }} }}\n  template:\n    metadata: {{ labels: {{ app: img }} }}\n    spec:\n      resources: {{ vcpus: 1, memory: 64Mi }}\n      boot: {{ kernel: {}, cmdline: \"console=ttyS0 test=container disks=check exit=0\" }}\n      runPolicy: Once\n      imagePullSecrets: [{{ name: regcred }}]\n  container:\n    image: \"{image}\"\n",
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
            "jsonpath={range .items[*]}{.status.phase} {.status.container.imageID} {.status.container.state.terminated.reason} {.status.container.state.terminated.exitCode}{\"\\n\"}{end}",
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
    for line in ids()? {
        assert!(
            line.ends_with(" Completed 0"),
            "the container's exit: {line}"
        );
    }
    // Each replica booted with the image's filesystem as its first disk,
    // and its container's output was kept on the node.
    let names = cluster.kubectl(&["get", "mvm", "-l", "app=img", "-o", "name"])?;
    for name in names.lines() {
        let name = name.trim_start_matches("microvm.runv.dev/");
        let log = std::fs::read_to_string(cluster.vm_dir(name).join("serial.log"))?;
        assert!(log.contains(EROFS_MAGIC), "{name}: {log}");
        let out = std::fs::read_to_string(cluster.vm_dir(name).join("container/current.log"))?;
        assert!(
            out.contains(&format!("hostname {name}, argv[0] ")),
            "{name}: {out}"
        );
    }
    eprintln!(
        "status.container of the replicas:\n{}",
        cluster.kubectl(&[
            "get",
            "mvm",
            "-l",
            "app=img",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}: {.status.container}{\"\\n\"}{end}"
        ])?
    );
    let events = cluster.kubectl(&["get", "events", "-o", "jsonpath={.items[*].reason}"])?;
    assert!(events.contains("Pulled"), "{events}");
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_container_is_rerun_and_a_running_one_counts_as_available() -> anyhow::Result<()>
{
    let test = "a_failing_container_is_rerun_and_a_running_one_counts_as_available";
    if !require_tools(test, &["docker-registry", "skopeo", "mkfs.erofs"]) {
        return Ok(());
    }
    run_scenario_needing(test, &[Need::Root], reruns_and_availability).await
}

fn workload(name: &str, image: &str, run: &str, guest: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: SecureWorkload\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  replicas: 1\n  selector: {{ matchLabels: {{ app: {name} }} }}\n  template:\n    metadata: {{ labels: {{ app: {name} }} }}\n    spec:\n      resources: {{ vcpus: 1, memory: 64Mi }}\n      boot: {{ kernel: {}, cmdline: \"console=ttyS0 test=container out={name} {guest}\" }}\n      runPolicy: {run}\n  container:\n    image: \"{image}\"\n",
        common::test_guest()
    )
}

fn reruns_and_availability(cluster: &Cluster) -> anyhow::Result<()> {
    let registry = Registry::start(None);
    push_test_image(&registry, cluster.tmp.path(), "1", &[]);
    let image = format!("{}/app:1", registry.addr);
    let mut agent = cluster.start_agent();
    for (name, run, guest) in [
        ("fails", "RerunOnFailure", "exit=3"),
        ("serves", "Always", "run=forever"),
    ] {
        let file = cluster.tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, workload(name, &image, run, guest))?;
        cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    }
    let get = |selector: &str, path: &str| {
        cluster.kubectl(&[
            "get",
            "mvm",
            "-l",
            selector,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    // The failing container is run again, its last exit kept as lastState.
    wait_until("a rerun after exit code 3", WAIT, || {
        Ok(get(
            "app=fails",
            "{.items[0].status.container.lastState.terminated.exitCode}",
        )? == "3")
    })
    .map_err(|e| e.context(agent.output()))?;
    let restarts: i32 = get("app=fails", "{.items[0].status.container.restartCount}")?.parse()?;
    assert!(restarts >= 1, "{restarts}");
    let reason = get(
        "app=fails",
        "{.items[0].status.container.lastState.terminated.reason}",
    )?;
    assert_eq!(reason, "Error");
    let name = get("app=fails", "{.items[0].metadata.name}")?;
    let previous = Agent::run_to_end(&[
        "--root",
        &cluster.root.display().to_string(),
        "logs",
        &name,
        "--previous",
    ]);
    assert!(
        previous.contains("runv-test-guest stderr: fails\n"),
        "{previous}"
    );
    // The running one is ready, and its workload counts it available.
    wait_until("the serving replica is available", WAIT, || {
        Ok(cluster.kubectl(&[
            "get",
            "swl",
            "serves",
            "-o",
            "jsonpath={.status.availableReplicas}",
        ])? == "1")
    })
    .map_err(|e| e.context(agent.output()))?;
    assert_eq!(
        get("app=serves", "{.items[0].status.container.ready}")?,
        "true"
    );
    assert!(
        !get(
            "app=serves",
            "{.items[0].status.container.state.running.startedAt}"
        )?
        .is_empty()
    );
    eprintln!(
        "status.container:\n{}\n{}\nrunv-agent logs {name} --previous:\n{previous}",
        get("app=fails", "{.items[0].status.container}")?,
        get("app=serves", "{.items[0].status.container}")?
    );
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    Ok(())
}

/// Whether this host's KVM is hardware-backed (VT-x or AMD-V), where a
/// stock kernel boots under runv-vmm; on `kvm_pvm` it does not
/// (docs/vmm-boot.md), and the guest path is tested under QEMU instead
/// (`tests/guest_kernel.rs`).
fn hardware_kvm() -> Result<(), String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "this host's KVM is kvm_pvm (shadow paging, no VT-x/AMD-V), on which a \
                    stock Linux kernel does not boot to /init under runv-vmm"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        Ok(())
    } else {
        Err("the CPU shows neither vmx nor svm: no hardware-backed KVM".into())
    }
}

/// Test 3 of the guest path: a SecureWorkload whose replicas boot the guest
/// kit (Debian's kernel, runv-init) under runv-vmm and run a busybox image;
/// their output reaches `runv-agent logs` and their exit code the status.
/// Needs hardware-backed KVM, and says why it skips without it, also under
/// `RUNV_REQUIRE_KVM=1` (CI's machines are `kvm_pvm`: tests 1 and 2 cover
/// the guest there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_their_image_under_runv_init_on_hardware_kvm() -> anyhow::Result<()> {
    let test = "replicas_run_their_image_under_runv_init_on_hardware_kvm";
    if let Err(why) = hardware_kvm() {
        eprintln!("{test}: skipping: needs hardware-backed KVM: {why}");
        return Ok(());
    }
    if !require_tools(
        test,
        &["docker-registry", "skopeo", "mkfs.erofs", "busybox"],
    ) {
        return Ok(());
    }
    let Some(kit) = common::guest_kit(test) else {
        return Ok(());
    };
    run_scenario_needing(test, &[Need::Kvm, Need::Root], move |c| {
        replicas_run_their_image(c, &kit)
    })
    .await
}

fn replicas_run_their_image(cluster: &Cluster, kit: &Path) -> anyhow::Result<()> {
    let registry = Registry::start(None);
    let mut layout = common::images::Layout::new(&cluster.tmp.path().join("layout"));
    let manifest = common::images::busybox_image(&layout);
    layout.tag(&manifest, "1");
    registry.push(&layout.dir, "1", "busybox", &[]);
    let image = format!("{}/busybox:1", registry.addr);
    let init = common::tcg::runv_init();
    let (kit_s, init_s) = (kit.display().to_string(), init.display().to_string());
    let mut agent = cluster.start_agent_with(&[
        "--guest-kit-dir",
        &kit_s,
        "--guest-init",
        &init_s,
        "--allowed-kernel-dir",
        &kit_s,
    ]);
    let body = format!(
        "apiVersion: runv.dev/v1alpha1\nkind: SecureWorkload\nmetadata:\n  name: real\n  namespace: default\nspec:\n  replicas: 2\n  selector: {{ matchLabels: {{ app: real }} }}\n  template:\n    metadata: {{ labels: {{ app: real }} }}\n    spec:\n      resources: {{ vcpus: 1, memory: 256Mi }}\n      runPolicy: Once\n  container:\n    image: \"{image}\"\n    command: [\"/bin/sh\", \"-c\", \"echo hello from $(hostname); echo to-stderr >&2; exit 3\"]\n"
    );
    let file = cluster.tmp.path().join("real.yaml");
    std::fs::write(&file, body)?;
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    let codes = || -> anyhow::Result<Vec<String>> {
        let out = cluster.kubectl(&[
            "get",
            "mvm",
            "-l",
            "app=real",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.container.state.terminated.exitCode}{\"\\n\"}{end}",
        ])?;
        Ok(out.lines().map(str::to_owned).collect())
    };
    wait_until(
        "both replicas' containers exited",
        Duration::from_secs(300),
        || Ok(codes()?.iter().filter(|l| l.ends_with(" Failed 3")).count() == 2),
    )
    .map_err(|e| e.context(agent.output()))?;
    for line in codes()? {
        let name = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let logs =
            Agent::run_to_end(&["--root", &cluster.root.display().to_string(), "logs", &name]);
        assert!(logs.contains(&format!("hello from {name}\n")), "{logs}");
        assert!(logs.contains("to-stderr\n"), "{logs}");
    }
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    Ok(())
}

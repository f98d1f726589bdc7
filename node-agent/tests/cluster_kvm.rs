//! e2e: the Kubernetes API test server, the real `runv-operator`, the real
//! `runv-agent run`, the real `kubectl` and real microVMs on /dev/kvm.
//! `kubectl apply` of 20 VMs → `kubectl wait --for=condition=Ready`; `kill -9`
//! of the agent while they run loses none and starts no duplicate; `kubectl delete` removes the VMM and its
//! state; a missing kernel shows `Ready=False` naming the file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{Agent, KillVmmOnDrop, alive, recorded_pid, vmm_binary};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use runv_e2e::{Options, TestServer};
use runv_node_agent::testing::{Need, require};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A binary of another workspace package, next to runv-agent (built if missing).
fn sibling_binary(package: &str, bin: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_runv-agent")).with_file_name(bin);
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package, "--bin", bin])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    path
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {bin}"))?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn manifest(name: &str, kernel: &str, cmdline: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: n1\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {kernel}\n    cmdline: \"{cmdline}\"\n  runPolicy: Always\n  terminationGracePeriodSeconds: 2\n"
    )
}

fn start_agent(kubeconfig: &Path, root: &Path, vmm: &Path) -> Agent {
    let port = free_port().to_string();
    let args = [
        "--root".to_owned(),
        root.display().to_string(),
        "run".into(),
        "--node".into(),
        "n1".into(),
        "--vmm".into(),
        vmm.display().to_string(),
        "--http-addr".into(),
        format!("127.0.0.1:{port}"),
        "--vcpus".into(),
        "64".into(),
        "--memory".into(),
        "64Gi".into(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::spawn(
        Path::new(env!("CARGO_BIN_EXE_runv-agent")),
        &refs,
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_microvms_through_operator_and_agent() -> Result<()> {
    if !require(
        "kubectl_drives_microvms_through_operator_and_agent",
        &[Need::Kvm],
    ) {
        return Ok(());
    }
    let mut opts = Options::default();
    for crd in runv_crds::generate::crds() {
        opts.preload.push(serde_json::to_value(crd)?);
    }
    let server = TestServer::start(opts).await?;
    let client = server.client()?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "runv-system"}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let kubeconfig = server.kubeconfig_path().to_owned();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("agent");
    let vmm = vmm_binary();
    let guest = common::test_guest();
    let operator_bin = sibling_binary("runv-operator", "runv-operator");
    let op_port = free_port().to_string();
    let mut operator = Agent::spawn(
        &operator_bin,
        &[
            "--namespace",
            "runv-system",
            "--leader-elect",
            "false",
            "--http-addr",
            &format!("127.0.0.1:{op_port}"),
        ],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    );

    let result = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut agent = start_agent(&kubeconfig, &root, &vmm);
        let file = tmp.path().join("vms.yaml");
        let names: Vec<String> = (0..20).map(|i| format!("loop-{i}")).collect();
        let text: Vec<String> = names
            .iter()
            .map(|n| manifest(n, &guest, "test=loop"))
            .collect();
        std::fs::write(&file, text.join("---\n"))?;
        let guards: Vec<KillVmmOnDrop> = names
            .iter()
            .map(|n| KillVmmOnDrop(root.join("vms").join(format!("default_{n}"))))
            .collect();
        kubectl(&kubeconfig, &["apply", "-f", &file.display().to_string()])?;
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Ready",
                "mvm",
                "--all",
                "--timeout=240s",
            ],
        )
        .with_context(|| agent.output())?;
        let pids: Vec<u32> = guards
            .iter()
            .map(|g| recorded_pid(&g.0).context("recorded VMM"))
            .collect::<Result<_>>()?;

        // kill -9 the agent while the VMs run: none is lost; a new agent adopts them.
        agent.signal(libc::SIGKILL);
        agent.wait(Duration::from_secs(10));
        assert!(pids.iter().all(|p| alive(*p)), "a VMM died with the agent");
        let mut agent = start_agent(&kubeconfig, &root, &vmm);
        std::thread::sleep(Duration::from_secs(2));
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Ready",
                "mvm",
                "--all",
                "--timeout=240s",
            ],
        )?;
        for (g, p) in guards.iter().zip(&pids) {
            assert_eq!(recorded_pid(&g.0), Some(*p), "a second VMM was started");
        }

        // Kill a VMM: restarted per runPolicy Always after backoff, counted.
        // SAFETY: kill(2) on the pid our VM recorded.
        unsafe {
            libc::kill(pids[0] as libc::pid_t, libc::SIGKILL);
        }
        wait_until("the restart", Duration::from_secs(180), || {
            let count = kubectl(
                &kubeconfig,
                &[
                    "get",
                    "mvm",
                    "loop-0",
                    "-o",
                    "jsonpath={.status.restartCount}",
                ],
            )?;
            Ok(count.trim() == "1")
        })
        .with_context(|| agent.output())?;
        let last = kubectl(
            &kubeconfig,
            &[
                "get",
                "mvm",
                "loop-0",
                "-o",
                "jsonpath={.status.lastExit.reason}",
            ],
        )?;
        assert_eq!(last, "Killed");
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Ready",
                "mvm/loop-0",
                "--timeout=180s",
            ],
        )?;
        let new_pid = recorded_pid(&guards[0].0).context("new VMM")?;
        assert_ne!(new_pid, pids[0]);

        // A kernel that does not exist.
        let bad = tmp.path().join("bad.yaml");
        std::fs::write(&bad, manifest("nokernel", "/nonexistent/vmlinux", ""))?;
        kubectl(&kubeconfig, &["apply", "-f", &bad.display().to_string()])?;
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=KernelNotFound",
                "mvm/nokernel",
                "--timeout=180s",
            ],
        )?;
        let msg = kubectl(
            &kubeconfig,
            &[
                "get",
                "mvm",
                "nokernel",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
            ],
        )?;
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");

        // Delete: VMM and state gone, then the object.
        kubectl(&kubeconfig, &["delete", "mvm", "loop-0", "--timeout=180s"])?;
        assert!(!alive(new_pid), "the VMM outlived its MicroVM");
        assert!(!guards[0].0.exists(), "the state directory is left");
        // SIGTERM, as the kubelet stops a DaemonSet pod: the agent exits 0 (not
        // killed by the signal) and its VMs keep running.
        agent.signal(libc::SIGTERM);
        assert_eq!(
            agent.wait(Duration::from_secs(10)),
            Some(0),
            "{}",
            agent.output()
        );
        assert!(
            pids[1..].iter().all(|p| alive(*p)),
            "a VMM ended with the agent's SIGTERM"
        );
        drop(agent);
        drop(guards);
        Ok(())
    })
    .await?;
    operator.signal(libc::SIGTERM);
    let _ = operator.wait(Duration::from_secs(10));
    server.shutdown().await?;
    result
}

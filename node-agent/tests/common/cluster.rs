//! A whole cluster on this host for e2e tests: the Kubernetes API test
//! server, the real `runv-operator`, and `runv-agent run` for node `n1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use runv_e2e::{Options, TestServer};
use serde_json::json;

use super::{Agent, vmm_binary};

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A binary of another workspace package, next to runv-agent (built if missing).
pub fn sibling_binary(package: &str, bin: &str) -> PathBuf {
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

/// Runs the real kubectl against `kubeconfig`; its stdout, or an error with
/// what it printed.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
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

/// A MicroVM manifest pinned to node n1, restarted always.
pub fn manifest(name: &str, kernel: &str, cmdline: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: n1\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {kernel}\n    cmdline: \"{cmdline}\"\n  runPolicy: Always\n  terminationGracePeriodSeconds: 2\n"
    )
}

/// Starts `runv-operator` against `kubeconfig` without leader election, with
/// `extra` arguments.
fn spawn_operator(kubeconfig: &Path, extra: &[String]) -> Agent {
    let bin = sibling_binary("runv-operator", "runv-operator");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--namespace",
        "runv-system",
        "--leader-elect",
        "false",
        "--http-addr",
        &addr,
    ];
    args.extend(extra.iter().map(String::as_str));
    Agent::spawn(&bin, &args, &[("KUBECONFIG", kubeconfig.as_os_str())])
}

/// Polls `f` every 100 ms until it says true, for at most `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
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

/// The test server with the CRDs and the runv namespace, and the operator.
pub struct Cluster {
    /// The API, while it is up ([`Cluster::stop_api`], [`Cluster::start_api`]).
    server: std::sync::Mutex<Option<TestServer>>,
    /// How it is started again after a stop: same port, same state.
    restart: Options,
    /// `runv-operator`.
    pub operator: Agent,
    /// The arguments it was started with besides the usual ones, for
    /// [`Cluster::start_operator`].
    operator_args: Vec<String>,
    /// A kubeconfig for the server.
    pub kubeconfig: PathBuf,
    /// The agent's root directory.
    pub root: PathBuf,
    /// `runv-vmm`.
    pub vmm: PathBuf,
    /// Scratch space; removed on drop.
    pub tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts the server and the operator (not the agent).
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts the server and the operator, with `operator_args` added.
    pub async fn start_with(operator_args: &[&str]) -> Result<Self> {
        Self::start_at(std::net::Ipv4Addr::LOCALHOST.into(), operator_args).await
    }

    /// Starts the server, listening on `address`, and the operator, with
    /// `operator_args` added.
    pub async fn start_at(address: std::net::IpAddr, operator_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let restart = Options {
            address,
            port: free_port(),
            kubeconfig: Some(tmp.path().join("kubeconfig")),
            state_file: Some(tmp.path().join("api-state.json")),
            ..Options::default()
        };
        let mut opts = restart.clone();
        for crd in runv_crds::generate::crds() {
            opts.preload.push(serde_json::to_value(crd)?);
        }
        let server = TestServer::start(opts).await?;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "runv-system"}}))?;
        let namespaces = Api::<Namespace>::all(server.client()?);
        namespaces.create(&PostParams::default(), &ns).await?;
        // The tests pin their VMs to n1 (see `manifest`): the administrator
        // allows that in `default`.
        let allow = json!({"metadata": {"labels": {
            runv_crds::contract::ALLOW_NODE_NAME_LABEL: runv_crds::contract::ALLOW_VALUE
        }}});
        namespaces
            .patch("default", &PatchParams::default(), &Patch::Merge(&allow))
            .await?;
        let kubeconfig = server.kubeconfig_path().to_owned();
        let operator_args: Vec<String> = operator_args.iter().map(|a| (*a).to_owned()).collect();
        let operator = spawn_operator(&kubeconfig, &operator_args);
        Ok(Self {
            server: std::sync::Mutex::new(Some(server)),
            restart,
            operator,
            operator_args,
            kubeconfig,
            root: tmp.path().join("agent"),
            vmm: vmm_binary(),
            tmp,
        })
    }

    /// Starts another `runv-operator` as the first was started (same
    /// arguments, its own HTTP port), as a restart after a crash does.
    pub fn start_operator(&self) -> Agent {
        spawn_operator(&self.kubeconfig, &self.operator_args)
    }

    /// Kills `operator` (the cluster's own or one from
    /// [`Cluster::start_operator`]) with SIGKILL and waits, at most 10 s,
    /// until it is gone.
    pub fn kill_operator(&self, operator: &Agent) -> Result<()> {
        let pid = operator
            .child
            .as_ref()
            .context("the operator was waited for")?
            .id();
        operator.signal(libc::SIGKILL);
        wait_until(
            "the killed operator to exit",
            Duration::from_secs(10),
            || Ok(!super::alive(pid)),
        )
    }

    /// A client of the API (which must be up).
    pub fn client(&self) -> Result<kube::Client> {
        let server = self.server.lock().unwrap();
        let server = server.as_ref().context("the API is stopped")?;
        Ok(server.client()?)
    }

    /// Stops the API server (its state is kept); from a blocking thread.
    pub fn stop_api(&self) -> Result<()> {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            tokio::runtime::Handle::current().block_on(server.shutdown())?;
        }
        Ok(())
    }

    /// Starts the API server again on the same address with the same state;
    /// from a blocking thread.
    pub fn start_api(&self) -> Result<()> {
        let server =
            tokio::runtime::Handle::current().block_on(TestServer::start(self.restart.clone()))?;
        *self.server.lock().unwrap() = Some(server);
        Ok(())
    }

    /// Starts `runv-agent run` for node n1.
    pub fn start_agent(&self) -> Agent {
        self.start_agent_with(&[])
    }

    /// Starts `runv-agent run` for node n1 with `extra` arguments.
    pub fn start_agent_with(&self, extra: &[&str]) -> Agent {
        self.start_agent_as("n1", &self.root, None, extra)
    }

    /// Starts `runv-agent run` for node `node` with its state in `root`,
    /// inside the network namespace `netns` if one is given, with `extra`
    /// arguments (`--vcpus` and `--memory` among them size the node; else
    /// it offers 64 vCPUs and 64 GiB).
    pub fn start_agent_as(
        &self,
        node: &str,
        root: &Path,
        netns: Option<&str>,
        extra: &[&str],
    ) -> Agent {
        let addr = format!("127.0.0.1:{}", free_port());
        let root = root.display().to_string();
        let vmm = self.vmm.display().to_string();
        let agent = Path::new(env!("CARGO_BIN_EXE_runv-agent"))
            .display()
            .to_string();
        let mut args = Vec::new();
        // nsenter joins the network namespace only (`ip netns exec` would
        // also remount /sys, hiding the cgroup hierarchy from the agent).
        let net = netns.map(|ns| format!("--net=/run/netns/{ns}"));
        if let Some(net) = &net {
            args.extend([net.as_str(), &agent]);
        }
        args.extend([
            "--root",
            &root,
            "run",
            "--node",
            node,
            "--vmm",
            &vmm,
            "--http-addr",
            &addr,
        ]);
        // A roomy node, unless the test sizes it.
        if !extra.contains(&"--vcpus") {
            args.extend(["--vcpus", "64"]);
        }
        if !extra.contains(&"--memory") {
            args.extend(["--memory", "64Gi"]);
        }
        args.extend_from_slice(extra);
        // nsenter execs the agent: the pid is the agent's.
        let program = if netns.is_some() { "nsenter" } else { &agent };
        Agent::spawn(
            Path::new(program),
            &args,
            &[("KUBECONFIG", self.kubeconfig.as_os_str())],
        )
    }

    /// kubectl against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl(&self.kubeconfig, args)
    }

    /// `kubectl apply` of one MicroVM per name, each booting the test guest in
    /// its loop mode (running until stopped).
    pub fn apply_looping(&self, names: &[String]) -> Result<()> {
        let guest = super::test_guest();
        let text: Vec<String> = names
            .iter()
            .map(|n| manifest(n, &guest, "test=loop"))
            .collect();
        let file = self.tmp.path().join("apply.yaml");
        std::fs::write(&file, text.join("---\n"))?;
        self.kubectl(&["apply", "-f", &file.display().to_string()])?;
        Ok(())
    }

    /// Waits (at most 180 s) until every MicroVM is Ready.
    pub fn wait_all_ready(&self) -> Result<()> {
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "mvm",
            "--all",
            "--timeout=180s",
        ])?;
        Ok(())
    }

    /// The state directory of VM `default/name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(format!("default_{name}"))
    }

    /// Stops the operator and the server.
    pub async fn shutdown(mut self) -> Result<()> {
        self.operator.signal(libc::SIGTERM);
        let _ = self.operator.wait(Duration::from_secs(10));
        let server = self.server.lock().unwrap().take();
        match server {
            Some(server) => Ok(server.shutdown().await?),
            None => Ok(()),
        }
    }
}

/// Runs `scenario` on a fresh cluster in a blocking thread (it drives
/// kubectl and waits), then shuts the cluster down. Skips, saying why, where
/// `/dev/kvm` is missing (fails instead under `RUNV_REQUIRE_KVM=1`).
pub async fn run_scenario(
    test: &str,
    scenario: impl FnOnce(&Cluster) -> Result<()> + Send + 'static,
) -> Result<()> {
    run_scenario_needing(test, &[], scenario).await
}

/// [`run_scenario`] for a scenario that also needs `needs` (for example
/// root, to mount a filesystem).
pub async fn run_scenario_needing(
    test: &str,
    needs: &[runv_node_agent::testing::Need],
    scenario: impl FnOnce(&Cluster) -> Result<()> + Send + 'static,
) -> Result<()> {
    use runv_node_agent::testing::{Need, require};
    let all: Vec<Need> = [Need::Kvm]
        .into_iter()
        .chain(needs.iter().copied())
        .collect();
    if !require(test, &all) {
        return Ok(());
    }
    let cluster = std::sync::Arc::new(Cluster::start().await?);
    let c = cluster.clone();
    let result = tokio::task::spawn_blocking(move || scenario(&c)).await;
    // The scenario's agents are gone with it, failed or not: end any VMM
    // it left behind.
    super::kill_vmms_under(cluster.tmp.path());
    let result = result?;
    let cluster = std::sync::Arc::into_inner(cluster).context("the cluster is still shared")?;
    cluster.shutdown().await?;
    result
}

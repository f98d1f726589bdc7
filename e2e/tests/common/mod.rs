//! Shared test harness: a server per test, the real kubectl with a private
//! kubeconfig and discovery cache, and kube-rs helpers for MicroVMs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use runv_e2e::{Options, TestServer};
use serde_json::{Value, json};

/// The kubectl the tests drive: `KUBECTL` if set, else the first `kubectl` on `PATH`.
pub fn kubectl_path() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL") {
        return PathBuf::from(k);
    }
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .find(|k| k.is_file())
        })
        .unwrap_or_default()
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A server with its kubectl cache directory.
pub struct Env {
    pub server: TestServer,
    pub dir: tempfile::TempDir,
}

/// Output of one kubectl run.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Fails unless kubectl exited 0.
    pub fn ok(self) -> Result<String> {
        if self.code != 0 {
            bail!(
                "kubectl failed ({}): {}{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self.stdout)
    }
}

impl Env {
    /// A fresh server; `crds` also creates runv's CRDs.
    pub async fn start(crds: bool) -> Result<Self> {
        Self::with(Options::default(), crds).await
    }

    /// A fresh server with options.
    pub async fn with(mut opts: Options, crds: bool) -> Result<Self> {
        if crds {
            for crd in runv_crds::generate::crds() {
                opts.preload.push(serde_json::to_value(crd)?);
            }
        }
        let server = TestServer::start(opts).await?;
        Ok(Self {
            server,
            dir: tempfile::tempdir()?,
        })
    }

    /// Runs kubectl with this server's kubeconfig, stdin optional, 60 s at most.
    pub async fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Result<Out> {
        run_kubectl(self.server.kubeconfig_path(), self.dir.path(), args, stdin).await
    }

    /// Runs kubectl without stdin.
    pub async fn kubectl(&self, args: &[&str]) -> Result<Out> {
        self.kubectl_in(args, None).await
    }

    /// A kube-rs client.
    pub fn client(&self) -> kube::Client {
        self.server.client().expect("client for a running server")
    }

    /// `Api<DynamicObject>` for MicroVMs in `default`.
    pub fn microvms(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client(), "default", &microvm_resource())
    }

    /// `Api<DynamicObject>` for SecureWorkloads in `default`.
    pub fn workloads(&self) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("runv.dev", "v1alpha1", "SecureWorkload");
        Api::namespaced_with(
            self.client(),
            "default",
            &ApiResource::from_gvk_with_plural(&gvk, "secureworkloads"),
        )
    }
}

/// Runs kubectl against `kubeconfig`, with `home` as its home and cache
/// directory, stdin optional, 60 s at most.
pub async fn run_kubectl(
    kubeconfig: &Path,
    home: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Out> {
    let path = kubectl_path();
    if !path.exists() {
        bail!(
            "kubectl not found ({}): the e2e suite needs the real kubectl on PATH or in KUBECTL",
            path.display()
        );
    }
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(home.join("cache"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", home)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", path.display()))?;
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().context("kubectl stdin")?;
        pipe.write_all(text.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("kubectl did not finish within 60 s")??;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The MicroVM resource.
pub fn microvm_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("runv.dev", "v1alpha1", "MicroVM");
    ApiResource::from_gvk_with_plural(&gvk, "microvms")
}

/// A valid MicroVM manifest.
pub fn microvm(name: &str) -> Value {
    json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "MicroVM",
        "metadata": { "name": name },
        "spec": {
            "resources": { "vcpus": 1, "memory": "64Mi" },
            "boot": { "kernel": "/var/lib/runv/guests/runv-test-guest" },
        },
    })
}

/// Creates a MicroVM through kube-rs.
pub async fn create_microvm(api: &Api<DynamicObject>, name: &str) -> Result<DynamicObject> {
    let obj: DynamicObject = serde_json::from_value(microvm(name))?;
    Ok(api.create(&PostParams::default(), &obj).await?)
}

/// The resourceVersion of an object.
pub fn rv(obj: &DynamicObject) -> String {
    obj.metadata.resource_version.clone().unwrap_or_default()
}

/// Runs a test body with a bound on its duration.
pub async fn bounded<F: Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .context("test did not finish within 120 s")?
}

/// The API error code of a kube-rs error, if it is one.
pub fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Polls `f` every 50 ms until it returns true, failing after 5 s.
pub async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    for _ in 0..100 {
        if f().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not happen within 5 s")
}

/// The message of a CEL rule in runv's CRD for `kind` (as the tests' servers
/// load it): the rule containing `rule` on the schema node at `path`, given as
/// property names with `[]` for list items, e.g. `["spec", "disks", "[]"]`.
pub fn rule_message(kind: &str, path: &[&str], rule: &str) -> Result<String> {
    let crd = runv_crds::generate::crds()
        .into_iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .with_context(|| format!("no CRD for {kind}"))?;
    let mut node = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for seg in path {
        node = if *seg == "[]" {
            &node["items"]
        } else {
            &node["properties"][seg]
        };
    }
    node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["rule"].as_str().is_some_and(|r| r.contains(rule)))
        .and_then(|v| v["message"].as_str())
        .map(str::to_string)
        .with_context(|| format!("no rule containing {rule:?} at {path:?} of {kind}"))
}

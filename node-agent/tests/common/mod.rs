//! Helpers for tests that run the real `runv-agent` and `runv-vmm` binaries.

#![allow(dead_code)]

pub mod cluster;
/// runv-image's test support: a real `docker-registry` on loopback, OCI
/// layouts written by the test, pushed with `skopeo`.
#[path = "../../../image/tests/support/mod.rs"]
pub mod images;
pub mod tcg;

/// Pushes a two-layer image as `app:TAG` to `registry` (its entrypoint
/// `/bin/app`, `A=1` in its environment, and `TAG` in `/etc/motd`, so each
/// tag is its own image); `extra` are skopeo flags (credentials).
pub fn push_test_image(registry: &images::Registry, dir: &Path, tag: &str, extra: &[&str]) {
    let mut layout = images::Layout::new(&dir.join(format!("layout-{tag}")));
    let base = images::TarBuilder::default()
        .dir("bin", 0o755)
        .file("bin/app", 0o755, b"#!/bin/sh\necho hello\n")
        .finish();
    let top = images::TarBuilder::default()
        .dir("etc", 0o755)
        .file("etc/motd", 0o644, tag.as_bytes())
        .finish();
    let manifest = layout.image(
        &[
            images::LayerBlob {
                tar: base,
                gzip: true,
            },
            images::LayerBlob {
                tar: top,
                gzip: false,
            },
        ],
        serde_json::json!({"Entrypoint": ["/bin/app"], "Env": ["A=1"]}),
        "amd64",
    );
    layout.tag(&manifest, tag);
    registry.push(&layout.dir, tag, "app", extra);
}

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The node's guest kit (`$RUNV_GUEST_KIT_DIR`, else
/// `/var/lib/runv/guests/kit`), when it is installed. Without one the test
/// skips with the reason, except under `RUNV_REQUIRE_KVM=1`, where it fails.
pub fn guest_kit(test: &str) -> Option<PathBuf> {
    let kit = std::env::var_os("RUNV_GUEST_KIT_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/runv/guests/kit"), PathBuf::from);
    if kit.join("version").is_file() {
        return Some(kit);
    }
    let why = format!(
        "no guest kit in {} (run vmm/scripts/guest-kit.sh {0} or set RUNV_GUEST_KIT_DIR)",
        kit.display()
    );
    if std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: required by RUNV_REQUIRE_KVM=1 but unavailable: {why}");
    }
    eprintln!("{test}: skipping: {why} (set RUNV_REQUIRE_KVM=1 to fail instead)");
    None
}

/// The `runv-vmm` binary: next to `runv-agent` in the target directory, built
/// there with cargo when a partial build (`cargo test -p runv-node-agent`) did
/// not make it.
pub fn vmm_binary() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_runv-agent"));
    let vmm = agent.with_file_name("runv-vmm");
    if !vmm.is_file() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "runv-vmm", "--bin", "runv-vmm"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p runv-vmm");
        assert!(status.success(), "cargo build -p runv-vmm failed");
    }
    assert!(vmm.is_file(), "{} missing", vmm.display());
    vmm
}

/// The cgroup parent of the agents tests start (`RUNV_CGROUP_PARENT`): relative,
/// so the test VMMs' cgroups nest under the test's own cgroups and never leave
/// whatever accounts for the test run. VM names must differ between the tests
/// of one test binary (they name the cgroups).
pub const TEST_CGROUP_PARENT: &str = "runv-test";

/// Removes the test's parent cgroup directories at the end, in order, even on
/// failure.
pub struct ParentGuard(pub Vec<PathBuf>);

impl Drop for ParentGuard {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Removes a test VM's cgroup under `parent` (best effort; the VMM must be gone).
pub fn remove_test_cgroup(parent: &str, vm_dir: &Path) {
    use runv_node_agent::host::Cgroups;
    use runv_node_agent::host::cgroup::{CgroupConfig, LinuxCgroups};
    let Some(name) = vm_dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let cgroups = LinuxCgroups::detect(&CgroupConfig {
        parent: parent.to_owned(),
        ..CgroupConfig::default()
    });
    let _ = cgroups.remove(name);
}

/// A running `runv-agent` whose stdout is collected in the background.
pub struct Agent {
    pub child: Option<Child>,
    pub out: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Path::new(env!("CARGO_BIN_EXE_runv-agent")), args, &[])
    }

    /// Any program, with extra environment variables (`RUNV_CGROUP_PARENT` is
    /// [`TEST_CGROUP_PARENT`] unless given; `RUNV_ALLOWED_KERNEL_DIRS` adds
    /// the build's test guest directory to the defaults unless given).
    pub fn spawn(program: &Path, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut child = Command::new(program)
            .env("RUNV_CGROUP_PARENT", TEST_CGROUP_PARENT)
            .env("RUNV_ALLOWED_KERNEL_DIRS", test_kernel_dirs())
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self {
            child: Some(child),
            out,
        }
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Runs `runv-agent ARGS` to its end (bounded); its output, and fails
    /// unless it exited 0.
    pub fn run_to_end(args: &[&str]) -> String {
        let mut agent = Self::start(args);
        let code = agent.wait(Duration::from_secs(60));
        let out = agent.output();
        assert_eq!(code, Some(0), "runv-agent {args:?}: {out}");
        out
    }

    /// Waits until the output contains `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.output().contains(text) {
            assert!(
                start.elapsed() < timeout,
                "no {text:?} within {timeout:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Waits for the agent to exit; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the reader threads drain.
                std::thread::sleep(Duration::from_millis(50));
                return status.code();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "runv-agent did not exit within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Kills a leftover VMM of a failed test by its recorded pid, and removes its
/// cgroup under [`TEST_CGROUP_PARENT`].
pub struct KillVmmOnDrop(pub PathBuf);

impl Drop for KillVmmOnDrop {
    fn drop(&mut self) {
        // The recorded VMM, and any other started for this VM directory (a
        // test may have made its record unreadable).
        let mut pids = vmm_pids(&self.0);
        pids.extend(recorded_pid(&self.0).filter(|p| alive(*p)));
        kill_all(&pids);
        remove_test_cgroup(TEST_CGROUP_PARENT, &self.0);
    }
}

/// Ends every `runv-vmm` whose command line names a file under `dir` (a
/// test's scratch directory): none outlives its test, whatever order its
/// guards and agents were dropped in.
pub fn kill_vmms_under(dir: &Path) {
    kill_all(&vmm_pids(dir));
}

/// SIGKILL to `pids`, then waits (at most 5 s) until they are gone.
fn kill_all(pids: &[u32]) {
    for &pid in pids {
        // SAFETY: kill(2) on a VMM a test started: its pid recorded in the
        // test's VM directory, or its command line naming the test's files.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every live `runv-vmm` process: its pid and its command line, arguments
/// joined by spaces.
fn vmms() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains("runv-vmm"))
        .collect()
}

/// The command lines of every live `runv-vmm` process, arguments joined by spaces.
pub fn vmm_cmdlines() -> Vec<String> {
    vmms().into_iter().map(|(_, c)| c).collect()
}

/// The pids of live `runv-vmm` processes whose command line names a file in
/// the VM directory `dir` (their config).
pub fn vmm_pids(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    vmms()
        .into_iter()
        .filter(|(_, c)| c.contains(&needle))
        .map(|(p, _)| p)
        .collect()
}

/// Live `runv-vmm` processes started for the VM whose state directory is `dir`.
pub fn vmm_processes(dir: &Path) -> usize {
    let needle = dir.display().to_string();
    vmm_cmdlines()
        .iter()
        .filter(|c| c.contains(&needle))
        .count()
}

/// The VMM pid recorded in a VM directory's `vm.json`.
pub fn recorded_pid(vm_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(vm_dir.join("vm.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["vmm"]["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// The in-repo test guest, built with the VMM.
/// The directories the tests' agents take kernels from: the defaults and
/// the directory the build left the test guest in.
pub fn test_kernel_dirs() -> String {
    let guest = test_guest();
    let dir = Path::new(&guest)
        .parent()
        .expect("the test guest's directory");
    format!(
        "/var/lib/runv/kernels,/var/lib/runv/guests,{}",
        dir.display()
    )
}

pub fn test_guest() -> String {
    vmm_binary();
    runv_node_agent::dev::find_test_guest(Path::new(env!("CARGO_BIN_EXE_runv-agent")))
        .expect("the VMM build made the test guest")
        .display()
        .to_string()
}

/// A MicroVM manifest booting the in-repo test guest.
pub fn manifest(name: &str, cmdline: &str, policy: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\nspec:\n  resources: {{ vcpus: 1, memory: 64Mi }}\n  boot:\n    kernel: {}\n    cmdline: \"{cmdline}\"\n  runPolicy: {policy}\n  terminationGracePeriodSeconds: 5\n",
        test_guest()
    )
}

/// Deletes the VM `default/NAME` as cluster mode's finalizer does (the
/// runtime's cleanup: VMM, tap, address, cgroup and state directory), with a
/// host in network namespace `netns` (None: this one) and VM cgroups under
/// `cgroup_parent`. Returns the runtime it used.
pub fn delete_vm(
    root: &Path,
    vmm: &Path,
    netns: Option<String>,
    cgroup_parent: &str,
    name: &str,
) -> runv_node_agent::runtime::Runtime {
    use runv_node_agent::host::LinuxHost;
    use runv_node_agent::host::cgroup::CgroupConfig;
    use runv_node_agent::runtime::{Runtime, RuntimeConfig, VmRef};
    let host = LinuxHost::new(netns).with_cgroups(&CgroupConfig {
        parent: cgroup_parent.into(),
        ..CgroupConfig::default()
    });
    let rt = Runtime::new(
        RuntimeConfig::new(root.to_owned(), vmm.to_owned()),
        Arc::new(host),
    )
    .unwrap();
    rt.cleanup(&VmRef {
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
    })
    .unwrap();
    rt
}

//! `spec.isolation.limits` on the real host: the real `runv-agent standalone`
//! starts the real `runv-vmm` with the in-repo test guest; the VMM is in a
//! cgroup of its own from before it runs (memory charged there, CPU throttled
//! at its quota), with the quota and limit the spec asks for, in cgroup v2 or
//! v1, whichever the machine has. A restarted agent keeps the cgroup; deleting
//! the VM (the runtime's cleanup, what cluster mode's finalizer runs) kills the
//! VMM and removes the cgroup and the state directory.
//!
//! A VMM the kernel's OOM killer ends in its cgroup is reported `OOMKilled`:
//! shown with the real runtime, cgroups and processes, and a stand-in VMM
//! that allocates without bound (no mode of the test guest touches more
//! memory than the VMM was given).
//!
//! Needs root (cgroups) and /dev/kvm (the OOM test: root only).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Agent, KillVmmOnDrop, ParentGuard, alive, recorded_pid, remove_test_cgroup, vmm_binary,
};
use runv_node_agent::host::cgroup::own_cgroup;
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);
const MOUNT: &str = "/sys/fs/cgroup";

/// The VM's cgroup directories, as the test reads them: (hierarchy, dir).
fn expected_dirs(parent: &str, name: &str) -> Vec<(&'static str, PathBuf)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let dir = |base: PathBuf, controller: &str| {
        let mut d = base;
        for c in own_cgroup(&own, controller).unwrap_or_default().split('/') {
            if !c.is_empty() {
                d.push(c);
            }
        }
        d.join(parent).join(name)
    };
    if Path::new(MOUNT).join("cgroup.controllers").exists() {
        vec![("", dir(PathBuf::from(MOUNT), ""))]
    } else {
        vec![
            ("cpu", dir(Path::new(MOUNT).join("cpu"), "cpu")),
            ("memory", dir(Path::new(MOUNT).join("memory"), "memory")),
        ]
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_owned()
}

/// The cgroup path of `pid` in `hierarchy` (`""`: v2), from /proc.
fn cgroup_of(pid: u32, hierarchy: &str) -> Option<String> {
    own_cgroup(
        &std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?,
        hierarchy,
    )
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn limits_put_the_vmm_in_its_cgroup_and_deletion_removes_it() {
    if !require(
        "limits_put_the_vmm_in_its_cgroup_and_deletion_removes_it",
        &[Need::Root, Need::Kvm],
    ) {
        return;
    }
    let started = Instant::now();
    let parent = format!("runv-limits-{}", std::process::id());
    let dirs = expected_dirs(&parent, "default_limited");
    let _parents = ParentGuard(
        dirs.iter()
            .map(|(_, d)| d.parent().unwrap().to_owned())
            .collect(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let vm_dir = root.join("vms/default_limited");
    let _vmm_guard = KillVmmOnDrop(vm_dir.clone());
    struct CgroupGuard(String, PathBuf);
    impl Drop for CgroupGuard {
        fn drop(&mut self) {
            remove_test_cgroup(&self.0, &self.1);
        }
    }
    let _cgroup_guard = CgroupGuard(parent.clone(), vm_dir.clone());
    let file = tmp.path().join("limited.yaml");
    std::fs::write(
        &file,
        common::manifest("limited", "test=loop", "Always")
            + "  isolation:\n    limits: { cpu: 250m, memory: 96Mi }\n",
    )
    .unwrap();
    let vmm = vmm_binary();
    let args = [
        "--root",
        root.to_str().unwrap(),
        "--cgroup-parent",
        &parent,
        "standalone",
        file.to_str().unwrap(),
        "--vmm",
        vmm.to_str().unwrap(),
    ];
    let mut first = Agent::start(&args);
    first.wait_for("limited | tick 3", WAIT);
    let pid = recorded_pid(&vm_dir).expect("vm.json records the VMM");

    // In its cgroup, in every hierarchy, as /proc says.
    for (hierarchy, dir) in &dirs {
        let procs = read(dir, "cgroup.procs");
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "pid {pid} not in {}: {procs:?}",
            dir.display()
        );
        let path = cgroup_of(pid, hierarchy).expect("/proc/PID/cgroup");
        assert!(
            dir.ends_with(path.trim_start_matches('/')),
            "{path} vs {}",
            dir.display()
        );
    }
    // The quota and the limit the spec asks for: 250m = 25 ms per 100 ms; 96Mi.
    let (cpu_dir, mem_dir) = match dirs.as_slice() {
        [(_, v2)] => {
            assert_eq!(read(v2, "cpu.max"), "25000 100000");
            assert_eq!(read(v2, "memory.max"), (96u64 << 20).to_string());
            (v2.clone(), v2.clone())
        }
        [(_, cpu), (_, mem)] => {
            assert_eq!(read(cpu, "cpu.cfs_quota_us"), "25000");
            assert_eq!(read(cpu, "cpu.cfs_period_us"), "100000");
            assert_eq!(
                read(mem, "memory.limit_in_bytes"),
                (96u64 << 20).to_string()
            );
            (cpu.clone(), mem.clone())
        }
        other => panic!("unexpected layout {other:?}"),
    };
    // Enforced, not just written: the busy guest is throttled at its quota, and
    // the VMM's memory (mapped after it joined, before exec) is charged here.
    wait_until("CPU throttling of the looping guest", || {
        read(&cpu_dir, "cpu.stat")
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    });
    let usage_file = if dirs.len() == 1 {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    let usage: u64 = read(&mem_dir, usage_file).parse().unwrap();
    assert!(usage > 0, "{usage_file} = {usage}");

    // kill -9 the agent; a new one adopts the VMM in the same cgroup.
    first.signal(libc::SIGKILL);
    first.wait(WAIT);
    let mut second = Agent::start(&args);
    second.wait_for("limited status phase=Running ready=True", WAIT);
    assert_eq!(recorded_pid(&vm_dir), Some(pid), "a second VMM was started");
    for (hierarchy, dir) in &dirs {
        assert!(read(dir, "cgroup.procs").contains(&pid.to_string()));
        assert!(
            cgroup_of(pid, hierarchy).is_some_and(|p| dir.ends_with(p.trim_start_matches('/')))
        );
    }
    second.signal(libc::SIGKILL);
    second.wait(WAIT);
    assert!(alive(pid));

    // Delete: what cluster mode runs when the MicroVM goes.
    common::delete_vm(&root, &vmm, None, &parent, "limited");
    assert!(!alive(pid), "the VMM outlived its deletion");
    for (_, dir) in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    assert!(!vm_dir.exists(), "the state directory is left");
    eprintln!(
        "limits: {} in {:.1}s",
        if dirs.len() == 1 {
            "cgroup v2"
        } else {
            "cgroup v1"
        },
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_vmm_the_oom_killer_ends_is_oomkilled() {
    use runv_crds::microvm::Phase;
    use runv_crds::{MicroVMSpec, MicroVMStatus};
    use runv_node_agent::host::LinuxHost;
    use runv_node_agent::host::cgroup::CgroupConfig;
    use runv_node_agent::runtime::{Runtime, RuntimeConfig, VmRef};

    if !require("a_vmm_the_oom_killer_ends_is_oomkilled", &[Need::Root]) {
        return;
    }
    let parent = format!("runv-oom-{}", std::process::id());
    let dirs = expected_dirs(&parent, "default_oom");
    let _parents = ParentGuard(
        dirs.iter()
            .map(|(_, d)| d.parent().unwrap().to_owned())
            .collect(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let vm_dir = root.join("vms/default_oom");
    struct Cleanup(Option<Runtime>, VmRef);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(rt) = &self.0 {
                let _ = rt.cleanup(&self.1);
            }
        }
    }
    // The stand-in VMM: `tail` of an endless line keeps all of it in memory.
    let vmm = tmp.path().join("hungry-vmm");
    std::fs::write(&vmm, "#!/bin/sh\nexec tail /dev/zero\n").unwrap();
    std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let host = LinuxHost::new(None).with_cgroups(&CgroupConfig {
        parent: parent.clone(),
        ..CgroupConfig::default()
    });
    // The stand-in VMM is a shell script, which cannot jail itself: this
    // node allows running it unjailed.
    let mut config = RuntimeConfig::new(root.clone(), vmm.clone());
    config.sandbox.allow_jail_disabled = true;
    // Its "kernel" (any file: the stand-in never reads it) is in the test's
    // own directory, which this node allows kernels from.
    config.allowed.kernels = vec![tmp.path().to_owned()];
    let rt = Runtime::new(config, Arc::new(host)).unwrap();
    let vm = VmRef {
        namespace: "default".into(),
        name: "oom".into(),
        uid: String::new(),
    };
    let spec: MicroVMSpec = serde_json::from_value(serde_json::json!({
        "boot": {"kernel": vmm},
        "resources": {"vcpus": 1, "memory": "64Mi"},
        "runPolicy": "Once",
        "isolation": {"jail": "Disabled", "limits": {"memory": "64Mi"}},
    }))
    .unwrap();
    let guard = Cleanup(Some(rt), vm.clone());
    let rt = guard.0.as_ref().unwrap();
    let mut status = MicroVMStatus::default();
    let start = Instant::now();
    let mut t = 0;
    loop {
        t += 1;
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + t).unwrap();
        status = rt.reconcile(&vm, &spec, 1, &status, now).status;
        if status.phase == Some(Phase::Failed) {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the hungry VMM was not OOM-killed: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = status.last_exit.clone().unwrap();
    assert_eq!(last.reason, "OOMKilled", "{last:?}");
    let ready = runv_crds::conditions::find(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "OOMKilled");
    // The cgroup's counter says so too, and the run started from its earlier value.
    let mem = &dirs.last().unwrap().1;
    let counter = if dirs.len() == 1 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let kills = runv_node_agent::host::cgroup::parse_oom_kill(&read(mem, counter));
    assert_eq!(kills, Some(1));
    let text = std::fs::read_to_string(vm_dir.join("vm.json")).unwrap();
    assert!(text.contains("\"oomKillsAtStart\": 0"), "{text}");
    drop(guard);
    assert!(!vm_dir.exists(), "the state directory is left");
    for (_, dir) in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

//! A VM is ended by its cgroup, not only by its VMM's pid: through the real
//! `runv-agent standalone` and the real `runv-vmm`, a process placed in the
//! running VM's cgroup beside the VMM (as a VMM that got past its seccomp
//! filter might start one) is killed when the VM is stopped and when it is
//! deleted, and the cgroup is removed.
//!
//! Needs root (cgroups) and /dev/kvm.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Agent, KillVmmOnDrop, ParentGuard, alive, recorded_pid, remove_test_cgroup, vmm_binary,
};
use runv_node_agent::host::cgroup::own_cgroup;
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);

/// The directories of the cgroup `pid` is in, in each hierarchy the agent
/// puts VMs in (v2: the unified one; v1: cpu and memory), from /proc.
fn cgroup_dirs(pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mount = Path::new("/sys/fs/cgroup");
    let hierarchies: &[(&str, &str)] = if mount.join("cgroup.controllers").exists() {
        &[("", "")]
    } else {
        &[("cpu", "cpu"), ("memory", "memory")]
    };
    hierarchies
        .iter()
        .map(|(controller, dir)| {
            let path = own_cgroup(&text, controller).expect("the VMM's cgroup");
            let mut d = mount.join(dir);
            d.extend(path.split('/').filter(|c| !c.is_empty()));
            d
        })
        .collect()
}

fn members(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// A `sleep` the test starts and moves into `dirs`, as if the VMM had
/// started it there; killed when dropped if it still runs.
struct Stray(Child);

impl Stray {
    fn into_cgroup(dirs: &[PathBuf]) -> Self {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting sleep");
        let stray = Self(child);
        for d in dirs {
            std::fs::write(d.join("cgroup.procs"), stray.0.id().to_string())
                .unwrap_or_else(|e| panic!("joining {}: {e}", d.display()));
            assert!(members(d).contains(&stray.0.id()), "{}", d.display());
        }
        stray
    }

    /// Waits until it has ended; returns the signal that ended it.
    fn ended_by(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.signal();
            }
            assert!(start.elapsed() < WAIT, "the stray process still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stray {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stopping_or_deleting_a_vm_ends_every_process_in_its_cgroup() {
    if !require(
        "stopping_or_deleting_a_vm_ends_every_process_in_its_cgroup",
        &[Need::Root, Need::Kvm],
    ) {
        return;
    }
    let parent = format!("runv-swept-{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("swept.yaml");
    std::fs::write(&file, common::manifest("swept", "test=loop", "Always")).unwrap();
    let (file, root) = (
        file.display().to_string(),
        tmp.path().join("root").display().to_string(),
    );
    let vmm = vmm_binary().display().to_string();
    let vm_dir = tmp.path().join("root/vms/default_swept");
    struct CgroupGuard(String, PathBuf);
    impl Drop for CgroupGuard {
        fn drop(&mut self) {
            remove_test_cgroup(&self.0, &self.1);
        }
    }
    let _cgroup_guard = CgroupGuard(parent.clone(), vm_dir.clone());
    let _vmm_guard = KillVmmOnDrop(vm_dir.clone());
    let args = [
        "--root",
        &root,
        "--cgroup-parent",
        &parent,
        "standalone",
        &file,
        "--vmm",
        &vmm,
    ];

    // Stopped (Ctrl-C: the power button; the guest powers off).
    let mut agent = Agent::start(&args);
    agent.wait_for("swept | tick 3", WAIT);
    let pid = recorded_pid(&vm_dir).expect("vm.json records the VMM");
    let dirs = cgroup_dirs(pid);
    // The VM's cgroups (left when the test fails), then their parents.
    let _parents = ParentGuard(
        dirs.iter()
            .cloned()
            .chain(dirs.iter().map(|d| d.parent().unwrap().to_owned()))
            .collect(),
    );
    for d in &dirs {
        assert!(
            d.ends_with(format!("{parent}/default_swept")),
            "the VMM is not in its VM's cgroup: {}",
            d.display()
        );
    }
    let mut stray = Stray::into_cgroup(&dirs);
    agent.signal(libc::SIGINT);
    assert_eq!(agent.wait(WAIT), Some(0), "{}", agent.output());
    assert!(!alive(pid), "the VMM outlived its stop");
    assert_eq!(stray.ended_by(), Some(libc::SIGKILL));
    for d in &dirs {
        assert!(!d.exists(), "{} is left: {}", d.display(), agent.output());
    }

    // Deleted while its agent is gone (kill -9): what cluster mode's
    // finalizer runs.
    let mut agent = Agent::start(&args);
    agent.wait_for("swept | tick 3", WAIT);
    let pid = recorded_pid(&vm_dir).expect("vm.json records the VMM");
    assert_eq!(cgroup_dirs(pid), dirs);
    let mut stray = Stray::into_cgroup(&dirs);
    agent.signal(libc::SIGKILL);
    agent.wait(WAIT);
    assert!(alive(pid));
    common::delete_vm(Path::new(&root), Path::new(&vmm), None, &parent, "swept");
    assert!(!alive(pid), "the VMM outlived its deletion");
    assert_eq!(stray.ended_by(), Some(libc::SIGKILL));
    for d in &dirs {
        assert!(!d.exists(), "{} is left", d.display());
    }
    assert!(!vm_dir.exists(), "the state directory is left");
}

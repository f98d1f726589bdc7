//! The real `runv-agent standalone` with the real `runv-vmm` and the in-repo
//! test guest on /dev/kvm: a VM runs to Succeeded, its console is kept; a
//! running VM survives `kill -9` of the agent and is re-adopted without a
//! second VMM; Ctrl-C stops it cleanly; a missing kernel is named.

mod common;

use std::time::Duration;

use common::{Agent, KillVmmOnDrop, alive, manifest, recorded_pid, vmm_binary};
use runv_node_agent::testing::{Need, require};

const WAIT: Duration = Duration::from_secs(60);

fn setup(name: &str, body: &str) -> (tempfile::TempDir, String, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let file = tmp.path().join(format!("{name}.yaml"));
    std::fs::write(&file, body).unwrap();
    let vmm = vmm_binary();
    (
        tmp,
        root.display().to_string(),
        file.display().to_string(),
        vmm.display().to_string(),
    )
}

#[test]
fn a_vm_runs_to_success_and_its_console_is_kept() {
    if !require("a_vm_runs_to_success_and_its_console_is_kept", &[Need::Kvm]) {
        return;
    }
    let (_tmp, root, file, vmm) = setup("once", &manifest("once", "console=ttyS0", "Once"));
    let mut agent = Agent::start(&[
        "--root",
        &root,
        "standalone",
        &file,
        "--vmm",
        &vmm,
        "--timeout",
        "60",
    ]);
    assert_eq!(agent.wait(WAIT), Some(0), "{}", agent.output());
    let out = agent.output();
    assert!(out.contains("once | runv-guest: hello"), "{out}");
    assert!(
        out.contains("once Normal Exited: VM exited: GuestPowerOff"),
        "{out}"
    );
    assert!(
        out.contains("phase=Succeeded ready=True reason=Succeeded"),
        "{out}"
    );

    let mut console = Agent::start(&["--root", &root, "console", "once"]);
    assert_eq!(console.wait(WAIT), Some(0));
    assert!(
        console.output().contains("runv-guest: poweroff"),
        "{}",
        console.output()
    );
}

#[test]
fn a_missing_kernel_is_named_and_fails() {
    let (_tmp, root, file, vmm) = setup(
        "nokernel",
        &manifest("nokernel", "", "Always").replace(&common::test_guest(), "/nonexistent/vmlinux"),
    );
    let mut agent = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
    assert_eq!(agent.wait(WAIT), Some(1), "{}", agent.output());
    let out = agent.output();
    assert!(out.contains("reason=KernelNotFound"), "{out}");
    assert!(out.contains("/nonexistent/vmlinux"), "{out}");
}

#[test]
fn an_invalid_manifest_is_refused_with_the_api_servers_message() {
    let (_tmp, root, file, vmm) = setup(
        "bad",
        &manifest("bad", "", "Once").replace("memory: 64Mi", "memory: \"0\""),
    );
    let mut agent = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
    assert_eq!(agent.wait(WAIT), Some(2));
    assert!(
        agent
            .output()
            .contains("spec.resources.memory must be between 16Mi and 64Gi"),
        "{}",
        agent.output()
    );
}

#[test]
fn a_killed_agent_readopts_its_vm_and_ctrl_c_stops_it() {
    if !require(
        "a_killed_agent_readopts_its_vm_and_ctrl_c_stops_it",
        &[Need::Kvm],
    ) {
        return;
    }
    let (tmp, root, file, vmm) = setup("loop", &manifest("loop", "test=loop", "Always"));
    let vm_dir = tmp.path().join("root/vms/default_loop");
    let _guard = KillVmmOnDrop(vm_dir.clone());
    let mut first = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
    first.wait_for("loop | tick 3", WAIT);
    let pid = recorded_pid(&vm_dir).expect("vm.json records the VMM");
    assert!(alive(pid));

    // kill -9 the agent: the VM keeps running.
    first.signal(libc::SIGKILL);
    first.wait(WAIT);
    assert!(alive(pid), "the VMM died with the agent");

    let mut second = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
    second.wait_for("loop status phase=", WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(recorded_pid(&vm_dir), Some(pid), "a second VMM was started");
    assert!(alive(pid));
    second.wait_for("loop status phase=Running ready=True", WAIT);
    assert_eq!(recorded_pid(&vm_dir), Some(pid));

    // Ctrl-C: the guest gets its power button and powers off.
    second.signal(libc::SIGINT);
    assert_eq!(second.wait(WAIT), Some(0), "{}", second.output());
    assert!(
        second.output().contains("loop stopped"),
        "{}",
        second.output()
    );
    assert!(!alive(pid), "the VMM outlived Ctrl-C");
    let exit = std::fs::read_to_string(vm_dir.join("ctl.sock.exit")).unwrap();
    assert!(exit.contains("powerOff"), "{exit}");
}

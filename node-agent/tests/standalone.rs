//! The real `runv-agent standalone` with the real `runv-vmm` and the in-repo
//! test guest on /dev/kvm: a VM runs to Succeeded, its console is kept; a
//! running VM survives `kill -9` of the agent and is re-adopted without a
//! second VMM; Ctrl-C stops it cleanly; a missing kernel is named; guests
//! that crash (pvpanic, triple fault) are restarted with exponential backoff.

mod common;

use std::time::{Duration, Instant};

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

    // What a guest could write to take over the admin's terminal (clear it,
    // set the clipboard by OSC 52) is shown, not obeyed.
    let serial = std::path::Path::new(&root).join("vms/default_once/serial.log");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&serial)
        .unwrap();
    std::io::Write::write_all(&mut log, b"\x1b[2J\x1b]52;c;ZXZpbA==\x07\n").unwrap();
    let mut console = Agent::start(&["--root", &root, "console", "once"]);
    assert_eq!(console.wait(WAIT), Some(0));
    let shown = console.output();
    assert!(shown.contains("runv-guest: poweroff"), "{shown}");
    assert!(
        shown.contains("\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07"),
        "{shown}"
    );
    assert!(!shown.contains('\x1b'), "{shown:?}");
}

#[test]
fn a_missing_kernel_is_named_and_fails() {
    let (_tmp, root, file, vmm) = setup(
        "nokernel",
        &manifest("nokernel", "", "Always").replace(
            &common::test_guest(),
            "/var/lib/runv/kernels/nonexistent-vmlinux",
        ),
    );
    let mut agent = Agent::start(&["--root", &root, "standalone", &file, "--vmm", &vmm]);
    assert_eq!(agent.wait(WAIT), Some(1), "{}", agent.output());
    let out = agent.output();
    assert!(out.contains("reason=KernelNotFound"), "{out}");
    assert!(
        out.contains("/var/lib/runv/kernels/nonexistent-vmlinux"),
        "{out}"
    );
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
            .contains("spec.resources.memory: must be between 16Mi and 64Gi"),
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
    let exit = std::fs::read_to_string(vm_dir.join("run/ctl.sock.exit")).unwrap();
    assert!(exit.contains("powerOff"), "{exit}");
}

/// When the first start and each `restart N` of `vm` showed in the output.
#[derive(Debug, Default)]
struct Seen {
    first_start: Option<Instant>,
    restarts: Vec<Instant>,
}

impl Seen {
    fn update(&mut self, out: &str, vm: &str) {
        let now = Instant::now();
        if self.first_start.is_none() && out.contains(&format!("{vm} Normal Started: ")) {
            self.first_start = Some(now);
        }
        while out.contains(&format!(
            "{vm} Normal Restarted: restart {} of the VM",
            self.restarts.len() + 1
        )) {
            self.restarts.push(now);
        }
    }
}

#[test]
fn a_crashing_guest_is_restarted_with_exponential_backoff() {
    if !require(
        "a_crashing_guest_is_restarted_with_exponential_backoff",
        &[Need::Kvm],
    ) {
        return;
    }
    let started = Instant::now();
    // Two guests that crash at once: a pvpanic under RerunOnFailure, a triple
    // fault under Always. Backoff 500 ms, doubled per restart, at most 2 s.
    let body = manifest("panicky", "test=panic", "RerunOnFailure")
        + "---\n"
        + &manifest("faulty", "test=triple-fault", "Always");
    let (tmp, root, file, vmm) = setup("crashing", &body);
    let _guards = [
        KillVmmOnDrop(tmp.path().join("root/vms/default_panicky")),
        KillVmmOnDrop(tmp.path().join("root/vms/default_faulty")),
    ];
    let mut agent = Agent::start(&[
        "--root",
        &root,
        "--restart-backoff",
        "500ms",
        "--restart-backoff-max",
        "2s",
        "standalone",
        &file,
        "--vmm",
        &vmm,
    ]);
    let (mut panicky, mut faulty) = (Seen::default(), Seen::default());
    let wait_start = Instant::now();
    while panicky.restarts.len() < 4 || faulty.restarts.len() < 3 {
        assert!(
            wait_start.elapsed() < WAIT,
            "restarts so far: panicky {}, faulty {}; output:\n{}",
            panicky.restarts.len(),
            faulty.restarts.len(),
            agent.output()
        );
        let out = agent.output();
        panicky.update(&out, "panicky");
        faulty.update(&out, "faulty");
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.signal(libc::SIGINT);
    assert_eq!(agent.wait(WAIT), Some(0), "{}", agent.output());
    let out = agent.output();

    // Each exit names its reason; each wait is CrashLoopBackOff with the last exit.
    assert!(
        out.contains("panicky Warning Exited: VM exited: GuestPanicked"),
        "{out}"
    );
    // Hardware KVM reports a triple fault as a shutdown exit; kvm_pvm fails to
    // deliver the exception and reports an emulation failure instead (as
    // vmm/tests/boot.rs accepts).
    let fault = ["TripleFault", "EmulationFailure", "InternalError"]
        .into_iter()
        .find(|r| out.contains(&format!("faulty Warning Exited: VM exited: {r}")))
        .unwrap_or_else(|| panic!("no fault exit named: {out}"));
    for vm in ["panicky", "faulty"] {
        assert!(
            out.contains(&format!("{vm} Warning BackOff: back-off")),
            "{out}"
        );
    }
    assert!(
        out.lines().any(|l| l.starts_with("panicky status")
            && l.contains("reason=CrashLoopBackOff")
            && l.contains("last exit: GuestPanicked")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("faulty status")
            && l.contains("reason=CrashLoopBackOff")
            && l.contains(&format!("last exit: {fault}"))),
        "{out}"
    );
    // Each start came at least its backoff (500 ms, 1 s, 2 s, 2 s) after the
    // one before (the run in between, the exit and then the delay). Both are
    // printed in the reconcile that started the VMM; 100 ms covers this
    // loop's polling.
    let delays = [0.5, 1.0, 2.0, 2.0];
    let mut waited = Vec::new();
    let mut previous = panicky.first_start.expect("the first start was seen");
    for (k, restart) in panicky.restarts.iter().take(4).enumerate() {
        let w = restart.duration_since(previous).as_secs_f64();
        previous = *restart;
        waited.push(w);
        assert!(
            w >= delays[k] - 0.1,
            "restart {} {w:.2}s after the start before it, sooner than its {:.1}s backoff; {waited:?}",
            k + 1,
            delays[k]
        );
    }
    eprintln!(
        "backoff: the triple fault ended as {fault}; panicky started again {:?} s after each start before (restarts 1-4); test took {:.1}s",
        waited.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>(),
        started.elapsed().as_secs_f64()
    );
}

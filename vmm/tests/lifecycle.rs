//! Lifecycle requests of a running `runv-vmm`: a VM created paused runs no
//! guest code until `resume`, and a guest that ignores the power button is
//! ended after the shutdown grace the request (or else the config) gives.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Control, KillOnDrop, Scratch, read_exit_file, require_kvm, wait_output};
use runv_vmm_api::{ExitReason, Request, Response, VmState};

fn spawn(dir: &Scratch, kernel: &str, extra: &[&str]) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
    cmd.args(["--kernel", kernel, "--memory", "64M", "--serial", "off"])
        .arg("--control-socket")
        .arg(dir.path("vm.sock"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    KillOnDrop(Some(cmd.spawn().unwrap()))
}

fn state(c: &mut Control) -> VmState {
    match c.ask(Request::Describe) {
        Response::Described(d) => d.state,
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_vm_started_paused_runs_no_guest_code_until_resumed() {
    let Some(_) = require_kvm("a_vm_started_paused_runs_no_guest_code_until_resumed") else {
        return;
    };
    let dir = Scratch::new("life-paused");
    let child = spawn(
        &dir,
        runv_vmm::TEST_GUEST_PVH,
        &["--cmdline", "test=loop", "--vcpus", "2", "--start-paused"],
    );
    let mut c = Control::connect(&dir.path("vm.sock"));
    assert_eq!(state(&mut c), VmState::Paused);
    std::thread::sleep(Duration::from_millis(200));
    // Not one vCPU entered the guest: no exit, no console byte.
    assert_eq!(c.counter("vcpu_exits_total"), 0);
    assert_eq!(c.counter("serial_tx_bytes_total"), 0);
    assert_eq!(state(&mut c), VmState::Paused);
    // Pausing again is harmless; resume starts the guest.
    assert_eq!(c.ask(Request::Pause), Response::Ok);
    assert_eq!(c.ask(Request::Resume), Response::Ok);
    assert_eq!(state(&mut c), VmState::Running);
    let start = Instant::now();
    while c.counter("serial_tx_bytes_total") == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "guest never ran");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.ask(Request::Kill), Response::Ok);
    let out = wait_output(child.take(), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        read_exit_file(&dir.path("vm.sock.exit")).reason,
        ExitReason::Killed
    );
}

/// A kernel that ignores the power button: an ELF whose 64-bit entry point
/// is `jmp .` (no test guest mode ignores it; `test=hello` ends too fast).
fn spinning_kernel(dir: &Scratch) -> String {
    const BASE: u64 = 0x10_0000; // the VMM loads kernels at and above 1 MiB
    const HEADERS: u64 = 64 + 56;
    let code = [0xeb_u8, 0xfe]; // jmp .
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    let path = dir.path("spin.elf");
    std::fs::write(&path, elf).unwrap();
    path.display().to_string()
}

#[test]
fn a_guest_that_ignores_the_power_button_is_killed_after_the_grace() {
    let Some(_) = require_kvm("a_guest_that_ignores_the_power_button_is_killed_after_the_grace")
    else {
        return;
    };
    // The request's grace wins over the config's; without one, the config's applies.
    for (config_grace, request, want) in [
        (
            "600",
            Request::Shutdown {
                grace_seconds: Some(1),
            },
            "within 1 s",
        ),
        ("1", Request::SHUTDOWN, "within 1 s"),
    ] {
        let dir = Scratch::new(&format!("life-grace-{config_grace}"));
        let kernel = spinning_kernel(&dir);
        let child = spawn(&dir, &kernel, &["--shutdown-grace-seconds", config_grace]);
        let mut c = Control::connect(&dir.path("vm.sock"));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(state(&mut c), VmState::Running, "the spinning guest runs");
        assert_eq!(c.ask(request), Response::Ok);
        assert_eq!(state(&mut c), VmState::ShuttingDown);
        // A hang guard only: the 600 s config grace would fail it.
        let out = wait_output(child.take(), Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(0));
        let rec = read_exit_file(&dir.path("vm.sock.exit"));
        assert_eq!(rec.reason, ExitReason::Killed, "{rec:?}");
        assert!(rec.message.contains(want), "{rec:?}");
    }
}

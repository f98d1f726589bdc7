//! The control socket of a running `runv-vmm`: ping, describe, pause/resume,
//! counters, malformed requests, shutdown and kill.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Control, KillOnDrop, Scratch, read_exit_file, require_kvm, wait_output};
use runv_vmm_api::{ExitReason, Request, Response, VmState};

fn spawn_loop_guest(dir: &Scratch) -> KillOnDrop {
    spawn_guest(dir, "test=loop")
}

fn spawn_guest(dir: &Scratch, cmdline: &str) -> KillOnDrop {
    spawn_guest_with_serial(dir, cmdline, "off")
}

fn spawn_guest_with_serial(dir: &Scratch, cmdline: &str, serial: &str) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
    cmd.args([
        "--kernel",
        runv_vmm::TEST_GUEST_PVH,
        "--cmdline",
        cmdline,
        "--vcpus",
        "2",
    ])
    .args(["--memory", "64M", "--serial", serial, "--control-socket"])
    .arg(dir.path("vm.sock"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    KillOnDrop(Some(cmd.spawn().unwrap()))
}

#[test]
fn control_socket_drives_a_running_vm() {
    let Some(hv) = require_kvm("control_socket_drives_a_running_vm") else {
        return;
    };
    let dir = Scratch::new("ctl");
    let child = spawn_loop_guest(&dir);
    let mut c = Control::connect(&dir.path("vm.sock"));
    assert_eq!(c.ask(Request::Ping), Response::Pong);
    match c.ask(Request::Describe) {
        Response::Described(d) => {
            assert_eq!((d.vcpus, d.memory_mib, d.state), (2, 64, VmState::Running));
            assert_eq!(d.hypervisor, hv);
            assert_eq!(d.cmdline, "test=loop");
            assert_eq!(d.pid, child.id());
        }
        r => panic!("{r:?}"),
    }
    // Malformed requests get an error and the VM keeps running.
    assert!(matches!(
        c.raw(b"{\"op\":\"explode\"}\n"),
        Response::Error { .. }
    ));
    assert!(matches!(
        c.raw(b"\x00\x01garbage\n"),
        Response::Error { .. }
    ));
    assert_eq!(c.ask(Request::Ping), Response::Pong);
    let n = c.wait_serial_past(0);
    c.wait_serial_past(n);

    // Pause: the guest stops producing output.
    assert_eq!(c.ask(Request::Pause), Response::Ok);
    let paused_at = c.counter("serial_tx_bytes_total");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        c.counter("serial_tx_bytes_total"),
        paused_at,
        "guest ran while paused"
    );
    match c.ask(Request::Describe) {
        Response::Described(d) => assert_eq!(d.state, VmState::Paused),
        r => panic!("{r:?}"),
    }
    // Resume: output grows again.
    assert_eq!(c.ask(Request::Resume), Response::Ok);
    if c.try_raw(Request::Ping.encode().as_bytes()).is_none() {
        let out = wait_output(child.take(), Duration::from_secs(10));
        panic!(
            "VMM went away after resume: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.wait_serial_past(paused_at);
    assert!(c.counter("vcpu_exits_total") > 0);

    assert_eq!(c.ask(Request::Kill), Response::Ok);
    let out = wait_output(child.take(), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    let rec = read_exit_file(&dir.path("vm.sock.exit"));
    assert_eq!(rec.reason, ExitReason::Killed);
    assert!(!dir.path("vm.sock").exists(), "socket is removed at exit");
}

#[test]
fn shutdown_asks_the_guest_which_powers_off() {
    let Some(_) = require_kvm("shutdown_asks_the_guest_which_powers_off") else {
        return;
    };
    let dir = Scratch::new("ctl-shutdown");
    let child = spawn_loop_guest(&dir);
    let mut c = Control::connect(&dir.path("vm.sock"));
    c.wait_serial_past(0);
    assert_eq!(c.ask(Request::SHUTDOWN), Response::Ok);
    let out = wait_output(child.take(), Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0));
    let rec = read_exit_file(&dir.path("vm.sock.exit"));
    assert_eq!(rec.reason, ExitReason::PowerOff, "{rec:?}");
}

/// User plus system CPU time of a process, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

/// Waits (at most 10 s) until the serial log holds `line`; returns the log.
fn wait_for_line(path: &std::path::Path, line: &str) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(line) {
            return log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {line:?} in the serial log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The idle test guest sleeps in `hlt` with no periodic timer: it routes the
/// ACPI GED's interrupt (the GSI it found in the DSDT), and the power button
/// wakes it through that interrupt. While it sleeps the vCPU makes no exit
/// to the VMM except for its watchdog (one poll of port 0x601 per wake-up,
/// about every 5 s, which the guest counts and reports), and a second of it
/// costs the host a small fraction of a CPU (the looping guest costs a whole
/// one).
#[test]
fn idle_guest_sleeps_and_answers_the_power_button() {
    let Some(hv) = require_kvm("idle_guest_sleeps_and_answers_the_power_button") else {
        return;
    };
    let dir = Scratch::new("ctl-idle");
    let log = dir.path("serial.log");
    let child = spawn_guest_with_serial(&dir, "test=idle", &format!("file:{}", log.display()));
    let mut c = Control::connect(&dir.path("vm.sock"));
    // Its last line before it sleeps.
    wait_for_line(&log, "runv-guest: idle ged_gsi=23\n");
    let pid = child.id();
    let (cpu0, exits0, t0) = (cpu_time(pid), c.counter("vcpu_exits_total"), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time(pid) - cpu0;
    let exits = c.counter("vcpu_exits_total") - exits0;
    let wall = t0.elapsed();
    assert!(
        used < wall / 10,
        "idle guest used {used:?} of CPU in {wall:?}: it does not sleep"
    );
    assert_eq!(c.ask(Request::SHUTDOWN), Response::Ok);
    let out = wait_output(child.take(), Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0));
    let rec = read_exit_file(&dir.path("vm.sock.exit"));
    assert_eq!(rec.reason, ExitReason::PowerOff, "{rec:?}");
    // The interrupt, not the watchdog's poll, woke it for the power button.
    let serial = std::fs::read_to_string(&log).unwrap();
    let report = serial
        .lines()
        .find_map(|l| l.strip_prefix("runv-guest: power button via="))
        .unwrap_or_else(|| panic!("no power-button line:\n{serial}"));
    let watchdog: u64 = report
        .strip_prefix("ged watchdog=")
        .unwrap_or_else(|| panic!("not woken by the GED: {report}"))
        .parse()
        .unwrap();
    eprintln!(
        "{hv}: idle guest: {used:?} CPU and {exits} vCPU exits in {wall:?}; \
         {watchdog} watchdog wake-ups in all"
    );
    assert!(
        exits <= watchdog,
        "{exits} vCPU exits while asleep, {watchdog} watchdog wake-ups"
    );
}

#[test]
fn sigterm_ends_the_vm_with_an_exit_file() {
    let Some(_) = require_kvm("sigterm_ends_the_vm_with_an_exit_file") else {
        return;
    };
    let dir = Scratch::new("ctl-term");
    let child = spawn_loop_guest(&dir);
    let mut c = Control::connect(&dir.path("vm.sock"));
    c.wait_serial_past(0);
    // SAFETY: sending SIGTERM to the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = wait_output(child.take(), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        read_exit_file(&dir.path("vm.sock.exit")).reason,
        ExitReason::Killed
    );
}

/// Every thread kind installs its allowlist: with the test probe enabled each
/// thread tries `getcwd(2)`, which no list allows, and a fork, and reports
/// the results. The VM keeps serving the control socket (its control thread
/// starts a thread per client under its filter) and its guest keeps printing
/// with every filter on; with `--no-seccomp` the same probes are allowed.
#[test]
fn every_vmm_thread_runs_under_its_seccomp_allowlist() {
    let Some(_) = require_kvm("every_vmm_thread_runs_under_its_seccomp_allowlist") else {
        return;
    };
    for seccomp in [true, false] {
        let dir = Scratch::new(&format!("ctl-seccomp-{seccomp}"));
        // vsock gives the VM its host I/O thread; the loop guest never uses it.
        let cfg = serde_json::json!({
            "apiVersion": runv_vmm_api::API_VERSION,
            "kernel": runv_vmm::TEST_GUEST_PVH,
            "cmdline": "test=loop",
            "memoryMib": 64,
            "serial": { "mode": "file", "path": dir.path("serial.log") },
            "controlSocket": dir.path("vm.sock"),
            "vsock": { "guestCid": 3, "udsPath": dir.path("v.sock") },
            "seccomp": seccomp,
        });
        std::fs::write(dir.path("vm.json"), cfg.to_string()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
        cmd.arg("--config")
            .arg(dir.path("vm.json"))
            .env("RUNV_VMM_SECCOMP_PROBE", "main,control,io,vcpu")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = KillOnDrop(Some(cmd.spawn().unwrap()));
        let mut c = Control::connect(&dir.path("vm.sock"));
        assert_eq!(c.ask(Request::Ping), Response::Pong);
        let n = c.wait_serial_past(0);
        c.wait_serial_past(n);
        assert_eq!(c.ask(Request::Kill), Response::Ok);
        let out = wait_output(child.take(), Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = if seccomp {
            "refused (EPERM)"
        } else {
            "allowed"
        };
        for kind in ["main", "control", "io", "vcpu"] {
            // A syscall on no list, and a new process (clone without
            // CLONE_THREAD), which even the control threads that start
            // threads may not make.
            for call in ["getcwd", "fork"] {
                let line = format!("runv-vmm: seccomp probe: {kind} thread: {call} {want}\n");
                assert!(stderr.contains(&line), "missing {line:?} in\n{stderr}");
            }
        }
    }
}

//! The guest channel (`runv_vmm_api::guest`) end to end through runv-vmm's
//! hybrid vsock: the test guest's `test=container` mode speaks the guest
//! side, as runv-init does, and these tests are the node agent's side. Every
//! guest frame is decoded with the API crate's own decoder, so the guest's
//! JSON is checked against the real serde types.

mod common;

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::channel::{
    self, Conn, exited_with_code, exited_with_signal, guest_config, run_container, stdout_line,
};
use common::{Control, KillOnDrop, Scratch, require_kvm, vmm, wait_output};
use runv_vmm_api::guest::{Frame, GuestState, Hello, Started, Stop, read_frame};
use runv_vmm_api::{Request, Response, SerialConfig, VmConfig, VsockConfig};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A running test guest in `test=container` mode.
struct Vm {
    /// Dropped first: no VMM outlives its test.
    child: KillOnDrop,
    dir: Scratch,
    uds: PathBuf,
}

impl Vm {
    fn start(name: &str, cmdline: &str) -> Vm {
        Vm::start_with(name, cmdline, 1)
    }

    fn start_with(name: &str, cmdline: &str, vcpus: u8) -> Vm {
        let dir = Scratch::new(&format!("chan-{name}"));
        let uds = dir.path("v.sock");
        let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
        cfg.memory_mib = 64;
        cfg.vcpus = vcpus;
        cfg.cmdline = format!("test=container {cmdline}");
        cfg.vsock = Some(VsockConfig {
            guest_cid: 5,
            uds_path: uds.clone(),
        });
        cfg.serial = SerialConfig::File {
            path: dir.path("serial.log"),
            rotate: None,
        };
        cfg.exit_file = Some(dir.path("vm.exit"));
        cfg.control_socket = Some(dir.path("vm.sock"));
        let path = dir.path("vm.json");
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let child = vmm()
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runv-vmm");
        Vm {
            child: KillOnDrop(Some(child)),
            dir,
            uds,
        }
    }

    fn connect(&self) -> Conn {
        channel::connect(&self.uds, &self.dir.path("serial.log"))
    }

    /// Waits (bounded) for the VMM to exit; returns its output and the console.
    fn wait_exit(self) -> (Output, String) {
        let out = wait_output(self.child.take(), TIMEOUT);
        let serial = std::fs::read_to_string(self.dir.path("serial.log")).unwrap_or_default();
        (out, serial)
    }

    /// Waits (bounded) for the VMM to exit and checks that the guest powered off.
    fn expect_poweroff(self, after: &str) -> String {
        let (out, serial) = self.wait_exit();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{serial}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(serial.contains(after), "missing {after:?} in\n{serial}");
        assert!(
            serial.ends_with("runv-guest: poweroff\n"),
            "the guest did not power off\n{serial}"
        );
        assert!(!serial.contains("FAIL"), "{serial}");
        serial
    }
}

#[test]
fn the_test_guest_runs_a_container_over_the_channel_and_powers_off_on_exit_ack() {
    let Some(_) = require_kvm("the_test_guest_runs_a_container_over_the_channel") else {
        return;
    };
    let vm = Vm::start("exit", "exit=3 out=marker42");
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    let config_len = run_container(&mut conn, "marker42");
    let exited = match conn.read() {
        Frame::Exited(e) => e,
        f => panic!("expected Exited, got {f:?}"),
    };
    assert_eq!(exited, exited_with_code(3));
    assert_eq!(exited.exit_code(), 3);
    conn.send(&Frame::ExitAck);
    let serial = vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    for line in [
        "runv-guest: virtio-vsock cid=5 listening on port 1024\n".to_owned(),
        format!("runv-guest: container started (config of {config_len} bytes)\n"),
        "runv-guest: container exited code=3\n".to_owned(),
    ] {
        assert!(serial.contains(&line), "missing {line:?} in\n{serial}");
    }
}

#[test]
fn a_signal_on_the_command_line_is_reported_as_the_containers_death() {
    let Some(_) = require_kvm("a_signal_on_the_command_line_is_reported") else {
        return;
    };
    // Two vCPUs: the second is never started and does not disturb the channel.
    let vm = Vm::start_with("signal", "signal=9", 2);
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, "hello");
    let exited = match conn.read() {
        Frame::Exited(e) => e,
        f => panic!("expected Exited, got {f:?}"),
    };
    assert_eq!(exited, exited_with_signal(9));
    assert_eq!(exited.exit_code(), 137);
    conn.send(&Frame::ExitAck);
    vm.expect_poweroff("runv-guest: container exited signal=9\n");
}

#[test]
fn stop_ends_a_running_container_with_sigterm() {
    let Some(_) = require_kvm("stop_ends_a_running_container_with_sigterm") else {
        return;
    };
    let vm = Vm::start("stop", "run=forever exit=7");
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, "hello");
    // It keeps running: the next frame is the answer to Stop.
    conn.send(&Frame::Stop(Stop {
        grace_period_seconds: 5,
    }));
    let exited = match conn.read() {
        Frame::Exited(e) => e,
        f => panic!("expected Exited, got {f:?}"),
    };
    assert_eq!(exited, exited_with_signal(15));
    assert_eq!(exited.exit_code(), 143);
    // A second Stop changes nothing; ExitAck powers off.
    conn.send(&Frame::Stop(Stop {
        grace_period_seconds: 5,
    }));
    conn.send(&Frame::ExitAck);
    vm.expect_poweroff("runv-guest: container exited signal=15\n");
}

#[test]
fn the_power_button_stops_a_running_container_like_sigterm() {
    let Some(_) = require_kvm("the_power_button_stops_a_running_container") else {
        return;
    };
    let vm = Vm::start("button", "run=forever");
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, "hello");
    // The VMM's graceful shutdown presses the ACPI power button.
    let mut control = Control::connect(&vm.dir.path("vm.sock"));
    assert_eq!(control.ask(Request::SHUTDOWN), Response::Ok);
    assert_eq!(conn.read(), Frame::Exited(exited_with_signal(15)));
    conn.send(&Frame::ExitAck);
    vm.expect_poweroff("runv-guest: container stop: power button\n");
}

#[test]
fn stop_before_config_reports_a_start_error() {
    let Some(_) = require_kvm("stop_before_config_reports_a_start_error") else {
        return;
    };
    let vm = Vm::start("stop-early", "");
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    conn.send(&Frame::Stop(Stop {
        grace_period_seconds: 0,
    }));
    let exited = match conn.read() {
        Frame::Exited(e) => e,
        f => panic!("expected Exited, got {f:?}"),
    };
    assert_eq!(
        exited.start_error.as_deref(),
        Some("stopped before the container started")
    );
    assert_eq!((exited.code, exited.signal), (None, None));
    assert_eq!(exited.exit_code(), 128);
    // A host that reconnects is told the same.
    drop(conn);
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::Exited(exited.clone()));
    assert_eq!(conn.read(), Frame::Exited(exited));
    conn.hello();
    // A Config after the exit starts nothing.
    conn.send(&Frame::Config(Box::new(guest_config(60))));
    conn.send(&Frame::ExitAck);
    let serial = vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    assert!(
        !serial.contains("runv-guest: container started"),
        "{serial}"
    );
}

#[test]
fn a_host_that_reconnects_sees_the_state_and_the_exit_until_it_acknowledges() {
    let Some(_) = require_kvm("a_host_that_reconnects_sees_the_state") else {
        return;
    };
    let vm = Vm::start("reconnect", "run=forever out=again");
    let mut first = vm.connect();
    assert_eq!(first.guest_hello(), GuestState::WaitingForConfig);
    first.hello();
    run_container(&mut first, "again");
    drop(first); // the agent restarts

    let mut second = vm.connect();
    assert_eq!(
        second.guest_hello(),
        GuestState::Running(Started {
            pid: 1,
            started_at_nanos: 0
        })
    );
    second.hello();
    // A Config to a running container is ignored; Stop ends it.
    second.send(&Frame::Config(Box::new(guest_config(60))));
    second.send(&Frame::Stop(Stop {
        grace_period_seconds: 5,
    }));
    assert_eq!(second.read(), Frame::Exited(exited_with_signal(15)));
    drop(second); // lost before ExitAck

    let mut third = vm.connect();
    assert_eq!(
        third.guest_hello(),
        GuestState::Exited(exited_with_signal(15))
    );
    assert_eq!(third.read(), Frame::Exited(exited_with_signal(15)));
    third.hello();
    third.send(&Frame::ExitAck);
    let serial = vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    assert_eq!(
        serial
            .matches("runv-guest: channel: host connected")
            .count(),
        3,
        "{serial}"
    );
    assert_eq!(
        serial.matches("runv-guest: container started").count(),
        1,
        "{serial}"
    );
}

#[test]
fn a_newer_connection_replaces_the_old_one() {
    let Some(_) = require_kvm("a_newer_connection_replaces_the_old_one") else {
        return;
    };
    let vm = Vm::start("replace", "exit=0");
    let mut old = vm.connect();
    assert_eq!(old.guest_hello(), GuestState::WaitingForConfig);
    let mut new = vm.connect();
    assert_eq!(new.guest_hello(), GuestState::WaitingForConfig);
    // The guest reset the old connection: its stream ends.
    old.expect_end();
    new.hello();
    run_container(&mut new, "hello");
    assert_eq!(new.read(), Frame::Exited(exited_with_code(0)));
    new.send(&Frame::ExitAck);
    vm.expect_poweroff("runv-guest: container exit acknowledged\n");
}

#[test]
fn a_host_breaking_the_protocol_gets_an_error_and_loses_only_its_connection() {
    let Some(_) = require_kvm("a_host_breaking_the_protocol_gets_an_error") else {
        return;
    };
    let vm = Vm::start("hostile", "exit=1");
    // Config before Hello.
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.send(&Frame::Config(Box::new(guest_config(60))));
    assert_eq!(
        conn.read(),
        Frame::Error("a Config frame before Hello".into())
    );
    conn.expect_end();
    // Another protocol version.
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.send(&Frame::Hello(Hello {
        version: 2,
        software: "future agent".into(),
        state: None,
    }));
    assert_eq!(
        conn.read(),
        Frame::Error("the peer speaks guest protocol version 2; this side speaks 1".into())
    );
    conn.expect_end();
    // A frame longer than any frame may be, and one of length 0.
    for (len, what) in [(0x0100_0000u32, "16777216"), (0, "0")] {
        let mut conn = vm.connect();
        conn.guest_hello();
        conn.hello();
        conn.send_raw(&len.to_be_bytes());
        assert_eq!(
            conn.read(),
            Frame::Error(format!(
                "a frame of {what} bytes; frames are 1 to 65536 bytes"
            ))
        );
        conn.expect_end();
    }
    // An unknown kind, and a frame only a guest sends.
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    conn.send_raw(&[0, 0, 0, 1, 42]);
    assert_eq!(
        conn.read(),
        Frame::Error("a frame of unknown kind 42".into())
    );
    conn.expect_end();
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    conn.send(&Frame::Exited(exited_with_code(0)));
    assert_eq!(
        conn.read(),
        Frame::Error("a Exited frame, which this side of the channel never receives".into())
    );
    conn.expect_end();
    // Half a frame, then gone.
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    conn.send_raw(&[0, 0, 0, 40, 2, b'{']);
    drop(conn);
    // The container is still waiting for its config, and a well-behaved
    // host runs it; a Config of nearly the largest frame arrives whole
    // (the guest's credit updates let the host send all of it).
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    let mut big = guest_config(60);
    big.container
        .env
        .push(format!("PAD={}", "x".repeat(60_000)));
    // JSON escapes in argv[0]: quotes come back, a tab as '?'.
    big.container.argv[0] = "/bin/say \"hi\"\t".into();
    let big = Frame::Config(Box::new(big));
    let big_len = big.encode().len() - 5;
    conn.send(&big);
    assert!(matches!(conn.read(), Frame::Started(_)));
    assert_eq!(
        conn.read(),
        Frame::Stdout(stdout_line("hello", big_len, "vm-1", "/bin/say \"hi\"?"))
    );
    assert!(matches!(conn.read(), Frame::Stderr(_)));
    assert_eq!(conn.read(), Frame::Exited(exited_with_code(1)));
    conn.send(&Frame::ExitAck);
    vm.expect_poweroff("runv-guest: container exit acknowledged\n");
}

#[test]
fn without_an_exit_ack_the_guest_powers_off_after_the_configs_timeout() {
    let Some(_) = require_kvm("without_an_exit_ack_the_guest_powers_off") else {
        return;
    };
    let vm = Vm::start("no-ack", "exit=0");
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    conn.send(&Frame::Config(Box::new(guest_config(1))));
    for _ in 0..3 {
        conn.read(); // Started, Stdout, Stderr
    }
    assert_eq!(conn.read(), Frame::Exited(exited_with_code(0)));
    // No ExitAck: the guest gives up after the config's 1 s and powers off.
    match read_frame(&mut conn.stream) {
        Ok(None) => {}
        Err(runv_vmm_api::guest::ProtoError::Io(e))
            if matches!(e.kind(), ErrorKind::ConnectionReset) => {}
        other => panic!("expected the end of the stream, got {other:?}"),
    }
    vm.expect_poweroff("runv-guest: no host acknowledged the exit within 1 s\n");
}

#[test]
fn the_guest_returns_credit_so_the_host_may_send_more_than_its_buffer() {
    let Some(_) = require_kvm("the_guest_returns_credit") else {
        return;
    };
    let vm = Vm::start("credit", "exit=0");
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    // 4 x 60,000 bytes the guest answers nothing to: the device forwards
    // them only as the guest's credit updates free its 64 KiB buffer.
    let text = "e".repeat(60_000);
    for _ in 0..4 {
        conn.send(&Frame::Error(text.clone()));
    }
    run_container(&mut conn, "hello");
    assert_eq!(conn.read(), Frame::Exited(exited_with_code(0)));
    conn.send(&Frame::ExitAck);
    let serial = vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    assert_eq!(
        serial
            .matches("runv-guest: channel: the host says: eeee")
            .count(),
        4,
        "{serial}"
    );
}

#[test]
fn test_container_without_a_vsock_device_fails_with_a_reason() {
    let Some(_) = require_kvm("test_container_without_a_vsock_device_fails") else {
        return;
    };
    let dir = Scratch::new("chan-novsock");
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_64);
    cfg.memory_mib = 64;
    cfg.cmdline = "test=container".into();
    cfg.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: None,
    };
    cfg.exit_file = Some(dir.path("vm.exit"));
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut cmd = vmm();
    cmd.arg("--config").arg(&path);
    let out = common::run_with_timeout(cmd, TIMEOUT);
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    assert!(
        serial.contains("runv-guest: FAIL test=container needs a virtio-vsock device\n"),
        "{serial}"
    );
    let rec = common::read_exit_file(&dir.path("vm.exit"));
    assert_eq!(rec.reason, runv_vmm_api::ExitReason::GuestPanic, "{rec:?}");
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn flood_writes_the_given_bytes_to_stdout_before_the_exit() {
    let Some(_) = require_kvm("flood_writes_the_given_bytes_to_stdout") else {
        return;
    };
    const BYTES: usize = 300_000;
    let vm = Vm::start("flood", &format!("flood={BYTES} exit=2"));
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    run_container(&mut conn, "hello");
    let mut flood = Vec::new();
    let exited = loop {
        match conn.read() {
            Frame::Stdout(b) => {
                assert!(b.len() <= runv_vmm_api::guest::MAX_OUTPUT_CHUNK);
                flood.extend_from_slice(&b);
            }
            Frame::Exited(e) => break e,
            f => panic!("expected Stdout or Exited, got {f:?}"),
        }
    };
    assert_eq!(exited, exited_with_code(2));
    assert_eq!(flood.len(), BYTES);
    let want: Vec<u8> = (0..BYTES)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    assert!(flood == want, "the flood's bytes differ from the pattern");
    conn.send(&Frame::ExitAck);
    vm.expect_poweroff(&format!("runv-guest: container flooded {BYTES} bytes\n"));
}

/// `bad=...` makes the guest break the protocol, so the host's decoder can be
/// tested against a real guest: each one is refused by the API crate.
#[test]
fn bad_frames_from_the_guest_are_refused_by_the_hosts_decoder() {
    use runv_vmm_api::guest::ProtoError;
    let Some(_) = require_kvm("bad_frames_from_the_guest_are_refused") else {
        return;
    };
    for bad in ["length", "kind", "json"] {
        let vm = Vm::start(&format!("bad-{bad}"), &format!("bad={bad}"));
        let mut conn = vm.connect();
        conn.guest_hello();
        conn.hello();
        run_container(&mut conn, "hello");
        match (bad, read_frame(&mut conn.stream)) {
            ("length", Err(ProtoError::Length(1_048_576))) => {}
            ("kind", Err(ProtoError::Kind(99))) => {}
            ("json", Err(ProtoError::Payload { kind: "Exited", .. })) => {}
            (_, other) => panic!("bad={bad}: {other:?}"),
        }
        // It keeps running until stopped.
        drop(conn);
        let mut conn = vm.connect();
        assert!(
            matches!(conn.guest_hello(), GuestState::Running(_)),
            "bad={bad}"
        );
        conn.hello();
        conn.send(&Frame::Stop(Stop {
            grace_period_seconds: 0,
        }));
        // The broken frame is not sent again: the next frame is Exited.
        assert_eq!(conn.read(), Frame::Exited(exited_with_signal(15)));
        conn.send(&Frame::ExitAck);
        vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    }
}

/// A host that stops reading for a while (a busy agent) loses nothing: the
/// guest's output waits in the VMM within its credit and then in the guest,
/// and the connection stays up.
#[test]
fn a_host_that_pauses_reading_loses_no_output() {
    let Some(_) = require_kvm("a_host_that_pauses_reading_loses_no_output") else {
        return;
    };
    const BYTES: usize = 1_000_000;
    let vm = Vm::start("pause", &format!("flood={BYTES}"));
    let mut conn = vm.connect();
    conn.guest_hello();
    conn.hello();
    run_container(&mut conn, "hello");
    // Long enough for the guest to fill the socket, the VMM's credit and its
    // own outbox; not a measurement.
    std::thread::sleep(Duration::from_secs(3));
    let mut flood = 0usize;
    loop {
        match conn.read() {
            Frame::Stdout(b) => flood += b.len(),
            Frame::Exited(e) => {
                assert_eq!(e, exited_with_code(0));
                break;
            }
            f => panic!("expected Stdout or Exited, got {f:?}"),
        }
    }
    assert_eq!(flood, BYTES);
    conn.send(&Frame::ExitAck);
    let serial = vm.expect_poweroff("runv-guest: container exit acknowledged\n");
    assert_eq!(
        serial
            .matches("runv-guest: channel: host connected")
            .count(),
        1,
        "{serial}"
    );
}

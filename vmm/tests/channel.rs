//! The guest channel (`runv_vmm_api::guest`) end to end through runv-vmm's
//! hybrid vsock: the test guest's `test=container` mode speaks the guest
//! side, as runv-init does, and these tests are the node agent's side. Every
//! guest frame is decoded with the API crate's own decoder, so the guest's
//! JSON is checked against the real serde types.

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Control, KillOnDrop, Scratch, require_kvm, vmm, wait_output};
use runv_vmm_api::guest::{
    CONFIG_VERSION, ContainerConfig, Exited, Frame, GuestConfig, GuestState, Hello,
    PROTOCOL_VERSION, RootFs, Started, Stop, VSOCK_PORT, hybrid_connect, read_frame, write_frame,
};
use runv_vmm_api::{Request, Response, SerialConfig, VmConfig, VsockConfig};

const TIMEOUT: Duration = Duration::from_secs(60);
/// How long one read from the guest may take.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

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

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path("serial.log")).unwrap_or_default()
    }

    /// Connects to the guest's channel port as the agent does: `CONNECT
    /// 1024` on the VM's vsock socket, tried again (bounded) while the VMM
    /// has not bound it or the guest has not set up its device yet.
    fn connect(&self) -> Conn {
        let start = Instant::now();
        loop {
            let attempt = UnixStream::connect(&self.uds).and_then(|mut s| {
                s.set_read_timeout(Some(READ_TIMEOUT))?;
                s.set_write_timeout(Some(READ_TIMEOUT))?;
                hybrid_connect(&mut s, VSOCK_PORT)?;
                Ok(s)
            });
            match attempt {
                Ok(stream) => return Conn { stream },
                Err(e) if start.elapsed() > TIMEOUT => {
                    panic!(
                        "cannot connect to the guest channel: {e}\n{}",
                        self.serial()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
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

/// One host connection to the guest's channel.
struct Conn {
    stream: UnixStream,
}

impl Conn {
    fn read(&mut self, vm: &Vm) -> Frame {
        match read_frame(&mut self.stream) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("the guest closed the channel\n{}", vm.serial()),
            Err(e) => panic!("reading the guest channel: {e:?}\n{}", vm.serial()),
        }
    }

    /// The stream ends (the guest closed the connection).
    fn expect_end(&mut self, vm: &Vm) {
        match read_frame(&mut self.stream) {
            Ok(None) => {}
            Ok(Some(f)) => panic!("another frame: {f:?}\n{}", vm.serial()),
            Err(e) => panic!("the stream did not end cleanly: {e:?}\n{}", vm.serial()),
        }
    }

    fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).unwrap();
    }

    /// Sends raw bytes (frames a well-behaved host would not send).
    fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).unwrap();
    }

    fn hello(&mut self) {
        self.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: "runv-vmm channel test".into(),
            state: None,
        }));
    }

    /// Reads the guest's Hello and returns the state it tells.
    fn guest_hello(&mut self, vm: &Vm) -> GuestState {
        match self.read(vm) {
            Frame::Hello(Hello {
                version,
                software,
                state: Some(state),
            }) => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert_eq!(software, "runv-test-guest");
                state
            }
            f => panic!("expected the guest's Hello with its state, got {f:?}"),
        }
    }
}

fn guest_config(exit_report_timeout_seconds: u32) -> GuestConfig {
    GuestConfig {
        version: CONFIG_VERSION,
        container: ContainerConfig {
            version: CONFIG_VERSION,
            image_id: "registry.test/app@sha256:0123".into(),
            manifest_digest: "sha256:0123".into(),
            argv: vec!["/bin/app".into(), "--serve".into()],
            env: vec![runv_vmm_api::guest::DEFAULT_PATH.into()],
            working_dir: "/".into(),
            user: String::new(),
        },
        hostname: "vm-1".into(),
        rootfs: RootFs {
            source: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        network: None,
        termination_grace_period_seconds: 5,
        exit_report_timeout_seconds,
    }
}

/// Sends Config and reads Started, Stdout and Stderr; returns the config's
/// payload length (the guest's stdout line names it).
fn run_container(conn: &mut Conn, vm: &Vm, word: &str) -> usize {
    let config = Frame::Config(Box::new(guest_config(60)));
    let config_len = config.encode().len() - 5;
    conn.send(&config);
    assert_eq!(
        conn.read(vm),
        Frame::Started(Started {
            pid: 1,
            started_at_nanos: 0
        })
    );
    assert_eq!(
        conn.read(vm),
        Frame::Stdout(
            format!("runv-test-guest stdout: {word} (config of {config_len} bytes)\n").into_bytes()
        )
    );
    assert_eq!(
        conn.read(vm),
        Frame::Stderr(format!("runv-test-guest stderr: {word}\n").into_bytes())
    );
    config_len
}

fn exited_with_code(code: i32) -> Exited {
    Exited {
        code: Some(code),
        signal: None,
        oom_killed: false,
        start_error: None,
        started_at_nanos: 0,
        finished_at_nanos: 0,
    }
}

fn exited_with_signal(signal: i32) -> Exited {
    Exited {
        code: None,
        signal: Some(signal),
        ..exited_with_code(0)
    }
}

#[test]
fn the_test_guest_runs_a_container_over_the_channel_and_powers_off_on_exit_ack() {
    let Some(_) = require_kvm("the_test_guest_runs_a_container_over_the_channel") else {
        return;
    };
    let vm = Vm::start("exit", "exit=3 out=marker42");
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    let config_len = run_container(&mut conn, &vm, "marker42");
    let exited = match conn.read(&vm) {
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
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, &vm, "hello");
    let exited = match conn.read(&vm) {
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
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, &vm, "hello");
    // It keeps running: the next frame is the answer to Stop.
    conn.send(&Frame::Stop(Stop {
        grace_period_seconds: 5,
    }));
    let exited = match conn.read(&vm) {
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
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, &vm, "hello");
    // The VMM's graceful shutdown presses the ACPI power button.
    let mut control = Control::connect(&vm.dir.path("vm.sock"));
    assert_eq!(control.ask(Request::SHUTDOWN), Response::Ok);
    assert_eq!(conn.read(&vm), Frame::Exited(exited_with_signal(15)));
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
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    conn.send(&Frame::Stop(Stop {
        grace_period_seconds: 0,
    }));
    let exited = match conn.read(&vm) {
        Frame::Exited(e) => e,
        f => panic!("expected Exited, got {f:?}"),
    };
    assert_eq!(
        exited.start_error.as_deref(),
        Some("stopped before the container started")
    );
    assert_eq!((exited.code, exited.signal), (None, None));
    assert_eq!(exited.exit_code(), 128);
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
    assert_eq!(first.guest_hello(&vm), GuestState::WaitingForConfig);
    first.hello();
    run_container(&mut first, &vm, "again");
    drop(first); // the agent restarts

    let mut second = vm.connect();
    assert_eq!(
        second.guest_hello(&vm),
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
    assert_eq!(second.read(&vm), Frame::Exited(exited_with_signal(15)));
    drop(second); // lost before ExitAck

    let mut third = vm.connect();
    assert_eq!(
        third.guest_hello(&vm),
        GuestState::Exited(exited_with_signal(15))
    );
    assert_eq!(third.read(&vm), Frame::Exited(exited_with_signal(15)));
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
    assert_eq!(old.guest_hello(&vm), GuestState::WaitingForConfig);
    let mut new = vm.connect();
    assert_eq!(new.guest_hello(&vm), GuestState::WaitingForConfig);
    // The guest reset the old connection: its stream ends.
    old.expect_end(&vm);
    new.hello();
    run_container(&mut new, &vm, "hello");
    assert_eq!(new.read(&vm), Frame::Exited(exited_with_code(0)));
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
    conn.guest_hello(&vm);
    conn.send(&Frame::Config(Box::new(guest_config(60))));
    assert_eq!(
        conn.read(&vm),
        Frame::Error("a Config frame before Hello".into())
    );
    conn.expect_end(&vm);
    // Another protocol version.
    let mut conn = vm.connect();
    conn.guest_hello(&vm);
    conn.send(&Frame::Hello(Hello {
        version: 2,
        software: "future agent".into(),
        state: None,
    }));
    assert_eq!(
        conn.read(&vm),
        Frame::Error("the peer speaks guest protocol version 2; this side speaks 1".into())
    );
    conn.expect_end(&vm);
    // A frame longer than any frame may be, and one of length 0.
    for (len, what) in [(0x0100_0000u32, "16777216"), (0, "0")] {
        let mut conn = vm.connect();
        conn.guest_hello(&vm);
        conn.hello();
        conn.send_raw(&len.to_be_bytes());
        assert_eq!(
            conn.read(&vm),
            Frame::Error(format!(
                "a frame of {what} bytes; frames are 1 to 65536 bytes"
            ))
        );
        conn.expect_end(&vm);
    }
    // An unknown kind, and a frame only a guest sends.
    let mut conn = vm.connect();
    conn.guest_hello(&vm);
    conn.hello();
    conn.send_raw(&[0, 0, 0, 1, 42]);
    assert_eq!(
        conn.read(&vm),
        Frame::Error("a frame of unknown kind 42".into())
    );
    conn.expect_end(&vm);
    let mut conn = vm.connect();
    conn.guest_hello(&vm);
    conn.hello();
    conn.send(&Frame::Exited(exited_with_code(0)));
    assert_eq!(
        conn.read(&vm),
        Frame::Error("a Exited frame, which this side of the channel never receives".into())
    );
    conn.expect_end(&vm);
    // The container is still waiting for its config, and a well-behaved
    // host runs it; a Config of nearly the largest frame arrives whole
    // (the guest's credit updates let the host send all of it).
    let mut conn = vm.connect();
    assert_eq!(conn.guest_hello(&vm), GuestState::WaitingForConfig);
    conn.hello();
    let mut big = guest_config(60);
    big.container
        .env
        .push(format!("PAD={}", "x".repeat(60_000)));
    let big = Frame::Config(Box::new(big));
    let big_len = big.encode().len() - 5;
    conn.send(&big);
    assert!(matches!(conn.read(&vm), Frame::Started(_)));
    assert_eq!(
        conn.read(&vm),
        Frame::Stdout(
            format!("runv-test-guest stdout: hello (config of {big_len} bytes)\n").into_bytes()
        )
    );
    assert!(matches!(conn.read(&vm), Frame::Stderr(_)));
    assert_eq!(conn.read(&vm), Frame::Exited(exited_with_code(1)));
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
    conn.guest_hello(&vm);
    conn.hello();
    conn.send(&Frame::Config(Box::new(guest_config(1))));
    for _ in 0..3 {
        conn.read(&vm); // Started, Stdout, Stderr
    }
    assert_eq!(conn.read(&vm), Frame::Exited(exited_with_code(0)));
    // No ExitAck: the guest gives up after the config's 1 s and powers off.
    match read_frame(&mut conn.stream) {
        Ok(None) => {}
        Err(runv_vmm_api::guest::ProtoError::Io(e))
            if matches!(e.kind(), ErrorKind::ConnectionReset) => {}
        other => panic!("expected the end of the stream, got {other:?}"),
    }
    vm.expect_poweroff("runv-guest: no host acknowledged the exit within 1 s\n");
}

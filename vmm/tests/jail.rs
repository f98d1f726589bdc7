//! A jailed `runv-vmm`: it runs the test guest as the given unprivileged
//! user, with no capabilities, chrooted into its jail directory, in mount,
//! network and IPC namespaces of its own, and still answers its control
//! socket, serves a disk, guest-initiated vsock connections and the guest
//! channel on a host-initiated one, and leaves its exit file. Needs root (to jail) and `/dev/kvm`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Control, KillOnDrop, Scratch, read_exit_file, require_kvm, wait_output};
use runv_vmm_api::{
    DiskConfig, ExitReason, JailConfig, Request, Response, SerialConfig, SerialRotation, VmConfig,
    VmState, VsockConfig,
};

/// An id from the range the node agent gives jails (docs/agent.md), far from
/// the ids it hands out first.
const UID: u32 = 1_879_048_192 + 65_000;
const GID: u32 = 1_879_048_192 + 65_001;

/// Skips (or fails under `RUNV_REQUIRE_KVM=1`) unless KVM is there and we are root.
fn require_kvm_and_root(test: &str) -> bool {
    if require_kvm(test).is_none() {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: entering the jail needs root (RUNV_REQUIRE_KVM=1)");
        }
        eprintln!("{test}: skipping: entering the jail needs root");
        return false;
    }
    true
}

/// A jail directory laid out as the node agent does: root-owned, with a
/// `run/` directory (sockets, exit file) owned by the jail user.
fn jail_dir(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(UID), Some(GID)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn jailed_config(dir: &Scratch, cmdline: &str) -> VmConfig {
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.cmdline = cmdline.into();
    cfg.memory_mib = 64;
    cfg.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: None,
    };
    cfg.control_socket = Some(dir.path("run/ctl.sock"));
    cfg.jail = Some(JailConfig {
        root: dir.0.clone(),
        uid: UID,
        gid: GID,
    });
    cfg
}

fn spawn(dir: &Scratch, cfg: &VmConfig) -> KillOnDrop {
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string(cfg).unwrap()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    KillOnDrop(Some(child))
}

/// The values of a `/proc/PID/status` line, e.g. `Uid:`.
fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_jailed_vmm_runs_the_guest_as_its_user_inside_its_root() {
    let test = "a_jailed_vmm_runs_the_guest_as_its_user_inside_its_root";
    if !require_kvm_and_root(test) {
        return;
    }
    let dir = jail_dir("jail-run");
    let mut cfg = jailed_config(&dir, "test=loop");
    cfg.vcpus = 2;
    let child = spawn(&dir, &cfg);
    let pid = child.id();
    let mut c = Control::connect(&dir.path("run/ctl.sock"));
    assert_eq!(c.ask(Request::Ping), Response::Pong);
    match c.ask(Request::Describe) {
        Response::Described(d) => {
            assert_eq!((d.pid, d.vcpus, d.state), (pid, 2, VmState::Running));
        }
        r => panic!("{r:?}"),
    }
    let n = c.wait_serial_past(0);

    // Who and where the VMM is now (it answered, so it is past its jail).
    assert_eq!(
        status_field(pid, "Uid:"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(pid, "Gid:"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups:"), "");
    for caps in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        dir.0
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        dir.0
    );
    for kind in ["mnt", "net", "ipc"] {
        assert_ne!(ns(&pid.to_string(), kind), ns("self", kind), "{kind}");
    }
    // No PID namespace (see the jail module docs).
    assert_eq!(ns(&pid.to_string(), "pid"), ns("self", "pid"));

    // Control requests work from inside the jail, and so does the guest.
    assert_eq!(c.ask(Request::Pause), Response::Ok);
    let paused_at = c.counter("serial_tx_bytes_total");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.counter("serial_tx_bytes_total"), paused_at);
    assert_eq!(c.ask(Request::Resume), Response::Ok);
    c.wait_serial_past(paused_at.max(n));

    // Shutdown: the guest powers off; the exit file is written and the
    // control socket removed from inside the jail, at their host paths.
    assert_eq!(c.ask(Request::SHUTDOWN), Response::Ok);
    let out = wait_output(child.take(), Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let rec = read_exit_file(&dir.path("run/ctl.sock.exit"));
    assert_eq!(rec.reason, ExitReason::PowerOff, "{rec:?}");
    assert!(!dir.path("run/ctl.sock").exists(), "socket removed at exit");
    let meta = std::fs::metadata(dir.path("run/ctl.sock.exit")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        UID,
        "written by the jailed user"
    );
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap();
    assert!(serial.contains("runv-guest: power button\n"), "{serial}");
}

/// The default test guest writes a pattern to its disk and opens a vsock
/// connection to host port 1234, which the jailed VMM makes for it to
/// `<udsPath>_1234`, a path it reaches inside its jail.
#[test]
fn a_jailed_vmm_serves_a_disk_and_a_guest_initiated_vsock_connection() {
    use std::io::{Read, Write};
    let test = "a_jailed_vmm_serves_a_disk_and_a_guest_initiated_vsock_connection";
    if !require_kvm_and_root(test) {
        return;
    }
    let dir = jail_dir("jail-dev");
    // The disk lies outside the jail: it is opened before.
    let disks = Scratch::new("jail-dev-disk");
    let img = disks.path("disk.img");
    let mut data = vec![0u8; 4 << 20];
    data[512..512 + 15].copy_from_slice(b"RUNV-DISK-MAGIC");
    std::fs::write(&img, data).unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The host service for guest port 1234, made reachable for the jail user.
    let listener = std::os::unix::net::UnixListener::bind(dir.path("run/v.sock_1234")).unwrap();
    std::os::unix::fs::chown(dir.path("run/v.sock_1234"), Some(UID), Some(GID)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return format!("no connection from the guest: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"hello from the host").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });

    let mut cfg = jailed_config(&dir, "");
    cfg.disks.push(DiskConfig {
        path: img.clone(),
        read_only: false,
    });
    cfg.vsock = Some(VsockConfig {
        guest_cid: 42,
        uds_path: dir.path("run/v.sock"),
    });
    let child = spawn(&dir, &cfg);
    let out = wait_output(child.take(), Duration::from_secs(60));
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{serial}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.join().unwrap(), "hello from the guest");
    for line in [
        "runv-guest: virtio-blk pattern ok\n",
        "runv-guest: virtio-vsock got hello from the host\n",
        "runv-guest: virtio-vsock ok\n",
    ] {
        assert!(serial.contains(line), "missing {line:?} in\n{serial}");
    }
    // The guest's write (a pattern at sector 8) reached the image outside the jail.
    let written = std::fs::read(&img).unwrap();
    let sector8 = &written[8 * 512..8 * 512 + 4096];
    assert!(
        sector8
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((i * 7 + 3) ^ 0x5a) as u8)
    );
    assert_eq!(
        read_exit_file(&dir.path("run/ctl.sock.exit")).reason,
        ExitReason::PowerOff
    );
    // The device's own socket was bound before the jail, at its host path.
    assert!(dir.path("run/v.sock").exists());
}

/// The node agent's side of the guest channel reaches the test guest in
/// `test=container` through a jailed VMM's vsock socket (`CONNECT 1024`
/// inside the jail's `run/`), and the whole conversation runs to power-off.
#[test]
fn a_jailed_vmm_carries_the_guest_channel_to_a_host_initiated_connection() {
    use common::channel::{self, exited_with_code, run_container};
    use runv_vmm_api::guest::{Frame, GuestState};
    let test = "a_jailed_vmm_carries_the_guest_channel_to_a_host_initiated_connection";
    if !require_kvm_and_root(test) {
        return;
    }
    let dir = jail_dir("jail-chan");
    let mut cfg = jailed_config(&dir, "test=container exit=4 out=jailed");
    cfg.vsock = Some(VsockConfig {
        guest_cid: 9,
        uds_path: dir.path("run/v.sock"),
    });
    let child = spawn(&dir, &cfg);
    let mut conn = channel::connect(&dir.path("run/v.sock"), &dir.path("serial.log"));
    assert_eq!(conn.guest_hello(), GuestState::WaitingForConfig);
    conn.hello();
    run_container(&mut conn, "jailed");
    assert_eq!(conn.read(), Frame::Exited(exited_with_code(4)));
    conn.send(&Frame::ExitAck);
    let out = wait_output(child.take(), Duration::from_secs(60));
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{serial}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        serial.contains("runv-guest: container exit acknowledged\n"),
        "{serial}"
    );
    assert_eq!(
        read_exit_file(&dir.path("run/ctl.sock.exit")).reason,
        ExitReason::PowerOff
    );
}

/// Paths the jailed VMM uses after the jail must lie inside it: a config
/// that breaks this is refused before anything starts, naming the field.
#[test]
fn a_jailed_config_with_a_late_path_outside_the_root_is_refused() {
    let dir = Scratch::new("jail-bad");
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.control_socket = Some(dir.path("jail/run/ctl.sock"));
    cfg.exit_file = Some(dir.path("vm.exit"));
    cfg.jail = Some(JailConfig {
        root: dir.path("jail"),
        uid: UID,
        gid: GID,
    });
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = common::run_with_timeout(
        {
            let mut c = common::vmm();
            c.arg("--config").arg(&path);
            c
        },
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exitFile") && stderr.contains("inside jail.root"),
        "{stderr}"
    );
    assert!(!Path::new(&dir.path("vm.exit")).exists());
    // The flags say the same about the control socket.
    let out = common::run_with_timeout(
        {
            let mut c = common::vmm();
            c.args(["--kernel", runv_vmm::TEST_GUEST_PVH, "--control-socket"])
                .arg(dir.path("ctl.sock"))
                .arg("--exit-file")
                .arg(dir.path("jail/run/vm.exit"))
                .arg("--jail-root")
                .arg(dir.path("jail"))
                .args(["--jail-uid", "5", "--jail-gid", "5"]);
            c
        },
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("controlSocket"), "{stderr}");
}

/// The tick numbers of the test guest's `loop` lines in `text`.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn a_jailed_vmm_keeps_its_serial_log_under_its_limit() {
    let test = "a_jailed_vmm_keeps_its_serial_log_under_its_limit";
    if !require_kvm_and_root(test) {
        return;
    }
    const LIMIT: u64 = 1024;
    let dir = jail_dir("jail-serial");
    let mut cfg = jailed_config(&dir, "test=loop");
    cfg.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: Some(SerialRotation {
            limit_bytes: LIMIT,
            previous: dir.path("serial.log.1"),
        }),
    };
    let child = spawn(&dir, &cfg);
    let mut c = Control::connect(&dir.path("run/ctl.sock"));
    // Several limits' worth, so the log rotated more than once (from the
    // vCPU thread, jailed and under its seccomp filter).
    let start = Instant::now();
    let mut printed = 0;
    for k in 1..=4 {
        printed = c.wait_serial_past(k * LIMIT);
    }
    eprintln!("{test}: {printed} bytes in {:?}", start.elapsed());
    assert_eq!(c.ask(Request::Pause), Response::Ok);
    let log = std::fs::read_to_string(dir.path("serial.log")).unwrap();
    let old = std::fs::read_to_string(dir.path("serial.log.1")).unwrap();
    // One line may pass the limit before the rotation it triggers.
    assert!(
        log.len() as u64 <= LIMIT,
        "serial.log has {} bytes",
        log.len()
    );
    assert!(
        (old.len() as u64) > LIMIT && (old.len() as u64) < LIMIT + 64,
        "serial.log.1 has {} bytes",
        old.len()
    );
    assert!(printed > 4 * LIMIT);
    // Nothing was lost at the last rotation: the ticks run on across it.
    let (old_ticks, new_ticks) = (ticks(&old), ticks(&log));
    assert!(old_ticks.windows(2).all(|w| w[1] == w[0] + 1), "{old}");
    if let (Some(last), Some(first)) = (old_ticks.last(), new_ticks.first()) {
        assert_eq!(first, &(last + 1), "a line was lost at the rotation");
    }
    assert!(
        old_ticks.first().is_some_and(|&t| t > 0),
        "the first rotation did not happen: serial.log.1 starts at tick 0"
    );
    drop(child);
}

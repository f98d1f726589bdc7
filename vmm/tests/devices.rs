//! virtio devices seen from the test guest: virtio-blk (read/write/flush,
//! read-only), virtio-rng (polled, and interrupt-driven through the IOAPIC),
//! and garbage descriptors ending the VM with a reason.

mod common;

use std::time::Duration;

use common::packet::{ETHERTYPE, PacketSocket};
use common::{Scratch, read_exit_file, require_kvm, run_with_timeout, vmm};
use runv_vmm_api::{DiskConfig, ExitReason, SerialConfig, VmConfig};

const TIMEOUT: Duration = Duration::from_secs(60);

fn disk(dir: &Scratch) -> std::path::PathBuf {
    let p = dir.path("disk.img");
    let mut img = vec![0u8; 4 << 20];
    img[512..512 + 15].copy_from_slice(b"RUNV-DISK-MAGIC");
    std::fs::write(&p, img).unwrap();
    p
}

fn boot(dir: &Scratch, cfg: &mut VmConfig) -> (std::process::Output, String) {
    cfg.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: None,
    };
    cfg.exit_file = Some(dir.path("vm.exit"));
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string(cfg).unwrap()).unwrap();
    let mut cmd = vmm();
    cmd.arg("--config").arg(&path);
    let out = run_with_timeout(cmd, TIMEOUT);
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    (out, serial)
}

fn pattern(i: usize) -> u8 {
    ((i * 7 + 3) ^ 0x5a) as u8
}

#[test]
fn guest_writes_and_reads_back_a_pattern_on_virtio_blk_and_reads_virtio_rng() {
    let Some(_) = require_kvm("guest_writes_and_reads_back_a_pattern_on_virtio_blk") else {
        return;
    };
    let dir = Scratch::new("dev-blk");
    let img = disk(&dir);
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.memory_mib = 64;
    cfg.disks.push(DiskConfig {
        path: img.clone(),
        read_only: false,
    });
    cfg.rng = true;
    let (out, serial) = boot(&dir, &mut cfg);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{serial}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6",
        "runv-guest: acpi lapics=1 virtio=2 ged_gsi=23\n",
        "runv-guest: virtio-blk sectors=8192 rw\n",
        "runv-guest: virtio-blk sector1=RUNV-DISK-MAGIC\n",
        "runv-guest: virtio-blk flush ok\n",
        "runv-guest: virtio-blk pattern ok\n",
        "runv-guest: virtio-rng ok ",
        "runv-guest: poweroff\n",
    ] {
        assert!(serial.contains(line), "missing {line:?} in\n{serial}");
    }
    // The guest's write reached the image file.
    let data = std::fs::read(&img).unwrap();
    let sector8 = &data[8 * 512..8 * 512 + 4096];
    assert!(sector8.iter().enumerate().all(|(i, b)| *b == pattern(i)));
}

#[test]
fn virtio_rng_completions_arrive_as_ioapic_interrupts_edge_and_level() {
    let Some(_) = require_kvm("virtio_rng_completions_arrive_as_ioapic_interrupts") else {
        return;
    };
    // Level on the PVH entry (the second interrupt needs the EOI of the first
    // to clear remote IRR), edge on the 64-bit entry.
    for (guest, mode, irr) in [
        (runv_vmm::TEST_GUEST_PVH, "level", 1),
        (runv_vmm::TEST_GUEST_64, "edge", 0),
    ] {
        let dir = Scratch::new(&format!("dev-irq-{mode}"));
        let mut cfg = VmConfig::new(guest);
        cfg.memory_mib = 64;
        cfg.rng = true;
        cfg.cmdline = format!("irq={mode}");
        let (out, serial) = boot(&dir, &mut cfg);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{mode}: {}\n{serial}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want =
            format!("runv-guest: virtio-rng irq {mode} pin=5 completions=2 remote_irr={irr} ");
        assert!(serial.contains(&want), "missing {want:?} in\n{serial}");
        assert!(!serial.contains("FAIL"), "{serial}");
    }
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    let Some(_) = require_kvm("read_only_disk_refuses_guest_writes") else {
        return;
    };
    let dir = Scratch::new("dev-ro");
    let img = disk(&dir);
    let before = std::fs::read(&img).unwrap();
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_64);
    cfg.memory_mib = 64;
    cfg.disks.push(DiskConfig {
        path: img.clone(),
        read_only: true,
    });
    let (out, serial) = boot(&dir, &mut cfg);
    assert_eq!(out.status.code(), Some(0), "{serial}");
    assert!(
        serial.contains("runv-guest: virtio-blk sectors=8192 ro\n"),
        "{serial}"
    );
    assert!(
        serial.contains("runv-guest: virtio-blk ro write refused\n"),
        "{serial}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "read-only image changed"
    );
}

#[test]
fn garbage_descriptors_end_the_vm_non_zero_with_a_reason() {
    let Some(_) = require_kvm("garbage_descriptors_end_the_vm_non_zero_with_a_reason") else {
        return;
    };
    let dir = Scratch::new("dev-garbage");
    let img = disk(&dir);
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.memory_mib = 64;
    cfg.cmdline = "test=bad-virtio".into();
    cfg.disks.push(DiskConfig {
        path: img,
        read_only: false,
    });
    let (out, serial) = boot(&dir, &mut cfg);
    assert!(serial.contains("posting garbage descriptors"), "{serial}");
    assert!(!serial.contains("FAIL"), "{serial}");
    let rec = read_exit_file(&dir.path("vm.exit"));
    assert_eq!(rec.reason, ExitReason::GuestFault, "{rec:?}");
    assert_eq!(out.status.code(), Some(rec.exit_code));
    assert_ne!(rec.exit_code, 0);
    assert!(
        rec.message.contains("outside guest memory"),
        "{}",
        rec.message
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GuestFault"), "{stderr}");
}

#[test]
fn guest_exchanges_frames_over_virtio_net_through_a_tap() {
    let Some(_) = require_kvm("guest_exchanges_frames_over_virtio_net_through_a_tap") else {
        return;
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        if std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/net/tun is required (RUNV_REQUIRE_KVM=1): {e}");
        }
        eprintln!(
            "skipping: /dev/net/tun not available ({e}) (set RUNV_REQUIRE_KVM=1 to fail instead)"
        );
        return;
    }
    let dir = Scratch::new("dev-net");
    let tap = format!("rvt{}", std::process::id() % 100_000);
    let guest_mac = [0x02u8, 0, 0, 0, 0, 0x42];
    let host_mac = [0x02u8, 0, 0, 0, 0, 0x01];
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.memory_mib = 64;
    cfg.net.push(runv_vmm_api::NetConfig {
        tap: tap.clone(),
        mac: Some("02:00:00:00:00:42".into()),
    });
    cfg.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: None,
    };
    cfg.exit_file = Some(dir.path("vm.exit"));
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let child = common::KillOnDrop(Some(
        vmm()
            .arg("--config")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let start = std::time::Instant::now();
    while !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists() {
        assert!(start.elapsed() < TIMEOUT, "tap {tap} never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sock = PacketSocket::open(&tap);
    let mut ping = Vec::new();
    ping.extend_from_slice(&guest_mac);
    ping.extend_from_slice(&host_mac);
    ping.extend_from_slice(&ETHERTYPE.to_be_bytes());
    ping.extend_from_slice(b"runv-host-ping");
    let mut pong = None;
    while pong.is_none() && start.elapsed() < TIMEOUT {
        sock.send(&ping);
        while let Some(f) = sock.recv() {
            if f.len() >= 14 && f[6..12] == guest_mac {
                pong = Some(f);
                break;
            }
        }
    }
    let out = common::wait_output(child.take(), TIMEOUT);
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    let pong = pong.unwrap_or_else(|| panic!("no frame from the guest\n{serial}"));
    assert_eq!(&pong[..6], &host_mac, "reply goes back to the sender");
    assert_eq!(&pong[14..], b"runv-guest-pong");
    assert!(
        serial.contains("runv-guest: virtio-net mac=02:00:00:00:00:42\n"),
        "{serial}"
    );
    assert!(
        serial.contains("runv-guest: virtio-net got runv-host-ping\n"),
        "{serial}"
    );
    assert!(
        serial.contains("runv-guest: virtio-net sent pong\n"),
        "{serial}"
    );
    assert_eq!(out.status.code(), Some(0), "{serial}");
}

#[test]
fn guest_exchanges_a_message_over_vsock_with_a_host_unix_socket() {
    use std::io::{Read, Write};
    let Some(_) = require_kvm("guest_exchanges_a_message_over_vsock") else {
        return;
    };
    let dir = Scratch::new("dev-vsock");
    let uds = dir.path("v.sock");
    // Hybrid vsock: the guest's connection to port 1234 arrives at `<uds>_1234`.
    let listener = std::os::unix::net::UnixListener::bind(dir.path("v.sock_1234")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let host = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return format!("no connection from the guest: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"hello from the host").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // until the guest shuts the stream down
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.memory_mib = 64;
    cfg.vsock = Some(runv_vmm_api::VsockConfig {
        guest_cid: 42,
        uds_path: uds,
    });
    let (out, serial) = boot(&dir, &mut cfg);
    let host_saw = host.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{serial}");
    assert_eq!(host_saw, "hello from the guest");
    assert!(
        serial.contains("runv-guest: virtio-vsock cid=42\n"),
        "{serial}"
    );
    assert!(
        serial.contains("runv-guest: virtio-vsock got hello from the host\n"),
        "{serial}"
    );
    assert!(serial.contains("runv-guest: virtio-vsock ok\n"), "{serial}");
}

#[test]
fn the_host_connects_to_a_guest_listening_on_vsock() {
    use std::io::{BufRead, BufReader, Read, Write};
    let Some(_) = require_kvm("the_host_connects_to_a_guest_listening_on_vsock") else {
        return;
    };
    let dir = Scratch::new("dev-vsock-listen");
    let uds = dir.path("v.sock");
    let mut cfg = VmConfig::new(runv_vmm::TEST_GUEST_PVH);
    cfg.memory_mib = 64;
    cfg.cmdline = "vsock-listen=5000".into();
    cfg.vsock = Some(runv_vmm_api::VsockConfig {
        guest_cid: 7,
        uds_path: uds.clone(),
    });
    // Hybrid vsock, host side: `CONNECT 5000` on the device's own socket.
    let host = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(&uds) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("cannot connect to {}: {e}", uds.display())),
            }
        };
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"CONNECT 5000\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut ok = String::new();
        r.read_line(&mut ok)
            .map_err(|e| format!("no OK line: {e}"))?;
        s.write_all(b"hello from the host").unwrap();
        let mut answer = Vec::new();
        let _ = r.read_to_end(&mut answer); // until the guest shuts down
        Ok((ok, String::from_utf8_lossy(&answer).into_owned()))
    });
    let (out, serial) = boot(&dir, &mut cfg);
    let (ok, answer) = host
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{serial}"));
    assert_eq!(out.status.code(), Some(0), "{serial}");
    let host_port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("bad reply {ok:?}"));
    assert!(
        serial.contains(&format!(
            "runv-guest: virtio-vsock accepted host port {host_port}\n"
        )),
        "{serial}"
    );
    assert!(
        serial.contains("runv-guest: virtio-vsock host said hello from the host\n"),
        "{serial}"
    );
    assert_eq!(answer, "hello from the guest listener");
}

//! Boots Debian's cloud kernel (fetched by `vmm/scripts/debian-kernel.sh`) and
//! checks that its banner reaches the serial console.
//!
//! Artifacts are looked up in `$RUNV_DEBIAN_KERNEL_DIR`, else
//! `target/debian-kernel` in the workspace. Without them the test skips with a
//! message, unless `RUNV_REQUIRE_DEBIAN_KERNEL=1`, which makes it fail.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Scratch, require_kvm, vmm, wait_output};

/// On kvm_pvm the banner takes 20 s on a quiet machine and 160 s was seen under
/// heavy load (early kernel code is emulated); this bounds a hang, not speed.
const BANNER_TIMEOUT: Duration = Duration::from_secs(600);

/// The kernel parameters that take this kernel furthest on kvm_pvm (docs/vmm-boot.md).
pub const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 clearcpuid=xsave,cx16";

fn artifacts() -> Option<PathBuf> {
    let dir = std::env::var_os("RUNV_DEBIAN_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian-kernel")
        });
    if dir.join("vmlinux").exists() && dir.join("initramfs.cpio.gz").exists() {
        return Some(dir);
    }
    if std::env::var("RUNV_REQUIRE_DEBIAN_KERNEL").as_deref() == Ok("1") {
        panic!(
            "Debian kernel artifacts missing in {} (RUNV_REQUIRE_DEBIAN_KERNEL=1); run vmm/scripts/debian-kernel.sh",
            dir.display()
        );
    }
    eprintln!(
        "skipping: no Debian kernel in {} (run vmm/scripts/debian-kernel.sh; set RUNV_REQUIRE_DEBIAN_KERNEL=1 to fail instead)",
        dir.display()
    );
    None
}

#[test]
fn debian_kernel_banner_reaches_the_serial_console() {
    let Some(hv) = require_kvm("debian_kernel_banner_reaches_the_serial_console") else {
        return;
    };
    let Some(dir) = artifacts() else {
        return;
    };
    let scratch = Scratch::new("linux");
    let serial = scratch.path("serial.log");
    let start = Instant::now();
    let child = common::KillOnDrop(Some(
        vmm()
            .arg("--kernel")
            .arg(dir.join("vmlinux"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["--cmdline", CMDLINE, "--memory", "256M", "--serial"])
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let pid = child.id() as i32;
    let mut banner = None;
    while start.elapsed() < BANNER_TIMEOUT {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("Linux version 6.")) {
            banner = Some((line.to_owned(), start.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: SIGTERM to the child we spawned.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = wait_output(child.take(), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (line, took) = banner.unwrap_or_else(|| {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!(
            "no kernel banner within {BANNER_TIMEOUT:?} on {hv}\nstderr: {stderr}\nserial: {text}"
        )
    });
    eprintln!("{hv}: banner after {took:?}: {line}");
    assert!(line.contains("cloud-amd64"), "{line}");
    // The VMM ended because we asked it to, not because the kernel crashed it first.
    assert!(
        stderr.contains("Killed") || stderr.contains("exit"),
        "{stderr}"
    );
}

#[test]
fn debian_bzimage_and_vmlinux_load_with_the_right_entry_protocols() {
    let Some(dir) = artifacts() else {
        return;
    };
    let layout = runv_vmm::memory::Layout::new(256).unwrap();
    let mem = layout.allocate().unwrap();
    let bz = runv_vmm::boot::load_kernel(&mem, &dir.join("vmlinuz")).unwrap();
    assert_eq!(bz.kind, runv_vmm::boot::EntryKind::Linux64);
    let hdr = bz.setup_header.expect("a bzImage carries its setup header");
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
    assert!(
        { hdr.version } >= 0x20c,
        "boot protocol 2.12+ for the 64-bit entry"
    );
    assert_eq!(bz.entry, u64::from(hdr.code32_start) + 0x200);

    let mem = layout.allocate().unwrap();
    let elf = runv_vmm::boot::load_kernel(&mem, &dir.join("vmlinux")).unwrap();
    assert_eq!(
        elf.kind,
        runv_vmm::boot::EntryKind::Pvh,
        "Debian's vmlinux has a PVH note"
    );
    assert!(elf.entry >= 0x100_0000 && elf.entry < 0x1_0000_0000);
}

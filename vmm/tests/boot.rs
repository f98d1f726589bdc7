//! Boots the in-repo test guest with the real `runv-vmm` binary on /dev/kvm.

mod common;

use std::time::Duration;

use common::{Scratch, read_exit_file, require_kvm, run_with_timeout, vmm};
use runv_vmm_api::{ExitReason, SerialConfig, VmConfig};

const TIMEOUT: Duration = Duration::from_secs(30);

fn config(dir: &Scratch, kernel: &str, cmdline: &str) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.cmdline = cmdline.into();
    c.memory_mib = 64;
    c.serial = SerialConfig::File {
        path: dir.path("serial.log"),
        rotate: None,
    };
    c.exit_file = Some(dir.path("vm.exit"));
    c
}

fn run_config(dir: &Scratch, cfg: &VmConfig) -> (std::process::Output, String) {
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    let mut cmd = vmm();
    cmd.arg("--config").arg(&path);
    let out = run_with_timeout(cmd, TIMEOUT);
    let serial = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    (out, serial)
}

#[test]
fn pvh_guest_boots_from_a_config_file_echoes_its_cmdline_and_powers_off() {
    let Some(_) = require_kvm("pvh_guest_boots_from_a_config_file") else {
        return;
    };
    let dir = Scratch::new("boot-pvh");
    let cfg = config(
        &dir,
        runv_vmm::TEST_GUEST_PVH,
        "runv.check=ab-12 console=ttyS0",
    );
    let (out, serial) = run_config(&dir, &cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {stderr}\nserial: {serial}"
    );
    assert!(serial.contains("runv-guest: hello\n"), "{serial}");
    assert!(serial.contains("runv-guest: entry=pvh\n"), "{serial}");
    assert!(
        serial.contains("runv-guest: cmdline=runv.check=ab-12 console=ttyS0\n"),
        "{serial}"
    );
    assert!(serial.contains("runv-guest: mem_mib=64\n"), "{serial}");
    assert!(
        serial.trim_end().ends_with("runv-guest: poweroff"),
        "{serial}"
    );
    assert!(stderr.contains("PowerOff"), "{stderr}");
    let rec = read_exit_file(&dir.path("vm.exit"));
    assert_eq!((rec.reason, rec.exit_code), (ExitReason::PowerOff, 0));
}

#[test]
fn elf_without_pvh_note_boots_through_the_64_bit_entry_from_flags() {
    let Some(_) = require_kvm("elf_without_pvh_note_boots_through_the_64_bit_entry") else {
        return;
    };
    let mut cmd = vmm();
    cmd.args(["--kernel", runv_vmm::TEST_GUEST_64])
        .args(["--cmdline", "x=1 y=two"])
        .args(["--memory", "96M", "--serial", "stdout"]);
    let out = run_with_timeout(cmd, TIMEOUT);
    let serial = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(serial.contains("runv-guest: entry=linux64\n"), "{serial}");
    assert!(
        serial.contains("runv-guest: cmdline=x=1 y=two\n"),
        "{serial}"
    );
    assert!(serial.contains("runv-guest: mem_mib=96\n"), "{serial}");
}

#[test]
fn triple_fault_ends_non_zero_with_a_reason_and_an_exit_file() {
    let Some(hv) = require_kvm("triple_fault_ends_non_zero") else {
        return;
    };
    for kernel in [runv_vmm::TEST_GUEST_PVH, runv_vmm::TEST_GUEST_64] {
        let dir = Scratch::new("boot-tf");
        let (out, serial) = run_config(&dir, &config(&dir, kernel, "test=triple-fault"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(serial.contains("runv-guest: triple-fault"), "{serial}");
        let code = out.status.code().expect("exited, not killed by a signal");
        assert_ne!(code, 0, "{stderr}");
        let rec = read_exit_file(&dir.path("vm.exit"));
        eprintln!(
            "{hv}: triple fault reported as {:?}: {}",
            rec.reason, rec.message
        );
        // Hardware KVM reports a shutdown exit; kvm_pvm fails to deliver the
        // exception and reports an emulation failure instead.
        assert!(
            matches!(
                rec.reason,
                ExitReason::TripleFault | ExitReason::EmulationFailure | ExitReason::InternalError
            ),
            "{rec:?}"
        );
        assert_eq!(rec.exit_code, code);
        let line: Vec<_> = stderr
            .lines()
            .filter(|l| l.starts_with("runv-vmm: exit"))
            .collect();
        assert_eq!(line.len(), 1, "{stderr}");
        assert!(line[0].contains(&rec.message), "{stderr}");
    }
}

#[test]
fn reset_exits_zero_and_pvpanic_exits_non_zero() {
    let Some(_) = require_kvm("reset_exits_zero_and_pvpanic_exits_non_zero") else {
        return;
    };
    let dir = Scratch::new("boot-reset");
    let (out, serial) = run_config(&dir, &config(&dir, runv_vmm::TEST_GUEST_PVH, "test=reset"));
    assert!(serial.contains("runv-guest: reset"), "{serial}");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        read_exit_file(&dir.path("vm.exit")).reason,
        ExitReason::Reset
    );

    let dir = Scratch::new("boot-panic");
    let (out, _) = run_config(&dir, &config(&dir, runv_vmm::TEST_GUEST_PVH, "test=panic"));
    let rec = read_exit_file(&dir.path("vm.exit"));
    assert_eq!(rec.reason, ExitReason::GuestPanic);
    assert_eq!(out.status.code(), Some(rec.exit_code));
    assert_ne!(rec.exit_code, 0);
}

#[test]
fn bad_kernel_path_is_a_vmm_error_with_a_reason() {
    let dir = Scratch::new("boot-bad");
    let mut cfg = config(&dir, "/nonexistent/kernel", "");
    cfg.exit_file = Some(dir.path("vm.exit"));
    let (out, _) = run_config(&dir, &cfg);
    assert_eq!(out.status.code(), Some(ExitReason::VmmError.exit_code()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/kernel"), "{stderr}");
}

#[test]
fn guest_brings_up_its_other_vcpus() {
    let Some(hv) = require_kvm("guest_brings_up_its_other_vcpus") else {
        return;
    };
    for (kernel, vcpus) in [
        (runv_vmm::TEST_GUEST_PVH, 2u8),
        (runv_vmm::TEST_GUEST_64, 4),
    ] {
        let dir = Scratch::new("boot-smp");
        let mut cfg = config(&dir, kernel, "");
        cfg.vcpus = vcpus;
        let (out, serial) = run_config(&dir, &cfg);
        assert_eq!(out.status.code(), Some(0), "{serial}");
        let want = format!("runv-guest: cpus={vcpus} online={vcpus}\n");
        assert!(
            serial.contains(&format!(
                "runv-guest: acpi lapics={vcpus} virtio=0 ged_gsi=23\n"
            )),
            "ACPI MADT lists every vCPU, the DSDT the power button's GED: {serial}"
        );
        eprintln!(
            "{hv}: {vcpus} vCPUs: {}",
            serial
                .lines()
                .find(|l| l.contains("cpus="))
                .unwrap_or("no SMP line")
        );
        assert!(serial.contains(&want), "{serial}");
    }
}

fn guest_cpuid(dir: &Scratch, policy: &str) -> (u32, u32) {
    let mut cmd = vmm();
    cmd.args(["--kernel", runv_vmm::TEST_GUEST_PVH, "--memory", "32M"])
        .args(["--cmdline", "test=cpuid", "--cpu-policy", policy])
        .arg("--serial")
        .arg(format!("file:{}", dir.path(policy).display()));
    let out = run_with_timeout(cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(0));
    let serial = std::fs::read_to_string(dir.path(policy)).unwrap();
    let line = serial
        .lines()
        .find(|l| l.starts_with("runv-guest: cpuid1"))
        .unwrap_or_else(|| panic!("{serial}"));
    let hex = |key: &str| {
        let v = line
            .split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    };
    (hex("ecx="), hex("cpuid7 ebx="))
}

#[test]
fn cpuid_policy_reaches_the_guest() {
    let Some(hv) = require_kvm("cpuid_policy_reaches_the_guest") else {
        return;
    };
    let dir = Scratch::new("boot-cpuid");
    let (host_ecx, _) = guest_cpuid(&dir, "host");
    let (compat_ecx, compat7) = guest_cpuid(&dir, "compat");
    assert_ne!(host_ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(compat_ecx & (1 << 13), 0, "compat hides cmpxchg16b");
    let xsave_hidden = compat_ecx & (1 << 26) == 0 && compat7 & (1 << 5) == 0;
    eprintln!(
        "{hv}: host ecx {host_ecx:#x}; compat ecx {compat_ecx:#x} leaf7 ebx {compat7:#x}; xsave/avx2 hidden: {xsave_hidden}"
    );
    if hv == "kvm" {
        assert!(xsave_hidden, "hardware KVM honours the whole policy");
    }
}

#[test]
fn memory_above_the_3_gib_gap_reaches_the_guest_through_both_entries() {
    let Some(hv) = require_kvm("memory_above_the_3_gib_gap_reaches_the_guest") else {
        return;
    };
    // 4608 MiB: 3 GiB below the device gap, 1.5 GiB from 4 GiB up. The guest
    // sums the RAM entries of the map its entry protocol hands it (PVH memmap
    // or zero-page e820), so both ranges must be in both maps.
    for (name, kernel, mib) in [
        ("boot-mem-pvh", runv_vmm::TEST_GUEST_PVH, 4608u32),
        ("boot-mem-64", runv_vmm::TEST_GUEST_64, 4608),
        ("boot-mem-max", runv_vmm::TEST_GUEST_PVH, 64 * 1024),
    ] {
        let dir = Scratch::new(name);
        let mut cfg = config(&dir, kernel, "");
        cfg.memory_mib = mib;
        let (out, serial) = run_config(&dir, &cfg);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}\n{serial}");
        assert!(
            serial.contains(&format!("runv-guest: mem_mib={mib}\n")),
            "{name}: {serial}"
        );
        eprintln!("{hv}: {name}: the guest saw {mib} MiB");
    }
}

#[test]
fn memory_beyond_64_gib_is_refused_naming_the_limit() {
    let mut cmd = vmm();
    cmd.args(["--kernel", runv_vmm::TEST_GUEST_PVH, "--memory", "65537M"])
        .args(["--serial", "off"]);
    let out = run_with_timeout(cmd, TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("memoryMib must be between 8 and 65536, got 65537"),
        "{stderr}"
    );
}

//! Builds the freestanding test guest (`guest/`) with the host's gcc and ld into
//! OUT_DIR: `runv-guest-pvh.elf` (with a PVH note) and `runv-guest-64.elf`
//! (64-bit entry only). No extra Rust target is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (gcc and binutils are required)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn compile(src: &Path, out: &Path, defines: &[&str]) {
    let mut cmd = Command::new(std::env::var("RUNV_GUEST_CC").unwrap_or_else(|_| "gcc".into()));
    cmd.args([
        "-c",
        "-m64",
        "-O2",
        "-ffreestanding",
        "-fno-pic",
        "-fno-pie",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fno-builtin",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-mcmodel=small",
        "-nostdinc",
        "-Wall",
        "-Werror",
    ]);
    cmd.args(defines).arg("-o").arg(out).arg(src);
    run(&mut cmd);
}

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for f in [
        "entry.S",
        "guest.c",
        "guest.h",
        "irq.c",
        "virtio.c",
        "virtio.h",
        "vsock.c",
        "container.c",
        "linker.ld",
    ] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    println!("cargo:rerun-if-env-changed=RUNV_GUEST_CC");
    let c_objs: Vec<PathBuf> = ["guest.c", "irq.c", "virtio.c", "vsock.c", "container.c"]
        .iter()
        .map(|src| {
            let obj = out.join(format!("{src}.o"));
            compile(&dir.join(src), &obj, &[]);
            obj
        })
        .collect();
    for (name, defines) in [("pvh", &["-DPVH_NOTE"][..]), ("64", &[][..])] {
        let entry = out.join(format!("entry-{name}.o"));
        compile(&dir.join("entry.S"), &entry, defines);
        let elf = out.join(format!("runv-guest-{name}.elf"));
        let mut ld = Command::new(std::env::var("RUNV_GUEST_LD").unwrap_or_else(|_| "ld".into()));
        ld.args([
            "-static",
            "-nostdlib",
            "-z",
            "max-page-size=0x1000",
            "--build-id=none",
            "-T",
        ])
        .arg(dir.join("linker.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&entry)
        .args(&c_objs);
        run(&mut ld);
        println!(
            "cargo:rustc-env=RUNV_GUEST_{}={}",
            name.to_uppercase(),
            elf.display()
        );
    }
}

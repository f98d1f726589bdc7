//! How long a container that keeps failing is down between two runs, on a
//! real kernel: from its `Exited` on the channel to the next run's
//! `Started`, the way the agent restarts a `RerunOnFailure` VM (the exit
//! acknowledged, the VM powered off, a new VM booted, runv-init configured
//! and the process started), measured under QEMU's software emulation (TCG)
//! with Debian's kernel from the guest kit, runv-init's initramfs and the
//! busybox image's root filesystem. The agent's own back-off between
//! restarts (1 s doubling by default) is left out: this is the mechanism's
//! cost. Also prints the sizes of runv-init and of the initramfs.
//!
//! `cargo bench -p runv-node-agent --bench restart_tcg` as root, with
//! `qemu-system-x86_64`, `docker-registry`, `skopeo`, `mkfs.erofs`,
//! `/bin/busybox` and the guest kit (`RUNV_GUEST_KIT_DIR`). `RUNS` (default
//! 5) sets how many runs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::tcg::{connect, converse, guest_config, image, runv_init, start_qemu, wait_power_off};
use runv_image::container::Overrides;
use runv_node_agent::host::guestkit;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let name = "restart_tcg";
    if !nix_root()
        || !common::images::require_tools(
            name,
            &[
                "qemu-system-x86_64",
                "docker-registry",
                "skopeo",
                "mkfs.erofs",
                "busybox",
            ],
        )
    {
        eprintln!("{name}: needs root and the tools above");
        return;
    }
    let Some(kit) = common::guest_kit(name) else {
        return;
    };
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5)
        .max(2);
    let tmp = tempfile::tempdir().unwrap();
    let init = runv_init();
    let overrides = Overrides {
        command: vec!["/bin/sh".into(), "-c".into(), "echo failing; exit 1".into()],
        args: vec![],
        env: vec![],
        working_dir: None,
    };
    let (rootfs, container) = image(tmp.path(), &overrides, "");
    let initrd = guestkit::initramfs(&kit, &init, &tmp.path().join("initramfs")).unwrap();
    let config = guest_config(container, "rerun");
    let (mut gaps, mut offs, mut boots, mut starts) = (vec![], vec![], vec![], vec![]);
    let mut last_exit: Option<Instant> = None;
    for run in 0..runs {
        let dir = tmp.path().join(format!("run-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let spawned = Instant::now();
        let (mut qemu, serial) = start_qemu(&dir, &kit, &initrd, &rootfs);
        let mut chan = connect(&mut qemu, &dir.join("channel.sock"));
        let conv = converse(&mut chan, config.clone(), spawned).unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            )
        });
        let (started, exited) = (conv.started_at.unwrap(), conv.exited_at.unwrap());
        assert_eq!(conv.exited.as_ref().and_then(|e| e.code), Some(1));
        if let Some(prev) = last_exit {
            gaps.push(started - prev);
        }
        boots.push(conv.hello_after.unwrap());
        starts.push(started - spawned - conv.hello_after.unwrap());
        wait_power_off(&mut qemu, &serial);
        offs.push(exited.elapsed());
        println!(
            "run {run}: Hello {} after spawn, Started {} after Hello, powered off {} after Exited",
            ms(conv.hello_after.unwrap()),
            ms(*starts.last().unwrap()),
            ms(*offs.last().unwrap())
        );
        last_exit = Some(exited);
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!(
        "Exited -> next Started, {} restarts: median {}, min {}, max {}",
        gaps.len(),
        ms(median(gaps.clone())),
        ms(*gaps.iter().min().unwrap()),
        ms(*gaps.iter().max().unwrap())
    );
    println!(
        "  of which: Exited -> powered off median {}, spawn -> runv-init's Hello median {}, Hello -> Started median {}",
        ms(median(offs)),
        ms(median(boots)),
        ms(median(starts))
    );
    println!(
        "runv-init {} bytes, initramfs {} bytes",
        size(&init),
        size(&initrd)
    );
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

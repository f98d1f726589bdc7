//! The whole guest path on a real Linux kernel: Debian's cloud kernel from
//! the node's guest kit, the initramfs the agent builds (`runv-init` plus the
//! kit's modules), and a root filesystem disk made from a busybox image pulled
//! from a real registry on loopback, booted under QEMU's software emulation
//! (TCG: a stock kernel does not boot on this host's `kvm_pvm`). The test is
//! the host end of the channel, over a virtio-console port named `runv.0`
//! (QEMU has no vsock without vhost), and checks that:
//! - the modules load (runv-init lists them on the serial console);
//! - the root filesystem mounts under its overlay: the container reads a file
//!   of the image and writes one into a directory of the read-only image;
//! - the entrypoint runs with the config's environment, arguments and user
//!   (`app`, named in the image's `/etc/passwd` and `/etc/group`);
//! - stdout and stderr arrive on their own streams;
//! - the exit code (3) is reported, and the VM powers off by itself.
//!
//! Needs root, `qemu-system-x86_64`, `docker-registry`, `skopeo`,
//! `mkfs.erofs`, `/bin/busybox` (Debian's `busybox-static`) and the guest kit
//! (`vmm/scripts/guest-kit.sh` into `$RUNV_GUEST_KIT_DIR`, default
//! `/var/lib/runv/guests/kit`). It builds the static `runv-init` with cargo.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::images::{Layout, Registry, busybox_image, require_tools};
use runv_image::RegistryAuth;
use runv_image::container::{Overrides, merge};
use runv_image::images::{Images, PullPolicy};
use runv_image::rootfs::Format;
use runv_node_agent::host::guestkit;
use runv_node_agent::testing::{Need, require};
use runv_vmm_api::guest::{self, Frame, GuestConfig, GuestState, Hello, RootFs};

/// Bounds a hang, not speed: runv-init says Hello 5–7 s after QEMU starts
/// here, with the other core busy; each read of the channel waits this long.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long QEMU may take to end after the guest was told its exit was seen.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);

/// What the container runs: shows what its root is mounted as, reads the
/// image, writes into a directory of the (read-only) image as its user (`/`
/// is root's, as in any container), prints its user, environment and
/// arguments on stdout, a line on stderr, and exits 3.
const SCRIPT: &str = r#"
grep '^overlay / overlay ' /proc/mounts | cut -d' ' -f1-3
cat /etc/image-release
echo written-by-the-container > /home/app/note && cat /home/app/note
echo "user=$(id -un):$(id -gn) uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "IMAGE_VAR=$IMAGE_VAR WHO=$WHO pwd=$(pwd) arg0=$0 arg1=$1"
echo "to-stderr" >&2
exit 3
"#;

/// The static `runv-init`, built now (a no-op when it is fresh).
fn runv_init() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_runv-agent"));
    let target_dir = agent
        .parent()
        .and_then(Path::parent)
        .expect("the target directory");
    let triple = "x86_64-unknown-linux-gnu";
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "runv-init",
            "--release",
            "--target",
            triple,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build -p runv-init");
    assert!(status.success(), "cargo build -p runv-init failed");
    let init = target_dir.join(triple).join("release/runv-init");
    // A dynamic executable needs a loader, which the initramfs does not have.
    // (A RUSTFLAGS in the environment overrides the target's crt-static.)
    assert!(
        !has_interpreter(&std::fs::read(&init).unwrap()),
        "{} is not static: is RUSTFLAGS set?",
        init.display()
    );
    init
}

/// Whether an ELF64 executable has a `PT_INTERP` program header (a loader).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(54), u16_at(56));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// The busybox image, pushed to a registry on loopback and pulled by
/// runv-image: its erofs root filesystem and the merged container config.
fn image(dir: &Path) -> (PathBuf, guest::ContainerConfig) {
    let registry = Registry::start(None);
    let mut layout = Layout::new(&dir.join("layout"));
    let manifest = busybox_image(&layout);
    layout.tag(&manifest, "1");
    registry.push(&layout.dir, "1", "busybox", &[]);
    let reference = runv_image::pull::parse_reference(&format!("{}/busybox:1", registry.addr))
        .expect("the reference");
    let images = Images::open(
        &dir.join("images"),
        runv_image::PullConfig::default(),
        Default::default(),
        Format::Erofs,
    )
    .unwrap();
    let ready = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(images.ensure(&reference, &RegistryAuth::Anonymous, PullPolicy::Always))
        .unwrap();
    let overrides = Overrides {
        command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        args: vec!["script".into(), "$(WHO)".into()],
        env: vec![("WHO".into(), "world".into())],
        working_dir: Some("/home/app".into()),
    };
    let digest = ready.pulled.manifest_digest.to_string();
    let mut container = merge(&ready.config, &overrides, "busybox@test", &digest).unwrap();
    container.user = "app".into();
    (ready.rootfs, container)
}

/// QEMU, killed by its pid when the test ends early.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's TSC runs at the host's under TCG (QEMU reads the host's).
/// Told its rate, the kernel skips calibrating it against the emulated PIT,
/// which fails on a loaded machine and then leaves the boot without a clock,
/// hung. Measured here over 200 ms rather than read from `/proc/cpuinfo`,
/// whose `cpu MHz` is the current clock where the CPU scales it.
fn tsc_khz() -> u64 {
    let (start, tsc) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let ticks = rdtsc().wrapping_sub(tsc);
    (ticks as f64 / start.elapsed().as_secs_f64() / 1000.0) as u64
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter; it touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

fn start_qemu(dir: &Path, kit: &Path, initrd: &Path, rootfs: &Path) -> (Qemu, PathBuf) {
    let serial = dir.join("serial.log");
    let socket = dir.join("channel.sock");
    let mut append = "console=ttyS0 panic=-1 no_timer_check runv.channel=port:runv.0".to_owned();
    append.push_str(&format!(" tsc_early_khz={}", tsc_khz()));
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-M", "microvm,x-option-roms=off,rtc=off"])
        .args(["-cpu", "max", "-m", "256", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(kit.join("vmlinuz"))
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-device", "virtio-serial-device", "-chardev"])
        .arg(format!(
            "socket,id=ch,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-device", "virtserialport,chardev=ch,name=runv.0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    (Qemu(child), serial)
}

/// Connects to QEMU's end of the channel once it listens.
fn connect(qemu: &mut Qemu, socket: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(socket) {
            s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
            return s;
        }
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!(
                "qemu ended ({status}) before it listened on {}",
                socket.display()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "qemu never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything the guest sent, up to its Exited.
#[derive(Debug, Default)]
struct Conversation {
    hello_after: Option<Duration>,
    started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exited: Option<guest::Exited>,
}

/// The next frame from the guest, or what went wrong.
fn next(chan: &mut UnixStream) -> Result<Frame, String> {
    match guest::read_frame(chan) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err("the guest closed the channel".into()),
        Err(e) => Err(format!("reading the channel: {e}")),
    }
}

/// The host's side of one run: Hello, Config, then every frame up to Exited,
/// answered with ExitAck.
fn converse(
    chan: &mut UnixStream,
    config: GuestConfig,
    spawned: Instant,
) -> Result<Conversation, String> {
    let mut conv = Conversation::default();
    let first = next(chan)?;
    conv.hello_after = Some(spawned.elapsed());
    let Frame::Hello(hello) = first else {
        return Err(format!("the guest's first frame is {first:?}"));
    };
    guest::check_hello(&hello).map_err(|e| e.to_string())?;
    if hello.state != Some(GuestState::WaitingForConfig) {
        return Err(format!(
            "the guest is not waiting for its config: {hello:?}"
        ));
    }
    let ours = Hello {
        version: guest::PROTOCOL_VERSION,
        software: "guest_kernel test".into(),
        state: None,
    };
    let write = |chan: &mut UnixStream, frame| {
        guest::write_frame(chan, &frame).map_err(|e| format!("writing {}: {e}", frame.name()))
    };
    write(chan, Frame::Hello(ours))?;
    write(chan, Frame::Config(Box::new(config)))?;
    while conv.exited.is_none() {
        match next(chan)? {
            Frame::Started(_) => conv.started = true,
            Frame::Stdout(b) => conv.stdout.extend(b),
            Frame::Stderr(b) => conv.stderr.extend(b),
            Frame::Exited(e) => conv.exited = Some(e),
            Frame::Error(e) => return Err(format!("the guest reports an error: {e}")),
            other => return Err(format!("unexpected frame {other:?}")),
        }
    }
    write(chan, Frame::ExitAck)?;
    Ok(conv)
}

/// Waits for QEMU to end by itself; kills it and fails if it does not.
fn wait_power_off(qemu: &mut Qemu, serial: &Path) {
    let start = Instant::now();
    while start.elapsed() < POWER_OFF_TIMEOUT {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            let mut err = String::new();
            let _ = qemu.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
            assert!(status.success(), "qemu: {status}: {err}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = qemu.0.kill();
    panic!(
        "the VM did not power off within {POWER_OFF_TIMEOUT:?}; serial console:\n{}",
        std::fs::read_to_string(serial).unwrap_or_default()
    );
}

#[test]
fn a_container_runs_on_debians_kernel_and_the_vm_powers_off() {
    let test = "a_container_runs_on_debians_kernel_and_the_vm_powers_off";
    if !require(test, &[Need::Root])
        || !require_tools(
            test,
            &[
                "qemu-system-x86_64",
                "docker-registry",
                "skopeo",
                "mkfs.erofs",
                "busybox",
            ],
        )
    {
        return;
    }
    let Some(kit) = common::guest_kit(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let init = runv_init();
    let (rootfs, container) = image(tmp.path());
    let initrd = guestkit::initramfs(&kit, &init, &tmp.path().join("initramfs")).unwrap();
    let config = GuestConfig {
        version: guest::CONFIG_VERSION,
        container,
        hostname: "kernel-test".into(),
        rootfs: RootFs {
            source: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        network: None,
        termination_grace_period_seconds: 5,
        exit_report_timeout_seconds: 30,
    };

    let spawned = Instant::now();
    let (mut qemu, serial) = start_qemu(tmp.path(), &kit, &initrd, &rootfs);
    let mut chan = connect(&mut qemu, &tmp.path().join("channel.sock"));
    let conv = converse(&mut chan, config, spawned).unwrap_or_else(|e| {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!("{e}; serial console:\n{console}")
    });
    wait_power_off(&mut qemu, &serial);
    let powered_off = spawned.elapsed();
    let console = std::fs::read_to_string(&serial).unwrap();
    let stdout = String::from_utf8_lossy(&conv.stdout);
    let stderr = String::from_utf8_lossy(&conv.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nconsole:\n{console}");

    // The modules, dependencies first.
    let loaded = console
        .lines()
        .find_map(|l| l.split("runv-init: loaded modules: ").nth(1))
        .unwrap_or_else(|| panic!("no module list on the console:\n{console}"));
    let loaded: Vec<&str> = loaded.split_whitespace().collect();
    for m in guestkit_wanted() {
        assert!(loaded.contains(&m.as_str()), "{m} not loaded: {loaded:?}");
    }
    let pos = |m: &str| loaded.iter().position(|l| *l == m).unwrap();
    assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_mmio"));
    // The root filesystem, its overlay, the process's user, env and args.
    assert!(conv.started, "{context}");
    assert!(stdout.contains("overlay / overlay\n"), "{context}");
    assert!(stdout.contains("busybox-test\n"), "{context}");
    assert!(stdout.contains("written-by-the-container\n"), "{context}");
    assert!(
        stdout.contains("user=app:app uid=1000 gid=1000 groups=1000 1001"),
        "{context}"
    );
    assert!(
        stdout.contains("IMAGE_VAR=from-image WHO=world pwd=/home/app arg0=script arg1=world"),
        "{context}"
    );
    // Two streams, kept apart.
    assert_eq!(stderr, "to-stderr\n", "{context}");
    assert!(!stdout.contains("to-stderr"), "{context}");
    let exited = conv.exited.unwrap();
    assert_eq!((exited.code, exited.signal), (Some(3), None), "{context}");
    assert!(exited.start_error.is_none(), "{exited:?}");

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "measured: runv-init's Hello {:.2?} after QEMU was spawned, powered off after {:.2?}; \
         initramfs {} bytes, runv-init {} bytes",
        conv.hello_after.unwrap(),
        powered_off,
        size(&initrd),
        size(&init)
    );
}

/// The modules the agent puts in every initramfs, as the kernel names them.
fn guestkit_wanted() -> Vec<String> {
    runv_node_agent::host::initramfs::WANTED
        .iter()
        .map(|m| m.to_string())
        .collect()
}

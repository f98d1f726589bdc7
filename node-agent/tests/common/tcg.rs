//! Running `runv-init` on Debian's kernel under QEMU's software emulation
//! (TCG): the static runv-init, the busybox image as a root filesystem
//! disk, QEMU with a virtio-console port for the channel, and the host's
//! side of one run. Shared by `tests/guest_kernel.rs` and the restart
//! benchmark (`benches/restart_tcg.rs`).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::{Layout, Registry, busybox_image};
use runv_image::RegistryAuth;
use runv_image::container::{Overrides, merge};
use runv_image::images::{Images, PullPolicy};
use runv_image::rootfs::Format;
use runv_vmm_api::guest::{self, Frame, GuestConfig, GuestState, Hello, RootFs};

/// Bounds a hang, not speed: runv-init says Hello 5–7 s after QEMU starts
/// here, with the other core busy; each read of the channel waits this long.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long QEMU may take to end after the guest was told its exit was seen.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);

/// The static `runv-init`, built now (a no-op when it is fresh).
pub fn runv_init() -> PathBuf {
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
        runv_node_agent::host::guestkit::is_static_elf(&std::fs::read(&init).unwrap()),
        "{} is not static: is RUSTFLAGS set?",
        init.display()
    );
    init
}

/// The busybox image, pushed to a registry on loopback and pulled by
/// runv-image: its erofs root filesystem and the container config merged
/// with `overrides`, run as `user`.
pub fn image(dir: &Path, overrides: &Overrides, user: &str) -> (PathBuf, guest::ContainerConfig) {
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
    let digest = ready.pulled.manifest_digest.to_string();
    let mut container = merge(&ready.config, overrides, "busybox@test", &digest).unwrap();
    container.user = user.into();
    (ready.rootfs, container)
}

/// QEMU, killed by its pid when the test ends early.
pub struct Qemu(pub Child);

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
pub fn tsc_khz() -> u64 {
    let (start, tsc) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let ticks = rdtsc().wrapping_sub(tsc);
    (ticks as f64 / start.elapsed().as_secs_f64() / 1000.0) as u64
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter; it touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

pub fn start_qemu(dir: &Path, kit: &Path, initrd: &Path, rootfs: &Path) -> (Qemu, PathBuf) {
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
pub fn connect(qemu: &mut Qemu, socket: &Path) -> UnixStream {
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
pub struct Conversation {
    pub hello_after: Option<Duration>,
    pub started: bool,
    /// When Started arrived.
    pub started_at: Option<Instant>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exited: Option<guest::Exited>,
    /// When Exited arrived.
    pub exited_at: Option<Instant>,
}

/// The next frame from the guest, or what went wrong.
pub fn next(chan: &mut UnixStream) -> Result<Frame, String> {
    match guest::read_frame(chan) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err("the guest closed the channel".into()),
        Err(e) => Err(format!("reading the channel: {e}")),
    }
}

/// The host's side of one run: Hello, Config, then every frame up to Exited,
/// answered with ExitAck.
pub fn converse(
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
            Frame::Started(_) => {
                conv.started = true;
                conv.started_at = Some(Instant::now());
            }
            Frame::Stdout(b) => conv.stdout.extend(b),
            Frame::Stderr(b) => conv.stderr.extend(b),
            Frame::Exited(e) => {
                conv.exited = Some(e);
                conv.exited_at = Some(Instant::now());
            }
            Frame::Error(e) => return Err(format!("the guest reports an error: {e}")),
            other => return Err(format!("unexpected frame {other:?}")),
        }
    }
    write(chan, Frame::ExitAck)?;
    Ok(conv)
}

/// Waits for QEMU to end by itself; kills it and fails if it does not.
pub fn wait_power_off(qemu: &mut Qemu, serial: &Path) {
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

/// The guest's config for `container`: the disk QEMU gives it first as root
/// filesystem, no network, a 5 s grace period.
pub fn guest_config(container: guest::ContainerConfig, hostname: &str) -> GuestConfig {
    GuestConfig {
        version: guest::CONFIG_VERSION,
        container,
        hostname: hostname.into(),
        rootfs: RootFs {
            source: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        network: None,
        termination_grace_period_seconds: 5,
        exit_report_timeout_seconds: 30,
    }
}

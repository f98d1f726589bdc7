//! `runv-vmm`: start one microVM from a config file or from flags.
//!
//! Exit status: 0 when the guest powered off or reset (or was killed on
//! request), non-zero on a fault, with a one-line reason on stderr and, when a
//! control socket or exit file is configured, the same reason as JSON in the
//! exit file.
//!
//! Run as root with `--jail-root DIR --jail-uid N --jail-gid N` (or a
//! `jail` section in the config), it confines itself before the guest runs
//! (`jail.rs`, docs/vmm-boot.md).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use runv_vmm::vmm;
use runv_vmm_api::config::{CpuPolicy, parse_size_mib};
use runv_vmm_api::{DiskConfig, ExitReason, ExitRecord, JailConfig, SerialConfig, VmConfig};

#[derive(Debug, Parser)]
#[command(
    name = "runv-vmm",
    version,
    about = "KVM microVM monitor (one process per microVM)"
)]
struct Cli {
    /// Versioned JSON config (runv.dev/vmm/v1alpha1); excludes the other VM flags.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory", "disk", "serial"])]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory, e.g. 128M or 1G.
    #[arg(long)]
    memory: Option<String>,
    /// Raw disk image, `PATH[,ro]`; repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// `stdout`, `off`, `file:PATH` or `socket:PATH`.
    #[arg(long)]
    serial: Option<String>,
    /// Control socket path (also with --config, where it overrides the file).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Exit file path (defaults to `<control socket>.exit`).
    #[arg(long)]
    exit_file: Option<PathBuf>,
    /// Turn seccomp filtering off (on by default).
    #[arg(long)]
    no_seccomp: bool,
    /// CPUID policy: auto, host or compat.
    #[arg(long)]
    cpu_policy: Option<String>,
    /// Jail the VMM in this directory (its new root) once its files are open;
    /// the exit file, control socket and vsock socket must lie inside it.
    #[arg(long, requires_all = ["jail_uid", "jail_gid"])]
    jail_root: Option<PathBuf>,
    /// The unprivileged uid the jailed VMM runs as.
    #[arg(long, requires = "jail_root")]
    jail_uid: Option<u32>,
    /// The unprivileged gid the jailed VMM runs as.
    #[arg(long, requires = "jail_root")]
    jail_gid: Option<u32>,
    /// Create the VM with its vCPUs paused; a control-socket `resume` starts them.
    #[arg(long)]
    start_paused: bool,
    /// Seconds a `shutdown` request without its own grace waits (default 10).
    #[arg(long)]
    shutdown_grace_seconds: Option<u32>,
}

fn parse_serial(s: &str) -> anyhow::Result<SerialConfig> {
    Ok(match s.split_once(':') {
        None if s == "stdout" => SerialConfig::Stdout,
        None if s == "off" => SerialConfig::Off,
        Some(("file", p)) => SerialConfig::File {
            path: p.into(),
            rotate: None,
        },
        Some(("socket", p)) => SerialConfig::Socket { path: p.into() },
        _ => anyhow::bail!("--serial must be stdout, off, file:PATH or socket:PATH"),
    })
}

fn config_from(cli: Cli) -> anyhow::Result<VmConfig> {
    let mut cfg = match (&cli.config, &cli.kernel) {
        (Some(path), _) => VmConfig::from_file(path)?,
        (None, Some(kernel)) => {
            let mut c = VmConfig::new(kernel.clone());
            c.initrd = cli.initrd;
            c.cmdline = cli.cmdline.unwrap_or_default();
            if let Some(v) = cli.vcpus {
                c.vcpus = v;
            }
            if let Some(m) = &cli.memory {
                c.memory_mib = parse_size_mib(m)?;
            }
            for d in &cli.disk {
                let (path, ro) = match d.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (d.as_str(), false),
                };
                c.disks.push(DiskConfig {
                    path: path.into(),
                    read_only: ro,
                });
            }
            if let Some(s) = &cli.serial {
                c.serial = parse_serial(s)?;
            }
            c
        }
        (None, None) => anyhow::bail!("either --config or --kernel is required"),
    };
    if cli.control_socket.is_some() {
        cfg.control_socket = cli.control_socket;
    }
    if cli.exit_file.is_some() {
        cfg.exit_file = cli.exit_file;
    }
    if cli.no_seccomp {
        cfg.seccomp = false;
    }
    if let (Some(root), Some(uid), Some(gid)) = (cli.jail_root, cli.jail_uid, cli.jail_gid) {
        cfg.jail = Some(JailConfig { root, uid, gid });
    }
    if cli.start_paused {
        cfg.start_paused = true;
    }
    if cli.shutdown_grace_seconds.is_some() {
        cfg.shutdown_grace_seconds = cli.shutdown_grace_seconds;
    }
    if let Some(p) = cli.cpu_policy {
        cfg.cpu_policy = match p.as_str() {
            "auto" => CpuPolicy::Auto,
            "host" => CpuPolicy::Host,
            "compat" => CpuPolicy::Compat,
            _ => anyhow::bail!("--cpu-policy must be auto, host or compat"),
        };
    }
    cfg.validate()?;
    Ok(cfg)
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Release);
}

fn install_terminate_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_terminate` only stores to an atomic, which is async-signal-safe;
        // the sigaction struct is fully initialised by zeroing plus the handler.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_terminate as *const () as usize;
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}

fn finish(cfg: Option<&VmConfig>, record: &ExitRecord) -> ! {
    eprintln!(
        "runv-vmm: exit {}: {:?}: {}",
        record.exit_code, record.reason, record.message
    );
    if let Some(cfg) = cfg {
        // Host paths, or where the jail sees them once the VMM is inside.
        let (exit_file, control_socket) = vmm::exit_paths(cfg);
        if let Some(path) = exit_file
            && let Err(e) = vmm::write_exit_file(&path, record)
        {
            eprintln!("runv-vmm: writing exit file {}: {e}", path.display());
        }
        if let Some(sock) = control_socket {
            let _ = std::fs::remove_file(sock);
        }
    }
    std::process::exit(record.exit_code)
}

fn main() {
    let cli = Cli::parse();
    let cfg = match config_from(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runv-vmm: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = install_terminate_handlers() {
        finish(
            Some(&cfg),
            &ExitRecord::new(ExitReason::VmmError, format!("{e:#}")),
        );
    }
    match vmm::start(&cfg) {
        Ok(running) => {
            let record = running.wait(|| TERMINATE.load(Ordering::Acquire));
            finish(Some(&cfg), &record)
        }
        Err(e) => finish(
            Some(&cfg),
            &ExitRecord::new(ExitReason::VmmError, runv_vmm::error_chain(&e)),
        ),
    }
}

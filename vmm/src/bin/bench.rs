//! `runv-vmm-bench`: prints the VMM's numbers, with QEMU's beside them when
//! `qemu-system-x86_64` is installed. Timing lives here, never in test asserts.
//!
//! Subcommands: `irqchip` (VM create+destroy cost per interrupt-controller
//! layout), `cold-start` (spawn → first serial byte → exit, ours and QEMU's),
//! `memory` (VMM RSS minus guest memory touched), `start-rate` (VMs started and
//! exited per second on all cores), `msi` (cost of raising one interrupt
//! with KVM_SIGNAL_MSI and with an irqfd write), `all`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use runv_vmm::kvm::{IrqchipMode, Vm, hypervisor_name};

#[derive(Debug, Parser)]
#[command(name = "runv-vmm-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Runs per measurement.
    #[arg(long, default_value_t = 50, global = true)]
    runs: usize,
    /// The runv-vmm binary (default: next to this one).
    #[arg(long, global = true)]
    vmm: Option<PathBuf>,
    /// Skip the QEMU comparison.
    #[arg(long, global = true)]
    no_qemu: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    Irqchip,
    Msi,
    ColdStart,
    Memory,
    StartRate {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    Blk {
        #[arg(long, default_value_t = 64)]
        mib: u64,
    },
    All,
}

struct Stats {
    median: f64,
    p99: f64,
    min: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p99: at(0.99),
        min: v[0],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One interrupt to vCPU 0 (fixed, vector 0x40), raised 20,000 times per way:
/// the time the raising thread spends, which is what a device path pays.
fn msi() -> anyhow::Result<()> {
    const N: u32 = 20_000;
    const ADDRESS: u64 = 0xfee0_0000;
    const DATA: u32 = 0x40;
    println!(
        "## raising one interrupt ({N} times, {})",
        hypervisor_name()
    );
    let vm = Vm::new(IrqchipMode::Split)?;
    let _vcpu = vm.create_vcpu(0)?;
    let irq = vm.interrupts();
    let t = Instant::now();
    for _ in 0..N {
        irq.signal_msi(ADDRESS, DATA)?;
    }
    let signal = t.elapsed() / N;
    irq.set_msi_routes(&[(5, ADDRESS, DATA)])?;
    let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
    irq.register_irqfd(&fd, 5)?;
    let t = Instant::now();
    for _ in 0..N {
        fd.write(1)?;
    }
    let irqfd = t.elapsed() / N;
    println!(
        "KVM_SIGNAL_MSI          {:.2} us per interrupt",
        irqfd_us(signal)
    );
    println!(
        "irqfd write (GSI → MSI) {:.2} us per interrupt",
        irqfd_us(irqfd)
    );
    Ok(())
}

fn irqfd_us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn irqchip(runs: usize) -> anyhow::Result<()> {
    println!(
        "## VM create + destroy by irqchip layout ({runs} runs, {})",
        hypervisor_name()
    );
    for (name, mode) in [
        ("none", IrqchipMode::None),
        ("split (userspace IOAPIC)", IrqchipMode::Split),
        ("full in-kernel irqchip + PIT", IrqchipMode::FullWithPit),
    ] {
        let mut t = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            let vm = Vm::new(mode).with_context(|| name.to_string())?;
            let vcpu = vm.create_vcpu(0)?;
            drop(vcpu);
            drop(vm);
            t.push(ms(start.elapsed()));
        }
        let s = stats(t);
        println!("{name:32} median {:7.3} ms  p99 {:7.3} ms", s.median, s.p99);
    }
    Ok(())
}

/// One boot: (ms to first stdout byte, ms to exit, max RSS KiB, exit code).
fn one_boot(mut cmd: Command) -> anyhow::Result<(f64, f64, u64, i32)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawn")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut first = [0u8; 1];
    let n = out.read(&mut first)?;
    let t_first = ms(start.elapsed());
    if n == 0 {
        bail!("no serial output");
    }
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped; status and usage are valid
    // out-pointers for the duration of the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let t_exit = ms(start.elapsed());
    if rc != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((t_first, t_exit, usage.ru_maxrss as u64, code))
}

fn ours(vmm: &Path) -> Command {
    let mut c = Command::new(vmm);
    c.args(["--kernel", runv_vmm::TEST_GUEST_PVH, "--memory", "128M"])
        .args(["--cmdline", "test=hello"]);
    c
}

fn qemu_cmd() -> Option<Command> {
    let path = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())?;
    let mut c = Command::new(path);
    // `-cpu host` fails here (KVM refuses MSR 0x10a); qemu64 starts everywhere.
    c.args([
        "-M",
        "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "qemu64",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel",
        runv_vmm::TEST_GUEST_PVH,
        "-append",
        "test=hello poweroff=debug-exit",
    ]);
    Some(c)
}

struct Boots {
    first: Stats,
    exit: Stats,
    rss_kib: u64,
}

fn boots(runs: usize, make: &dyn Fn() -> Command, ok_code: i32) -> anyhow::Result<Boots> {
    let (mut first, mut exit, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (f, e, r, code) = one_boot(make())?;
        if code != ok_code {
            bail!("guest exited with {code}, expected {ok_code}");
        }
        first.push(f);
        exit.push(e);
        rss.push(r);
    }
    rss.sort();
    Ok(Boots {
        first: stats(first),
        exit: stats(exit),
        rss_kib: rss[rss.len() / 2],
    })
}

fn cold_start(runs: usize, vmm: &Path, qemu: bool) -> anyhow::Result<()> {
    println!(
        "## Cold start, test guest, 128 MiB, {runs} runs, {} (spawn → first serial byte → exit)",
        hypervisor_name()
    );
    let o = boots(runs, &|| ours(vmm), 0)?;
    println!(
        "runv-vmm      first byte median {:6.2} ms p99 {:6.2} ms | exit median {:6.2} ms p99 {:6.2} ms (min {:.2}) | max RSS {} KiB",
        o.first.median, o.first.p99, o.exit.median, o.exit.p99, o.exit.min, o.rss_kib
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The node agent's default: the VMM confines itself (namespaces, chroot,
        // an unprivileged uid) before the guest runs.
        let root = std::env::temp_dir().join(format!("runv-bench-jail-{}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        let j = boots(
            runs,
            &|| {
                let mut c = ours(vmm);
                c.arg("--jail-root").arg(&root);
                c.args(["--jail-uid", "1879048192", "--jail-gid", "1879048192"]);
                c
            },
            0,
        );
        let _ = std::fs::remove_dir(&root);
        let j = j?;
        println!(
            "runv-vmm jail first byte median {:6.2} ms p99 {:6.2} ms | exit median {:6.2} ms p99 {:6.2} ms (min {:.2}) | max RSS {} KiB",
            j.first.median, j.first.p99, j.exit.median, j.exit.p99, j.exit.min, j.rss_kib
        );
    } else {
        println!("runv-vmm jail skipped (needs root)");
    }
    if !qemu {
        println!("qemu microvm  skipped (--no-qemu)");
    } else if qemu_cmd().is_some() {
        // isa-debug-exit turns the guest's 0 into exit status 1.
        let q = boots(runs, &|| qemu_cmd().expect("checked"), 1)?;
        println!(
            "qemu microvm  first byte median {:6.2} ms p99 {:6.2} ms | exit median {:6.2} ms p99 {:6.2} ms (min {:.2}) | max RSS {} KiB",
            q.first.median, q.first.p99, q.exit.median, q.exit.p99, q.exit.min, q.rss_kib
        );
        println!(
            "ratio qemu/runv: first byte {:.1}x, exit {:.1}x, RSS {:.1}x",
            q.first.median / o.first.median,
            q.exit.median / o.exit.median,
            q.rss_kib as f64 / o.rss_kib as f64
        );
    } else {
        println!("qemu microvm  not installed (Debian package qemu-system-x86); skipped");
    }
    Ok(())
}

fn control(sock: &Path, line: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let start = Instant::now();
    let s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(5) => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let mut w = s.try_clone()?;
    w.write_all(line.as_bytes())?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out)?;
    Ok(out)
}

fn memory(vmm: &Path) -> anyhow::Result<()> {
    println!("## Memory overhead, 128 MiB guest (VMM RSS minus guest memory resident)");
    let dir = std::env::temp_dir().join(format!("runv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("vm.sock");
    let mut child = Command::new(vmm)
        .args([
            "--kernel",
            runv_vmm::TEST_GUEST_PVH,
            "--memory",
            "128M",
            "--serial",
            "off",
        ])
        .args(["--cmdline", "test=loop", "--control-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    control(&sock, "{\"op\":\"pause\"}\n")?;
    let counters = control(&sock, "{\"op\":\"counters\"}\n")?;
    let resp: runv_vmm_api::Response = serde_json::from_str(counters.trim())?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.id()))?;
    control(&sock, "{\"op\":\"kill\"}\n")?;
    child.wait()?;
    std::fs::remove_dir_all(&dir).ok();
    let field_in = |text: &str, name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| name.to_string())?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("value")?
            .parse::<u64>()?
            * 1024)
    };
    let rss = field_in(&status, "VmRSS:")?;
    let hwm = field_in(&status, "VmHWM:")?;
    let pss = field_in(&rollup, "Pss:")?;
    let anon = field_in(&rollup, "Anonymous:")?;
    let runv_vmm_api::Response::Counters { counters } = resp else {
        bail!("unexpected reply {counters}");
    };
    let guest = counters
        .get("guest_memory_resident_bytes")
        .copied()
        .unwrap_or(0);
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "runv-vmm  RSS {:.2} MiB (peak {:.2}), guest resident {:.2} MiB, overhead {:.2} MiB \
         (of which private anonymous {:.2} MiB; PSS overhead {:.2} MiB: libc and the binary are shared)",
        mib(rss),
        mib(hwm),
        mib(guest),
        mib(rss.saturating_sub(guest)),
        mib(anon.saturating_sub(guest)),
        mib(pss.saturating_sub(guest)),
    );
    Ok(())
}

fn start_rate(vmm: &Path, seconds: u64) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("## Start rate: test-guest VMs started and exited, {workers} workers, {seconds} s");
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (vmm, done, failed) = (vmm.to_owned(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let st = ours(&vmm)
                        .args(["--serial", "off"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    match st {
                        Ok(s) if s.success() => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => failed.store(true, Ordering::Relaxed),
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for t in threads {
        let _ = t.join();
    }
    if failed.load(Ordering::Relaxed) {
        bail!("a VM failed during the start-rate run");
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "runv-vmm  {n} VMs in {:.2} s = {:.0} VMs/s",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs a guest that writes then reads `mib` MiB sequentially in 64 KiB
/// requests; returns (write MB/s, read MB/s) from when its marker lines arrive.
fn blk_run(mut cmd: Command, mib: u64) -> anyhow::Result<(f64, f64)> {
    use std::io::BufRead;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    let out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let (mut t0, mut t1, mut t2) = (None, None, None);
    for line in out.lines() {
        let line = line?;
        let now = Instant::now();
        if line.contains("blkbench write start") {
            t0 = Some(now);
        } else if line.contains("blkbench write done") {
            t1 = Some(now);
        } else if line.contains("blkbench read done") {
            t2 = Some(now);
        } else if line.contains("FAIL") {
            bail!("guest: {line}");
        }
    }
    child.wait()?;
    let (Some(t0), Some(t1), Some(t2)) = (t0, t1, t2) else {
        bail!("benchmark guest did not finish");
    };
    let mb = mib as f64 * 1.048576;
    Ok((mb / (t1 - t0).as_secs_f64(), mb / (t2 - t1).as_secs_f64()))
}

fn blk(vmm: &Path, mib: u64, qemu: bool) -> anyhow::Result<()> {
    println!(
        "## virtio-blk sequential, test guest, {mib} MiB in 64 KiB requests, raw image in /tmp"
    );
    let img = std::env::temp_dir().join(format!("runv-bench-{}.img", std::process::id()));
    std::fs::File::create(&img)?.set_len((mib + 1) << 20)?;
    let cmdline = format!("test=devices blkbench={mib}");
    let mut c = Command::new(vmm);
    c.args([
        "--kernel",
        runv_vmm::TEST_GUEST_PVH,
        "--memory",
        "128M",
        "--cmdline",
        &cmdline,
    ])
    .arg("--disk")
    .arg(&img);
    let (w, r) = blk_run(c, mib)?;
    println!("runv-vmm      write {w:8.1} MB/s  read {r:8.1} MB/s");
    if qemu && let Some(mut q) = qemu_cmd() {
        // Replace the default append and add a v1.x virtio-mmio disk.
        let args: Vec<String> = q
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut cmd = Command::new(q.get_program());
        let mut skip = false;
        for a in &args {
            if skip {
                skip = false;
                continue;
            }
            if a == "-append" {
                skip = true;
                continue;
            }
            cmd.arg(a);
        }
        q = cmd;
        q.args(["-append", &format!("{cmdline} poweroff=debug-exit")])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-drive")
            .arg(format!(
                "id=d0,file={},format=raw,if=none,cache=writeback,aio=threads",
                img.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        match blk_run(q, mib) {
            Ok((qw, qr)) => println!(
                "qemu microvm  write {qw:8.1} MB/s  read {qr:8.1} MB/s  (runv/qemu: write {:.2}x, read {:.2}x)",
                w / qw,
                r / qr
            ),
            Err(e) => println!("qemu microvm  failed: {e:#}"),
        }
    }
    std::fs::remove_file(&img).ok();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let vmm = match cli.vmm {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("runv-vmm"),
    };
    if !vmm.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p runv-vmm)",
            vmm.display()
        );
    }
    let qemu = !cli.no_qemu;
    match cli.cmd.unwrap_or(Cmd::All) {
        Cmd::Irqchip => irqchip(cli.runs),
        Cmd::Msi => msi(),
        Cmd::ColdStart => cold_start(cli.runs, &vmm, qemu),
        Cmd::Memory => memory(&vmm),
        Cmd::StartRate { seconds } => start_rate(&vmm, seconds),
        Cmd::Blk { mib } => blk(&vmm, mib, qemu),
        Cmd::All => {
            irqchip(cli.runs)?;
            msi()?;
            cold_start(cli.runs, &vmm, qemu)?;
            memory(&vmm)?;
            start_rate(&vmm, 5)?;
            blk(&vmm, 64, qemu)
        }
    }
}

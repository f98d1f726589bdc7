//! The VMM: builds one microVM from a [`VmConfig`] and runs it to its end.
//!
//! Owns the boot sequence in order (memory → kernel → initrd/cmdline → boot
//! info → vCPU state → devices → jail → threads) and the end of the process
//! (exit record, exit file, exit code). The numbered steps match
//! docs/vmm-boot.md. Every host resource is opened before the jail (step 7);
//! no thread exists until after it.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runv_vmm_api::config::{MAX_VIRTIO_DEVICES, parse_mac};
use runv_vmm_api::{ExitReason, ExitRecord, JailConfig, VmConfig};
use vm_memory::GuestMemoryMmap;

use crate::boot::{
    self, EntryKind, InitrdPlacement, KernelEntry, acpi, cpu, cpuid, mptable, params,
};
use crate::control::{self, Facts};
use crate::counters::Counters;
use crate::devices::ioapic::{self, Ioapic, IrqLine, Msi, MsiSink};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockCounters, BlockError, FileDisk};
use crate::devices::virtio::io_thread::{self, Watched};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetCounters, Tap, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockCounters, VsockError};
use crate::devices::{Bus, i8042, lock, power, serial};
use crate::kvm::{Interrupts, IrqchipMode, KvmError, Vcpu, Vm, hypervisor_name};
use crate::memory::{Layout, MMIO_SLOT, MMIO_START};
use crate::seccomp::{Filter, ThreadKind};
use crate::state::Shared;
use crate::vcpu::{self, Buses, SignalKicker};

/// Errors while building the VM (before any guest code runs).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Serial(#[from] serial::SerialError),
    #[error(transparent)]
    Bus(#[from] crate::devices::BusError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("starting a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("config")]
    Config(#[source] runv_vmm_api::ConfigError),
    #[error("config")]
    AbsolutePaths(#[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("changing to the jail root {0}")]
    JailRoot(String, #[source] std::io::Error),
}

/// The interrupt controller layout every VM gets (see docs/vmm-boot.md for the
/// measurement behind it): in-kernel LAPICs, no in-kernel IOAPIC/PIC/PIT.
pub const IRQCHIP: IrqchipMode = IrqchipMode::Split;

/// Largest initrd address for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// A built VM whose vCPUs are running.
#[derive(Debug)]
pub struct Running {
    pub shared: Arc<Shared>,
    serial: Arc<Mutex<serial::SerialDevice>>,
    /// Installed on the calling thread by [`Running::wait`].
    main_filter: Option<Filter>,
    /// Kept for as long as vCPUs run; it owns the guest memory KVM maps.
    _vm: Vm,
}

/// Builds the VM, enters its jail when the config has one, and starts its
/// threads (the vCPUs wait for a `resume` when `startPaused` is set). Each
/// numbered step of docs/vmm-boot.md is one function, called in order here.
pub fn start(cfg: &VmConfig) -> Result<Running, VmmError> {
    let absolute;
    let cfg = match &cfg.jail {
        Some(jail) => {
            absolute = work_in_jail_root(cfg, jail)?;
            &absolute
        }
        None => cfg,
    };
    // Read before the jail, which hides /sys.
    let hypervisor = hypervisor_name();
    let counters = Counters::default();
    let (layout, mem, vm) = guest_memory(cfg)?;
    let loaded = load_kernel_and_initrd(cfg, &mem, &layout)?;
    let virtio = virtio_devices(cfg, &counters)?;
    let cmdline_len = write_cmdline(cfg, &mem, virtio.len())?;
    let boot_info = write_boot_info(cfg, &mem, &layout, &loaded, cmdline_len, virtio.len())?;
    let vcpus = create_vcpus(cfg, &vm, loaded.kernel, boot_info, hypervisor)?;
    let shared = Arc::new(Shared::with_counters(vcpus.len(), counters));
    if cfg.start_paused {
        shared.start_paused();
    }
    let devices = build_devices(cfg, &vm, &mem, &shared, virtio)?;
    let control = bind_control_and_enter_jail(cfg)?;
    let facts = Facts {
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        kernel: cfg.kernel.display().to_string(),
        cmdline: cfg.cmdline.clone(),
        hypervisor: hypervisor.into(),
        memory: Some(mem),
        shutdown_grace: cfg.shutdown_grace(),
    };
    let serial = devices.serial.clone();
    let main_filter = start_threads(cfg, &shared, devices, control.map(|l| (l, facts)), vcpus)?;
    Ok(Running {
        shared,
        serial,
        main_filter,
        _vm: vm,
    })
}

/// A jailed VMM works in its jail root from the start: relative config paths
/// are resolved first, and the vsock socket is bound by its path relative to
/// the root, which stays valid inside the jail (where the device connects to
/// `<udsPath>_<port>` for the guest). Returns the config with absolute paths.
fn work_in_jail_root(cfg: &VmConfig, jail: &JailConfig) -> Result<VmConfig, VmmError> {
    let absolute = with_absolute_paths(cfg).map_err(VmmError::AbsolutePaths)?;
    std::env::set_current_dir(&jail.root)
        .map_err(|e| VmmError::JailRoot(jail.root.display().to_string(), e))?;
    Ok(absolute)
}

/// Step 1: guest memory, registered with a new VM.
fn guest_memory(cfg: &VmConfig) -> Result<(Layout, Arc<GuestMemoryMmap>, Vm), VmmError> {
    let layout = Layout::new(cfg.memory_mib)?;
    let mem = Arc::new(layout.allocate()?);
    let mut vm = Vm::new(IRQCHIP)?;
    vm.register_memory(mem.clone())?;
    Ok((layout, mem, vm))
}

/// What steps 2 and 3 loaded into guest memory.
struct Loaded {
    kernel: KernelEntry,
    initrd: Option<InitrdPlacement>,
}

/// Steps 2 and 3 (kernel, initrd).
fn load_kernel_and_initrd(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<Loaded, VmmError> {
    let kernel = boot::load_kernel(mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => {
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            Some(boot::load_initrd(mem, layout, p, max)?)
        }
        None => None,
    };
    Ok(Loaded { kernel, initrd })
}

/// Step 3: the command line, with one `virtio_mmio.device=` per device (kernels
/// with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES find them so); returns its length.
fn write_cmdline(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio_count: usize,
) -> Result<u64, VmmError> {
    let mut cmdline = cfg.cmdline.clone();
    for i in 0..virtio_count {
        let (addr, irq) = mmio_slot(i);
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    Ok(boot::write_cmdline(mem, cmdline.trim_start())?)
}

/// Step 4: boot information and tables; returns the address the boot vCPU is
/// handed (`hvm_start_info` or the zero page).
fn write_boot_info(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    loaded: &Loaded,
    cmdline_len: u64,
    virtio_count: usize,
) -> Result<u64, VmmError> {
    let e820 = layout.e820();
    let acpi_devices: Vec<acpi::MmioDevice> = (0..virtio_count)
        .map(|i| {
            let (addr, irq) = mmio_slot(i);
            acpi::MmioDevice {
                addr,
                len: MMIO_SLOT as u32,
                irq,
            }
        })
        .collect();
    let rsdp = acpi::write(mem, cfg.vcpus, &acpi_devices)?;
    let kernel = loaded.kernel;
    let boot_info = match kernel.kind {
        EntryKind::Pvh => params::write_pvh_start_info(mem, loaded.initrd, &e820, Some(rsdp))?,
        EntryKind::Linux64 => params::write_zero_page(
            mem,
            kernel.setup_header,
            cmdline_len,
            loaded.initrd,
            &e820,
            Some(rsdp),
        )?,
    };
    cpu::write_tables(mem, kernel.kind)?;
    mptable::write(mem, cfg.vcpus)?;
    Ok(boot_info)
}

/// Step 5: vCPUs: CPUID, MSRs, LAPIC, and the boot vCPU's registers.
fn create_vcpus(
    cfg: &VmConfig,
    vm: &Vm,
    kernel: KernelEntry,
    boot_info: u64,
    hypervisor: &str,
) -> Result<Vec<Vcpu>, VmmError> {
    let policy = cpuid::resolve(cfg.cpu_policy, hypervisor);
    let supported = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::apply(&mut entries, policy, id, cfg.vcpus);
        let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(KvmError::MsrList)?;
        vcpu.set_cpuid(&cpuid)?;
        let refused = vcpu.set_msrs(&cpu::boot_msrs())?;
        if !refused.is_empty() && id == 0 {
            eprintln!("runv-vmm: KVM refused boot MSRs {refused:x?}; continuing without them");
        }
        let mut lapic = vcpu.lapic()?;
        cpu::set_lint_pins(&mut lapic.regs);
        vcpu.set_lapic(&lapic)?;
        if id == 0 {
            vcpu.set_sregs(&cpu::boot_sregs(vcpu.sregs()?, kernel.kind))?;
            vcpu.set_regs(&cpu::boot_regs(kernel.kind, kernel.entry, boot_info))?;
            vcpu.set_fpu(&cpu::boot_fpu())?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The seccomp allowlist of one thread kind, when the config asks for
/// seccomp; each thread installs its own at its start.
fn seccomp_filter(cfg: &VmConfig, kind: ThreadKind) -> Result<Option<Filter>, VmmError> {
    Ok(if cfg.seccomp {
        Some(Filter::for_thread(kind)?)
    } else {
        None
    })
}

/// The devices of step 6, as the threads of step 8 need them.
struct Devices {
    serial: Arc<Mutex<serial::SerialDevice>>,
    buses: Buses,
    /// Virtio devices with a host fd, for the host I/O thread.
    watched: Vec<Watched>,
}

/// Step 6: devices: the IOAPIC, the serial port, the other port I/O devices and
/// the virtio-mmio transports.
fn build_devices(
    cfg: &VmConfig,
    vm: &Vm,
    mem: &Arc<GuestMemoryMmap>,
    shared: &Shared,
    virtio: Vec<Box<dyn VirtioDevice>>,
) -> Result<Devices, VmmError> {
    let sink = serial::SerialSink::open(
        &cfg.serial,
        shared.counters.get("serial_tx_bytes_total"),
        shared.counters.get("serial_dropped_bytes_total"),
        seccomp_filter(cfg, ThreadKind::Control)?,
    )?;
    let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(KvmMsiSink {
        irq: vm.interrupts(),
        delivered: shared.counters.get("irq_msi_total"),
        errors: shared.counters.get("irq_msi_errors_total"),
    }))));
    let serial = Arc::new(Mutex::new(serial::SerialDevice::with_irq(
        sink,
        IrqLine::new(ioapic.clone(), serial::COM1_IRQ),
    )));
    let pio = port_io_bus(shared, &serial, &ioapic)?;
    let (mmio, watched) = mmio_bus(mem, shared, &ioapic, virtio)?;
    Ok(Devices {
        serial,
        buses: Buses {
            pio,
            mmio,
            ioapic: Some(ioapic),
        },
        watched,
    })
}

/// The port I/O bus: COM1, the i8042, ACPI sleep control and GED events
/// (whose power button raises its IOAPIC line), pvpanic.
fn port_io_bus(
    shared: &Shared,
    serial: &Arc<Mutex<serial::SerialDevice>>,
    ioapic: &Arc<Mutex<Ioapic>>,
) -> Result<Bus, VmmError> {
    let mut pio = Bus::new();
    pio.insert(serial::COM1_BASE, serial::COM1_LEN, serial.clone())?;
    pio.insert(
        i8042::I8042_BASE,
        i8042::I8042_LEN,
        Arc::new(Mutex::new(i8042::I8042)),
    )?;
    let button = &shared.power_button;
    pio.insert(
        power::SLEEP_CTL_PORT,
        power::SLEEP_CTL_LEN,
        Arc::new(Mutex::new(power::SleepControl::new(button.clone()))),
    )?;
    pio.insert(
        power::GED_EVENT_PORT,
        power::GED_EVENT_LEN,
        Arc::new(Mutex::new(power::GedEvents::new(button.clone()))),
    )?;
    button.connect(IrqLine::new(ioapic.clone(), power::GED_GSI as usize));
    pio.insert(power::PVPANIC_PORT, 1, Arc::new(Mutex::new(power::PvPanic)))?;
    Ok(pio)
}

/// The MMIO bus: the IOAPIC and one virtio-mmio transport per device, in
/// slot order; also returns the transports whose device has a host fd.
fn mmio_bus(
    mem: &Arc<GuestMemoryMmap>,
    shared: &Shared,
    ioapic: &Arc<Mutex<Ioapic>>,
    virtio: Vec<Box<dyn VirtioDevice>>,
) -> Result<(Bus, Vec<Watched>), VmmError> {
    let mut mmio = Bus::new();
    mmio.insert(ioapic::IOAPIC_BASE, ioapic::IOAPIC_LEN, ioapic.clone())?;
    let mut watched = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let (addr, irq) = mmio_slot(i);
        let name = format!("virtio{i}");
        let transport = MmioTransport::new(
            dev,
            mem.clone(),
            shared.counters.get(&format!("{name}_notifications_total")),
            shared.counters.get(&format!("{name}_faults_total")),
        )
        .with_irq(IrqLine::new(ioapic.clone(), irq as usize));
        let host_fd = transport.host_fd();
        let transport = Arc::new(Mutex::new(transport));
        if let Some((fd, queue)) = host_fd {
            watched.push(Watched {
                fd,
                queue,
                transport: transport.clone(),
            });
        }
        mmio.insert(addr, MMIO_SLOT, transport)?;
    }
    Ok((mmio, watched))
}

/// Step 7: the control socket (bound), then the jail: from here on the process
/// opens nothing on the host.
fn bind_control_and_enter_jail(cfg: &VmConfig) -> Result<Option<UnixListener>, VmmError> {
    let control = cfg
        .control_socket
        .as_deref()
        .map(control::bind)
        .transpose()?;
    if let Some(jail) = &cfg.jail {
        crate::jail::enter(jail)?;
    }
    Ok(control)
}

/// Step 8: threads: serial socket acceptor, control socket, host I/O, vCPUs.
/// Returns the main thread's seccomp filter, for [`Running::wait`].
fn start_threads(
    cfg: &VmConfig,
    shared: &Arc<Shared>,
    devices: Devices,
    control: Option<(UnixListener, Facts)>,
    vcpus: Vec<Vcpu>,
) -> Result<Option<Filter>, VmmError> {
    lock(&devices.serial).start()?;
    if let Some((listener, facts)) = control {
        let filter = seccomp_filter(cfg, ThreadKind::Control)?;
        control::serve(listener, shared.clone(), facts, filter)?;
    }
    let io_filter = seccomp_filter(cfg, ThreadKind::Io)?;
    io_thread::spawn(devices.watched, shared.clone(), io_filter).map_err(VmmError::Thread)?;
    let main_filter = seccomp_filter(cfg, ThreadKind::Main)?;
    let vcpu_filter = seccomp_filter(cfg, ThreadKind::Vcpu)?;
    vcpu::install_kick_handler().map_err(VmmError::Signal)?;
    let kicker = Arc::new(SignalKicker::default());
    shared.set_kicker(kicker.clone());
    for v in vcpus {
        let buses = devices.buses.clone();
        let h =
            vcpu::spawn(v, buses, shared.clone(), vcpu_filter.clone()).map_err(VmmError::Thread)?;
        kicker.add(h);
    }
    Ok(main_filter)
}

impl Running {
    /// Waits until the VM ends (or `stop` returns true between checks). Call
    /// it on the thread that will then report the exit (the main thread): it
    /// installs the main thread's seccomp filter first.
    pub fn wait(&self, mut stop: impl FnMut() -> bool) -> ExitRecord {
        if let Err(e) = crate::seccomp::enter(ThreadKind::Main, self.main_filter.as_ref()) {
            self.shared.request_exit(
                ExitReason::VmmError,
                format!("seccomp: {}", crate::error_chain(&e)),
            );
        }
        loop {
            if let Some(r) = self.shared.wait_exit(Duration::from_millis(50)) {
                lock(&self.serial).flush();
                return r;
            }
            if stop() {
                self.shared
                    .request_exit(ExitReason::Killed, "VMM received a termination signal");
            }
        }
    }
}

/// The IOAPIC's way into KVM: `KVM_SIGNAL_MSI` per interrupt, and the
/// redirection table mirrored into GSI routes so KVM reports EOIs of
/// level-triggered vectors (see `devices/ioapic.rs`). Failures are counted,
/// never fatal: a guest can program an entry no LAPIC accepts.
struct KvmMsiSink {
    irq: Interrupts,
    delivered: Arc<std::sync::atomic::AtomicU64>,
    errors: Arc<std::sync::atomic::AtomicU64>,
}

impl MsiSink for KvmMsiSink {
    fn signal(&self, msi: Msi) {
        use std::sync::atomic::Ordering::Relaxed;
        match self.irq.signal_msi(msi.address, msi.data) {
            Ok(true) => self.delivered.fetch_add(1, Relaxed),
            Ok(false) | Err(_) => self.errors.fetch_add(1, Relaxed),
        };
    }

    fn routes_changed(&self, routes: &[Option<Msi>; ioapic::PINS]) {
        let table: Vec<(u32, u64, u32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(pin, m)| m.map(|m| (pin as u32, m.address, m.data)))
            .collect();
        if self.irq.set_msi_routes(&table).is_err() {
            self.errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Address and interrupt line of virtio-mmio slot `i`.
pub fn mmio_slot(i: usize) -> (u64, u32) {
    (
        MMIO_START + i as u64 * MMIO_SLOT,
        FIRST_VIRTIO_IRQ + i as u32,
    )
}

/// First legacy interrupt line given to virtio-mmio devices.
const FIRST_VIRTIO_IRQ: u32 = 5;

// One IOAPIC pin per virtio device, from FIRST_VIRTIO_IRQ up to the pin below
// the ACPI GED's (power::GED_GSI, the last one): the API's MAX_VIRTIO_DEVICES,
// which VmConfig::validate enforces.
const _: () = assert!(MAX_VIRTIO_DEVICES == (power::GED_GSI - FIRST_VIRTIO_IRQ) as usize);
const _: () = assert!(serial::COM1_IRQ < FIRST_VIRTIO_IRQ as usize);

/// The virtio devices `cfg` asks for, in slot order: disks, rng, net, vsock.
fn virtio_devices(
    cfg: &VmConfig,
    counters: &Counters,
) -> Result<Vec<Box<dyn VirtioDevice>>, VmmError> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let disk = FileDisk::open(&d.path, d.read_only)?;
        let c = BlockCounters {
            read_bytes: counters.get(&format!("block{i}_read_bytes_total")),
            write_bytes: counters.get(&format!("block{i}_write_bytes_total")),
            requests: counters.get(&format!("block{i}_requests_total")),
            errors: counters.get(&format!("block{i}_errors_total")),
        };
        out.push(Box::new(Block::new(Box::new(disk), d.read_only, c)));
    }
    if cfg.rng {
        out.push(Box::new(Rng {
            bytes: counters.get("rng_bytes_total"),
        }));
    }
    for (i, n) in cfg.net.iter().enumerate() {
        let mac = match &n.mac {
            Some(m) => parse_mac(m).map_err(VmmError::Config)?,
            None => [0x02, 0x72, 0x75, 0x6e, 0x76, i as u8],
        };
        let c = NetCounters {
            rx_bytes: counters.get(&format!("net{i}_rx_bytes_total")),
            tx_bytes: counters.get(&format!("net{i}_tx_bytes_total")),
            dropped: counters.get(&format!("net{i}_dropped_frames_total")),
        };
        out.push(Box::new(Net::new(Box::new(Tap::open(&n.tap)?), mac, c)));
    }
    if let Some(v) = &cfg.vsock {
        let c = VsockCounters {
            rx_bytes: counters.get("vsock_rx_bytes_total"),
            tx_bytes: counters.get("vsock_tx_bytes_total"),
            connections: counters.get("vsock_connections_total"),
            resets: counters.get("vsock_resets_total"),
        };
        // Jailed: relative to the jail root, the working directory (see `start`).
        let uds_path = match &cfg.jail {
            Some(j) => {
                let inside = j
                    .inside("vsock.udsPath", &v.uds_path)
                    .map_err(VmmError::Config)?;
                inside.strip_prefix("/").unwrap_or(&inside).to_owned()
            }
            None => v.uds_path.clone(),
        };
        out.push(Box::new(Vsock::new(u64::from(v.guest_cid), uds_path, c)?));
    }
    Ok(out)
}

/// `cfg` with every relative path made absolute against the working directory.
fn with_absolute_paths(cfg: &VmConfig) -> std::io::Result<VmConfig> {
    let abs = |p: &Path| std::path::absolute(p);
    let mut c = cfg.clone();
    c.kernel = abs(&c.kernel)?;
    if let Some(i) = &c.initrd {
        c.initrd = Some(abs(i)?);
    }
    for d in &mut c.disks {
        d.path = abs(&d.path)?;
    }
    match &mut c.serial {
        runv_vmm_api::SerialConfig::File { path, rotate } => {
            *path = abs(path)?;
            if let Some(r) = rotate {
                r.previous = abs(&r.previous)?;
            }
        }
        runv_vmm_api::SerialConfig::Socket { path } => {
            *path = abs(path)?;
        }
        _ => {}
    }
    Ok(c)
}

/// The exit file and the control socket as this process reaches them now:
/// the configured host paths, or their in-jail paths once it entered its jail.
pub fn exit_paths(cfg: &VmConfig) -> (Option<PathBuf>, Option<PathBuf>) {
    let exit = cfg.exit_file_path();
    let socket = cfg.control_socket.clone();
    match &cfg.jail {
        Some(j) if crate::jail::entered() => (
            exit.and_then(|p| j.inside("exitFile", &p).ok()),
            socket.and_then(|p| j.inside("controlSocket", &p).ok()),
        ),
        _ => (exit, socket),
    }
}

/// Writes the exit record as JSON (best effort: the stderr line is the fallback).
pub fn write_exit_file(path: &Path, record: &ExitRecord) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(record).unwrap_or_default().as_bytes())?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_vmm_api::DiskConfig;

    #[test]
    fn virtio_slots_stop_below_the_ged_pin() {
        let (_, last) = mmio_slot(MAX_VIRTIO_DEVICES - 1);
        assert_eq!(last + 1, power::GED_GSI);
        let mut cfg = VmConfig::new("k");
        cfg.rng = true;
        for i in 0..MAX_VIRTIO_DEVICES - 1 {
            cfg.disks.push(DiskConfig {
                path: format!("d{i}").into(),
                read_only: true,
            });
        }
        assert!(cfg.validate().is_ok());
        cfg.vsock = Some(runv_vmm_api::VsockConfig {
            guest_cid: 3,
            uds_path: "v".into(),
        });
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("19 virtio devices") && e.contains("at most 18"),
            "{e}"
        );
    }
}

//! KVM behind two small types, [`Vm`] and [`Vcpu`].
//!
//! This module owns every KVM ioctl the VMM issues, so boot and device code can
//! be written (and tested) against plain data. It must not know about devices,
//! guest layout or the config: callers pass registers, CPUID and memory in.

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, KvmIrqRouting, Msrs,
    kvm_enable_cap, kvm_fpu, kvm_irq_routing_entry, kvm_lapic_state, kvm_msi, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors from KVM ioctls.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("opening /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("creating the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("enabling the split irqchip: {0}")]
    SplitIrqchip(kvm_ioctls::Error),
    #[error("creating the in-kernel irqchip: {0}")]
    Irqchip(kvm_ioctls::Error),
    #[error("setting the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("registering guest memory: {0}")]
    Memory(kvm_ioctls::Error),
    #[error("reading supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("creating vCPU {0}: {1}")]
    CreateVcpu(u8, kvm_ioctls::Error),
    #[error("vCPU setup ({0}): {1}")]
    VcpuSetup(&'static str, kvm_ioctls::Error),
    #[error("building the MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM_RUN: {0}")]
    Run(kvm_ioctls::Error),
}

/// Which interrupt controller layout a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqchipMode {
    /// No in-kernel interrupt controller at all.
    None,
    /// In-kernel LAPICs, IOAPIC/PIC in userspace (KVM_CAP_SPLIT_IRQCHIP).
    Split,
    /// In-kernel LAPIC, IOAPIC and PIC plus an in-kernel PIT.
    FullWithPit,
}

/// `kvm_pvm` when the shadow-paging PVM module is loaded, else `kvm`.
pub fn hypervisor_name() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else {
        "kvm"
    }
}

/// A VM: one KVM VM file descriptor.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
}

/// Number of IOAPIC routes reserved for the userspace IOAPIC with a split irqchip.
const SPLIT_IRQCHIP_ROUTES: u64 = 24;
/// Where KVM puts its 3-page TSS area on Intel; just below the 4 GiB BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    /// Opens /dev/kvm and creates a VM with the given irqchip layout.
    pub fn new(irqchip: IrqchipMode) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(KvmError::ApiVersion(v));
        }
        let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        // Hardware VMX needs a TSS area; kvm_pvm accepts and ignores it.
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(KvmError::Tss)?;
        match irqchip {
            IrqchipMode::None => {}
            IrqchipMode::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                cap.args[0] = SPLIT_IRQCHIP_ROUTES;
                fd.enable_cap(&cap).map_err(KvmError::SplitIrqchip)?;
            }
            IrqchipMode::FullWithPit => {
                fd.create_irq_chip().map_err(KvmError::Irqchip)?;
                fd.create_pit2(kvm_bindings::kvm_pit_config::default())
                    .map_err(KvmError::Irqchip)?;
            }
        }
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
        })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| KvmError::Memory(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range belongs to `mem`, which the caller keeps alive for
            // as long as the VM exists (the Vmm owns both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(KvmError::Memory)?;
        }
        Ok(())
    }

    /// CPUID leaves KVM can offer on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }

    /// A handle that injects interrupts into this VM from any thread.
    pub fn interrupts(&self) -> Interrupts {
        Interrupts {
            fd: self.fd.clone(),
        }
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| KvmError::CreateVcpu(id, e))?;
        Ok(Vcpu { id, fd })
    }
}

/// Interrupt injection into a VM with a split irqchip (MSIs to the in-kernel
/// LAPICs), usable from any thread.
#[derive(Debug, Clone)]
pub struct Interrupts {
    fd: Arc<VmFd>,
}

impl Interrupts {
    /// `KVM_SIGNAL_MSI`: Ok(true) if a LAPIC accepted it, Ok(false) if none did.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<bool, kvm_ioctls::Error> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd.signal_msi(msi).map(|n| n > 0)
    }

    /// `KVM_IRQFD`: writing to `fd` injects GSI `gsi` (through its route).
    /// Only the benchmark uses it, to compare with [`Self::signal_msi`].
    pub fn register_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.fd.register_irqfd(fd, gsi)
    }

    /// `KVM_SET_GSI_ROUTING` with one MSI route per `(gsi, address, data)`.
    pub fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), kvm_ioctls::Error> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|&(gsi, address, data)| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = address as u32;
                e.u.msi.address_hi = (address >> 32) as u32;
                e.u.msi.data = data;
                e
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        self.fd.set_gsi_routing(&table)
    }
}

/// What a vCPU exit asks of the VMM, stripped of KVM types.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// The guest's LAPIC EOI'd a level-triggered vector routed through the
    /// userspace IOAPIC (split irqchip).
    IoapicEoi(u8),
    /// The vCPU halted and KVM handed the halt to userspace.
    Hlt,
    /// The run was interrupted by a signal (a kick); check for pause or stop.
    Interrupted,
    /// Triple fault.
    Shutdown,
    /// PSCI-style system events from in-kernel devices.
    PowerOff,
    Reset,
    Crash,
    /// KVM could not go on: `suberror` is KVM's `internal.suberror`.
    InternalError {
        suberror: u32,
    },
    /// VM entry failed with a hardware reason.
    FailEntry {
        reason: u64,
    },
    /// Anything else, with KVM's exit number.
    Other(String),
}

/// One virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), KvmError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(|e| KvmError::VcpuSetup("cpuid", e))
    }

    /// Sets MSRs one at a time and returns the indices KVM refused.
    pub fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<Vec<u32>, KvmError> {
        let mut refused = Vec::new();
        for &(index, data) in msrs {
            let list = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .map_err(KvmError::MsrList)?;
            let n = self
                .fd
                .set_msrs(&list)
                .map_err(|e| KvmError::VcpuSetup("msrs", e))?;
            if n != 1 {
                refused.push(index);
            }
        }
        Ok(refused)
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), KvmError> {
        self.fd
            .set_regs(regs)
            .map_err(|e| KvmError::VcpuSetup("regs", e))
    }

    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd
            .get_regs()
            .map_err(|e| KvmError::VcpuSetup("get regs", e))
    }

    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd
            .get_sregs()
            .map_err(|e| KvmError::VcpuSetup("get sregs", e))
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), KvmError> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| KvmError::VcpuSetup("sregs", e))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), KvmError> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| KvmError::VcpuSetup("fpu", e))
    }

    pub fn lapic(&self) -> Result<kvm_lapic_state, KvmError> {
        self.fd
            .get_lapic()
            .map_err(|e| KvmError::VcpuSetup("get lapic", e))
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), KvmError> {
        self.fd
            .set_lapic(lapic)
            .map_err(|e| KvmError::VcpuSetup("lapic", e))
    }

    /// Makes the next `run` return at once (set before kicking with a signal).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Runs the vCPU until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, KvmError> {
        let run_area: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(KvmError::Run(e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn(port, data),
            KvmExit::IoOut(port, data) => VcpuExit::IoOut(port, data),
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
            KvmExit::IoapicEoi(vector) => VcpuExit::IoapicEoi(vector),
            KvmExit::Hlt => VcpuExit::Hlt,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VcpuExit::Crash,
                k => VcpuExit::Other(format!("system event {k}")),
            },
            KvmExit::InternalError => {
                // SAFETY: `run_area` points into the kvm_run mapping owned by `self.fd`,
                // which lives as long as `self`; exit_reason is KVM_EXIT_INTERNAL_ERROR,
                // so `internal` is the union member KVM filled in.
                let suberror = unsafe { (*run_area).__bindgen_anon_1.internal.suberror };
                VcpuExit::InternalError { suberror }
            }
            KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
            other => VcpuExit::Other(format!("{other:?}")),
        })
    }
}

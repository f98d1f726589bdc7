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
    #[error("opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("creating the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("enabling the split irqchip")]
    SplitIrqchip(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel irqchip")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("setting the TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("registering guest memory")]
    Memory(#[source] kvm_ioctls::Error),
    #[error("reading supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("creating vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU setup ({0})")]
    VcpuSetup(&'static str, #[source] kvm_ioctls::Error),
    #[error("building the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_RUN")]
    Run(#[source] kvm_ioctls::Error),
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

/// A VM: one KVM VM file descriptor, and the guest memory registered with it.
///
/// The VM owns that memory so that KVM never keeps a slot on an unmapped
/// range: other handles ([`Interrupts`], [`Vcpu`]) keep the kernel's VM alive
/// after this value is gone, so `Drop` deletes the slots before the memory is
/// released (a struct's `drop` runs before its fields are dropped).
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// Registered guest memory and the number of slots it occupies (0 to n-1).
    memory: Option<(Arc<GuestMemoryMmap>, u32)>,
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
            memory: None,
        })
    }

    /// Registers every region of `mem` as a KVM memory slot, once per VM. The
    /// VM keeps `mem` until its slots are deleted (see [`Vm`]).
    pub fn register_memory(&mut self, mem: Arc<GuestMemoryMmap>) -> Result<(), KvmError> {
        if self.memory.is_some() {
            return Err(KvmError::Memory(kvm_ioctls::Error::new(libc::EEXIST)));
        }
        // Held from the first slot on, so a failure part-way deletes what was added.
        let (mem, slots) = self.memory.insert((mem, 0));
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
            // SAFETY: the host range is `region`'s own mapping, and `self.memory`
            // holds a reference to it from now on: `Drop for Vm` deletes this slot
            // before that reference goes, and leaks the memory if KVM refuses.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(KvmError::Memory)?;
            *slots = slot as u32 + 1;
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

impl Drop for Vm {
    fn drop(&mut self) {
        let Some((mem, slots)) = self.memory.take() else {
            return;
        };
        for slot in 0..slots {
            let r = kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: a zero-sized region deletes the slot: KVM is given no memory
            // and drops its reference to the range registered for that slot.
            if unsafe { self.fd.set_user_memory_region(r) }.is_err() {
                // KVM may still map this memory: it must never be unmapped.
                std::mem::forget(mem);
                return;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, MemoryRegionAddress};

    const SIZE: usize = 0x10000;

    /// A VM without an irqchip, or None (with a message) when there is no KVM
    /// and `RUNV_REQUIRE_KVM=1` is not set.
    fn vm_or_skip(test: &str) -> Option<Vm> {
        match Vm::new(IrqchipMode::None) {
            Ok(vm) => Some(vm),
            Err(e) if std::env::var("RUNV_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("{test}: skipping: {e} (set RUNV_REQUIRE_KVM=1 to fail instead)");
                None
            }
            Err(e) => panic!("{test}: KVM is required (RUNV_REQUIRE_KVM=1): {e}"),
        }
    }

    fn one_region() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap()
    }

    /// Puts `mem`'s only region in `slot`, at guest address 0.
    fn set_slot(fd: &VmFd, slot: u32, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
        let host = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap();
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: callers declare `mem` before every handle of the VM, so it is
        // unmapped only after the last handle has closed and the VM is gone.
        unsafe { fd.set_user_memory_region(r) }
    }

    /// KVM refuses a slot that overlaps another (EEXIST), which shows whether
    /// the VM still has a slot on the first memory after the `Vm` is dropped
    /// while another handle keeps the kernel's VM alive.
    #[test]
    fn a_dropped_vm_leaves_no_slot_on_its_memory_when_the_memory_goes() {
        // Declared before every VM handle, so it outlives them (see `set_slot`).
        let other = one_region();
        let Some(mut vm) =
            vm_or_skip("a_dropped_vm_leaves_no_slot_on_its_memory_when_the_memory_goes")
        else {
            return;
        };
        let mem = Arc::new(one_region());
        let weak = Arc::downgrade(&mem);
        vm.register_memory(mem).unwrap();
        let fd = vm.fd.clone();
        let e = set_slot(&fd, 7, &other).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "the registered range is taken");

        drop(vm);
        assert!(weak.upgrade().is_none(), "the VM's memory is unmapped");
        set_slot(&fd, 7, &other).expect("no slot is left on the unmapped range");
    }

    #[test]
    fn memory_is_registered_once() {
        let Some(mut vm) = vm_or_skip("memory_is_registered_once") else {
            return;
        };
        vm.register_memory(Arc::new(one_region())).unwrap();
        let e = vm.register_memory(Arc::new(one_region())).unwrap_err();
        assert!(
            matches!(e, KvmError::Memory(ref e) if e.errno() == libc::EEXIST),
            "{e}"
        );
    }
}

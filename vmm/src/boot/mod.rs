//! Boot: everything between "guest memory exists" and "vCPUs may run".
//!
//! The sequence (see docs/vmm-boot.md): load the kernel (ELF with or without a
//! PVH note, or bzImage) → load the initrd → write the command line → write the
//! boot information (zero page or hvm_start_info, with the e820 map) → MP table
//! and ACPI tables → per-vCPU CPUID, MSRs, registers and page tables. This module
//! owns the load step and the plan; the submodules own the data structures. It
//! must not create VMs or vCPUs.

pub mod acpi;
pub mod cpu;
pub mod cpuid;
pub mod mptable;
pub mod params;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::{
    BzImage, Cmdline, KernelLoader, bootparam::setup_header, elf::Elf, elf::PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{CMDLINE_ADDR, CMDLINE_MAX, HIGH_RAM_START, Layout};

/// Errors from loading the kernel, initrd and boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {0}")]
    Open(String, #[source] std::io::Error),
    #[error("loading the kernel")]
    Kernel(#[source] linux_loader::loader::Error),
    #[error("kernel is neither an ELF nor a bzImage")]
    UnknownFormat,
    #[error("command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("ACPI tables do not fit below 1 MiB")]
    AcpiTooLarge,
    #[error("initrd of {0} bytes does not fit in guest memory")]
    InitrdTooLarge(u64),
    #[error("writing boot data to guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// 32-bit protected mode, paging off, %ebx = hvm_start_info (PVH ELF note).
    Pvh,
    /// 64-bit long mode with identity paging, %rsi = boot_params.
    Linux64,
}

/// What the loader found: where to start and what boot information to write.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub kind: EntryKind,
    pub entry: u64,
    /// The bzImage's own setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Loads `path` into guest memory and decides the entry protocol.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelEntry, BootError> {
    let open = |e| BootError::Open(path.display().to_string(), e);
    let mut file = File::open(path).map_err(open)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(open)?;
    let highmem = Some(GuestAddress(HIGH_RAM_START));
    if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, highmem).map_err(BootError::Kernel)?;
        return Ok(match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                kind: EntryKind::Pvh,
                entry: addr.0,
                setup_header: None,
            },
            _ => KernelEntry {
                kind: EntryKind::Linux64,
                entry: r.kernel_load.0,
                setup_header: None,
            },
        });
    }
    let r = BzImage::load(mem, None, &mut file, highmem).map_err(|e| match e {
        linux_loader::loader::Error::Bzimage(_) => BootError::UnknownFormat,
        e => BootError::Kernel(e),
    })?;
    // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
    Ok(KernelEntry {
        kind: EntryKind::Linux64,
        entry: r.kernel_load.0 + 0x200,
        setup_header: r.setup_header,
    })
}

/// Places the initrd page-aligned at the top of the RAM below the device gap
/// (and at or below `max_addr`, the kernel's `initrd_addr_max`).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    path: &Path,
    max_addr: u64,
) -> Result<InitrdPlacement, BootError> {
    let open = |e| BootError::Open(path.display().to_string(), e);
    let mut file = File::open(path).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    let top = layout.low_ram_end().min(max_addr.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIGH_RAM_START + (16 << 20))
        .ok_or(BootError::InitrdTooLarge(size))?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)?;
    Ok(InitrdPlacement { addr, size })
}

/// Validates and writes the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<u64, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(BootError::Cmdline)?;
    }
    let c = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = c.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_ADDR))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_nul_terminated_and_length_checked() {
        let layout = Layout::new(16).unwrap();
        let mem = layout.allocate().unwrap();
        let n = write_cmdline(&mem, "console=ttyS0 test=x").unwrap();
        let mut buf = vec![0u8; n as usize];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 test=x\0");
        assert!(write_cmdline(&mem, &"a".repeat(CMDLINE_MAX + 1)).is_err());
    }

    #[test]
    fn non_kernels_are_refused() {
        let layout = Layout::new(16).unwrap();
        let mem = layout.allocate().unwrap();
        let dir = std::env::temp_dir().join(format!("runv-boot-test-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5au8; 8192]).unwrap();
        let err = load_kernel(&mem, &dir).unwrap_err();
        std::fs::remove_file(&dir).ok();
        assert!(
            matches!(err, BootError::UnknownFormat | BootError::Kernel(_)),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_ram() {
        let layout = Layout::new(64).unwrap();
        let mem = layout.allocate().unwrap();
        let path = std::env::temp_dir().join(format!("runv-initrd-test-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let p = load_initrd(&mem, &layout, &path, u64::from(u32::MAX)).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(p.addr % 4096, 0);
        assert!(p.addr + p.size <= 64 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(p.addr + 4999)).unwrap(), 7);
    }

    #[test]
    fn with_memory_above_4_gib_the_initrd_stays_below_the_gap() {
        use crate::memory::MMIO_GAP_START;
        let layout = Layout::new(5120).unwrap();
        let mem = layout.allocate().unwrap();
        let path = std::env::temp_dir().join(format!("runv-initrd-hi-{}", std::process::id()));
        std::fs::write(&path, vec![9u8; 5000]).unwrap();
        // A kernel that allows any 32-bit address: the top of the RAM below the gap.
        let p = load_initrd(&mem, &layout, &path, u64::from(u32::MAX)).unwrap();
        assert_eq!(p.addr, (MMIO_GAP_START - 5000) & !0xfff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(p.addr + 4999)).unwrap(), 9);
        // The default initrd_addr_max still wins when it is lower.
        let p = load_initrd(&mem, &layout, &path, 0x37ff_ffff).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(p.addr + p.size <= 0x3800_0000);
    }
}

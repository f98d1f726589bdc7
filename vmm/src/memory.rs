//! Guest physical memory: the fixed layout and its allocation.
//!
//! Owns where things live in guest-physical space (boot structures, RAM, the
//! virtio-mmio window) and the e820 map that describes it. Pure data plus one
//! allocation function; it must not talk to KVM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Errors from laying out or allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB does not fit below the device window")]
    TooLarge(u32),
    #[error("guest memory of {0} MiB is too small for the boot layout")]
    TooSmall(u32),
    #[error("allocating guest memory: {0}")]
    Alloc(String),
}

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories (0xb000..0xf000) identity-map the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// MP floating pointer and table (SMP discovery) live at the top of low memory.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// Top of the low-memory RAM range; 0x9fc00..0x100000 is reserved (EBDA, ROM).
pub const LOW_RAM_END: u64 = 0x9fc00;
/// ACPI tables live in the reserved BIOS area, where a kernel looks for the RSDP.
pub const ACPI_ADDR: u64 = 0xe0000;
pub const HIGH_RAM_START: u64 = 0x10_0000;
const _: () = assert!(BOOT_STACK_TOP < PML4_ADDR && BOOT_STACK_TOP > ZERO_PAGE_ADDR + 0x1000);

/// Start of the virtio-mmio device window (above all RAM).
pub const MMIO_START: u64 = 0xd000_0000;
/// Each virtio-mmio device gets one 4 KiB slot.
pub const MMIO_SLOT: u64 = 0x1000;

/// e820 memory type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 memory type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's RAM layout for `mib` MiB of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mem_bytes: u64,
}

impl Layout {
    pub fn new(mib: u32) -> Result<Self, MemoryError> {
        let mem_bytes = u64::from(mib) << 20;
        if mem_bytes > MMIO_START {
            return Err(MemoryError::TooLarge(mib));
        }
        if mem_bytes < 4 * HIGH_RAM_START {
            return Err(MemoryError::TooSmall(mib));
        }
        Ok(Self { mem_bytes })
    }

    /// End of RAM (exclusive).
    pub fn ram_end(&self) -> u64 {
        self.mem_bytes
    }

    /// The e820 map: low RAM, the reserved BIOS hole, high RAM.
    pub fn e820(&self) -> Vec<E820Entry> {
        vec![
            E820Entry {
                addr: 0,
                size: LOW_RAM_END,
                kind: E820_RAM,
            },
            E820Entry {
                addr: LOW_RAM_END,
                size: HIGH_RAM_START - LOW_RAM_END,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIGH_RAM_START,
                size: self.mem_bytes - HIGH_RAM_START,
                kind: E820_RAM,
            },
        ]
    }

    /// Allocates the guest memory as one anonymous mapping (pages are touched lazily).
    pub fn allocate(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let len = usize::try_from(self.mem_bytes).map_err(|e| MemoryError::Alloc(e.to_string()))?;
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| MemoryError::Alloc(e.to_string()))
    }
}

/// Bytes of guest memory currently resident in host RAM (touched by the guest
/// or the VMM), from mincore(2). Used to report the VMM's own overhead.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    const PAGE: usize = 4096;
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: `host..host+len` is the region's own mapping, alive while `mem` is
        // borrowed; `vec` has one byte per page of that range, as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_hole() {
        let l = Layout::new(128).unwrap();
        let map = l.e820();
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIGH_RAM_START - LOW_RAM_END));
        assert_eq!(map[2].addr + map[2].size, 128 << 20);
        for w in map.windows(2) {
            assert_eq!(w[0].addr + w[0].size, w[1].addr, "map has a gap or overlap");
        }
    }

    #[test]
    fn resident_bytes_counts_touched_pages_only() {
        use vm_memory::Bytes;
        let m = Layout::new(16).unwrap().allocate().unwrap();
        let before = resident_bytes(&m);
        for page in 0..10u64 {
            m.write_obj(1u8, GuestAddress(HIGH_RAM_START + page * 4096))
                .unwrap();
        }
        assert_eq!(resident_bytes(&m) - before, 10 * 4096);
    }

    #[test]
    fn sizes_outside_the_layout_are_refused() {
        assert!(matches!(Layout::new(2), Err(MemoryError::TooSmall(2))));
        assert!(matches!(
            Layout::new(4096),
            Err(MemoryError::TooLarge(4096))
        ));
        assert!(Layout::new(3072).is_ok());
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 0x8),
            (PVH_INFO_ADDR, 0x60),
            (PVH_MEMMAP_ADDR, 24 * 8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x4000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
            (
                MPTABLE_ADDR,
                LOW_RAM_END.saturating_sub(MPTABLE_ADDR).max(0x400),
            ),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?}");
        }
    }
}

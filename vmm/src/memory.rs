//! Guest physical memory: the fixed layout and its allocation.
//!
//! Owns where things live in guest-physical space (boot structures, RAM, the
//! 32-bit device gap with the virtio-mmio window, IOAPIC and LAPIC) and the
//! e820 map that describes it. Pure data plus one allocation function; it must
//! not talk to KVM.
//!
//! RAM is laid out as Firecracker and Cloud Hypervisor do on x86: from 0 up to
//! [`MMIO_GAP_START`] (3 GiB), then the rest from [`MMIO_GAP_END`] (4 GiB) up,
//! so devices keep their 32-bit addresses whatever the memory size.

use runv_vmm_api::config::MAX_MEMORY_MIB;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Errors from laying out or allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is more than the maximum of {MAX_MEMORY_MIB} MiB")]
    TooLarge(u32),
    #[error("guest memory of {0} MiB is too small for the boot layout")]
    TooSmall(u32),
    #[error("allocating guest memory")]
    Alloc(#[source] vm_memory::mmap::FromRangesError),
    #[error("allocating guest memory: a range does not fit this host's address space")]
    HostSize(#[source] std::num::TryFromIntError),
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

/// RAM below 4 GiB ends here; the 32-bit device gap runs from here to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit device gap; RAM beyond [`MMIO_GAP_START`] continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Start of the virtio-mmio device window (in the 32-bit gap, above all low RAM).
pub const MMIO_START: u64 = 0xd000_0000;
/// Each virtio-mmio device gets one 4 KiB slot.
pub const MMIO_SLOT: u64 = 0x1000;
/// Guest-physical base of every local APIC (in KVM), as the MADT and MP table announce it.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
// The device gap holds the virtio-mmio window, then the IOAPIC, then the LAPICs,
// and no RAM: keep these in step with `devices/ioapic.rs`.
const _: () = {
    use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_LEN};
    assert!(MMIO_GAP_START <= MMIO_START && MMIO_START < IOAPIC_BASE);
    assert!(IOAPIC_BASE + IOAPIC_LEN <= LAPIC_BASE && LAPIC_BASE + 0x1000 <= MMIO_GAP_END);
};

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
    /// All guest RAM, below and above the device gap.
    pub mem_bytes: u64,
}

impl Layout {
    /// Lays out `mib` MiB: at least 4 MiB, at most [`MAX_MEMORY_MIB`] (64 GiB).
    pub fn new(mib: u32) -> Result<Self, MemoryError> {
        let mem_bytes = u64::from(mib) << 20;
        if mib > MAX_MEMORY_MIB {
            return Err(MemoryError::TooLarge(mib));
        }
        if mem_bytes < 4 * HIGH_RAM_START {
            return Err(MemoryError::TooSmall(mib));
        }
        Ok(Self { mem_bytes })
    }

    /// End (exclusive) of the RAM below the device gap; the boot structures,
    /// kernel and initrd all live below it.
    pub fn low_ram_end(&self) -> u64 {
        self.mem_bytes.min(MMIO_GAP_START)
    }

    /// Bytes of RAM above 4 GiB (0 when everything fits below the gap).
    pub fn high_ram_bytes(&self) -> u64 {
        self.mem_bytes - self.low_ram_end()
    }

    /// End (exclusive) of the highest RAM address.
    pub fn ram_end(&self) -> u64 {
        match self.high_ram_bytes() {
            0 => self.low_ram_end(),
            high => MMIO_GAP_END + high,
        }
    }

    /// The guest-physical RAM ranges as (start, length): one below the gap,
    /// and one from 4 GiB when the memory does not fit below it.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges = vec![(0, self.low_ram_end())];
        if self.high_ram_bytes() > 0 {
            ranges.push((MMIO_GAP_END, self.high_ram_bytes()));
        }
        ranges
    }

    /// The e820 map: low RAM, the reserved BIOS hole, RAM up to the device
    /// gap, and RAM above 4 GiB if any. The gap itself is left out, as on a
    /// PC: a kernel treats holes in the map as device space.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
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
                size: self.low_ram_end() - HIGH_RAM_START,
                kind: E820_RAM,
            },
        ];
        if self.high_ram_bytes() > 0 {
            map.push(E820Entry {
                addr: MMIO_GAP_END,
                size: self.high_ram_bytes(),
                kind: E820_RAM,
            });
        }
        map
    }

    /// Allocates the guest memory as one anonymous mapping per RAM range
    /// (pages are touched lazily, so a large guest costs only what it uses).
    pub fn allocate(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let ranges = self
            .ram_ranges()
            .into_iter()
            .map(|(start, len)| {
                usize::try_from(len)
                    .map(|len| (GuestAddress(start), len))
                    .map_err(MemoryError::HostSize)
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Alloc)
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
        assert!(Layout::new(4).is_ok());
        assert!(Layout::new(MAX_MEMORY_MIB).is_ok());
        let e = Layout::new(MAX_MEMORY_MIB + 1).unwrap_err();
        assert!(matches!(e, MemoryError::TooLarge(65537)), "{e}");
        assert_eq!(
            e.to_string(),
            "guest memory of 65537 MiB is more than the maximum of 65536 MiB"
        );
        assert!(matches!(
            Layout::new(u32::MAX),
            Err(MemoryError::TooLarge(u32::MAX))
        ));
    }

    /// RAM summed over the map's RAM entries, as a kernel (and the test guest) sums it.
    fn e820_ram(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    /// Checks the map is sorted, free of overlaps, keeps RAM out of the device
    /// gap, and matches the allocated regions.
    fn check_layout(mib: u32) -> Layout {
        let l = Layout::new(mib).unwrap();
        let map = l.e820();
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{mib}: {map:x?}");
        }
        for e in &map {
            let end = e.addr + e.size;
            assert!(e.size > 0, "{mib}: empty entry {e:x?}");
            assert!(
                end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
                "{mib}: {e:x?} reaches into the device gap"
            );
        }
        let bios_hole = HIGH_RAM_START - LOW_RAM_END;
        assert_eq!(e820_ram(&map), l.mem_bytes - bios_hole, "{mib}");
        assert_eq!(l.mem_bytes, u64::from(mib) << 20);
        let mem = l.allocate().unwrap();
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, l.ram_ranges(), "{mib}");
        // Every RAM entry is backed by guest memory.
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(
                mem.check_range(GuestAddress(e.addr), e.size as usize),
                "{mib}: {e:x?}"
            );
        }
        l
    }

    #[test]
    fn memory_below_the_gap_is_one_range() {
        for mib in [4, 128, 3071, 3072] {
            let l = check_layout(mib);
            assert_eq!(l.ram_ranges().len(), 1, "{mib}");
            assert_eq!(l.e820().len(), 3, "{mib}");
            assert_eq!(l.high_ram_bytes(), 0);
            assert_eq!(l.ram_end(), u64::from(mib) << 20);
        }
        // Exactly 3 GiB ends at the start of the gap, with no range above it.
        assert_eq!(Layout::new(3072).unwrap().low_ram_end(), MMIO_GAP_START);
    }

    #[test]
    fn memory_above_3_gib_continues_at_4_gib() {
        let l = check_layout(3073);
        assert_eq!(
            l.ram_ranges(),
            vec![(0, MMIO_GAP_START), (1 << 32, 1 << 20)]
        );
        let map = l.e820();
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 32,
                size: 1 << 20,
                kind: E820_RAM
            }
        );
        assert_eq!(l.ram_end(), (4 << 30) + (1 << 20));

        let l = check_layout(4608);
        assert_eq!(l.low_ram_end(), 3 << 30);
        assert_eq!(l.high_ram_bytes(), 1536 << 20);
        assert_eq!(l.ram_end(), (4 << 30) + (1536 << 20));
    }

    #[test]
    fn the_maximum_is_64_gib_with_61_gib_above_the_gap() {
        let l = check_layout(MAX_MEMORY_MIB);
        assert_eq!(MAX_MEMORY_MIB, 64 * 1024);
        assert_eq!(l.high_ram_bytes(), 61 << 30);
        assert_eq!(l.ram_end(), 65 << 30);
        // The mapping is lazy: touching its last page costs one page.
        use vm_memory::Bytes;
        let mem = l.allocate().unwrap();
        mem.write_obj(0xa5u8, GuestAddress(l.ram_end() - 1))
            .unwrap();
        let resident = resident_bytes(&mem);
        assert!(resident > 0 && resident <= 2 << 20, "{resident}");
        assert!(mem.write_obj(0u8, GuestAddress(l.ram_end())).is_err());
        assert!(mem.write_obj(0u8, GuestAddress(MMIO_GAP_START)).is_err());
    }

    #[test]
    fn devices_sit_in_the_gap_between_low_and_high_ram() {
        use crate::devices::ioapic::IOAPIC_BASE;
        let l = Layout::new(MAX_MEMORY_MIB).unwrap();
        let mem = l.allocate().unwrap();
        for addr in [
            MMIO_START,
            MMIO_START + 31 * MMIO_SLOT,
            IOAPIC_BASE,
            LAPIC_BASE,
        ] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr), "{addr:#x}");
            assert!(
                !l.e820()
                    .iter()
                    .any(|e| (e.addr..e.addr + e.size).contains(&addr)),
                "{addr:#x} is in the e820 map"
            );
            assert!(!vm_memory::GuestMemoryBackend::address_in_range(
                &mem,
                GuestAddress(addr)
            ));
        }
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

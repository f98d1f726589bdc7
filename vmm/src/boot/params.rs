//! Boot information structures: the Linux zero page (`boot_params`) and the
//! PVH `hvm_start_info` with its memory map.
//!
//! Owns their layout in guest memory; pure writes over [`GuestMemoryMmap`], so
//! unit tests check every field the guest reads.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, InitrdPlacement};
use crate::memory::{CMDLINE_ADDR, E820Entry, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, ZERO_PAGE_ADDR};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `loadflags`: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// `loadflags`: the boot loader set heap_end_ptr; harmless for direct boot.
const CAN_USE_HEAP: u8 = 0x80;

const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u32 = 1;
/// Size of one `hvm_memmap_table_entry`.
const PVH_MEMMAP_ENTRY: u64 = 24;

/// Writes the Linux zero page at [`ZERO_PAGE_ADDR`] and returns its address.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    image_header: Option<setup_header>,
    cmdline_len: u64,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
    rsdp: Option<u64>,
) -> Result<u64, BootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(hdr) = image_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(ZERO_PAGE_ADDR)
}

/// Writes `hvm_start_info` at [`PVH_INFO_ADDR`] and its memory map, returning
/// the start_info address for %ebx.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
    rsdp: Option<u64>,
) -> Result<u64, BootError> {
    // hvm_start_info (version 1): magic, version, flags, nr_modules, modlist_paddr,
    // cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut info = [0u8; 56];
    let mut put = |off: usize, bytes: &[u8]| info[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &PVH_MAGIC.to_le_bytes());
    put(4, &PVH_VERSION.to_le_bytes());
    put(24, &CMDLINE_ADDR.to_le_bytes());
    put(32, &rsdp.unwrap_or(0).to_le_bytes());
    put(40, &PVH_MEMMAP_ADDR.to_le_bytes());
    put(48, &(e820.len() as u32).to_le_bytes());
    if let Some(i) = initrd {
        // One module (the initrd) described right after start_info.
        let modlist = PVH_INFO_ADDR + 0x40;
        put(12, &1u32.to_le_bytes());
        put(16, &modlist.to_le_bytes());
        let mut module = [0u8; 32];
        module[0..8].copy_from_slice(&i.addr.to_le_bytes());
        module[8..16].copy_from_slice(&i.size.to_le_bytes());
        mem.write_slice(&module, GuestAddress(modlist))?;
    }
    mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))?;
    for (n, e) in e820.iter().enumerate() {
        let mut entry = [0u8; PVH_MEMMAP_ENTRY as usize];
        entry[0..8].copy_from_slice(&e.addr.to_le_bytes());
        entry[8..16].copy_from_slice(&e.size.to_le_bytes());
        entry[16..20].copy_from_slice(&e.kind.to_le_bytes());
        mem.write_slice(
            &entry,
            GuestAddress(PVH_MEMMAP_ADDR + n as u64 * PVH_MEMMAP_ENTRY),
        )?;
    }
    Ok(PVH_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;

    fn mem() -> (Layout, GuestMemoryMmap) {
        let l = Layout::new(32).unwrap();
        let m = l.allocate().unwrap();
        (l, m)
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let (l, m) = mem();
        let initrd = InitrdPlacement {
            addr: 0x100_0000,
            size: 0x1234,
        };
        write_zero_page(&m, None, 17, Some(initrd), &l.e820(), Some(0xe0000)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 17);
        assert_eq!({ p.hdr.ramdisk_image }, 0x100_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let last = p.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, 32 << 20);
        // The guest reads these at fixed offsets: check them byte by byte.
        let cmd: u32 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x228)).unwrap();
        assert_eq!(cmd, CMDLINE_ADDR as u32);
        let n: u8 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn pvh_start_info_has_magic_cmdline_memmap_and_module() {
        let (l, m) = mem();
        let initrd = InitrdPlacement {
            addr: 0x180_0000,
            size: 99,
        };
        let at = write_pvh_start_info(&m, Some(initrd), &l.e820(), Some(0xe0000)).unwrap();
        let r32 = |o: u64| m.read_obj::<u32>(GuestAddress(at + o)).unwrap();
        let r64 = |o: u64| m.read_obj::<u64>(GuestAddress(at + o)).unwrap();
        assert_eq!(r32(0), PVH_MAGIC);
        assert_eq!(r32(4), 1);
        assert_eq!(r32(12), 1);
        assert_eq!(r64(24), CMDLINE_ADDR);
        assert_eq!(r64(32), 0xe0000);
        assert_eq!(r64(40), PVH_MEMMAP_ADDR);
        assert_eq!(r32(48), 3);
        let modlist = r64(16);
        assert!(modlist >= at + 56 && modlist + 32 <= PVH_MEMMAP_ADDR);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(modlist)).unwrap(),
            0x180_0000
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(modlist + 8)).unwrap(), 99);
        let e2 = PVH_MEMMAP_ADDR + 2 * 24;
        assert_eq!(m.read_obj::<u64>(GuestAddress(e2)).unwrap(), 0x10_0000);
        assert_eq!(m.read_obj::<u32>(GuestAddress(e2 + 16)).unwrap(), 1);
    }

    #[test]
    fn both_maps_carry_the_ram_above_4_gib() {
        // 5 GiB: 3 GiB below the device gap, 2 GiB from 4 GiB up.
        let l = Layout::new(5120).unwrap();
        let m = Layout::new(16).unwrap().allocate().unwrap();
        let e820 = l.e820();
        assert_eq!(e820.len(), 4);
        let ram = |entries: &[(u64, u64, u32)]| -> u64 {
            entries.iter().filter(|e| e.2 == 1).map(|e| e.1).sum()
        };

        write_zero_page(&m, None, 1, None, &e820, None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(p.e820_entries, 4);
        let zp: Vec<(u64, u64, u32)> = p.e820_table[..4]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(zp[2], (0x10_0000, (3 << 30) - 0x10_0000, 1));
        assert_eq!(zp[3], (4 << 30, 2 << 30, 1));
        assert_eq!(ram(&zp) + 0x60400, 5 << 30);

        let at = write_pvh_start_info(&m, None, &e820, None).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(at + 48)).unwrap(), 4);
        let pvh: Vec<(u64, u64, u32)> = (0..4u64)
            .map(|n| {
                let e = PVH_MEMMAP_ADDR + n * PVH_MEMMAP_ENTRY;
                (
                    m.read_obj(GuestAddress(e)).unwrap(),
                    m.read_obj(GuestAddress(e + 8)).unwrap(),
                    m.read_obj(GuestAddress(e + 16)).unwrap(),
                )
            })
            .collect();
        assert_eq!(pvh, zp);
    }
}

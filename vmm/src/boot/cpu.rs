//! Initial vCPU state: GDT, identity page tables, segment and control
//! registers for each entry protocol, FPU, boot MSRs and LAPIC LINT pins.
//!
//! Pure functions produce KVM structures and write tables into guest memory;
//! the caller hands them to [`crate::kvm::Vcpu`].

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, EntryKind};
use crate::memory::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors required by the Linux 64-bit boot protocol (__BOOT_CS/__BOOT_DS).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// A GDT entry from flags, base and limit (the layout the CPU reads).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM wants.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flag = |shift: u32, bits: u64| ((entry >> shift) & bits) as u8;
    kvm_segment {
        base: (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if flag(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        unusable: 0,
        padding: 0,
    }
}

fn gdt(kind: EntryKind) -> [u64; 5] {
    let code = match kind {
        EntryKind::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit, G
        EntryKind::Pvh => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit, G, D
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) identity page tables
/// covering the first 4 GiB with 2 MiB pages.
pub fn write_tables(mem: &GuestMemoryMmap, kind: EntryKind) -> Result<(), BootError> {
    for (i, e) in gdt(kind).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    if kind == EntryKind::Linux64 {
        mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
        for pd in 0..4u64 {
            let pd_addr = PD_ADDR + pd * 0x1000;
            mem.write_obj(pd_addr | 0x03, GuestAddress(PDPT_ADDR + pd * 8))?;
            for i in 0..512u64 {
                let frame = ((pd << 9) + i) << 21;
                mem.write_obj(frame | 0x83, GuestAddress(pd_addr + i * 8))?;
            }
        }
    }
    Ok(())
}

/// Segment and control registers for the boot vCPU, starting from KVM's defaults.
pub fn boot_sregs(mut sregs: kvm_sregs, kind: EntryKind) -> kvm_sregs {
    let table = gdt(kind);
    let code = segment(table[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment(table[usize::from(BOOT_DS / 8)], BOOT_DS);
    let tss = segment(table[usize::from(BOOT_TSS / 8)], BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match kind {
        EntryKind::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.cr3 = 0;
        }
        EntryKind::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            sregs.cr3 = PML4_ADDR;
        }
    }
    sregs
}

/// General registers for the boot vCPU: entry point and the boot-info pointer.
pub fn boot_regs(kind: EntryKind, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match kind {
        EntryKind::Pvh => regs.rbx = boot_info,
        EntryKind::Linux64 => {
            regs.rsi = boot_info;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
    }
    regs
}

/// x87 and SSE control words as after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs written before the first run: SYSCALL/SYSENTER state zeroed, fast
/// strings enabled, write-back default memory type.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, 1),
        (MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Programs LINT0 as ExtINT and LINT1 as NMI in a LAPIC register page.
pub fn set_lint_pins(regs: &mut [std::os::raw::c_char; 1024]) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut set = |off: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (b, r) in raw.iter_mut().zip(&regs[off..off + 4]) {
            *b = *r as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (r, b) in regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
            *r = b as std::os::raw::c_char;
        }
    };
    set(APIC_LVT0, MODE_EXTINT);
    set(APIC_LVT1, MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt(EntryKind::Linux64)[2], BOOT_CS);
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        let code32 = segment(gdt(EntryKind::Pvh)[2], BOOT_CS);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment(gdt(EntryKind::Pvh)[4], BOOT_TSS);
        assert_eq!((tss.limit, tss.type_, tss.s), (0x67, 0xb, 0));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let l = Layout::new(16).unwrap();
        let m = l.allocate().unwrap();
        write_tables(&m, EntryKind::Linux64).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // Walk the mapping of a few addresses by hand.
        for va in [0u64, 0x20_0000, 0x1234_5678, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(PDPT_ADDR + (va >> 30) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83);
            assert_eq!((pde & !0x1f_ffff & !0x83) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn entry_registers_follow_each_protocol() {
        let s = boot_sregs(kvm_sregs::default(), EntryKind::Linux64);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
        let s = boot_sregs(kvm_sregs::default(), EntryKind::Pvh);
        assert_eq!((s.cr0 & CR0_PG, s.efer, s.cs.l, s.cs.db), (0, 0, 0, 1));
        let r = boot_regs(EntryKind::Pvh, 0x100000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100000, 0x6000, 2));
        let r = boot_regs(EntryKind::Linux64, 0x200000, 0x7000);
        assert_eq!((r.rip, r.rsi), (0x200000, 0x7000));
    }

    #[test]
    fn lint_pins_are_programmed() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lint_pins(&mut regs);
        assert_eq!(regs[0x351] as u8 & 7, 7);
        assert_eq!(regs[0x361] as u8 & 7, 4);
    }
}

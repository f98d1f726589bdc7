//! The Intel MultiProcessor table (spec 1.4), so a kernel finds every vCPU.
//!
//! Written at [`MPTABLE_ADDR`] (the last KiB of base memory, where kernels
//! look): the floating pointer, the configuration table header, one processor
//! entry per vCPU, one ISA bus, the userspace IOAPIC with ISA IRQ n on its
//! pin n (all 24 pins, as Firecracker lists them) and the LAPIC LINT0/LINT1
//! wiring.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_ID, PINS};
use crate::memory::{LAPIC_BASE, LOW_RAM_END, MPTABLE_ADDR};

const LAPIC_ADDR: u32 = LAPIC_BASE as u32;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags, as the spec's examples use.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const IOAPIC_VERSION: u8 = 0x20;
const INT_VECTORED: u8 = 0;
const ENTRY_LOCAL_INT: u8 = 4;
const INT_EXTINT: u8 = 3;
const INT_NMI: u8 = 1;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and table for `cpus` vCPUs (pure).
pub fn build(cpus: u8) -> Vec<u8> {
    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = ENTRY_PROCESSOR;
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    // ISA IRQ n → IOAPIC pin n, polarity and trigger conforming to the bus.
    for pin in 0..PINS as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INT, INT_VECTORED, 0, 0, 0, pin, IOAPIC_ID, pin]);
    }
    // LINT0 = ExtINT, LINT1 = NMI on every LAPIC (destination 0xff).
    for (kind, lint) in [(INT_EXTINT, 0u8), (INT_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INT, kind, 0, 0, 0, 0, 0xff, lint]);
    }
    let count = u16::from(cpus) + 4 + PINS as u16;

    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    let len = (header.len() + entries.len()) as u16;
    header[4..6].copy_from_slice(&len.to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"RUNV    ");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let bytes = build(cpus);
    debug_assert!(MPTABLE_ADDR + bytes.len() as u64 <= LOW_RAM_END + 0x400);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            assert_eq!(
                u16::from_le_bytes([table[34], table[35]]),
                u16::from(cpus) + 4 + 24
            );
            let procs: Vec<_> = table[44..44 + 20 * cpus as usize].chunks(20).collect();
            assert_eq!(procs[0][3], CPU_ENABLED | CPU_BSP);
            assert!(
                procs
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e[0] == 0 && e[1] == i as u8)
            );
            let io = &table[44 + 20 * cpus as usize + 8..];
            assert_eq!(&io[..4], &[2, IOAPIC_ID, 0x20, 1]);
            assert_eq!(&io[4..8], &0xfec0_0000u32.to_le_bytes());
            let com1 = &io[8 + 4 * 8..8 + 5 * 8];
            assert_eq!(com1, &[3, 0, 0, 0, 0, 4, IOAPIC_ID, 4]);
            // Fits below the end of the reserved hole's first KiB.
            assert!(MPTABLE_ADDR + b.len() as u64 <= 0xa0000);
        }
    }

    #[test]
    fn the_pointer_points_at_the_table() {
        let b = build(2);
        let ptr = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64;
        assert_eq!(ptr, MPTABLE_ADDR + 16);
    }
}

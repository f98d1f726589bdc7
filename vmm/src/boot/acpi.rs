//! ACPI tables (rust-vmm acpi_tables): RSDP, XSDT, FADT, MADT and a DSDT that
//! describes each virtio-mmio device, so kernels whose virtio-mmio driver only
//! discovers devices through ACPI (Debian's, where it is a module without
//! command-line devices) find them.
//!
//! The platform is hardware-reduced ACPI: the FADT's sleep control/status
//! registers are the VMM's ports 0x600/0x601 and its reset register is 0x600
//! with value 1 (see `devices/power.rs`). The MADT lists one LAPIC per vCPU
//! and the userspace IOAPIC (`devices/ioapic.rs`, GSIs 0-23 identity-mapped
//! to ISA IRQs). Pure builders plus one write.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml, rsdp::Rsdp};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_ID};
use crate::memory::{ACPI_ADDR, HIGH_RAM_START, LAPIC_BASE};

const OEM_ID: [u8; 6] = *b"RUNV  ";
const LAPIC_ADDR: u32 = LAPIC_BASE as u32;
const SLEEP_CONTROL_PORT: u64 = 0x600;
const SLEEP_STATUS_PORT: u64 = 0x601;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub addr: u64,
    pub len: u32,
    pub irq: u32,
}

/// A generic address structure for a byte-wide I/O port.
fn gas_io(port: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&port.to_le_bytes());
    g
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let path = format!("_SB_.VR{i:02X}");
        let uid = i as u8;
        let mem = aml::Memory32Fixed::new(true, d.addr as u32, d.len);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(path.as_str().into(), vec![&hid, &uid_name, &crs_name])
            .to_aml_bytes(&mut body);
    }
    // \\_S5: the sleep type the guest writes to power off.
    let five = 5u8;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&five])).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RUNVDSDT", 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const PWR_BUTTON: u32 = 1 << 4;
    const SLP_BUTTON: u32 = 1 << 5;
    let mut sdt = Sdt::new(*b"FACP", 276, 6, OEM_ID, *b"RUNVFACP", 1);
    sdt.write_u32(
        112,
        HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON,
    );
    sdt.write_bytes(116, &gas_io(SLEEP_CONTROL_PORT)); // reset register
    sdt.write_u8(128, 1); // reset value
    sdt.write_u8(131, 3); // FADT minor version (6.3)
    sdt.write_u64(140, dsdt_addr); // X_DSDT
    sdt.write_bytes(244, &gas_io(SLEEP_CONTROL_PORT));
    sdt.write_bytes(256, &gas_io(SLEEP_STATUS_PORT));
    sdt.write_bytes(268, b"RUNVVMM "); // hypervisor vendor identity
    sdt.as_slice().to_vec()
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"RUNVMADT",
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_BASE as u32, 0));
    let mut v = Vec::new();
    m.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// All tables laid out from `base`: (address, bytes) pairs; the RSDP is first.
pub fn build(base: u64, cpus: u8, devices: &[MmioDevice]) -> Vec<(u64, Vec<u8>)> {
    let xsdt_addr = align16(base + Rsdp::len() as u64);
    // XSDT with two entries is 36 + 16 bytes.
    let dsdt_addr = align16(xsdt_addr + 36 + 16);
    let dsdt = dsdt(devices);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let mut xsdt = XSDT::new(OEM_ID, *b"RUNVXSDT", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    vec![
        (base, rsdp),
        (xsdt_addr, xsdt_bytes),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
    ]
}

/// Writes the tables at [`ACPI_ADDR`] and returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, devices: &[MmioDevice]) -> Result<u64, BootError> {
    let tables = build(ACPI_ADDR, cpus, devices);
    for (addr, bytes) in &tables {
        if addr + bytes.len() as u64 > HIGH_RAM_START {
            return Err(BootError::Cmdline(
                "ACPI tables do not fit below 1 MiB".into(),
            ));
        }
        mem.write_slice(bytes, GuestAddress(*addr))?;
    }
    Ok(ACPI_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_link_up() {
        let devs = [
            MmioDevice {
                addr: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDevice {
                addr: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let t = build(0xe0000, 2, &devs);
        let (rsdp_addr, rsdp) = &t[0];
        assert_eq!(*rsdp_addr, 0xe0000);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, t[1].0);
        for (_, table) in &t[1..] {
            assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[..4]));
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
        }
        let xsdt = &t[1].1;
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        assert_eq!((fadt_addr, madt_addr), (t[3].0, t[4].0));
        let fadt = &t[3].1;
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            t[2].0
        );
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            0x600
        );
        // Both devices and the S5 object are in the DSDT.
        let dsdt = &t[2].1;
        let hits = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hits, 2);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == 0xd000_1000u32.to_le_bytes()));
        // One LAPIC entry (type 0, length 8) per vCPU after the 44-byte header,
        // then the IOAPIC (type 1, length 12) at 0xfec00000 with GSI base 0.
        let madt = &t[4].1;
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!((madt[44], madt[45], madt[52 + 3]), (0, 8, 1));
        let io = &madt[60..72];
        assert_eq!((io[0], io[1], io[2]), (1, 12, IOAPIC_ID));
        assert_eq!(&io[4..8], &0xfec0_0000u32.to_le_bytes());
        assert_eq!(&io[8..12], &[0; 4]);
    }

    #[test]
    fn tables_fit_in_the_bios_area() {
        let devs: Vec<_> = (0..32)
            .map(|i| MmioDevice {
                addr: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect();
        let t = build(ACPI_ADDR, 32, &devs);
        let (addr, last) = t.last().unwrap();
        assert!(addr + last.len() as u64 <= HIGH_RAM_START);
    }
}

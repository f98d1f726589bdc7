//! ACPI tables (rust-vmm acpi_tables): RSDP, XSDT, FADT, MADT and a DSDT that
//! describes each virtio-mmio device, so kernels whose virtio-mmio driver only
//! discovers devices through ACPI (Debian's, where it is a module without
//! command-line devices) find them.
//!
//! The platform is hardware-reduced ACPI: the FADT's sleep control/status
//! registers are the VMM's ports 0x600/0x601 and its reset register is 0x600
//! with value 1 (see `devices/power.rs`). The power button is a control-method
//! device (`\_SB.PWRB`, `PNP0C0C`) signalled through a Generic Event Device
//! (`\_SB.GED_`, `ACPI0013`): its interrupt is GSI [`GED_GSI`] (level, active
//! high) and its `_EVT` reads the event register at port 0x602 and notifies
//! `PWRB` with 0x80 when the power-button bit is set, which Linux's `button`
//! driver turns into a KEY_POWER input event. The MADT lists one LAPIC per
//! vCPU and the userspace IOAPIC (`devices/ioapic.rs`, GSIs 0-23
//! identity-mapped to ISA IRQs). Pure builders plus one write.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml, rsdp::Rsdp};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_ID};
use crate::devices::power::{
    GED_EVENT_LEN, GED_EVENT_PORT, GED_GSI, GED_POWER_BUTTON, SLEEP_CTL_PORT, SLEEP_STATUS_PORT,
};
use crate::memory::{ACPI_ADDR, HIGH_RAM_START, LAPIC_BASE};

const OEM_ID: [u8; 6] = *b"RUNV  ";
const LAPIC_ADDR: u32 = LAPIC_BASE as u32;
/// ACPI notification value for a button: "the button was pressed".
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

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
    power_button(&mut body);
    // \\_S5: the sleep type the guest writes to power off.
    let five = 5u8;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&five])).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RUNVDSDT", 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The power button (`\_SB.PWRB`) and the Generic Event Device that
/// signals it (`\_SB.GED_`), as Cloud Hypervisor describes them:
///
/// ```text
/// Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
/// Device (\_SB.GED_) {
///     Name (_HID, "ACPI0013")
///     Name (_UID, Zero)
///     Name (_CRS, ResourceTemplate () {
///         Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { 23 } })
///     OperationRegion (GDST, SystemIO, 0x0602, One)
///     Field (GDST, ByteAcc, NoLock, Preserve) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT                  // read to clear: lowers the line
///         If ((Local0 & One) == One) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// ```
fn power_button(body: &mut Vec<u8>) {
    let zero = 0u8;
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &zero);
    aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &pwrb_uid]).to_aml_bytes(body);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &zero);
    // consumer, level-triggered (not edge), active high, exclusive
    let irq = aml::Interrupt::new(true, false, false, false, GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &GED_EVENT_PORT,
        &GED_EVENT_LEN,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = aml::Local(0);
    let register = aml::Path::new("GDAT");
    let read = aml::Store::new(&events, &register);
    let bit = aml::Local(1);
    let mask = aml::And::new(&bit, &events, &GED_POWER_BUTTON);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &NOTIFY_BUTTON_PRESSED);
    let pressed = aml::Equal::new(&bit, &GED_POWER_BUTTON);
    let on_press = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &mask, &on_press]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(body);
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
    sdt.write_bytes(116, &gas_io(SLEEP_CTL_PORT)); // reset register
    sdt.write_u8(128, 1); // reset value
    sdt.write_u8(131, 3); // FADT minor version (6.3)
    sdt.write_u64(140, dsdt_addr); // X_DSDT
    sdt.write_bytes(244, &gas_io(SLEEP_CTL_PORT));
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
            return Err(BootError::AcpiTooLarge);
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
        assert_power_button(dsdt);
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

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// The DSDT has the power button and the GED, wired as `power_button`'s
    /// docs show (AML and resource-descriptor encodings from the ACPI spec).
    fn assert_power_button(dsdt: &[u8]) {
        // Device (\_SB.PWRB) with _HID EisaId ("PNP0C0C"), a DWordConst.
        let pwrb = find(dsdt, b"_SB_PWRB").expect("PWRB device");
        assert_eq!(&dsdt[pwrb - 1..pwrb], &[0x2e], "a dual name path");
        let hid = find(&dsdt[pwrb..], b"_HID").unwrap() + pwrb;
        assert_eq!(&dsdt[hid + 4..hid + 9], &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]);
        // Device (\_SB.GED_) with _HID "ACPI0013", after PWRB.
        let ged = find(dsdt, b"_SB_GED_").expect("GED device");
        assert!(ged > pwrb);
        let ged_dev = &dsdt[ged..];
        assert!(find(ged_dev, b"_HID\x0dACPI0013\0").is_some());
        // _CRS: one Extended Interrupt descriptor, consumer, level-triggered,
        // active high, exclusive, on GSI 23; then the end tag.
        let crs = find(ged_dev, b"_CRS").unwrap();
        let irq = [0x89, 0x06, 0x00, 0x01, 0x01, 23, 0, 0, 0, 0x79];
        assert_eq!(GED_GSI, 23);
        assert_eq!(
            find(&ged_dev[crs..], &irq),
            Some(8),
            "{:x?}",
            &ged_dev[crs..]
        );
        // OperationRegion (GDST, SystemIO, 0x602, One); Field GDAT, 8 bits, ByteAcc.
        let region = [
            0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, 0x02, 0x06, 0x01,
        ];
        assert!(find(ged_dev, &region).is_some());
        assert!(find(ged_dev, b"GDST\x01GDAT\x08").is_some());
        // Method (_EVT, 1, Serialized): Local0 = GDAT, Local1 = Local0 & 1,
        // If (Local1 == 1) { Notify (\_SB.PWRB, 0x80) }.
        let evt = find(ged_dev, b"_EVT\x09").expect("_EVT, one argument, serialized");
        let body = &ged_dev[evt + 5..];
        assert_eq!(&body[..6], b"\x70GDAT\x60");
        assert_eq!(&body[6..10], &[0x7b, 0x60, 0x01, 0x61]);
        let notify = b"\x86\\\x2e_SB_PWRB\x0a\x80";
        let if_at = find(body, &[0xa0]).unwrap();
        assert_eq!(&body[if_at + 2..if_at + 5], &[0x93, 0x61, 0x01]);
        assert_eq!(&body[if_at + 5..if_at + 5 + notify.len()], notify);
        // A free IOAPIC pin: not COM1's (virtio slots stop below it, `vmm.rs`).
        assert_ne!(GED_GSI as usize, crate::devices::serial::COM1_IRQ);
        assert!((GED_GSI as usize) < crate::devices::ioapic::PINS);
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

//! The userspace IOAPIC (Intel 82093AA semantics) behind the split irqchip.
//!
//! Owns the 24-pin redirection table, the indirect register window at
//! [`IOAPIC_BASE`] (IOREGSEL at 0x00, IOWIN at 0x10, the version-0x20 EOI
//! register at 0x40), pin levels, remote IRR and the translation of a
//! redirection entry into an MSI. It must not know about devices: they hold an
//! [`IrqLine`] and assert or lower it. Delivery goes through an [`MsiSink`]
//! (KVM in the VMM, a recorder in tests); every guest-written value is masked
//! to the bits the datasheet defines and every index is checked, so nothing a
//! guest writes can panic the VMM.
//!
//! Delivery is `KVM_SIGNAL_MSI` from the thread that raises the line: the
//! devices here complete requests synchronously on the notifying vCPU or on the
//! I/O thread, so an irqfd would add an eventfd write plus an in-kernel wakeup
//! to a path that is already in the VMM. Measured (`runv-vmm-bench msi`,
//! `kvm_pvm`, loaded 2-core machine): 0.42–0.50 µs per `KVM_SIGNAL_MSI`
//! against 0.50–0.72 µs per irqfd write, and the ioctl has injected the
//! interrupt when it returns. The redirection table is also mirrored
//! into KVM's GSI routes (one MSI route per pin) only so that KVM knows which
//! vectors are level-triggered: with a split irqchip KVM exits to userspace
//! (`KVM_EXIT_IOAPIC_EOI`) on the guest's LAPIC EOI of exactly those vectors,
//! which is how remote IRR gets cleared ([`Ioapic::end_of_interrupt`]).

use std::sync::{Arc, Mutex};

use super::{BusDevice, GuestEvent, lock};

/// Guest-physical base of the IOAPIC, as the MADT and MP table announce it.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window.
pub const IOAPIC_LEN: u64 = 0x1000;
/// Number of input pins (GSIs 0..24).
pub const PINS: usize = 24;
/// The IOAPIC's ID as the MADT and MP table announce it.
pub const IOAPIC_ID: u8 = 0xfe;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x20 (has the EOI register) with PINS - 1 as the maximum entry.
const VERSION: u32 = 0x20 | (((PINS as u32) - 1) << 16);

const OFF_SELECT: u64 = 0x00;
const OFF_WINDOW: u64 = 0x10;
const OFF_EOI: u64 = 0x40;

// Redirection entry bits.
const VECTOR: u64 = 0xff;
const DELIVERY_MODE: u64 = 0x7 << 8;
const DEST_LOGICAL: u64 = 1 << 11;
const POLARITY_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// Bits the guest may write: everything but delivery status (bit 12, always 0
/// here: delivery is immediate) and remote IRR.
const WRITABLE: u64 =
    VECTOR | DELIVERY_MODE | DEST_LOGICAL | POLARITY_LOW | LEVEL | MASKED | (0xff << DEST_SHIFT);
/// ExtINT: would need a PIC, which this VM does not have.
const MODE_EXTINT: u64 = 7 << 8;

/// An MSI as the LAPICs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    pub address: u64,
    pub data: u32,
}

/// Where the IOAPIC sends interrupts (KVM in the VMM).
pub trait MsiSink: Send {
    /// Injects one MSI.
    fn signal(&self, msi: Msi);
    /// The redirection table changed: `routes[pin]` is the MSI that pin sends,
    /// `None` when it is masked (so the hypervisor can track level vectors).
    fn routes_changed(&self, routes: &[Option<Msi>; PINS]);
}

/// The IOAPIC state.
pub struct Ioapic {
    id: u32,
    select: u32,
    table: [u64; PINS],
    /// Input pin levels (true = asserted), whatever the polarity setting.
    level: [bool; PINS],
    /// Edge-triggered assertions that arrived while the pin was masked.
    pending: [bool; PINS],
    sink: Box<dyn MsiSink>,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("table", &self.table)
            .field("level", &self.level)
            .finish()
    }
}

impl Ioapic {
    /// All pins masked, as after reset.
    pub fn new(sink: Box<dyn MsiSink>) -> Self {
        Self {
            id: u32::from(IOAPIC_ID) << 24,
            select: 0,
            table: [MASKED; PINS],
            level: [false; PINS],
            pending: [false; PINS],
            sink,
        }
    }

    /// The MSI redirection entry `e` sends.
    pub fn msi(e: u64) -> Msi {
        let dest = (e >> DEST_SHIFT) & 0xff;
        let logical = u64::from(e & DEST_LOGICAL != 0);
        let address = 0xfee0_0000 | (dest << 12) | (logical << 2);
        let mut data = (e & (VECTOR | DELIVERY_MODE)) as u32;
        if e & LEVEL != 0 {
            // Trigger mode level, and "assert" (MSI data bits 15 and 14).
            data |= (1 << 15) | (1 << 14);
        }
        Msi { address, data }
    }

    fn routes(&self) -> [Option<Msi>; PINS] {
        std::array::from_fn(|i| {
            let e = self.table[i];
            (e & MASKED == 0 && e & DELIVERY_MODE != MODE_EXTINT).then(|| Self::msi(e))
        })
    }

    /// Delivers pin `pin` if its entry allows it now.
    fn service(&mut self, pin: usize) {
        let e = self.table[pin];
        let level = e & LEVEL != 0;
        if e & MASKED != 0 {
            if !level {
                self.pending[pin] = true;
            }
            return;
        }
        if level && (!self.level[pin] || e & REMOTE_IRR != 0) {
            return;
        }
        self.pending[pin] = false;
        if e & DELIVERY_MODE == MODE_EXTINT {
            return;
        }
        if level {
            self.table[pin] |= REMOTE_IRR;
        }
        self.sink.signal(Self::msi(e));
    }

    /// Asserts `pin`. For an edge-triggered entry every call is one interrupt
    /// (devices call it once per event); a level-triggered entry interrupts
    /// once and again after each EOI for as long as the pin stays asserted.
    pub fn assert(&mut self, pin: usize) {
        if pin >= PINS {
            return;
        }
        self.level[pin] = true;
        self.service(pin);
    }

    /// Deasserts `pin`.
    pub fn lower(&mut self, pin: usize) {
        if let Some(l) = self.level.get_mut(pin) {
            *l = false;
        }
    }

    /// A LAPIC EOI of `vector` (KVM's IOAPIC EOI exit, or the EOI register):
    /// clears remote IRR on the level-triggered entries with that vector and
    /// interrupts again for pins still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..PINS {
            let e = self.table[pin];
            if e & LEVEL != 0 && e & REMOTE_IRR != 0 && (e & VECTOR) as u8 == vector {
                self.table[pin] &= !REMOTE_IRR;
                self.service(pin);
            }
        }
    }

    /// Redirection entry `pin` (for tests and debugging).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.table.get(pin).copied()
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARB => self.id,
            r if r >= REG_TABLE => {
                let i = (r - REG_TABLE) as usize;
                match self.table.get(i / 2) {
                    Some(e) if i.is_multiple_of(2) => *e as u32,
                    Some(e) => (*e >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, v: u32) {
        match self.select {
            REG_ID => self.id = v & 0xff00_0000,
            r if r >= REG_TABLE => {
                let i = (r - REG_TABLE) as usize;
                let pin = i / 2;
                let Some(old) = self.table.get(pin).copied() else {
                    return;
                };
                let (mask, shifted) = if i.is_multiple_of(2) {
                    (0xffff_ffffu64, u64::from(v))
                } else {
                    (0xffff_ffff_0000_0000, u64::from(v) << 32)
                };
                let mut new = (old & !(mask & WRITABLE)) | (shifted & mask & WRITABLE);
                if new & LEVEL == 0 {
                    new &= !REMOTE_IRR;
                }
                self.table[pin] = new;
                let routing = WRITABLE & !MASKED;
                if old & routing != new & routing || (old ^ new) & MASKED != 0 {
                    self.sink.routes_changed(&self.routes());
                }
                // Unmasking delivers what waited: an edge that arrived while
                // masked, or a level that is still asserted.
                if old & MASKED != 0 && new & MASKED == 0 && (new & LEVEL != 0 || self.pending[pin])
                {
                    self.service(pin);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            OFF_SELECT => self.select,
            OFF_WINDOW => self.read_register(),
            _ => 0,
        };
        for (d, s) in data
            .iter_mut()
            .zip(v.to_le_bytes().into_iter().chain([0; 4]))
        {
            *d = s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent> {
        // Registers are 32 bits wide; other access sizes are ignored.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return None;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            OFF_SELECT => self.select = v & 0xff,
            OFF_WINDOW => self.write_register(v),
            OFF_EOI => self.end_of_interrupt(v as u8),
            _ => {}
        }
        None
    }
}

/// One IOAPIC input pin, as a device holds it.
#[derive(Clone)]
pub struct IrqLine {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IrqLine({})", self.pin)
    }
}

impl IrqLine {
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> Self {
        Self { ioapic, pin }
    }

    /// Asserts the pin (see [`Ioapic::assert`]).
    pub fn assert(&self) {
        lock(&self.ioapic).assert(self.pin);
    }

    /// Deasserts the pin.
    pub fn lower(&self) {
        lock(&self.ioapic).lower(self.pin);
    }

    /// One edge: assert, then lower (ISA devices such as the UART).
    pub fn pulse(&self) {
        let mut a = lock(&self.ioapic);
        a.assert(self.pin);
        a.lower(self.pin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct Recorder {
        sent: Arc<Mutex<Vec<Msi>>>,
        routes: Arc<Mutex<Vec<[Option<Msi>; PINS]>>>,
    }
    impl MsiSink for Recorder {
        fn signal(&self, msi: Msi) {
            lock(&self.sent).push(msi);
        }
        fn routes_changed(&self, routes: &[Option<Msi>; PINS]) {
            lock(&self.routes).push(*routes);
        }
    }

    const DELIVERY_STATUS: u64 = 1 << 12;

    fn setup() -> (Ioapic, Recorder) {
        let r = Recorder::default();
        (Ioapic::new(Box::new(r.clone())), r)
    }

    fn w(a: &mut Ioapic, off: u64, v: u32) {
        a.write(off, &v.to_le_bytes());
    }
    fn r(a: &mut Ioapic, off: u64) -> u32 {
        let mut b = [0u8; 4];
        a.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn set_entry(a: &mut Ioapic, pin: u32, e: u64) {
        w(a, OFF_SELECT, REG_TABLE + 2 * pin + 1);
        w(a, OFF_WINDOW, (e >> 32) as u32);
        w(a, OFF_SELECT, REG_TABLE + 2 * pin);
        w(a, OFF_WINDOW, e as u32);
    }
    fn get_entry(a: &mut Ioapic, pin: u32) -> u64 {
        w(a, OFF_SELECT, REG_TABLE + 2 * pin);
        let lo = r(a, OFF_WINDOW);
        w(a, OFF_SELECT, REG_TABLE + 2 * pin + 1);
        u64::from(lo) | (u64::from(r(a, OFF_WINDOW)) << 32)
    }
    fn sent(rec: &Recorder) -> Vec<Msi> {
        std::mem::take(&mut *lock(&rec.sent))
    }

    #[test]
    fn version_id_and_reset_state() {
        let (mut a, _) = setup();
        w(&mut a, OFF_SELECT, REG_VERSION);
        assert_eq!(r(&mut a, OFF_WINDOW), 0x0017_0020);
        w(&mut a, OFF_SELECT, REG_ID);
        assert_eq!(r(&mut a, OFF_WINDOW) >> 24, u32::from(IOAPIC_ID));
        for pin in 0..24 {
            assert_eq!(get_entry(&mut a, pin), MASKED);
        }
        assert_eq!(r(&mut a, OFF_SELECT), REG_TABLE + 2 * 23 + 1);
    }

    #[test]
    fn an_edge_entry_becomes_an_msi_per_assertion_and_masking_holds_it() {
        let (mut a, rec) = setup();
        // Vector 0x40, fixed, physical destination APIC 1.
        set_entry(&mut a, 5, 0x40 | (1 << DEST_SHIFT));
        assert_eq!(get_entry(&mut a, 5), 0x40 | (1 << DEST_SHIFT));
        let routes = lock(&rec.routes).last().copied().unwrap();
        assert_eq!(
            routes[5],
            Some(Msi {
                address: 0xfee0_1000,
                data: 0x40
            })
        );
        assert!(routes[4].is_none());
        a.assert(5);
        a.assert(5);
        assert_eq!(sent(&rec).len(), 2, "each assertion is an edge");
        a.lower(5);
        // Masked: held, then delivered once on unmask.
        set_entry(&mut a, 5, 0x40 | MASKED);
        a.assert(5);
        a.lower(5);
        a.assert(5);
        assert!(sent(&rec).is_empty());
        set_entry(&mut a, 5, 0x40);
        assert_eq!(sent(&rec).len(), 1);
        set_entry(&mut a, 5, 0x40 | MASKED);
        set_entry(&mut a, 5, 0x40);
        assert!(sent(&rec).is_empty(), "nothing new was pending");
    }

    #[test]
    fn a_level_entry_waits_for_eoi_and_re_asserts_while_the_line_is_high() {
        let (mut a, rec) = setup();
        set_entry(&mut a, 7, 0x51 | LEVEL | DEST_LOGICAL | (3 << DEST_SHIFT));
        a.assert(7);
        let m = sent(&rec);
        assert_eq!(
            m,
            vec![Msi {
                address: 0xfee0_3004,
                data: 0x51 | (1 << 15) | (1 << 14)
            }]
        );
        assert_ne!(get_entry(&mut a, 7) & REMOTE_IRR, 0);
        a.assert(7);
        assert!(sent(&rec).is_empty(), "remote IRR blocks a second delivery");
        // EOI of another vector changes nothing.
        a.end_of_interrupt(0x52);
        assert!(sent(&rec).is_empty());
        // EOI while the line is still high: delivered again.
        a.end_of_interrupt(0x51);
        assert_eq!(sent(&rec).len(), 1);
        assert_ne!(get_entry(&mut a, 7) & REMOTE_IRR, 0);
        // The device lowers its line, then the guest EOIs: quiet.
        a.lower(7);
        w(&mut a, OFF_EOI, 0x51);
        assert!(sent(&rec).is_empty());
        assert_eq!(get_entry(&mut a, 7) & REMOTE_IRR, 0);
        // A masked level pin that is still high fires on unmask.
        set_entry(&mut a, 7, 0x51 | LEVEL | MASKED);
        a.assert(7);
        assert!(sent(&rec).is_empty());
        set_entry(&mut a, 7, 0x51 | LEVEL);
        assert_eq!(sent(&rec).len(), 1);
    }

    #[test]
    fn guest_cannot_set_read_only_bits_or_reach_outside_the_table() {
        let (mut a, rec) = setup();
        set_entry(&mut a, 3, u64::MAX);
        let e = get_entry(&mut a, 3);
        assert_eq!(e & (REMOTE_IRR | DELIVERY_STATUS), 0);
        assert_eq!(e & 0x00ff_ffff_fffe_0000, 0, "reserved bits stay 0");
        // Selecting past the last entry: reads 0, writes ignored.
        for sel in [REG_TABLE + 48, REG_TABLE + 49, 0xff, 0x03] {
            w(&mut a, OFF_SELECT, sel);
            w(&mut a, OFF_WINDOW, 0xdead_beef);
            assert_eq!(r(&mut a, OFF_WINDOW), 0);
        }
        // IOREGSEL keeps 8 bits; unknown offsets and sizes are harmless.
        w(&mut a, OFF_SELECT, 0xffff_ff10);
        assert_eq!(r(&mut a, OFF_SELECT), 0x10);
        a.write(OFF_WINDOW, &[1, 2]);
        a.write(0xff8, &[0; 8]);
        let mut b = [0xffu8; 8];
        a.read(0x800, &mut b);
        assert_eq!(b, [0; 8]);
        a.assert(24);
        a.assert(usize::MAX);
        a.lower(99);
        a.end_of_interrupt(0xff);
        assert!(sent(&rec).is_empty());
        // ExtINT entries are never delivered (there is no PIC).
        set_entry(&mut a, 2, 0x30 | MODE_EXTINT);
        a.assert(2);
        assert!(sent(&rec).is_empty());
        assert!(lock(&rec.routes).last().unwrap()[2].is_none());
    }

    #[test]
    fn an_irq_line_pulse_is_one_edge() {
        let rec = Recorder::default();
        let a = Arc::new(Mutex::new(Ioapic::new(Box::new(rec.clone()))));
        let line = IrqLine::new(a.clone(), 4);
        let mut g = lock(&a);
        set_entry(&mut g, 4, 0x24);
        drop(g);
        line.pulse();
        line.pulse();
        assert_eq!(sent(&rec).len(), 2);
        assert!(!lock(&a).level[4]);
    }
}

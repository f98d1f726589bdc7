//! Power and crash signalling: an ACPI hardware-reduced sleep control register
//! (port 0x600, as the FADT describes it), the power button with its ACPI
//! Generic Event Device (GED) event register (port 0x602) and interrupt, and
//! a pvpanic port (0x505).
//!
//! Port 0x600 write: `SLP_TYP=5 | SLP_EN` (0x34) powers off, `1` resets.
//! Port 0x601 read: bit 0 is set once the host asked for a graceful shutdown
//! (the VMM's power button) and stays set, so a polling guest can notice it.
//! Port 0x602 read: the GED event register, cleared by the read. Bit 0
//! ([`GED_POWER_BUTTON`]) means the power button was pressed since the last
//! read. The GED's interrupt is IOAPIC pin [`GED_GSI`], level-triggered and
//! active high: the line is asserted exactly while the register is non-zero,
//! so the read that takes the events also lowers it, and no press is lost
//! between the read and the guest's EOI. The DSDT's `\_SB.GED_._EVT` reads the
//! register and notifies `\_SB.PWRB` (`boot/acpi.rs`).
//!
//! This module must not know how the press arrives (the control socket, via
//! `state.rs`) nor how the interrupt is delivered (an [`IrqLine`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::ioapic::IrqLine;
use super::{BusDevice, GuestEvent, lock};

pub const SLEEP_CTL_PORT: u64 = 0x600;
pub const SLEEP_CTL_LEN: u64 = 2;
/// The sleep status register (the FADT's `SLEEP_STATUS_REG`): bit 0 = pressed.
pub const SLEEP_STATUS_PORT: u64 = 0x601;
/// The GED event register (read to clear).
pub const GED_EVENT_PORT: u64 = 0x602;
pub const GED_EVENT_LEN: u64 = 1;
/// The GED's interrupt: the last IOAPIC pin, above COM1 (4) and the
/// virtio-mmio slots (5..=22, see `vmm.rs`). A GSI of 16 or more is never an
/// ISA IRQ, so a guest takes the level/active-high flags of the DSDT as they are.
pub const GED_GSI: u32 = 23;
/// GED event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1;
pub const PVPANIC_PORT: u64 = 0x505;

const _: () = assert!((GED_GSI as usize) < super::ioapic::PINS);

const S5_SLEEP_VALUE: u8 = 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_EN: u8 = 1 << 5;
const RESET_VALUE: u8 = 1;

/// The power button: the sticky "shutdown requested" flag behind port 0x601
/// and the GED event register behind port 0x602, with the GED's interrupt.
#[derive(Debug, Default)]
pub struct PowerButton {
    pressed: AtomicBool,
    /// Pending GED events and the line they raise; one lock, so that setting
    /// a bit and asserting, or taking the bits and lowering, are atomic.
    ged: Mutex<Ged>,
}

#[derive(Debug, Default)]
struct Ged {
    events: u8,
    irq: Option<IrqLine>,
}

impl PowerButton {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the GED interrupt (once the IOAPIC exists); events that are
    /// already pending assert it at once.
    pub fn connect(&self, irq: IrqLine) {
        let mut g = lock(&self.ged);
        if g.events != 0 {
            irq.assert();
        }
        g.irq = Some(irq);
    }

    /// Presses the button: sets the sticky flag and the GED event bit and
    /// asserts the GED line. Called from the control socket's thread.
    pub fn press(&self) {
        self.pressed.store(true, Ordering::Release);
        let mut g = lock(&self.ged);
        g.events |= GED_POWER_BUTTON;
        if let Some(irq) = &g.irq {
            irq.assert();
        }
    }

    /// Whether the button was ever pressed (port 0x601 bit 0).
    pub fn pressed(&self) -> bool {
        self.pressed.load(Ordering::Acquire)
    }

    /// Takes the pending GED events and lowers the line (a read of 0x602).
    pub fn take_events(&self) -> u8 {
        let mut g = lock(&self.ged);
        let events = std::mem::take(&mut g.events);
        if let Some(irq) = &g.irq {
            irq.lower();
        }
        events
    }
}

/// The sleep control/status pair.
#[derive(Debug)]
pub struct SleepControl {
    button: Arc<PowerButton>,
}

impl SleepControl {
    /// `button` is pressed by the control socket's `shutdown` request.
    pub fn new(button: Arc<PowerButton>) -> Self {
        Self { button }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS_PORT - SLEEP_CTL_PORT
            && let Some(b) = data.first_mut()
        {
            *b = u8::from(self.button.pressed());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent> {
        let v = *data.first()?;
        if offset != 0 {
            return None;
        }
        if v == RESET_VALUE {
            return Some(GuestEvent::Reset);
        }
        let typ = (v >> SLP_TYP_SHIFT) & 7;
        (v & SLP_EN != 0 && typ == S5_SLEEP_VALUE).then_some(GuestEvent::PowerOff)
    }
}

/// The GED event register at port 0x602: a read returns the pending events
/// and clears them; writes are ignored.
#[derive(Debug)]
pub struct GedEvents {
    button: Arc<PowerButton>,
}

impl GedEvents {
    pub fn new(button: Arc<PowerButton>) -> Self {
        Self { button }
    }
}

impl BusDevice for GedEvents {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0
            && let Some(b) = data.first_mut()
        {
            *b = self.button.take_events();
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<GuestEvent> {
        None
    }
}

/// The pvpanic ISA port.
#[derive(Debug, Default)]
pub struct PvPanic;

const PVPANIC_PANICKED: u8 = 1;
const PVPANIC_CRASH_LOADED: u8 = 2;

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<GuestEvent> {
        (data.first()? & PVPANIC_PANICKED != 0).then_some(GuestEvent::Panic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::{Ioapic, Msi, MsiSink, PINS};

    #[test]
    fn s5_powers_off_and_one_resets() {
        let button = Arc::new(PowerButton::new());
        let mut d = SleepControl::new(button.clone());
        assert_eq!(d.write(0, &[0x34]), Some(GuestEvent::PowerOff));
        assert_eq!(d.write(0, &[0x14]), None, "S5 without SLP_EN");
        assert_eq!(d.write(0, &[0x30 | (3 << 2)]), None, "S3 is not power-off");
        assert_eq!(d.write(0, &[1]), Some(GuestEvent::Reset));
        assert_eq!(d.write(1, &[0x34]), None);
        assert_eq!(d.write(0, &[]), None);
        let mut b = [0xffu8; 1];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
        button.press();
        d.read(1, &mut b);
        assert_eq!(b, [1]);
        // Sticky: the GED register's read-to-clear does not reset it.
        button.take_events();
        d.read(1, &mut b);
        assert_eq!(b, [1]);
    }

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<Msi>>>);
    impl MsiSink for Recorder {
        fn signal(&self, msi: Msi) {
            lock(&self.0).push(msi);
        }
        fn routes_changed(&self, _: &[Option<Msi>; PINS]) {}
    }

    /// An IOAPIC with pin `GED_GSI` routed level-triggered to vector 0x42.
    fn routed_ioapic() -> (Arc<Mutex<Ioapic>>, Recorder) {
        let rec = Recorder::default();
        let a = Arc::new(Mutex::new(Ioapic::new(Box::new(rec.clone()))));
        let entry: u32 = 0x42 | (1 << 15);
        let mut g = lock(&a);
        g.write(0, &(0x10 + 2 * GED_GSI).to_le_bytes());
        g.write(0x10, &entry.to_le_bytes());
        drop(g);
        (a, rec)
    }

    #[test]
    fn the_power_button_raises_the_ged_line_until_the_register_is_read() {
        let (ioapic, rec) = routed_ioapic();
        let button = Arc::new(PowerButton::new());
        let mut ged = GedEvents::new(button.clone());
        let mut b = [0xffu8; 1];
        ged.read(0, &mut b);
        assert_eq!(b, [0], "nothing pending");
        // A press before the line is connected is delivered on connect.
        button.press();
        assert!(lock(&rec.0).is_empty());
        button.connect(IrqLine::new(ioapic.clone(), GED_GSI as usize));
        assert_eq!(lock(&rec.0).len(), 1);
        // A second press while the first is unacknowledged adds no interrupt.
        button.press();
        assert_eq!(lock(&rec.0).len(), 1);
        // The read takes the event and lowers the line.
        ged.read(0, &mut b);
        assert_eq!(b, [GED_POWER_BUTTON]);
        ged.read(0, &mut b);
        assert_eq!(b, [0], "read to clear");
        // A press between the read and the EOI interrupts again at the EOI.
        button.press();
        assert_eq!(lock(&rec.0).len(), 1, "remote IRR still set");
        lock(&ioapic).end_of_interrupt(0x42);
        assert_eq!(lock(&rec.0).len(), 2);
        // Read, then EOI: quiet.
        ged.read(0, &mut b);
        assert_eq!(b, [GED_POWER_BUTTON]);
        lock(&ioapic).end_of_interrupt(0x42);
        assert_eq!(lock(&rec.0).len(), 2);
        button.press();
        assert_eq!(lock(&rec.0).len(), 3, "the next press interrupts at once");
        let mut wide = [0xffu8; 4];
        ged.read(0, &mut wide);
        assert_eq!(wide, [GED_POWER_BUTTON, 0, 0, 0]);
        assert_eq!(ged.write(0, &[0xff]), None);
        ged.read(0, &mut b);
        assert_eq!(b, [0], "writes set nothing");
    }

    #[test]
    fn pvpanic_reports_panics_only() {
        let mut p = PvPanic;
        assert_eq!(p.write(0, &[1]), Some(GuestEvent::Panic));
        assert_eq!(p.write(0, &[2]), None);
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b, [3]);
    }
}

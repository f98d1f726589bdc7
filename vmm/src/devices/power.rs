//! Power and crash signalling: an ACPI hardware-reduced sleep control register
//! (port 0x600, as the FADT describes it) and a pvpanic port (0x505).
//!
//! Port 0x600 write: `SLP_TYP=5 | SLP_EN` (0x34) powers off, `1` resets.
//! Port 0x601 read: bit 0 is set once the host asked for a graceful shutdown
//! (the VMM's power button), so a polling guest can notice it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{BusDevice, GuestEvent};

pub const SLEEP_CTL_PORT: u64 = 0x600;
pub const SLEEP_CTL_LEN: u64 = 2;
pub const PVPANIC_PORT: u64 = 0x505;

const S5_SLEEP_VALUE: u8 = 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_EN: u8 = 1 << 5;
const RESET_VALUE: u8 = 1;

/// The sleep control/status pair.
#[derive(Debug)]
pub struct SleepControl {
    power_button: Arc<AtomicBool>,
}

impl SleepControl {
    /// `power_button` is raised by the control socket's `shutdown` request.
    pub fn new(power_button: Arc<AtomicBool>) -> Self {
        Self { power_button }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1
            && let Some(b) = data.first_mut()
        {
            *b = u8::from(self.power_button.load(Ordering::Acquire));
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

    #[test]
    fn s5_powers_off_and_one_resets() {
        let button = Arc::new(AtomicBool::new(false));
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
        button.store(true, Ordering::Release);
        d.read(1, &mut b);
        assert_eq!(b, [1]);
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

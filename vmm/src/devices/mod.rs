//! Devices and the buses that route guest port and MMIO accesses to them.
//!
//! Owns the [`BusDevice`] trait, the [`Bus`] address map and the legacy
//! devices (8250 serial, i8042, ACPI sleep control and the power button's
//! GED event register, pvpanic) and the
//! userspace IOAPIC their interrupt lines go to. Devices never
//! touch KVM; a guest access that ends the VM comes back as a [`GuestEvent`].

pub mod i8042;
pub mod ioapic;
pub mod power;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// Something a guest write asks of the VMM as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    PowerOff,
    Reset,
    Panic,
    /// The guest broke a device protocol (e.g. garbage virtio descriptors).
    DeviceFault(String),
}

/// A device on a port or MMIO bus; offsets are relative to its base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent>;
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

/// A write hit no device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmapped;

type Slot = (u64, u64, Arc<Mutex<dyn BusDevice>>);

/// An address map from ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.slots.iter().map(|(b, l, _)| (b, l)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self.slots.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(BusError::Overlap { base, len });
        }
        self.slots.push((base, len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        self.slots
            .iter()
            .find(|(b, l, _)| addr >= *b && addr - b < *l)
            .map(|(b, _, d)| (addr - b, d))
    }

    /// Reads from the device at `addr`; returns false (and all-ones data) if none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<GuestEvent>, Unmapped> {
        match self.find(addr) {
            Some((off, dev)) => Ok(lock(dev).write(off, data)),
            None => Err(Unmapped),
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a panicked vCPU thread must
/// not wedge the others; the device state is plain data).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Option<GuestEvent> {
            self.0 = data[0];
            (data[0] == 0xee).then_some(GuestEvent::Reset)
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x18, 8, Arc::new(Mutex::new(Echo(100))))
            .unwrap();
        assert!(bus.insert(0x17, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x0, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0))))
                .is_err()
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b[0], 100);
        assert!(!bus.read(0x20, &mut b));
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.write(0x10, &[0xee]), Ok(Some(GuestEvent::Reset)));
        assert_eq!(bus.write(0x40, &[1]), Err(Unmapped));
    }
}

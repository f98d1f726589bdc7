//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! Owns the register file, feature negotiation, queue configuration and the
//! device status state machine. A queue notification processes the queue
//! synchronously on the notifying vCPU. A used buffer sets the interrupt
//! status and asserts the device's IOAPIC pin; the driver's acknowledgement
//! that clears the status lowers it. A device error sets DEVICE_NEEDS_RESET
//! and ends the VM with a reason; nothing here panics on guest input.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{QueueError, VirtioDevice};
use crate::devices::ioapic::IrqLine;
use crate::devices::{BusDevice, GuestEvent};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // same vendor id the reference VMMs use

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

const INT_USED_RING: u32 = 1;
const CONFIG_SPACE: u64 = 0x100;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    notifications: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    irq: Option<IrqLine>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`; `notifications`/`faults` count queue kicks and device errors.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        notifications: Arc<AtomicU64>,
        faults: Arc<AtomicU64>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&s| Queue::new(s).ok())
            .collect();
        Self {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            notifications,
            faults,
            irq: None,
        }
    }

    /// Connects the transport's interrupt to an IOAPIC pin.
    pub fn with_irq(mut self, irq: IrqLine) -> Self {
        self.irq = Some(irq);
        self
    }

    /// Used buffers are ready: set the status bit and interrupt the driver.
    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Some(irq) = &self.irq {
            irq.assert();
        }
    }

    fn lower_irq(&self) {
        if let Some(irq) = &self.irq {
            irq.lower();
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is only allowed before DRIVER_OK.
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.lower_irq();
        self.device.reset();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Refuse FEATURES_OK for features we did not offer or without VERSION_1.
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & super::VIRTIO_F_VERSION_1 == 0
            {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
    }

    fn notify(&mut self, index: u32) -> Option<GuestEvent> {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return None;
        }
        let i = index as usize;
        let queue = self.queues.get_mut(i)?;
        if !queue.ready() {
            return None;
        }
        match self.device.process_queue(i, queue, &self.mem) {
            Ok(true) => self.signal_used(),
            Ok(false) => {}
            Err(e) => return self.fault(e),
        }
        if let Some(j) = self.device.pending_queue().filter(|&j| j != i)
            && let Err(ev) = self.host_kick(j)
        {
            return Some(ev);
        }
        None
    }

    /// The host side has work for queue `index` (called by the I/O thread).
    /// Returns whether any buffer was used, or the VM-ending event on a fault.
    pub fn host_kick(&mut self, index: usize) -> Result<bool, GuestEvent> {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return Ok(false);
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return Ok(false);
        };
        if !queue.ready() {
            return Ok(false);
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(used) => {
                if used {
                    self.signal_used();
                }
                Ok(used)
            }
            Err(e) => Err(self.fault(e).unwrap_or(GuestEvent::Panic)),
        }
    }

    /// The queues as the driver configured them (for the fuzz harness's checks).
    #[cfg(any(test, feature = "fuzz"))]
    pub(crate) fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The device's host file descriptor, if it has one.
    pub fn host_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        self.device.host_fd()
    }

    fn fault(&mut self, e: QueueError) -> Option<GuestEvent> {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.status |= STATUS_NEEDS_RESET;
        Some(GuestEvent::DeviceFault(format!(
            "virtio device type {}: {}",
            self.device.device_type(),
            crate::error_chain(&e)
        )))
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) -> Option<GuestEvent> {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => return self.notify(v),
            0x64 => {
                self.interrupt_status &= !v;
                if self.interrupt_status == 0 {
                    self.lower_irq();
                }
            }
            0x70 => self.set_status(v),
            0x80 => self
                .queue()
                .map_or((), |q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .queue()
                .map_or((), |q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .queue()
                .map_or((), |q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .queue()
                .map_or((), |q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .queue()
                .map_or((), |q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .queue()
                .map_or((), |q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
        None
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        let v = if data.len() == 4 {
            self.read_reg(offset)
        } else {
            0
        };
        for (d, s) in data
            .iter_mut()
            .zip(v.to_le_bytes().iter().chain([0u8; 4].iter()))
        {
            *d = *s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent> {
        if offset >= CONFIG_SPACE {
            return None; // read-only configuration for the devices here
        }
        let bytes: [u8; 4] = data.try_into().ok()?;
        if self.status & STATUS_FAILED != 0 && offset != 0x70 {
            return None;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::testing::{self, AVAIL, DESC, USED};
    use super::*;

    const STATUS_ACKNOWLEDGE: u32 = 1;
    const STATUS_DRIVER: u32 = 2;

    /// A device that completes every chain with length 7, or fails.
    struct Echo {
        fail: bool,
    }
    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            99
        }
        fn features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn process_queue(
            &mut self,
            index: usize,
            queue: &mut Queue,
            mem: &GuestMemoryMmap,
        ) -> Result<bool, QueueError> {
            let chains = super::super::chain::pop_all(index, queue, mem)?;
            if self.fail {
                return Err(QueueError::Malformed("test".into()));
            }
            for c in &chains {
                super::super::chain::add_used(queue, mem, c.head, 7)?;
            }
            Ok(!chains.is_empty())
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) -> Option<GuestEvent> {
        t.write(off, &v.to_le_bytes())
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup(fail: bool) -> (MmioTransport, Arc<GuestMemoryMmap>) {
        let mem = Arc::new(testing::mem());
        let mut t = MmioTransport::new(
            Box::new(Echo { fail }),
            mem.clone(),
            Arc::default(),
            Arc::default(),
        );
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 99);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x34), 16);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, DESC as u32);
        w(&mut t, 0x90, AVAIL as u32);
        w(&mut t, 0xa0, USED as u32);
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        (t, mem)
    }

    #[test]
    fn driver_init_then_notify_uses_the_chain_and_raises_the_interrupt() {
        let (mut t, mem) = setup(false);
        testing::desc(&mem, 0, 0x8000, 8, 0, 0);
        testing::publish(&mem, &[0]);
        assert_eq!(w(&mut t, 0x50, 0), None);
        assert_eq!(testing::used(&mem, 0), (1, 0, 7));
        assert_eq!(r(&mut t, 0x60), INT_USED_RING);
        w(&mut t, 0x64, INT_USED_RING);
        assert_eq!(r(&mut t, 0x60), 0);
        let mut cfg = [0u8; 2];
        t.read(0x102, &mut cfg);
        assert_eq!(cfg, [3, 4]);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, 0x80, 0x5000);
        assert_eq!(t.queues[0].desc_table(), DESC);
        // Reset clears everything.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn a_used_buffer_asserts_the_pin_and_the_ack_lowers_it() {
        use crate::devices::ioapic::{Ioapic, IrqLine, Msi, MsiSink, PINS};
        use crate::devices::lock;
        struct Count(Arc<AtomicU64>);
        impl MsiSink for Count {
            fn signal(&self, _: Msi) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
            fn routes_changed(&self, _: &[Option<Msi>; PINS]) {}
        }
        let sent = Arc::new(AtomicU64::new(0));
        let ioapic = Arc::new(std::sync::Mutex::new(Ioapic::new(Box::new(Count(
            sent.clone(),
        )))));
        // Pin 5 → vector 0x30, level-triggered.
        let mut a = lock(&ioapic);
        a.write(0, &(0x10u32 + 10).to_le_bytes());
        a.write(0x10, &(0x30u32 | 1 << 15).to_le_bytes());
        drop(a);
        let (t, mem) = setup(false);
        let mut t = t.with_irq(IrqLine::new(ioapic.clone(), 5));
        testing::desc(&mem, 0, 0x8000, 8, 0, 0);
        testing::publish(&mem, &[0]);
        w(&mut t, 0x50, 0);
        assert_eq!(sent.load(Ordering::Relaxed), 1);
        // EOI before the ack: the line is still high, so it fires again.
        lock(&ioapic).end_of_interrupt(0x30);
        assert_eq!(sent.load(Ordering::Relaxed), 2);
        // Ack, then EOI: quiet.
        w(&mut t, 0x64, INT_USED_RING);
        lock(&ioapic).end_of_interrupt(0x30);
        assert_eq!(sent.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn features_we_did_not_offer_are_refused() {
        let mem = Arc::new(testing::mem());
        let mut t = MmioTransport::new(
            Box::new(Echo { fail: false }),
            mem,
            Arc::default(),
            Arc::default(),
        );
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5);
        w(&mut t, 0x70, STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_device_error_sets_needs_reset_and_ends_the_vm() {
        let (mut t, mem) = setup(true);
        testing::desc(&mem, 0, 0x8000, 8, 0, 0);
        testing::publish(&mem, &[0]);
        let ev = w(&mut t, 0x50, 0);
        assert!(
            matches!(ev, Some(GuestEvent::DeviceFault(ref m)) if m.contains("test")),
            "{ev:?}"
        );
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        // Further notifications are ignored until reset.
        assert_eq!(w(&mut t, 0x50, 0), None);
    }

    #[test]
    fn odd_sized_and_unknown_accesses_are_harmless() {
        let (mut t, _mem) = setup(false);
        assert_eq!(t.write(0x50, &[0]), None);
        assert_eq!(t.write(0x70, &[0, 0, 0, 0, 0, 0, 0, 0]), None);
        let mut b = [0xffu8; 2];
        t.read(0x00, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(w(&mut t, 0x50, 12345), None, "notify of a missing queue");
        assert_eq!(r(&mut t, 0xdead), 0);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0);
    }
}

//! Virtio devices and the virtio-mmio transport.
//!
//! One folder per device with the same shape (device + queue handling +
//! counters), one [`VirtioDevice`] trait, transports separate. Queue processing
//! is pure logic over guest memory ([`chain`]), so unit tests and fuzzers drive
//! it without KVM or eventfds. Nothing a guest writes may panic the VMM: bad
//! descriptors become a [`QueueError`], which the transport turns into
//! DEVICE_NEEDS_RESET and a VM-ending [`crate::devices::GuestEvent::DeviceFault`].

pub mod block;
pub mod chain;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod io_thread;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit every device offers: the modern (1.x) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device types (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Errors a guest can cause while a queue is processed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {0} is not valid (ring addresses outside guest memory or misaligned)")]
    InvalidQueue(usize),
    #[error("available ring index is out of range")]
    AvailIndex,
    #[error("descriptor chain is malformed: {0}")]
    Malformed(String),
    #[error("guest memory access failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("guest memory access failed")]
    UsedRing(#[source] virtio_queue::Error),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes available buffers on queue `index`; returns whether any
    /// buffer was used (so the driver should be notified).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError>;
    /// A host file descriptor whose readability means "process this queue"
    /// (e.g. a tap with frames for the RX queue), watched by the I/O thread.
    fn host_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// A queue the device has work for after processing another one (e.g.
    /// vsock replies waiting for RX buffers after a TX packet).
    fn pending_queue(&self) -> Option<usize> {
        None
    }
    /// The driver accepted these features.
    fn ack_features(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Reads a little-endian config space field into `data` (out-of-range bytes read 0).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

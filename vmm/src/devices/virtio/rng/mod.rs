//! virtio-rng: fills device-writable buffers from the host's getrandom(2).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain;
use super::{QueueError, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice};

const QUEUE_SIZES: &[u16] = &[64];
/// Most entropy handed out per buffer.
const MAX_PER_BUFFER: u32 = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    pub bytes: Arc<AtomicU64>,
}

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let chains = chain::pop_all(index, queue, mem)?;
        for c in &chains {
            let mut given = 0u32;
            for b in c.buffers.iter().filter(|b| b.write_only) {
                let n = b.len.min(MAX_PER_BUFFER);
                let mut buf = vec![0u8; n as usize];
                if !getrandom(&mut buf) {
                    break;
                }
                mem.write_slice(&buf, b.addr).map_err(QueueError::Memory)?;
                given += n;
            }
            self.bytes.fetch_add(u64::from(given), Ordering::Relaxed);
            chain::add_used(queue, mem, c.head, given)?;
        }
        Ok(!chains.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::testing::*;
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_writable_buffers_with_fresh_bytes() {
        let m = mem();
        let mut q = queue();
        let mut rng = Rng::default();
        desc(&m, 0, 0x8000, 64, F_WRITE, 0);
        desc(&m, 1, 0x9000, 64, F_WRITE, 0);
        publish(&m, &[0, 1]);
        assert!(rng.process_queue(0, &mut q, &m).unwrap());
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        m.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
        assert_ne!(a, [0u8; 64]);
        assert_ne!(a, b);
        assert_eq!(used(&m, 0), (2, 0, 64));
        assert_eq!(rng.bytes.load(Ordering::Relaxed), 128);
    }
}

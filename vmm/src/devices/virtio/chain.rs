//! Descriptor chains, collected and checked before any device looks at them.
//!
//! Owns the rules every device relies on: a chain is at most the queue size
//! long (so loops end), every buffer lies inside guest memory, and the total
//! length is bounded. Pure logic over guest memory.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::QueueError;

/// Largest total byte count a device accepts in one chain.
pub const MAX_CHAIN_BYTES: u64 = 4 << 20;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// A validated chain: its head index (for the used ring) and buffers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

fn check(desc: &Descriptor, mem: &GuestMemoryMmap) -> Result<Buffer, QueueError> {
    let addr = desc.addr();
    let len = desc.len();
    if len > 0 && !mem.check_range(addr, len as usize, Permissions::ReadWrite) {
        return Err(QueueError::Malformed(format!(
            "buffer {:#x}+{len:#x} is outside guest memory",
            addr.0
        )));
    }
    Ok(Buffer {
        addr,
        len,
        write_only: desc.is_write_only(),
    })
}

/// Collects and validates one chain popped from a queue.
pub fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    queue_size: u16,
) -> Result<Chain, QueueError> {
    let head = chain.head_index();
    let mut buffers = Vec::new();
    let mut total = 0u64;
    let mut last_has_next = false;
    for desc in chain {
        if buffers.len() >= usize::from(queue_size) {
            return Err(QueueError::Malformed("chain longer than the queue".into()));
        }
        let b = check(&desc, mem)?;
        total += u64::from(b.len);
        if total > MAX_CHAIN_BYTES {
            return Err(QueueError::Malformed(format!(
                "chain longer than {MAX_CHAIN_BYTES} bytes"
            )));
        }
        last_has_next = desc.has_next();
        buffers.push(b);
    }
    if buffers.is_empty() {
        return Err(QueueError::Malformed(format!(
            "head descriptor {head} is unreadable"
        )));
    }
    if last_has_next {
        return Err(QueueError::Malformed(
            "chain loops or links outside the descriptor table".into(),
        ));
    }
    Ok(Chain { head, buffers })
}

/// Pops every available chain of `queue`, validated, checking the queue first.
pub fn pop_all(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Chain>, QueueError> {
    if !queue.is_valid(mem) {
        return Err(QueueError::InvalidQueue(index));
    }
    let size = queue.size();
    let mut out = Vec::new();
    let iter = queue.iter(mem).map_err(|_| QueueError::AvailIndex)?;
    for chain in iter {
        if out.len() >= usize::from(size) {
            break;
        }
        out.push(collect(chain, mem, size)?);
    }
    Ok(out)
}

/// Pops at most one available chain, validated.
pub fn pop_one(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<Chain>, QueueError> {
    if !queue.is_valid(mem) {
        return Err(QueueError::InvalidQueue(index));
    }
    let size = queue.size();
    let mut iter = queue.iter(mem).map_err(|_| QueueError::AvailIndex)?;
    match iter.next() {
        Some(c) => Ok(Some(collect(c, mem, size)?)),
        None => Ok(None),
    }
}

/// Returns a used chain to the driver.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, len).map_err(QueueError::UsedRing)
}

#[cfg(test)]
pub mod testing {
    //! A split virtqueue laid out in guest memory by hand, as a driver would.

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const SIZE: u16 = 16;
    pub const MEM_SIZE: u64 = 8 << 20;
    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    pub fn queue() -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    pub fn desc(m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + u64::from(i) * 16;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Publishes `heads` in the available ring.
    pub fn publish(m: &GuestMemoryMmap, heads: &[u16]) {
        let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for (k, h) in heads.iter().enumerate() {
            let slot = (idx as usize + k) % SIZE as usize;
            m.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        m.write_obj(
            idx.wrapping_add(heads.len() as u16),
            GuestAddress(AVAIL + 2),
        )
        .unwrap();
    }

    /// (used idx, first used element id, first used element len).
    pub fn used(m: &GuestMemoryMmap, n: u16) -> (u16, u32, u32) {
        let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        let e = USED + 4 + 8 * u64::from(n % SIZE);
        (
            idx,
            m.read_obj(GuestAddress(e)).unwrap(),
            m.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn a_good_chain_is_collected_in_order() {
        let m = mem();
        let mut q = queue();
        desc(&m, 0, 0x8000, 16, F_NEXT, 1);
        desc(&m, 1, 0x9000, 512, F_NEXT | F_WRITE, 2);
        desc(&m, 2, 0xa000, 1, F_WRITE, 0);
        publish(&m, &[0]);
        let chains = pop_all(0, &mut q, &m).unwrap();
        assert_eq!(chains.len(), 1);
        let c = &chains[0];
        assert_eq!(c.head, 0);
        assert_eq!(c.buffers.len(), 3);
        assert!(!c.buffers[0].write_only && c.buffers[2].write_only);
        assert_eq!(c.buffers[1].len, 512);
    }

    #[test]
    fn a_descriptor_loop_is_malformed_not_endless() {
        let m = mem();
        let mut q = queue();
        desc(&m, 0, 0x8000, 16, F_NEXT, 1);
        desc(&m, 1, 0x9000, 16, F_NEXT, 0);
        publish(&m, &[0]);
        assert!(matches!(
            pop_all(0, &mut q, &m),
            Err(QueueError::Malformed(_))
        ));
    }

    #[test]
    fn buffers_outside_memory_and_bad_links_are_malformed() {
        let m = mem();
        let mut q = queue();
        desc(&m, 0, 0xffff_ffff_0000, 16, 0, 0);
        publish(&m, &[0]);
        assert!(matches!(
            pop_all(0, &mut q, &m),
            Err(QueueError::Malformed(_))
        ));

        let mut q = queue();
        desc(&m, 0, 0x8000, 16, F_NEXT, 200); // next beyond the table
        publish(&m, &[0]);
        assert!(matches!(
            pop_all(0, &mut q, &m),
            Err(QueueError::Malformed(_))
        ));

        let mut q = queue();
        desc(&m, 0, MEM_SIZE - 8, 16, 0, 0); // straddles the end of memory
        publish(&m, &[0]);
        assert!(matches!(
            pop_all(0, &mut q, &m),
            Err(QueueError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_chains_and_bad_avail_index_are_refused() {
        let m = mem();
        let mut q = queue();
        for i in 0..4u16 {
            desc(&m, i, 0x10000, (MAX_CHAIN_BYTES / 3) as u32, F_NEXT, i + 1);
        }
        desc(&m, 4, 0x10000, 1, 0, 0);
        publish(&m, &[0]);
        let e = pop_all(0, &mut q, &m).unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");

        let mut q = queue();
        m.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(
            pop_all(0, &mut q, &m),
            Err(QueueError::AvailIndex)
        ));
    }

    #[test]
    fn a_queue_outside_memory_is_invalid() {
        let m = mem();
        let mut q = queue();
        q.set_desc_table_address(Some(0xfff0_0000), Some(0x10));
        assert!(matches!(
            pop_all(3, &mut q, &m),
            Err(QueueError::InvalidQueue(3))
        ));
    }
}

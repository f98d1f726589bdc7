//! Hand-made tricky inputs for the fuzz harness (also written to
//! `vmm/fuzz/seeds/virtio_queues/` as the coverage-guided fuzzer's seeds) and
//! the builders they use. The tests at the bottom are the bounded run
//! `cargo test` does on every change, with [`super::random`]'s drivers.

use super::harness::{DISK_SIZE, VSOCK_SERVICE_PORT};
use super::{DeviceKind, MAX_BYTES, Op, Scenario};

pub const VERSION_1: u64 = 1 << 32;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// What a hand-made case must lead to, besides holding every invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The device reports a fault (DEVICE_NEEDS_RESET); nothing hangs.
    Fault,
    /// The device completes buffers and never faults.
    Used,
    /// Only the invariants.
    Survive,
}

/// Where the standard layout puts queue `q`'s descriptor table (its
/// available ring follows 4 KiB later, its used ring 8 KiB later).
pub fn desc_table(q: u8) -> u64 {
    0x1000 + u64::from(q) * 0x3000
}

/// Driver initialization: features, queues of the given sizes in the
/// standard layout, DRIVER_OK.
pub fn start(sizes: &[u16]) -> Vec<Op> {
    let mut ops = vec![Op::Init {
        features: VERSION_1,
    }];
    for (q, &size) in sizes.iter().enumerate() {
        let desc = desc_table(q as u8);
        ops.push(Op::Queue {
            queue: q as u8,
            size,
            desc,
            avail: desc + 0x1000,
            used: desc + 0x2000,
        });
    }
    ops.push(Op::DriverOk);
    ops
}

pub fn desc(queue: u8, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> Op {
    Op::Desc {
        queue,
        index,
        addr,
        len,
        flags,
        next,
    }
}

pub fn write(addr: u64, bytes: Vec<u8>) -> Op {
    Op::Write { addr, bytes }
}

/// Publishes `heads` on `queue` and notifies it.
pub fn kick(queue: u8, heads: &[u16]) -> [Op; 2] {
    [
        Op::Publish {
            queue,
            heads: heads.to_vec(),
        },
        Op::Notify {
            queue: u32::from(queue),
        },
    ]
}

/// A virtio-blk request header.
pub fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A vsock packet header from guest CID 3 to the host.
pub fn vsock_header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&3u64.to_le_bytes());
    h.extend_from_slice(&2u64.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // stream
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&(64u32 * 1024).to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// Descriptor table entries (addr, len, flags, next) as guest bytes.
pub fn table(entries: &[(u64, u32, u16, u16)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len, flags, next) in entries {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out
}

const BUF: u64 = 0x1_0000; // region B: buffers
const HI: u64 = 0x4_0000; // region C, past the hole
pub const HOLE: u64 = 0x2_0000;
pub const END: u64 = 0x5_0000; // first address past all memory

fn scenario(device: DeviceKind, ops: Vec<Op>) -> Scenario {
    Scenario { device, ops }
}

/// A good block request (header, data, status) in descriptors 0..3 of queue 0.
fn blk_request(kind: u32, sector: u64, len: u32, data_flags: u16) -> Vec<Op> {
    vec![
        write(BUF, blk_header(kind, sector)),
        desc(0, 0, BUF, 16, F_NEXT, 1),
        desc(0, 1, BUF + 0x100, len, F_NEXT | data_flags, 2),
        desc(0, 2, BUF + 0x80, 1, F_WRITE, 0),
    ]
}

/// A hand-made case: its name (and seed file's), what it must lead to, the input.
pub type Case = (&'static str, Expect, Scenario);

/// The hand-made tricky inputs, by name, in a fixed order.
pub fn tricky() -> Vec<Case> {
    [
        good_traffic(),
        loops_and_long_chains(),
        wild_addresses_and_rings(),
        lengths_and_indirect_tables(),
        ring_indices_and_transport_misuse(),
        block_and_net_protocol(),
        vsock_protocol(),
    ]
    .concat()
}

/// Well-formed traffic on every device: the baseline the others break.
fn good_traffic() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Well-formed traffic on every device: the baseline the others break.
    let mut ops = start(&[16]);
    ops.extend(blk_request(1, 2, 1024, 0));
    ops.extend(kick(0, &[0]));
    ops.extend(blk_request(0, 2, 1024, F_WRITE));
    ops.extend(kick(0, &[0]));
    ops.extend(blk_request(8, 0, 20, F_WRITE));
    ops.extend(kick(0, &[0]));
    add("blk-good-write-read-getid", Used, Block, ops);

    let mut ops = start(&[16]);
    ops.push(desc(0, 0, BUF, 64, F_WRITE, 0));
    ops.push(desc(0, 1, HI, 4096, F_WRITE, 0));
    ops.extend(kick(0, &[0, 1]));
    add("rng-good", Used, Rng, ops);

    let mut ops = start(&[16, 16]);
    ops.push(write(BUF, vec![0; 12]));
    ops.push(write(BUF + 0x100, b"a frame for the tap".to_vec()));
    ops.push(desc(1, 0, BUF, 12, F_NEXT, 1));
    ops.push(desc(1, 1, BUF + 0x100, 19, 0, 0));
    ops.extend(kick(1, &[0]));
    ops.push(Op::HostData {
        bytes: vec![0xee; 60],
    });
    ops.push(desc(0, 0, HI, 2048, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("net-good-tx-rx", Used, Net, ops);

    let mut ops = start(&[16, 16, 4]);
    ops.push(desc(0, 0, HI, 4096, F_WRITE, 0));
    ops.push(desc(0, 1, HI + 0x1000, 4096, F_WRITE, 0));
    ops.push(desc(0, 2, HI + 0x2000, 4096, F_WRITE, 0));
    ops.push(Op::Publish {
        queue: 0,
        heads: vec![0, 1, 2],
    });
    ops.push(write(BUF, vsock_header(1, 5000, VSOCK_SERVICE_PORT, 0)));
    ops.push(desc(1, 0, BUF, 44, 0, 0));
    ops.extend(kick(1, &[0]));
    let mut rw = vsock_header(5, 5000, VSOCK_SERVICE_PORT, 5);
    rw.extend_from_slice(b"hello");
    ops.push(write(BUF + 0x100, rw));
    ops.push(desc(1, 1, BUF + 0x100, 49, 0, 0));
    ops.extend(kick(1, &[1]));
    ops.push(Op::HostData {
        bytes: b"reply from the host".to_vec(),
    });
    ops.push(Op::HostKick { queue: 0 });
    ops.push(Op::HostConnect { port: 77 });
    ops.push(Op::HostKick { queue: 0 });
    add("vsock-good-connect-rw-reply", Used, Vsock, ops);
    out
}

/// Descriptor loops, and chains longer than the queue or a full ring of them.
fn loops_and_long_chains() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Descriptor loops: a self-loop, a two-cycle, and a loop in an indirect table.
    for device in [Block, Rng, Net, Vsock] {
        let q = if device == Net || device == Vsock {
            1
        } else {
            0
        };
        let mut ops = start(&[16, 16, 4]);
        ops.push(desc(q, 0, BUF, 16, F_NEXT, 1));
        ops.push(desc(q, 1, BUF + 0x10, 16, F_NEXT | F_WRITE, 0));
        ops.extend(kick(q, &[0]));
        let name = match device {
            Block => "loop-two-cycle-blk",
            Rng => "loop-two-cycle-rng",
            Net => "loop-two-cycle-net-tx",
            _ => "loop-two-cycle-vsock-tx",
        };
        add(name, Fault, device, ops);
    }
    let mut ops = start(&[8]);
    ops.push(desc(0, 3, BUF, 64, F_NEXT | F_WRITE, 3));
    ops.extend(kick(0, &[3]));
    add("loop-self-rng", Fault, Rng, ops);
    let mut ops = start(&[8]);
    ops.push(write(
        HI,
        table(&[(BUF, 8, F_NEXT | F_WRITE, 1), (BUF, 8, F_NEXT | F_WRITE, 0)]),
    ));
    ops.push(desc(0, 0, HI, 32, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("loop-in-indirect-table-rng", Fault, Rng, ops);

    // A chain longer than the queue: 64 linked entries in an indirect table
    // behind a queue of 8.
    let long: Vec<_> = (0..64u16)
        .map(|i| (BUF + u64::from(i) * 8, 8, F_NEXT | F_WRITE, i + 1))
        .collect();
    let mut ops = start(&[8]);
    ops.push(write(HI, table(&long)));
    ops.push(desc(0, 0, HI, 64 * 16, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("chain-longer-than-queue-indirect", Fault, Rng, ops);
    // ...and a full ring of chains (net TX, 256 entries) in one
    // notification, twice over, the second time all the same head.
    let mut ops = start(&[256, 256]);
    for i in 0..256u16 {
        ops.push(desc(1, i, BUF + u64::from(i) * 16, 16, 0, 0));
    }
    ops.push(Op::Publish {
        queue: 1,
        heads: (0..256).collect(),
    });
    ops.push(Op::Notify { queue: 1 });
    ops.push(Op::Publish {
        queue: 1,
        heads: vec![7; 256],
    });
    ops.push(Op::Notify { queue: 1 });
    add("full-ring-twice-net-tx", Used, Net, ops);
    out
}

/// Buffers and rings at addresses outside memory, misaligned or overlapping.
fn wild_addresses_and_rings() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Addresses past the end of memory, in the hole, straddling edges, wrapping.
    for (name, addr, len) in [
        ("addr-past-end", END, 16),
        ("addr-in-hole", HOLE, 16),
        ("addr-straddles-into-hole", 0x1_7ff8, 16),
        ("addr-straddles-end", END - 8, 16),
        ("addr-wraps-u64", u64::MAX - 7, 16),
    ] {
        let mut ops = start(&[16]);
        ops.push(desc(0, 0, addr, len, F_WRITE, 0));
        ops.extend(kick(0, &[0]));
        add(name, Fault, Rng, ops);
    }
    // Adjacent regions: a buffer across their boundary is ordinary memory.
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, 0xfff8, 16, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("addr-across-adjacent-regions", Used, Rng, ops);
    // Rings outside memory, misaligned, or on top of each other.
    let mut ops = vec![
        Op::Init {
            features: VERSION_1,
        },
        Op::Queue {
            queue: 0,
            size: 16,
            desc: END,
            avail: HOLE,
            used: u64::MAX - 3,
        },
        Op::DriverOk,
    ];
    ops.push(Op::Notify { queue: 0 });
    add("rings-outside-memory", Fault, Block, ops);
    let mut ops = vec![
        Op::Init {
            features: VERSION_1,
        },
        Op::Queue {
            queue: 0,
            size: 16,
            desc: 0x1008,
            avail: 0x2001,
            used: 0x3002,
        },
        Op::DriverOk,
    ];
    ops.extend(kick(0, &[0]));
    add("rings-misaligned", Survive, Rng, ops);
    // Used ring on the descriptor table, and a writable buffer over the
    // available ring: the device rewrites the driver's own structures.
    let mut ops = vec![
        Op::Init {
            features: VERSION_1,
        },
        Op::Queue {
            queue: 0,
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x1000,
        },
        Op::DriverOk,
        desc(0, 0, 0x2000, 64, F_WRITE, 0),
        desc(0, 1, 0x1000, 256, F_WRITE, 0),
    ];
    ops.extend(kick(0, &[0, 1, 0, 1]));
    ops.extend(kick(0, &[1, 1]));
    add("rings-overlap-and-self-overwrite", Survive, Rng, ops);
    out
}

/// Zero and huge lengths, and indirect descriptor tables.
fn lengths_and_indirect_tables() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Zero and huge lengths.
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, u64::MAX, 0, F_WRITE, 0));
    ops.push(desc(0, 1, END, 0, F_NEXT | F_WRITE, 2));
    ops.push(desc(0, 2, BUF, 0, F_WRITE, 0));
    ops.extend(kick(0, &[0, 1]));
    add("zero-length-at-wild-addresses-rng", Survive, Rng, ops);
    let mut ops = start(&[16]);
    ops.extend(blk_request(0, 0, 0, F_WRITE));
    ops.push(desc(0, 1, u64::MAX, 0, F_NEXT | F_WRITE, 2));
    ops.extend(kick(0, &[0]));
    add("zero-length-data-blk", Survive, Block, ops);
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, BUF, u32::MAX, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("huge-length-rng", Fault, Rng, ops);
    // 50 buffers of 96 KiB (all of the first two regions, overlapping) is
    // more than a chain may carry, though each buffer is valid memory.
    let mut big: Vec<_> = (0..50u16)
        .map(|i| (0, 0x1_8000, F_NEXT | F_WRITE, i + 1))
        .collect();
    big[49].2 = F_WRITE;
    let mut ops = start(&[64]);
    ops.push(write(HI, table(&big)));
    ops.push(desc(0, 0, HI, 50 * 16, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("chain-over-max-bytes", Fault, Rng, ops);

    // Indirect descriptors: good, nested, odd length, outside memory, with NEXT.
    let mut ops = start(&[16]);
    ops.push(write(BUF, blk_header(0, 1)));
    ops.push(write(
        HI,
        table(&[
            (BUF, 16, F_NEXT, 1),
            (BUF + 0x200, 512, F_NEXT | F_WRITE, 2),
            (BUF + 0x80, 1, F_WRITE, 0),
        ]),
    ));
    ops.push(desc(0, 5, HI, 48, F_INDIRECT, 0));
    ops.extend(kick(0, &[5]));
    add("indirect-good-blk-read", Used, Block, ops);
    let mut ops = start(&[16]);
    ops.push(write(HI, table(&[(HI + 0x100, 16, F_INDIRECT, 0)])));
    ops.push(desc(0, 0, HI, 16, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("indirect-nested", Fault, Rng, ops);
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, HI, 17, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("indirect-odd-length", Fault, Rng, ops);
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, END - 16, 64, F_INDIRECT, 0));
    ops.push(desc(0, 1, u64::MAX - 15, 32, F_INDIRECT, 0));
    ops.extend(kick(0, &[0, 1]));
    add("indirect-table-outside-memory", Fault, Rng, ops);
    let mut ops = start(&[16]);
    ops.push(write(HI, table(&[(BUF, 16, F_WRITE, 0)])));
    ops.push(desc(0, 0, HI, 16, F_INDIRECT | F_NEXT, 1));
    ops.push(desc(0, 1, BUF, 16, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("indirect-with-next", Survive, Rng, ops);
    let mut ops = start(&[16]);
    ops.push(desc(0, 0, HI, 0xffff0, F_INDIRECT, 0));
    ops.extend(kick(0, &[0]));
    add("indirect-table-of-65535", Survive, Rng, ops);
    out
}

/// Ring indices out of range and misuse of the transport.
fn ring_indices_and_transport_misuse() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Ring indices: heads out of range, an available index far ahead.
    let mut ops = start(&[16]);
    ops.extend(kick(0, &[300, 16, u16::MAX]));
    add("head-out-of-range", Fault, Rng, ops);
    let mut ops = start(&[16]);
    ops.push(Op::AvailIdx {
        queue: 0,
        idx: 1000,
    });
    ops.push(Op::Notify { queue: 0 });
    add("avail-index-far-ahead", Fault, Block, ops);

    // Transport misuse: notify before DRIVER_OK and of missing queues, odd
    // widths, a reset mid-way and a reused device.
    let mut ops = vec![
        Op::Notify { queue: 0 },
        Op::Init { features: u64::MAX },
        Op::Notify { queue: 0 },
    ];
    ops.extend(start(&[16]));
    ops.extend([
        Op::Notify { queue: 7 },
        Op::Notify { queue: u32::MAX },
        Op::Reg {
            offset: 0x50,
            value: 0,
            width: 2,
        },
        Op::Reg {
            offset: 0x70,
            value: 0,
            width: 8,
        },
        Op::Read {
            offset: 0x100,
            width: 8,
        },
        Op::Read {
            offset: 0xfff,
            width: 8,
        },
        Op::HostKick { queue: 9 },
    ]);
    ops.push(desc(0, 0, END, 16, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    ops.extend(kick(0, &[0]));
    ops.push(Op::Reg {
        offset: 0x70,
        value: 0,
        width: 4,
    });
    ops.extend(start(&[16]));
    ops.push(desc(0, 0, BUF, 16, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("transport-misuse-fault-reset-reuse", Survive, Rng, ops);
    out
}

/// Block and net protocol errors.
fn block_and_net_protocol() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Block-specific: wrong directions, no status, sector overflow, read-only writes.
    let mut ops = start(&[16]);
    ops.extend(blk_request(0, 0, 512, 0));
    ops.extend(kick(0, &[0]));
    add("blk-read-into-readonly-buffer", Fault, Block, ops);
    let mut ops = start(&[16]);
    ops.push(write(BUF, blk_header(0, 0)));
    ops.push(desc(0, 0, BUF, 16, F_NEXT, 1));
    ops.push(desc(0, 1, BUF + 0x80, 1, 0, 0));
    ops.extend(kick(0, &[0]));
    add("blk-status-not-writable", Fault, Block, ops);
    let mut ops = start(&[16]);
    ops.extend(blk_request(0, u64::MAX / 256, 512, F_WRITE));
    ops.extend(kick(0, &[0]));
    ops.extend(blk_request(0, (DISK_SIZE as u64 / 512) - 1, 1024, F_WRITE));
    ops.extend(kick(0, &[0]));
    add("blk-sector-overflow-and-past-end", Used, Block, ops);
    let mut ops = start(&[16]);
    ops.extend(blk_request(1, 0, 512, 0));
    ops.extend(kick(0, &[0]));
    add("blk-write-to-read-only-disk", Used, BlockReadOnly, ops);

    // Net: frames bigger than the RX buffers, TX shorter than its header.
    let mut ops = start(&[16, 16]);
    ops.push(Op::HostData {
        bytes: vec![1; MAX_BYTES],
    });
    ops.push(desc(0, 0, BUF, 100, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    ops.push(desc(1, 0, BUF, 4, 0, 0));
    ops.extend(kick(1, &[0]));
    add("net-frame-too-big-and-short-tx", Used, Net, ops);
    out
}

/// Vsock protocol errors and a TX flood.
fn vsock_protocol() -> Vec<Case> {
    use DeviceKind::*;
    use Expect::*;
    let mut out = Vec::new();
    let mut add =
        |name, expect, device, ops: Vec<Op>| out.push((name, expect, scenario(device, ops)));
    // Vsock: a header claiming more payload than its buffers, a short
    // packet, an RX buffer the device may not write, and host data with
    // RX buffers too small to hold a header.
    let mut ops = start(&[16, 16, 4]);
    ops.push(write(BUF, vsock_header(5, 1, VSOCK_SERVICE_PORT, u32::MAX)));
    ops.push(desc(1, 0, BUF, 44, 0, 0));
    ops.extend(kick(1, &[0]));
    add("vsock-len-beyond-buffers", Fault, Vsock, ops);
    let mut ops = start(&[16, 16, 4]);
    ops.push(desc(1, 0, BUF, 10, 0, 0));
    ops.extend(kick(1, &[0]));
    add("vsock-short-packet", Fault, Vsock, ops);
    let mut ops = start(&[16, 16, 4]);
    ops.push(desc(0, 0, HI, 4096, 0, 0));
    ops.push(Op::Publish {
        queue: 0,
        heads: vec![0],
    });
    ops.push(write(BUF, vsock_header(1, 9, 4242, 0)));
    ops.push(desc(1, 0, BUF, 44, 0, 0));
    ops.extend(kick(1, &[0]));
    add("vsock-rx-buffer-not-writable", Fault, Vsock, ops);
    let mut ops = start(&[16, 16, 4]);
    ops.push(write(BUF, vsock_header(1, 5000, VSOCK_SERVICE_PORT, 0)));
    ops.push(desc(1, 0, BUF, 44, 0, 0));
    ops.extend(kick(1, &[0]));
    ops.push(Op::HostData {
        bytes: vec![7; 1000],
    });
    ops.push(desc(0, 0, HI, 20, F_WRITE, 0));
    ops.extend(kick(0, &[0]));
    add("vsock-rx-buffer-too-small", Fault, Vsock, ops);
    // A guest that floods TX with requests (each earning an RST) and posts no
    // RX buffers: the device stops taking TX packets once its control queue
    // is full, then drains it into RX buffers and resumes TX by itself.
    let mut ops = start(&[16, 16, 4]);
    ops.push(write(BUF, vsock_header(1, 1, 9, 0)));
    ops.push(desc(1, 0, BUF, 44, 0, 0));
    for _ in 0..65 {
        ops.extend(kick(1, &[0; 16]));
    }
    for i in 0..16 {
        ops.push(desc(0, i, HI + u64::from(i) * 64, 64, F_WRITE, 0));
    }
    for _ in 0..66 {
        ops.extend(kick(0, &(0..16).collect::<Vec<_>>()));
    }
    add("vsock-tx-flood-without-rx-buffers", Used, Vsock, ops);
    out
}

#[cfg(test)]
mod tests {
    use super::super::random::{Prng, mutate, random_scenario};
    use super::super::{run, run_bytes};
    use super::*;
    use std::path::PathBuf;

    fn seeds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/virtio_queues")
    }

    fn env_u64(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    #[test]
    fn hand_made_tricky_inputs_hold_every_invariant() {
        for (name, expect, s) in tricky() {
            let stats = run(&s).unwrap_or_else(|v| panic!("{name}: {v}"));
            match expect {
                Expect::Fault => assert!(stats.faults > 0, "{name}: no fault: {stats:?}"),
                Expect::Used => assert!(
                    stats.used > 0 && stats.faults == 0,
                    "{name}: expected used buffers and no fault: {stats:?}"
                ),
                Expect::Survive => {}
            }
            // The encoding is what the fuzzer and the seed files carry.
            assert!(Scenario::decode(&s.encode()) == s, "{name}: encoding");
        }
    }

    /// The seed corpus is the hand-made cases plus regressions; set
    /// RUNV_FUZZ_WRITE_SEEDS=1 to rewrite the hand-made ones after a change.
    #[test]
    fn seed_files_replay_and_match_the_hand_made_cases() {
        let dir = seeds_dir();
        if std::env::var("RUNV_FUZZ_WRITE_SEEDS").as_deref() == Ok("1") {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, _, s) in tricky() {
                std::fs::write(dir.join(name), s.encode()).unwrap();
            }
        }
        for (name, _, s) in tricky() {
            let on_disk = std::fs::read(dir.join(name)).unwrap_or_default();
            assert!(
                on_disk == s.encode(),
                "seed {name} is missing or stale: run with RUNV_FUZZ_WRITE_SEEDS=1"
            );
        }
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            run_bytes(&bytes).unwrap_or_else(|v| panic!("{}: {v}", path.display()));
            n += 1;
        }
        assert!(n >= tricky().len());
    }

    #[test]
    fn encoding_round_trips_for_generated_scenarios() {
        let mut r = Prng::new(7);
        for _ in 0..500 {
            let s = random_scenario(&mut r);
            assert_eq!(Scenario::decode(&s.encode()), s);
        }
        // Any bytes decode, including none.
        assert_eq!(Scenario::decode(&[]).ops, vec![]);
        let mut r = Prng::new(8);
        for _ in 0..500 {
            let bytes: Vec<u8> = (0..r.below(300)).map(|_| r.next_u64() as u8).collect();
            assert!(Scenario::decode(&bytes).ops.len() <= super::super::MAX_OPS);
        }
    }

    /// The bounded fuzzing run CI does: generated drivers, then mutations of
    /// the seeds and of generated inputs, from a fixed seed. Override with
    /// RUNV_FUZZ_SEED and RUNV_FUZZ_ITERS for a longer local run.
    #[test]
    fn seeded_random_drivers_hold_every_invariant() {
        let seed = env_u64("RUNV_FUZZ_SEED", 0x5eed_f00d);
        let iters = env_u64("RUNV_FUZZ_ITERS", 4000);
        let mut r = Prng::new(seed);
        let mut total = crate::devices::virtio::fuzz::Stats::default();
        let seeds: Vec<Vec<u8>> = tricky().iter().map(|(_, _, s)| s.encode()).collect();
        for i in 0..iters {
            let (input, origin) = match i % 3 {
                0 => {
                    let seed = &seeds[r.below(seeds.len() as u64) as usize];
                    (mutate(&mut r, seed), "mutated seed")
                }
                1 => {
                    let generated = random_scenario(&mut r).encode();
                    (mutate(&mut r, &generated), "mutated driver")
                }
                _ => (random_scenario(&mut r).encode(), "driver"),
            };
            match run_bytes(&input) {
                Ok(s) => {
                    total.live_steps += s.live_steps;
                    total.used += s.used;
                    total.faults += s.faults;
                    total.self_modifying += s.self_modifying;
                }
                Err(v) => {
                    let path = std::env::temp_dir().join(format!("runv-fuzz-{seed:x}-{i}"));
                    let _ = std::fs::write(&path, &input);
                    panic!(
                        "seed {seed:#x} iteration {i} ({origin}): {v}\ninput saved to {} (replay it with the fuzz target, or add it to the seeds as a regression)",
                        path.display()
                    );
                }
            }
        }
        eprintln!("fuzz seed {seed:#x}, {iters} inputs: {total:?}");
        // The generator must reach the devices, not just fail setup.
        assert!(total.used > iters / 4, "{total:?}");
        assert!(total.faults > iters / 20, "{total:?}");
    }
}

//! Random inputs for the bounded fuzzing run: a seeded generator of driver
//! behaviour (mostly well-formed chains, with wrong turns mixed in) and a
//! byte-level mutator like a fuzzer's. No coverage feedback: the point is a
//! fast, reproducible sweep on every `cargo test`; vmm/fuzz goes deeper.

use super::cases::{
    END, F_INDIRECT, F_NEXT, F_WRITE, HOLE, VERSION_1, blk_header, desc, desc_table, start, table,
    vsock_header, write,
};
use super::harness::{DISK_SIZE, REGIONS, VSOCK_SERVICE_PORT};
use super::{DeviceKind, MAX_HEADS, Op, Scenario};

/// A small, fast, seedable generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn queue_count(d: DeviceKind) -> u64 {
    match d {
        DeviceKind::Net => 2,
        DeviceKind::Vsock => 3,
        _ => 1,
    }
}

fn address(r: &mut Prng) -> u64 {
    let (b_start, b_len) = REGIONS[1];
    let (c_start, c_len) = REGIONS[2];
    match r.below(12) {
        0..=3 => b_start + r.below(b_len),
        4..=5 => c_start + r.below(c_len),
        6 => r.below(REGIONS[0].1),
        7 => r.pick(&[0xfff8, 0x1_7ff0, 0x1_7fff, 0x4_fff0, END, HOLE, END - 1]),
        8 => u64::MAX - r.below(64),
        9 => r.next_u64(),
        _ => (b_start + r.below(b_len)) & !0xf,
    }
}

fn length(r: &mut Prng) -> u32 {
    match r.below(10) {
        0 => 0,
        1 => r.pick(&[1, 16, 44, 56, 512, 4096]),
        2 => r.pick(&[0x8000, 0x1_0000, 0x1_8000, u32::MAX]),
        3 => r.next_u64() as u32,
        _ => r.below(0x800) as u32,
    }
}

/// Guest bytes a device will find meaningful at a buffer's start.
fn payload(r: &mut Prng, device: DeviceKind) -> Vec<u8> {
    match (device, r.below(3)) {
        (DeviceKind::Block | DeviceKind::BlockReadOnly, 0) => {
            let sector = match r.below(3) {
                0 => r.below(DISK_SIZE as u64 / 512 + 2),
                1 => r.next_u64(),
                _ => 0,
            };
            blk_header(r.pick(&[0, 1, 4, 8, 77]), sector)
        }
        (DeviceKind::Vsock, 0) => {
            let port = if r.chance(70) {
                VSOCK_SERVICE_PORT
            } else {
                r.next_u64() as u32
            };
            let len = if r.chance(80) {
                r.below(64) as u32
            } else {
                r.next_u64() as u32
            };
            let mut h = vsock_header(r.below(9) as u16, r.below(4) as u32, port, len);
            if r.chance(10) {
                h[0] = r.next_u64() as u8; // wrong source CID
            }
            h.extend((0..r.below(64)).map(|_| r.next_u64() as u8));
            h
        }
        (_, 1) => {
            // An indirect table of a few entries.
            let n = r.below(6) + 1;
            let entries: Vec<_> = (0..n)
                .map(|i| {
                    let flags = (r.next_u64() as u16) & (F_NEXT | F_WRITE | F_INDIRECT);
                    let next = if r.chance(80) {
                        i as u16 + 1
                    } else {
                        r.next_u64() as u16
                    };
                    (address(r), length(r), flags, next)
                })
                .collect();
            table(&entries)
        }
        _ => (0..r.below(64)).map(|_| r.next_u64() as u8).collect(),
    }
}

/// A buffer that lies in memory, in the buffer region or past the hole.
fn sane_buffer(r: &mut Prng, min_len: u64) -> (u64, u32) {
    let (start, len) = if r.chance(70) { REGIONS[1] } else { REGIONS[2] };
    let blen = min_len.max(1 + r.below(0x800)).min(len);
    let addr = start + r.below(len - blen + 1);
    (addr, blen as u32)
}

/// A well-formed chain for `device`'s queue `q` (with a small chance of
/// one wrong direction), its payload written, its head published.
fn good_chain(r: &mut Prng, device: DeviceKind, q: u8, size: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    let blk = matches!(device, DeviceKind::Block | DeviceKind::BlockReadOnly);
    let n = if blk { 2 + r.below(3) } else { 1 + r.below(3) }.min(size);
    let first = r.below(size);
    let index = |k: u64| ((first + k) % size) as u16;
    let kind = r.pick(&[0u32, 0, 1, 1, 4, 8]);
    for k in 0..n {
        let last = k + 1 == n;
        let (min_len, write_only) = match (device, q) {
            (DeviceKind::Block | DeviceKind::BlockReadOnly, _) if k == 0 => (16, false),
            (DeviceKind::Block | DeviceKind::BlockReadOnly, _) if last => (1, true),
            (DeviceKind::Block | DeviceKind::BlockReadOnly, _) => (512, kind != 1),
            (DeviceKind::Rng, _) => (1, true),
            (DeviceKind::Net, 0) => (1600, true),
            (DeviceKind::Net, _) => (if k == 0 { 12 } else { 1 }, false),
            (DeviceKind::Vsock, 1) => (if k == 0 { 44 } else { 1 }, false),
            (DeviceKind::Vsock, _) => (44 + 64, true),
        };
        let (addr, mut len) = sane_buffer(r, min_len);
        if blk && last {
            len = 1;
        } else if blk && k > 0 {
            len = len / 512 * 512;
        }
        if k == 0 {
            let header = match device {
                DeviceKind::Block | DeviceKind::BlockReadOnly => {
                    blk_header(kind, r.below(DISK_SIZE as u64 / 512))
                }
                DeviceKind::Vsock if q == 1 => {
                    let op = r.pick(&[1u16, 1, 2, 3, 4, 5, 5, 5, 6, 7]);
                    let port = if r.chance(80) {
                        VSOCK_SERVICE_PORT
                    } else {
                        r.below(2000) as u32
                    };
                    let payload = r.below(u64::from(len).saturating_sub(44).min(64) + 1) as u32;
                    let mut h = vsock_header(op, 5000 + r.below(3) as u32, port, payload);
                    h.extend((0..payload).map(|_| r.next_u64() as u8));
                    h
                }
                _ => Vec::new(),
            };
            if !header.is_empty() {
                ops.push(write(addr, header));
            }
        }
        let mut flags = if write_only { F_WRITE } else { 0 };
        if r.chance(3) {
            flags ^= F_WRITE;
        }
        if !last {
            flags |= F_NEXT;
        }
        ops.push(desc(q, index(k), addr, len, flags, index(k + 1)));
    }
    ops.push(Op::Publish {
        queue: q,
        heads: vec![index(0)],
    });
    if r.chance(60) {
        ops.push(Op::Notify {
            queue: u32::from(q),
        });
    }
    ops
}

/// A random driver: mostly a proper initialization, then a mix of
/// descriptors, publications, notifications and host traffic.
pub fn random_scenario(r: &mut Prng) -> Scenario {
    let device = DeviceKind::ALL[r.below(DeviceKind::ALL.len() as u64) as usize];
    let nq = queue_count(device);
    let (sizes, mut ops) = random_init(r, nq);
    let steps = 1 + r.below(40);
    for _ in 0..steps {
        let q = r.below(nq) as u8;
        let size = effective_size(device, q, sizes[usize::from(q)]);
        if r.chance(35) {
            ops.extend(good_chain(r, device, q, size));
            continue;
        }
        if r.chance(3) {
            // The driver resets the device and starts over.
            ops.push(Op::Reg {
                offset: 0x70,
                value: 0,
                width: 4,
            });
            ops.extend(start(&sizes));
            continue;
        }
        ops.push(random_op(r, device, q, size));
    }
    Scenario { device, ops }
}

/// Mostly a proper initialization (features, `nq` queues of random sizes,
/// DRIVER_OK): the queue sizes asked for, and the operations.
fn random_init(r: &mut Prng, nq: u64) -> (Vec<u16>, Vec<Op>) {
    let mut sizes = vec![0u16; nq as usize];
    let mut ops = Vec::new();
    if r.chance(95) {
        let features = if r.chance(90) {
            VERSION_1
        } else {
            r.next_u64()
        };
        ops.push(Op::Init { features });
    }
    for (q, size) in sizes.iter_mut().enumerate() {
        *size = r.pick(&[1, 2, 4, 8, 16, 16, 64, 256, 3, 0]);
        if r.chance(8) {
            *size = r.next_u64() as u16;
        }
        let desc = desc_table(q as u8);
        let mut rings = [desc, desc + 0x1000, desc + 0x2000];
        if r.chance(10) {
            rings[r.below(3) as usize] = address(r);
        }
        ops.push(Op::Queue {
            queue: q as u8,
            size: *size,
            desc: rings[0],
            avail: rings[1],
            used: rings[2],
        });
    }
    if r.chance(95) {
        ops.push(Op::DriverOk);
    }
    (sizes, ops)
}

/// What the transport made of the size `asked` for queue `q`: a valid one
/// (a power of two up to the device's maximum) or, when refused, the maximum.
fn effective_size(device: DeviceKind, q: u8, asked: u16) -> u64 {
    let max = match device {
        DeviceKind::Rng => 64,
        DeviceKind::Vsock if q == 2 => 64,
        _ => 256,
    };
    let size = if asked.is_power_of_two() && asked <= max {
        asked
    } else {
        max
    };
    u64::from(size)
}

/// One driver or host action other than a good chain or a reset, on queue
/// `q` of `size` entries.
fn random_op(r: &mut Prng, device: DeviceKind, q: u8, size: u64) -> Op {
    match r.below(100) {
        0..=34 => random_desc(r, q, size),
        35..=46 => write(address(r), payload(r, device)),
        47..=61 => random_publish(r, q, size),
        62..=81 => Op::Notify {
            queue: if r.chance(95) {
                u32::from(q)
            } else {
                r.next_u64() as u32
            },
        },
        82..=86 => Op::HostKick { queue: q },
        87..=91 => Op::HostData {
            bytes: (0..r.below(1600)).map(|_| r.next_u64() as u8).collect(),
        },
        92..=93 => Op::HostConnect {
            port: {
                let any = r.next_u64() as u32;
                r.pick(&[VSOCK_SERVICE_PORT, 80, any])
            },
        },
        94..=96 => random_reg(r),
        97 => Op::Read {
            offset: r.below(0x1000) as u16,
            width: r.below(9) as u8,
        },
        98 => Op::AvailIdx {
            queue: q,
            idx: r.next_u64() as u16,
        },
        _ => Op::DriverOk,
    }
}

/// A descriptor with mostly sane flags and indices, anywhere.
fn random_desc(r: &mut Prng, q: u8, size: u64) -> Op {
    let flags = if r.chance(90) {
        (r.next_u64() as u16)
            & (F_NEXT | F_WRITE | F_INDIRECT)
            & !(if r.chance(70) { F_INDIRECT } else { 0 })
    } else {
        r.next_u64() as u16
    };
    let index = if r.chance(90) {
        r.below(size)
    } else {
        r.next_u64()
    } as u16;
    let next = if r.chance(85) {
        r.below(size)
    } else {
        r.next_u64()
    } as u16;
    desc(q, index, address(r), length(r), flags, next)
}

/// A few heads (now and then up to [`MAX_HEADS`]), mostly in range.
fn random_publish(r: &mut Prng, q: u8, size: u64) -> Op {
    let n = match r.below(10) {
        0 => r.below(MAX_HEADS as u64),
        _ => 1 + r.below(4),
    };
    let heads = (0..n)
        .map(|_| if r.chance(95) { r.below(size) } else { r.next_u64() } as u16)
        .collect();
    Op::Publish { queue: q, heads }
}

/// A register write, mostly to a register that matters.
fn random_reg(r: &mut Prng) -> Op {
    Op::Reg {
        offset: {
            let any = r.below(0x1000) as u16;
            r.pick(&[0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x100, any])
        },
        value: if r.chance(50) {
            r.below(8)
        } else {
            r.next_u64()
        },
        width: r.pick(&[4, 4, 4, 1, 2, 8, 0]),
    }
}

/// Mutates an encoded input the way a byte-level fuzzer does.
pub fn mutate(r: &mut Prng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + r.below(8) {
        let len = out.len() as u64;
        match r.below(6) {
            0 if len > 0 => {
                let i = r.below(len) as usize;
                out[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len) as usize;
                let any = r.next_u64() as u8;
                out[i] = r.pick(&[0, 1, 0x7f, 0x80, 0xff, any]);
            }
            2 if len >= 8 => {
                let i = r.below(len - 7) as usize;
                let any = r.next_u64();
                let v: u64 = r.pick(&[0, u64::MAX, 0x1_0000, 0x5_0000, 0xffff_ffff, any]);
                let w = r.pick(&[2usize, 4, 8]);
                out[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            3 => {
                let i = r.below(len + 1) as usize;
                let n = 1 + r.below(16) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 1 => {
                let i = r.below(len) as usize;
                let n = (1 + r.below(16) as usize).min(out.len() - i);
                out.drain(i..i + n);
            }
            _ if len > 1 => {
                // Duplicate a slice elsewhere (repeats whole ops).
                let i = r.below(len) as usize;
                let n = (1 + r.below(64) as usize).min(out.len() - i);
                let slice = out[i..i + n].to_vec();
                let at = r.below(len + 1) as usize;
                out.splice(at..at, slice);
            }
            _ => out.push(r.next_u64() as u8),
        }
    }
    out
}

//! Fuzzing the virtio queue code: arbitrary bytes become a guest's memory
//! contents, queue configuration, MMIO register accesses and notifications,
//! run against the real transport ([`super::mmio::MmioTransport`]) and the
//! real devices (virtio-blk on an in-memory disk, rng, net on a fake tap,
//! vsock on unix sockets in a scratch directory).
//!
//! Owns the input format ([`Scenario`], decoded from any byte string, and its
//! encoder for hand-written seeds), the harness that runs it and checks the
//! VMM-side invariants after every step ([`harness`]), and the hand-made
//! tricky inputs ([`cases`]) and seeded random drivers ([`random`]) that
//! `cargo test` replays. The coverage-guided target in `vmm/fuzz/` calls
//! [`run_bytes`]. Built only for tests and with the `fuzz` feature; it must
//! not be reachable from the VMM.

pub mod cases;
pub mod harness;
pub mod random;

pub use harness::{Harness, Stats, Violation};

/// The device under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    BlockReadOnly,
    Rng,
    Net,
    Vsock,
}

impl DeviceKind {
    const ALL: [DeviceKind; 5] = [
        DeviceKind::Block,
        DeviceKind::BlockReadOnly,
        DeviceKind::Rng,
        DeviceKind::Net,
        DeviceKind::Vsock,
    ];

    fn from_byte(b: u8) -> Self {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }

    fn to_byte(self) -> u8 {
        Self::ALL.iter().position(|&k| k == self).unwrap_or(0) as u8
    }
}

/// One step of a guest driver (or of the host side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Raw bytes into guest memory (ignored where the range is not memory).
    Write { addr: u64, bytes: Vec<u8> },
    /// ACKNOWLEDGE | DRIVER, the driver's features, FEATURES_OK.
    Init { features: u64 },
    /// QueueSel, QueueNum, the three ring addresses and QueueReady = 1.
    Queue {
        queue: u8,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    /// Status |= DRIVER_OK.
    DriverOk,
    /// One descriptor at `index` of the table the transport has for `queue`.
    Desc {
        queue: u8,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// Heads into `queue`'s available ring, then its index moved on.
    Publish { queue: u8, heads: Vec<u16> },
    /// The available ring's index set to a raw value.
    AvailIdx { queue: u8, idx: u16 },
    /// A register write of `width` bytes (any width, any offset in the slot).
    Reg { offset: u16, value: u64, width: u8 },
    /// A register or configuration read.
    Read { offset: u16, width: u8 },
    /// QueueNotify with a raw queue index.
    Notify { queue: u32 },
    /// The I/O thread found the device's host fd readable.
    HostKick { queue: u8 },
    /// Host traffic: a frame for net, bytes on every open vsock stream.
    HostData { bytes: Vec<u8> },
    /// A host client asks the vsock device for a connection to `port`.
    HostConnect { port: u32 },
}

/// A whole input: which device, then the steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub device: DeviceKind,
    pub ops: Vec<Op>,
}

/// Longest scenario decoded from one input.
pub const MAX_OPS: usize = 1024;
/// Longest byte string in one op (memory writes, host data).
pub const MAX_BYTES: usize = 2048;
/// Most heads published by one op.
pub const MAX_HEADS: usize = 512;

/// Reads little-endian fields; past the end every field reads as zero.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos = self.pos.saturating_add(1);
        }
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn vec(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.u16()).min(max);
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        self.data[start..end].to_vec()
    }
}

const TAG_COUNT: u8 = 13;

impl Scenario {
    /// Decodes any byte string (this is what the fuzzer mutates).
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader { data, pos: 0 };
        let device = DeviceKind::from_byte(r.u8());
        let mut ops = Vec::new();
        while !r.done() && ops.len() < MAX_OPS {
            let op = match r.u8() % TAG_COUNT {
                0 => Op::Write {
                    addr: r.u64(),
                    bytes: r.vec(MAX_BYTES),
                },
                1 => Op::Init { features: r.u64() },
                2 => Op::Queue {
                    queue: r.u8(),
                    size: r.u16(),
                    desc: r.u64(),
                    avail: r.u64(),
                    used: r.u64(),
                },
                3 => Op::DriverOk,
                4 => Op::Desc {
                    queue: r.u8(),
                    index: r.u16(),
                    addr: r.u64(),
                    len: r.u32(),
                    flags: r.u16(),
                    next: r.u16(),
                },
                5 => {
                    let queue = r.u8();
                    let raw = r.vec(MAX_HEADS * 2);
                    let heads = raw
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    Op::Publish { queue, heads }
                }
                6 => Op::AvailIdx {
                    queue: r.u8(),
                    idx: r.u16(),
                },
                7 => Op::Reg {
                    offset: r.u16(),
                    value: r.u64(),
                    width: r.u8(),
                },
                8 => Op::Read {
                    offset: r.u16(),
                    width: r.u8(),
                },
                9 => Op::Notify { queue: r.u32() },
                10 => Op::HostKick { queue: r.u8() },
                11 => Op::HostData {
                    bytes: r.vec(MAX_BYTES),
                },
                _ => Op::HostConnect { port: r.u32() },
            };
            ops.push(op);
        }
        Self { device, ops }
    }

    /// Encodes so that [`Scenario::decode`] gives the same scenario back
    /// (within the limits above): how hand-written seeds become corpus files.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.device.to_byte()];
        let vec = |out: &mut Vec<u8>, b: &[u8], max: usize| {
            let b = &b[..b.len().min(max)];
            out.extend_from_slice(&(b.len() as u16).to_le_bytes());
            out.extend_from_slice(b);
        };
        for op in self.ops.iter().take(MAX_OPS) {
            match op {
                Op::Write { addr, bytes } => {
                    out.push(0);
                    out.extend_from_slice(&addr.to_le_bytes());
                    vec(&mut out, bytes, MAX_BYTES);
                }
                Op::Init { features } => {
                    out.push(1);
                    out.extend_from_slice(&features.to_le_bytes());
                }
                Op::Queue {
                    queue,
                    size,
                    desc,
                    avail,
                    used,
                } => {
                    out.push(2);
                    out.push(*queue);
                    out.extend_from_slice(&size.to_le_bytes());
                    for a in [desc, avail, used] {
                        out.extend_from_slice(&a.to_le_bytes());
                    }
                }
                Op::DriverOk => out.push(3),
                Op::Desc {
                    queue,
                    index,
                    addr,
                    len,
                    flags,
                    next,
                } => {
                    out.push(4);
                    out.push(*queue);
                    out.extend_from_slice(&index.to_le_bytes());
                    out.extend_from_slice(&addr.to_le_bytes());
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&flags.to_le_bytes());
                    out.extend_from_slice(&next.to_le_bytes());
                }
                Op::Publish { queue, heads } => {
                    out.push(5);
                    out.push(*queue);
                    let raw: Vec<u8> = heads.iter().flat_map(|h| h.to_le_bytes()).collect();
                    vec(&mut out, &raw, MAX_HEADS * 2);
                }
                Op::AvailIdx { queue, idx } => {
                    out.push(6);
                    out.push(*queue);
                    out.extend_from_slice(&idx.to_le_bytes());
                }
                Op::Reg {
                    offset,
                    value,
                    width,
                } => {
                    out.push(7);
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.extend_from_slice(&value.to_le_bytes());
                    out.push(*width);
                }
                Op::Read { offset, width } => {
                    out.push(8);
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.push(*width);
                }
                Op::Notify { queue } => {
                    out.push(9);
                    out.extend_from_slice(&queue.to_le_bytes());
                }
                Op::HostKick { queue } => {
                    out.push(10);
                    out.push(*queue);
                }
                Op::HostData { bytes } => {
                    out.push(11);
                    vec(&mut out, bytes, MAX_BYTES);
                }
                Op::HostConnect { port } => {
                    out.push(12);
                    out.extend_from_slice(&port.to_le_bytes());
                }
            }
        }
        out
    }
}

/// Runs one input and checks every invariant; the fuzz target's whole body.
pub fn run_bytes(data: &[u8]) -> Result<Stats, Violation> {
    run(&Scenario::decode(data))
}

/// Runs one scenario and checks every invariant after every step.
pub fn run(s: &Scenario) -> Result<Stats, Violation> {
    let mut h = Harness::new(s.device);
    for (i, op) in s.ops.iter().enumerate() {
        h.step(op).map_err(|v| v.at(i, op))?;
    }
    Ok(h.stats)
}

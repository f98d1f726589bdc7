//! The fuzz harness: one transport and device over a small guest memory, and
//! the invariants checked around every step that runs device code.
//!
//! Guest memory mirrors the VMM's shape in miniature: two adjacent regions,
//! a hole, and a third region, so buffers can straddle a region boundary or
//! run into the hole. The invariants:
//!
//! 1. Nothing panics (a panic is the fuzzer's crash), and the in-memory disk
//!    is never asked for bytes past its end.
//! 2. Every guest byte the device changes lies in a device-writable buffer
//!    of a ready queue (directly or through an indirect table) or in a used
//!    ring. When the device's own writes land on a descriptor table or an
//!    available ring (a guest that makes the device rewrite its queues), the
//!    step is counted as self-modifying and this check is skipped for it.
//! 3. Bounded work: one notification or host kick consumes and uses at most
//!    one ring's worth of chains per queue.
//! 4. A device fault is reported as DEVICE_NEEDS_RESET in the status
//!    register, and a device in that state writes nothing until it is reset.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{DeviceKind, Op};
use crate::devices::ioapic::{Ioapic, IrqLine, Msi, MsiSink, PINS};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockCounters, Disk};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{FrameIo, Net, NetCounters};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockCounters};
use crate::devices::{BusDevice, GuestEvent};

/// Guest memory: (start, length) of each region. The first two are adjacent.
pub const REGIONS: [(u64, u64); 3] = [(0, 0x1_0000), (0x1_0000, 0x8000), (0x4_0000, 0x1_0000)];
/// Linear runs of guest memory as (start, length, offset in a snapshot).
const RUNS: [(u64, u64, usize); 2] = [(0, 0x1_8000, 0), (0x4_0000, 0x1_0000, 0x1_8000)];
const MEM_TOTAL: usize = 0x2_8000;
/// Size of the in-memory disk behind virtio-blk.
pub const DISK_SIZE: usize = 64 * 1024;
/// The vsock host port a host service listens on (guest connections to it succeed).
pub const VSOCK_SERVICE_PORT: u32 = 1024;
/// Interrupt pin of the device under test.
const IRQ_PIN: usize = 5;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;

const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// A broken invariant, with the step that broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub step: Option<usize>,
    pub op: String,
    pub what: String,
}

impl Violation {
    fn new(what: impl Into<String>) -> Self {
        Self {
            step: None,
            op: String::new(),
            what: what.into(),
        }
    }

    pub(super) fn at(mut self, step: usize, op: &Op) -> Self {
        self.step = Some(step);
        self.op = format!("{op:?}");
        self.op.truncate(300);
        self
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(i) => write!(f, "step {i} ({}): {}", self.op, self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// A disk in a vector that panics when asked for anything past its end.
struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(len);
        assert!(
            end <= DISK_SIZE,
            "disk access {offset:#x}+{len:#x} past its end"
        );
        start..end
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        DISK_SIZE as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len());
        buf.copy_from_slice(&crate::devices::lock(&self.0)[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len());
        crate::devices::lock(&self.0)[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Frames the host has for the guest; transmitted frames are dropped.
struct FakeTap(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl FrameIo for FakeTap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let frame = crate::devices::lock(&self.0)
            .pop_front()
            .ok_or(std::io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        Ok(frame.len())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

struct NullSink;

impl MsiSink for NullSink {
    fn signal(&self, _: Msi) {}
    fn routes_changed(&self, _: &[Option<Msi>; PINS]) {}
}

/// The host side of vsock: a service on [`VSOCK_SERVICE_PORT`] and clients.
struct VsockHost {
    dir: PathBuf,
    service: UnixListener,
    streams: Vec<UnixStream>,
}

impl VsockHost {
    const MAX_STREAMS: usize = 32;

    /// Accepts waiting guest connections and drains what they sent.
    fn pump(&mut self) {
        while let Ok((s, _)) = self.service.accept() {
            if self.streams.len() < Self::MAX_STREAMS && s.set_nonblocking(true).is_ok() {
                self.streams.push(s);
            }
        }
        let mut buf = [0u8; 4096];
        for s in &mut self.streams {
            for _ in 0..16 {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
    }
}

impl Drop for VsockHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Host {
    None,
    Net(Arc<Mutex<VecDeque<Vec<u8>>>>),
    Vsock(VsockHost),
}

/// Counts of what a run did, for the seeded runs' sanity checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Steps that ran device code with DRIVER_OK set.
    pub live_steps: u64,
    /// Steps after which the used ring had moved on.
    pub used: u64,
    /// Device faults reported (DEVICE_NEEDS_RESET).
    pub faults: u64,
    /// Steps whose writes hit a ring or table (write check skipped).
    pub self_modifying: u64,
}

/// One device behind its transport, over fresh guest memory.
pub struct Harness {
    mem: Arc<GuestMemoryMmap>,
    transport: MmioTransport,
    host: Host,
    /// Snapshot buffers, reused: fresh 160 KiB allocations per step would be
    /// an mmap and munmap each and dominate the fuzzer's time.
    before: Vec<u8>,
    after: Vec<u8>,
    pub stats: Stats,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("transport", &self.transport)
            .field("stats", &self.stats)
            .finish()
    }
}

fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("runv-fuzz-{}-{n}", std::process::id()))
}

impl Harness {
    pub fn new(kind: DeviceKind) -> Self {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("fuzz guest memory"));
        let mut host = Host::None;
        let device: Box<dyn VirtioDevice> = match kind {
            DeviceKind::Block | DeviceKind::BlockReadOnly => Box::new(Block::new(
                Box::new(MemDisk(Mutex::new(vec![0x5a; DISK_SIZE]))),
                kind == DeviceKind::BlockReadOnly,
                BlockCounters::default(),
            )),
            DeviceKind::Rng => Box::new(Rng::default()),
            DeviceKind::Net => {
                let inbox = Arc::new(Mutex::new(VecDeque::new()));
                host = Host::Net(inbox.clone());
                Box::new(Net::new(
                    Box::new(FakeTap(inbox)),
                    [2, 0, 0, 0, 0, 1],
                    NetCounters::default(),
                ))
            }
            DeviceKind::Vsock => {
                let dir = scratch_dir();
                std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
                let uds = dir.join("v.sock");
                let service = UnixListener::bind(dir.join(format!("v.sock_{VSOCK_SERVICE_PORT}")))
                    .expect("vsock service socket");
                service
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                let v = Vsock::new(3, uds, VsockCounters::default()).expect("vsock device");
                host = Host::Vsock(VsockHost {
                    dir,
                    service,
                    streams: Vec::new(),
                });
                Box::new(v)
            }
        };
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(NullSink))));
        {
            // Pin 5 → vector 0x30, level-triggered, unmasked: interrupts take the real path.
            let mut a = crate::devices::lock(&ioapic);
            a.write(0, &(0x10u32 + 2 * IRQ_PIN as u32).to_le_bytes());
            a.write(0x10, &(0x30u32 | 1 << 15).to_le_bytes());
        }
        let transport = MmioTransport::new(device, mem.clone(), Arc::default(), Arc::default())
            .with_irq(IrqLine::new(ioapic, IRQ_PIN));
        Self {
            mem,
            transport,
            host,
            before: vec![0; MEM_TOTAL],
            after: vec![0; MEM_TOTAL],
            stats: Stats::default(),
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// 32-bit register writes as a driver makes them, checked as one step
    /// (the first event ends the sequence).
    fn write_regs(&mut self, writes: &[(u64, u32)]) -> Result<(), Violation> {
        self.run_device(false, |t| {
            writes
                .iter()
                .find_map(|&(offset, v)| t.write(offset, &v.to_le_bytes()))
        })
    }

    /// (descriptor table, available ring, size) of queue `q % queues`.
    fn rings(&self, q: u8) -> Option<(u64, u64, u16)> {
        let queues = self.transport.queues();
        if queues.is_empty() {
            return None;
        }
        let q = &queues[usize::from(q) % queues.len()];
        Some((q.desc_table(), q.avail_ring(), q.size().max(1)))
    }

    /// Runs one step and checks the invariants.
    pub fn step(&mut self, op: &Op) -> Result<(), Violation> {
        match op {
            Op::Write { addr, bytes } => {
                let _ = self.mem.write_slice(bytes, GuestAddress(*addr));
            }
            Op::Init { features } => self.init(*features)?,
            Op::Queue {
                queue,
                size,
                desc,
                avail,
                used,
            } => self.write_regs(&[
                (0x30, u32::from(*queue)),
                (0x38, u32::from(*size)),
                (0x80, *desc as u32),
                (0x84, (*desc >> 32) as u32),
                (0x90, *avail as u32),
                (0x94, (*avail >> 32) as u32),
                (0xa0, *used as u32),
                (0xa4, (*used >> 32) as u32),
                (0x44, 1),
            ])?,
            Op::DriverOk => {
                let s = self.read_reg(0x70);
                self.write_regs(&[(0x70, s | STATUS_DRIVER_OK)])?;
            }
            Op::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => self.write_desc(*queue, *index, &descriptor(*addr, *len, *flags, *next)),
            Op::Publish { queue, heads } => self.publish(*queue, heads),
            Op::AvailIdx { queue, idx } => {
                if let Some((_, avail, _)) = self.rings(*queue) {
                    let _ = self
                        .mem
                        .write_obj(*idx, GuestAddress(avail.wrapping_add(2)));
                }
            }
            Op::Reg {
                offset,
                value,
                width,
            } => {
                let bytes = value.to_le_bytes();
                let data = &bytes[..usize::from(*width % 9)];
                let offset = u64::from(*offset % 0x1000);
                let notify = offset == 0x50;
                self.run_device(notify, |t| t.write(offset, data))?;
            }
            Op::Read { offset, width } => {
                let mut data = vec![0u8; usize::from(*width % 9)];
                self.transport.read(u64::from(*offset % 0x1000), &mut data);
            }
            Op::Notify { queue } => {
                let v = queue.to_le_bytes();
                self.run_device(true, |t| t.write(0x50, &v))?;
            }
            Op::HostKick { queue } => {
                let q = usize::from(*queue);
                self.run_device(true, |t| t.host_kick(q).err())?;
            }
            Op::HostData { bytes } => self.host_data(bytes),
            Op::HostConnect { port } => self.host_connect(*port),
        }
        if let Host::Vsock(v) = &mut self.host {
            v.pump();
        }
        Ok(())
    }

    /// Feature negotiation up to FEATURES_OK.
    fn init(&mut self, features: u64) -> Result<(), Violation> {
        self.write_regs(&[
            (0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER),
            (0x24, 0),
            (0x20, features as u32),
            (0x24, 1),
            (0x20, (features >> 32) as u32),
            (
                0x70,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            ),
        ])
    }

    /// Writes descriptor `index` of queue `queue`'s table.
    fn write_desc(&mut self, queue: u8, index: u16, d: &[u8; 16]) {
        if let Some((table, _, _)) = self.rings(queue) {
            let at = table.wrapping_add(u64::from(index) * 16);
            let _ = self.mem.write_slice(d, GuestAddress(at));
        }
    }

    /// Appends `heads` to queue `queue`'s available ring and bumps its index.
    fn publish(&mut self, queue: u8, heads: &[u16]) {
        if let Some((_, avail, size)) = self.rings(queue) {
            let idx_at = GuestAddress(avail.wrapping_add(2));
            let idx: u16 = self.mem.read_obj(idx_at).unwrap_or(0);
            for (k, h) in heads.iter().enumerate() {
                let slot = u64::from(idx.wrapping_add(k as u16) % size);
                let at = avail.wrapping_add(4 + 2 * slot);
                let _ = self.mem.write_obj(*h, GuestAddress(at));
            }
            let _ = self
                .mem
                .write_obj(idx.wrapping_add(heads.len() as u16), idx_at);
        }
    }

    /// Host traffic towards the guest: a frame for net, stream bytes for vsock.
    fn host_data(&mut self, bytes: &[u8]) {
        match &mut self.host {
            Host::Net(inbox) => {
                let mut inbox = crate::devices::lock(inbox);
                if inbox.len() < 64 {
                    inbox.push_back(bytes.to_vec());
                }
            }
            Host::Vsock(v) => {
                v.pump();
                for s in &mut v.streams {
                    let _ = s.write(bytes);
                }
            }
            Host::None => {}
        }
    }

    /// A host-initiated vsock connection to guest port `port`.
    fn host_connect(&mut self, port: u32) {
        if let Host::Vsock(v) = &mut self.host
            && v.streams.len() < VsockHost::MAX_STREAMS
            && let Ok(mut s) = UnixStream::connect(v.dir.join("v.sock"))
        {
            let _ = s.set_nonblocking(true);
            let _ = s.write_all(format!("CONNECT {port}\n").as_bytes());
            v.streams.push(s);
        }
    }

    /// Copies all of guest memory, run by run.
    fn snapshot(mem: &GuestMemoryMmap, out: &mut [u8]) {
        for &(start, len, off) in &RUNS {
            mem.read_slice(&mut out[off..off + len as usize], GuestAddress(start))
                .expect("fuzz memory is readable");
        }
    }

    /// Runs device code through `f` and checks invariants 2 to 4 around it.
    fn run_device(
        &mut self,
        bounded: bool,
        f: impl FnOnce(&mut MmioTransport) -> Option<GuestEvent>,
    ) -> Result<(), Violation> {
        let status_before = self.read_reg(0x70);
        let mut before = std::mem::take(&mut self.before);
        let mut after = std::mem::take(&mut self.after);
        Self::snapshot(&self.mem, &mut before);
        let rings_before: Vec<(u16, u16)> = self
            .transport
            .queues()
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect();

        let event = f(&mut self.transport);

        let status = self.read_reg(0x70);
        Self::snapshot(&self.mem, &mut after);
        let rings = bounded.then_some(rings_before.as_slice());
        let result = self.check(status_before, status, event, rings, &before, &after);
        self.before = before;
        self.after = after;
        result
    }

    /// Invariants 2 to 4 for one step that ran device code.
    fn check(
        &mut self,
        status_before: u32,
        status: u32,
        event: Option<GuestEvent>,
        rings_before: Option<&[(u16, u16)]>,
        before: &[u8],
        after: &[u8],
    ) -> Result<(), Violation> {
        if status_before & STATUS_DRIVER_OK != 0 {
            self.stats.live_steps += 1;
        }
        match &event {
            None => {}
            Some(GuestEvent::DeviceFault(_)) => {
                self.stats.faults += 1;
                if status & STATUS_NEEDS_RESET == 0 {
                    return Err(Violation::new(format!(
                        "device fault {event:?} without DEVICE_NEEDS_RESET (status {status:#x})"
                    )));
                }
            }
            Some(other) => {
                return Err(Violation::new(format!("the transport asked for {other:?}")));
            }
        }
        if status_before & STATUS_NEEDS_RESET != 0
            && status & STATUS_NEEDS_RESET != 0
            && let Some(at) = first_change(before, after)
        {
            return Err(Violation::new(format!(
                "a device that needs a reset wrote guest memory at {at:#x}"
            )));
        }

        let queues = self.transport.queues();
        if let Some(rings_before) = rings_before {
            for (i, (q, (a0, u0))) in queues.iter().zip(rings_before).enumerate() {
                let consumed = q.next_avail().wrapping_sub(*a0);
                let used = q.next_used().wrapping_sub(*u0);
                if consumed > q.size() || used > q.size() {
                    return Err(Violation::new(format!(
                        "queue {i} of size {} consumed {consumed} and used {used} chains in one step",
                        q.size()
                    )));
                }
                if used > 0 {
                    self.stats.used += 1;
                }
            }
        }

        let changed = changes(before, after);
        if changed.is_empty() {
            return Ok(());
        }
        // Worked out only now, as it is costly: the queue configuration a step
        // that wrote memory ran with is the one the transport still has.
        let shape_before = self.shape(before);
        let shape_after = self.shape(after);
        let rings = |s: &Shape| s.rings.clone();
        let tables = merge([rings(&shape_before), rings(&shape_after)].concat());
        if changed.iter().any(|c| overlaps(&tables, *c)) {
            self.stats.self_modifying += 1;
            return Ok(());
        }
        let allowed = merge([shape_before.writable, shape_after.writable].concat());
        for c in changed {
            if !covered(&allowed, c) {
                return Err(Violation::new(format!(
                    "the device wrote guest memory {:#x}..{:#x}, outside every device-writable buffer and used ring",
                    c.0, c.1
                )));
            }
        }
        Ok(())
    }

    /// What the guest's queues look like in `snap`: where the device may
    /// write, and where the rings and tables it reads are.
    fn shape(&self, snap: &[u8]) -> Shape {
        let mut s = Shape::default();
        let mut indirect = std::collections::HashSet::new();
        for q in self.transport.queues().iter().filter(|q| q.ready()) {
            let size = u64::from(q.size());
            let used = q.used_ring();
            s.writable.push((used, used.saturating_add(6 + 8 * size)));
            let avail = q.avail_ring();
            s.rings.push((avail, avail.saturating_add(6 + 2 * size)));
            let table = q.desc_table();
            s.rings.push((table, table.saturating_add(16 * size)));
            for i in 0..size {
                let Some(d) = read_desc(snap, table.wrapping_add(16 * i)) else {
                    continue;
                };
                if d.flags & DESC_F_INDIRECT != 0 {
                    let n = u64::from(d.len / 16).min(MEM_TOTAL as u64 / 16);
                    if !indirect.insert((d.addr, n)) {
                        continue; // the same table again
                    }
                    s.rings
                        .push((d.addr, d.addr.saturating_add((16 * n).max(1))));
                    for j in 0..n {
                        if let Some(e) = read_desc(snap, d.addr.wrapping_add(16 * j))
                            && e.flags & DESC_F_WRITE != 0
                        {
                            s.writable
                                .push((e.addr, e.addr.saturating_add(u64::from(e.len))));
                        }
                    }
                } else if d.flags & DESC_F_WRITE != 0 {
                    s.writable
                        .push((d.addr, d.addr.saturating_add(u64::from(d.len))));
                }
            }
        }
        s
    }
}

/// Guest ranges as [start, end): where the device may write, and the rings
/// and descriptor tables the driver owns.
#[derive(Debug, Default)]
struct Shape {
    writable: Vec<(u64, u64)>,
    rings: Vec<(u64, u64)>,
}

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// The snapshot offset of `addr..addr+len`, when it lies in one run.
fn offset(addr: u64, len: u64) -> Option<usize> {
    RUNS.iter().find_map(|&(start, rlen, off)| {
        let end = addr.checked_add(len)?;
        (addr >= start && end <= start + rlen).then(|| off + (addr - start) as usize)
    })
}

/// The guest address of snapshot offset `off`.
fn address(off: usize) -> u64 {
    RUNS.iter()
        .find(|&&(_, len, o)| off >= o && off < o + len as usize)
        .map_or(u64::MAX, |&(start, _, o)| start + (off - o) as u64)
}

fn read_desc(snap: &[u8], addr: u64) -> Option<RawDesc> {
    let o = offset(addr, 16)?;
    let b = &snap[o..o + 16];
    Some(RawDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes(b[12..14].try_into().ok()?),
    })
}

fn first_change(a: &[u8], b: &[u8]) -> Option<u64> {
    changes(a, b).first().map(|c| c.0)
}

/// Changed guest ranges between two snapshots ([start, end), ascending).
fn changes(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
    const CHUNK: usize = 4096;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (ca, cb)) in a.chunks(CHUNK).zip(b.chunks(CHUNK)).enumerate() {
        if ca == cb {
            continue;
        }
        for (j, (x, y)) in ca.iter().zip(cb).enumerate() {
            if x == y {
                continue;
            }
            let at = address(i * CHUNK + j);
            match out.last_mut() {
                Some(last) if last.1 == at => last.1 = at + 1,
                _ => out.push((at, at + 1)),
            }
        }
    }
    out
}

/// Sorts and coalesces ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => out.push(r),
        }
    }
    out
}

fn covered(merged: &[(u64, u64)], r: (u64, u64)) -> bool {
    let i = merged.partition_point(|m| m.1 <= r.0);
    merged.get(i).is_some_and(|m| m.0 <= r.0 && r.1 <= m.1)
}

fn overlaps(merged: &[(u64, u64)], r: (u64, u64)) -> bool {
    let i = merged.partition_point(|m| m.1 <= r.0);
    merged.get(i).is_some_and(|m| m.0 < r.1)
}

/// A split-ring descriptor as guest bytes.
fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_helpers_agree_with_the_memory_map() {
        assert_eq!(offset(0x1_7ff0, 16), Some(0x1_7ff0));
        assert_eq!(offset(0x1_7ff8, 16), None, "runs into the hole");
        assert_eq!(offset(0x4_0000, 16), Some(0x1_8000));
        assert_eq!(address(0x1_8001), 0x4_0001);
        let m = merge(vec![(10, 20), (15, 30), (40, 50), (5, 5)]);
        assert_eq!(m, vec![(10, 30), (40, 50)]);
        assert!(covered(&m, (12, 30)) && !covered(&m, (25, 41)));
        assert!(overlaps(&m, (29, 35)) && !overlaps(&m, (30, 40)));
        let (mut a, mut b) = (vec![0u8; MEM_TOTAL], vec![0u8; MEM_TOTAL]);
        a[0x1_8000] = 1;
        b[3] = 1;
        b[4] = 1;
        assert_eq!(changes(&a, &b), vec![(3, 5), (0x4_0000, 0x4_0001)]);
    }
}

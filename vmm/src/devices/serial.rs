//! The 8250 UART (vm-superio) at COM1, and where its output goes.
//!
//! Output is buffered per line and bounded: at most [`SINK_BUFFER`] bytes wait
//! for a slow socket reader; anything beyond is dropped and counted, so a guest
//! printing fast can never make the VMM grow without limit. A file output
//! with a rotation limit is kept under about twice the limit by the VMM
//! itself ([`LogFile`]), whether or not anyone watches it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use runv_vmm_api::{SerialConfig, SerialRotation};
use vm_superio::{Serial, Trigger};

use super::ioapic::IrqLine;
use super::{BusDevice, GuestEvent, lock};
use crate::seccomp::{Filter, ThreadKind};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
/// Bytes held before a flush is forced.
pub const SINK_BUFFER: usize = 4096;

/// Errors from opening the serial output.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("opening serial file {0}")]
    File(String, #[source] io::Error),
    #[error("listening on serial socket {0}")]
    Socket(String, #[source] io::Error),
}

/// IOAPIC pin of COM1 (ISA IRQ 4, identity-mapped in the MADT and MP table).
pub const COM1_IRQ: usize = 4;

/// Interrupt line of the UART: an ISA edge on its IOAPIC pin each time
/// vm-superio raises it (transmitter empty, data received), or nothing when
/// the UART is not wired (unit tests).
#[derive(Debug, Default)]
pub struct SerialIrq(Option<IrqLine>);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        if let Some(l) = &self.0 {
            l.pulse();
        }
        Ok(())
    }
}

enum Target {
    Stdout,
    File(LogFile),
    Socket(Arc<Mutex<Vec<UnixStream>>>),
    Off,
}

/// Where serial bytes end up.
pub struct SerialSink {
    target: Target,
    buf: Vec<u8>,
    tx: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    /// A bound socket whose acceptor thread has not started yet, with its filter.
    acceptor: Option<(UnixListener, Option<Filter>)>,
}

impl std::fmt::Debug for SerialSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialSink")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl SerialSink {
    /// Opens the output `cfg` names (a socket is bound, but accepts no
    /// clients before [`SerialSink::start`]). `tx`/`dropped` count bytes; a
    /// socket's accepting thread installs `seccomp` first.
    pub fn open(
        cfg: &SerialConfig,
        tx: Arc<AtomicU64>,
        dropped: Arc<AtomicU64>,
        seccomp: Option<Filter>,
    ) -> Result<Self, SerialError> {
        let mut acceptor = None;
        let target = match cfg {
            SerialConfig::Stdout => Target::Stdout,
            SerialConfig::Off => Target::Off,
            SerialConfig::File { path, rotate } => Target::File(LogFile::open(path, rotate)?),
            SerialConfig::Socket { path } => {
                let err = |e| SerialError::Socket(path.display().to_string(), e);
                let _ = std::fs::remove_file(path);
                acceptor = Some((UnixListener::bind(path).map_err(err)?, seccomp));
                Target::Socket(Arc::new(Mutex::new(Vec::new())))
            }
        };
        Ok(Self {
            target,
            buf: Vec::with_capacity(256),
            tx,
            dropped,
            acceptor,
        })
    }

    /// Starts the socket's accepting thread (nothing for other outputs). The
    /// VMM calls it once it has entered its jail: the process must have one
    /// thread until then.
    pub fn start(&mut self) -> Result<(), SerialError> {
        if let (Some((listener, seccomp)), Target::Socket(clients)) =
            (self.acceptor.take(), &self.target)
        {
            accept_clients(listener, clients.clone(), seccomp)?;
        }
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        self.tx.fetch_add(1, Ordering::Relaxed);
        self.buf.push(byte);
        if byte == b'\n' || self.buf.len() >= SINK_BUFFER {
            self.flush_buf();
        }
    }

    /// Sends what is buffered; a socket reader that cannot keep up loses bytes.
    pub fn flush_buf(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let ok = match &mut self.target {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&self.buf).and_then(|_| out.flush()).is_ok()
            }
            Target::File(f) => f.append(&self.buf).is_ok(),
            Target::Socket(clients) => {
                let mut clients = lock(clients);
                clients.retain_mut(|c| match c.write(&self.buf) {
                    Ok(n) if n == self.buf.len() => true,
                    Ok(n) => {
                        self.dropped
                            .fetch_add((self.buf.len() - n) as u64, Ordering::Relaxed);
                        true
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.dropped
                            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                        true
                    }
                    Err(_) => false,
                });
                true
            }
            Target::Off => true,
        };
        if !ok {
            self.dropped
                .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        }
        self.buf.clear();
    }
}

impl Write for SerialSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        for &b in data {
            self.push(b);
        }
        Ok(data.len())
    }
    /// vm-superio flushes after every byte; output is sent per line instead
    /// (or when the buffer fills, or when the VM stops via [`Self::flush_buf`]).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An append-only log file, rotated by the VMM when it passes its limit: its
/// content is copied to the previous file (replacing it) and it is truncated,
/// as the node agent's readers expect. Everything happens on descriptors
/// opened before the jail, so it keeps working inside it.
struct LogFile {
    file: File,
    len: u64,
    rotate: Option<(u64, File)>,
}

impl LogFile {
    fn open(path: &std::path::Path, rotate: &Option<SerialRotation>) -> Result<Self, SerialError> {
        let open = |p: &std::path::Path, append: bool| {
            OpenOptions::new()
                .create(true)
                .append(append)
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| SerialError::File(p.display().to_string(), e))
        };
        let file = open(path, true)?;
        let len = file
            .metadata()
            .map_err(|e| SerialError::File(path.display().to_string(), e))?
            .len();
        let rotate = match rotate {
            Some(r) => Some((r.limit_bytes, open(&r.previous, false)?)),
            None => None,
        };
        let mut log = Self { file, len, rotate };
        log.rotate_if_full()
            .map_err(|e| SerialError::File(path.display().to_string(), e))?;
        Ok(log)
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        self.rotate_if_full()
    }

    fn rotate_if_full(&mut self) -> io::Result<()> {
        let Some((limit, previous)) = &self.rotate else {
            return Ok(());
        };
        if self.len <= *limit {
            return Ok(());
        }
        previous.set_len(0)?;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = self.file.read_at(&mut chunk, at)?;
            if n == 0 {
                break;
            }
            previous.write_all_at(&chunk[..n], at)?;
            at += n as u64;
        }
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

fn accept_clients(
    listener: UnixListener,
    c: Arc<Mutex<Vec<UnixStream>>>,
    seccomp: Option<Filter>,
) -> Result<(), SerialError> {
    let name = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_default();
    std::thread::Builder::new()
        .name("serial-accept".into())
        .spawn(move || {
            // Without its filter the acceptor stops: serial output then has no
            // socket readers, which the VM survives.
            if crate::seccomp::enter(ThreadKind::Control, seccomp.as_ref()).is_err() {
                return;
            }
            for s in listener.incoming().flatten() {
                if s.set_nonblocking(true).is_ok() {
                    let mut all = lock(&c);
                    if all.len() < 8 {
                        all.push(s);
                    }
                }
            }
        })
        .map_err(|e| SerialError::Socket(name, e))?;
    Ok(())
}

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Serial<SerialIrq, vm_superio::serial::NoEvents, SerialSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    pub fn new(sink: SerialSink) -> Self {
        Self {
            uart: Serial::new(SerialIrq(None), sink),
        }
    }

    /// A UART whose interrupt goes to `irq`.
    pub fn with_irq(sink: SerialSink, irq: IrqLine) -> Self {
        Self {
            uart: Serial::new(SerialIrq(Some(irq)), sink),
        }
    }

    /// Starts the output's thread, if it has one ([`SerialSink::start`]).
    pub fn start(&mut self) -> Result<(), SerialError> {
        self.uart.writer_mut().start()
    }

    /// Flushes buffered output (called when the VM stops).
    pub fn flush(&mut self) {
        self.uart.writer_mut().flush_buf();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent> {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The only error is a failed interrupt trigger, which SerialIrq never returns.
            let _ = self.uart.write(off, v);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sink_gets_lines_and_counts_bytes() {
        let path = std::env::temp_dir().join(format!("runv-serial-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let tx = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = SerialSink::open(
            &SerialConfig::File {
                path: path.clone(),
                rotate: None,
            },
            tx.clone(),
            dropped.clone(),
            None,
        )
        .unwrap();
        let mut dev = SerialDevice::new(sink);
        for b in b"hi\npartial" {
            dev.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        dev.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\npartial");
        assert_eq!(tx.load(Ordering::Relaxed), 10);
        // Line status: transmitter empty, so a polling guest never waits.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        std::fs::remove_file(&path).ok();
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_uart_interrupt_reaches_its_ioapic_pin_as_an_edge() {
        use crate::devices::ioapic::{Ioapic, Msi, MsiSink, PINS};
        struct Count(Arc<AtomicU64>);
        impl MsiSink for Count {
            fn signal(&self, msi: Msi) {
                assert_eq!(msi.data, 0x24);
                self.0.fetch_add(1, Ordering::Relaxed);
            }
            fn routes_changed(&self, _: &[Option<Msi>; PINS]) {}
        }
        let sent = Arc::new(AtomicU64::new(0));
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(Count(sent.clone())))));
        // Pin 4 → vector 0x24, edge, unmasked.
        let mut a = lock(&ioapic);
        a.write(0, &(0x10u32 + 8).to_le_bytes());
        a.write(0x10, &0x24u32.to_le_bytes());
        drop(a);
        let sink =
            SerialSink::open(&SerialConfig::Off, Arc::default(), Arc::default(), None).unwrap();
        let mut dev = SerialDevice::with_irq(sink, IrqLine::new(ioapic.clone(), COM1_IRQ));
        dev.write(0, b"a");
        assert_eq!(sent.load(Ordering::Relaxed), 0, "IER off: no interrupt");
        // IER: transmitter-holding-register-empty interrupt on, then a byte.
        dev.write(1, &[0x02]);
        dev.write(0, b"b");
        let first = sent.load(Ordering::Relaxed);
        assert!(first > 0, "THR empty interrupt");
        // The driver reads IIR (acknowledging it); the next byte interrupts again.
        let mut iir = [0u8];
        dev.read(2, &mut iir);
        dev.write(0, b"c");
        assert!(sent.load(Ordering::Relaxed) > first);
    }

    #[test]
    fn a_stalled_socket_reader_loses_bytes_instead_of_growing_memory() {
        let path = std::env::temp_dir().join(format!("runv-serial-sock-{}", std::process::id()));
        let tx = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sink = SerialSink::open(
            &SerialConfig::Socket { path: path.clone() },
            tx.clone(),
            dropped.clone(),
            // The acceptor runs under its allowlist, as in the VMM.
            Some(Filter::for_thread(ThreadKind::Control).unwrap()),
        )
        .unwrap();
        sink.start().unwrap();
        let _reader = UnixStream::connect(&path).unwrap();
        // Wait for the accept thread to register the client.
        for _ in 0..200 {
            sink.write_all(b"x\n").unwrap();
            if let Target::Socket(c) = &sink.target
                && !lock(c).is_empty()
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let line = vec![b'y'; 1023];
        for _ in 0..4096 {
            sink.write_all(&line).unwrap();
            sink.write_all(b"\n").unwrap();
        }
        assert!(
            dropped.load(Ordering::Relaxed) > 0,
            "nobody reads: bytes must drop"
        );
        assert!(sink.buf.capacity() <= 2 * SINK_BUFFER);
        std::fs::remove_file(&path).ok();
    }
}

//! The 8250 UART (vm-superio) at COM1, and where its output goes.
//!
//! Output is buffered per line and bounded: at most [`SINK_BUFFER`] bytes wait
//! for a slow socket reader; anything beyond is dropped and counted, so a guest
//! printing fast can never make the VMM grow without limit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use runv_vmm_api::SerialConfig;
use vm_superio::{Serial, Trigger};

use super::{BusDevice, GuestEvent, lock};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
/// Bytes held before a flush is forced.
pub const SINK_BUFFER: usize = 4096;

/// Errors from opening the serial output.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("opening serial file {0}: {1}")]
    File(String, io::Error),
    #[error("listening on serial socket {0}: {1}")]
    Socket(String, io::Error),
}

/// Interrupt line of the UART. The VM has no userspace IOAPIC yet, so the
/// guest drives the UART by polling; raising the line is a no-op.
#[derive(Debug, Default)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

enum Target {
    Stdout,
    File(File),
    Socket(Arc<Mutex<Vec<UnixStream>>>),
    Off,
}

/// Where serial bytes end up.
pub struct SerialSink {
    target: Target,
    buf: Vec<u8>,
    tx: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for SerialSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialSink")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl SerialSink {
    /// Opens the output `cfg` names. `tx`/`dropped` count bytes.
    pub fn open(
        cfg: &SerialConfig,
        tx: Arc<AtomicU64>,
        dropped: Arc<AtomicU64>,
    ) -> Result<Self, SerialError> {
        let target = match cfg {
            SerialConfig::Stdout => Target::Stdout,
            SerialConfig::Off => Target::Off,
            SerialConfig::File { path } => Target::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| SerialError::File(path.display().to_string(), e))?,
            ),
            SerialConfig::Socket { path } => Target::Socket(listen(path)?),
        };
        Ok(Self {
            target,
            buf: Vec::with_capacity(256),
            tx,
            dropped,
        })
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
            Target::File(f) => f.write_all(&self.buf).is_ok(),
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

fn listen(path: &Path) -> Result<Arc<Mutex<Vec<UnixStream>>>, SerialError> {
    let err = |e| SerialError::Socket(path.display().to_string(), e);
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    let clients = Arc::new(Mutex::new(Vec::new()));
    let c = clients.clone();
    std::thread::Builder::new()
        .name("serial-accept".into())
        .spawn(move || {
            for s in listener.incoming().flatten() {
                if s.set_nonblocking(true).is_ok() {
                    let mut all = lock(&c);
                    if all.len() < 8 {
                        all.push(s);
                    }
                }
            }
        })
        .map_err(err)?;
    Ok(clients)
}

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Serial<NoIrq, vm_superio::serial::NoEvents, SerialSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    pub fn new(sink: SerialSink) -> Self {
        Self {
            uart: Serial::new(NoIrq, sink),
        }
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
            // The only error is a failed interrupt trigger, which NoIrq never returns.
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
            &SerialConfig::File { path: path.clone() },
            tx.clone(),
            dropped.clone(),
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
    fn a_stalled_socket_reader_loses_bytes_instead_of_growing_memory() {
        let path = std::env::temp_dir().join(format!("runv-serial-sock-{}", std::process::id()));
        let tx = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sink = SerialSink::open(
            &SerialConfig::Socket { path: path.clone() },
            tx.clone(),
            dropped.clone(),
        )
        .unwrap();
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

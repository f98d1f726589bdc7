//! A host tap device: opened (and created, when root) by name, brought up, and
//! read and written without blocking.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("opening /dev/net/tun")]
    Open(#[source] std::io::Error),
    #[error("attaching to tap {0}")]
    Attach(String, #[source] std::io::Error),
    #[error("bringing tap {0} up")]
    Up(String, #[source] std::io::Error),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > 15 {
            return Err(TapError::Name(name.into()));
        }
        let mut r = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens tap `name` (without packet information), non-blocking, and sets it up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut req = IfReq::new(name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is
        // (same size and layout); the fd is the tun control device we just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Attach(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        let tap = Self {
            file,
            name: name.into(),
        };
        tap.set_up()?;
        Ok(tap)
    }

    fn set_up(&self) -> Result<(), TapError> {
        let err = |e| TapError::Up(self.name.clone(), e);
        // SAFETY: plain socket(2) call; the fd is closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let mut req = IfReq::new(&self.name)?;
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one `struct ifreq`
        // (`req` has its layout) on a socket we own.
        let rc = unsafe {
            let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
            if rc == 0 {
                req.flags |= libc::IFF_UP as i16;
                rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req);
            }
            rc
        };
        let e = std::io::Error::last_os_error();
        // SAFETY: `sock` is our socket and is not used after this.
        unsafe { libc::close(sock) };
        if rc < 0 {
            return Err(err(e));
        }
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

use std::os::unix::fs::OpenOptionsExt;

//! The host I/O thread: waits for device file descriptors (taps, sockets) to
//! become readable and lets the device move data into the guest's queues.
//!
//! Bounded by design: one thread for all devices, a 100 ms poll timeout so it
//! notices the VM ending, and a short back-off while a guest has posted no
//! buffers, so a busy host socket cannot make it spin.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runv_vmm_api::ExitReason;

use super::mmio::MmioTransport;
use crate::devices::{GuestEvent, lock};
use crate::seccomp::{Filter, ThreadKind};
use crate::state::Shared;

/// One watched descriptor.
pub struct Watched {
    pub fd: RawFd,
    pub queue: usize,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("fd", &self.fd).finish()
    }
}

/// Starts the thread, which installs `seccomp` first; returns at once when
/// there is nothing to watch.
pub fn spawn(
    watched: Vec<Watched>,
    shared: Arc<Shared>,
    seccomp: Option<Filter>,
) -> std::io::Result<()> {
    if watched.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("virtio-io".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::enter(ThreadKind::Io, seccomp.as_ref()) {
                shared.request_exit(
                    ExitReason::VmmError,
                    format!("seccomp: {}", crate::error_chain(&e)),
                );
                return;
            }
            run(watched, shared)
        })?;
    Ok(())
}

fn run(watched: Vec<Watched>, shared: Arc<Shared>) {
    let mut fds: Vec<libc::pollfd> = watched
        .iter()
        .map(|w| libc::pollfd {
            fd: w.fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !shared.exiting() {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        let mut progressed = false;
        for (p, w) in fds.iter_mut().zip(&watched) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            match lock(&w.transport).host_kick(w.queue) {
                Ok(used) => progressed |= used,
                Err(GuestEvent::DeviceFault(msg)) => {
                    shared.request_exit(ExitReason::GuestFault, msg);
                    return;
                }
                Err(other) => {
                    shared.request_exit(ExitReason::GuestFault, format!("{other:?}"));
                    return;
                }
            }
        }
        if !progressed {
            // Data is waiting but the guest has no buffers posted yet.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

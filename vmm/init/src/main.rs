//! runv-init: PID 1 of a runv container microVM.
//!
//! 1. Mounts `/proc`, `/sys` and `/dev`, reads its `runv.*` settings from
//!    the kernel command line (or its arguments) and loads the modules the
//!    initramfs carries.
//! 2. Opens the channel to the node agent, says Hello, and waits for the
//!    container's config.
//! 3. Mounts the image's disk read-only under a tmpfs overlay, switches
//!    into it, mounts the container's filesystems, names the host, brings
//!    the network up and writes `/etc/hosts` and `/etc/resolv.conf`.
//! 4. Starts the container's process as its user, in its own session;
//!    forwards its output, reaps every orphan, and on a Stop (or SIGTERM,
//!    SIGINT, SIGPWR to PID 1) sends it SIGTERM and, after the grace
//!    period, SIGKILL.
//! 5. Reports the exit, waits for the host to acknowledge it (bounded),
//!    syncs and powers off: the VM's life is the container's life.
//!
//! Nothing it does ends in a panic or an exit of PID 1 (which would panic
//! the guest kernel): every failure is reported, then the VM powers off.

mod channel;
mod modules;
mod net;
mod process;
mod root;
mod settings;
mod supervise;
mod user;

use std::fmt;

use settings::Settings;

/// A failure that ends the VM, with what was being done.
#[derive(Debug)]
pub struct Fatal {
    what: String,
    cause: Option<String>,
}

impl Fatal {
    /// `what` failed because of `cause`.
    pub fn new(what: impl Into<String>, cause: impl fmt::Display) -> Fatal {
        Fatal {
            what: what.into(),
            cause: Some(cause.to_string()),
        }
    }

    /// A failure told in one message.
    pub fn msg(what: impl Into<String>) -> Fatal {
        Fatal {
            what: what.into(),
            cause: None,
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Some(c) => write!(f, "{}: {c}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let s = Settings::parse(
        cmdline
            .split_whitespace()
            .chain(args.iter().map(String::as_str)),
    );
    for w in &s.unknown {
        eprintln!("runv-init: ignoring {w:?}, which it does not understand");
    }
    s
}

fn run() -> Result<(), Fatal> {
    let signals = supervise::block_signals()?;
    root::mount_guest()?;
    let settings = settings();
    let loaded = modules::load(&settings.modules)?;
    if !loaded.is_empty() {
        eprintln!("runv-init: loaded modules: {}", loaded.join(" "));
    }
    let chan = channel::Channel::open(settings.channel.clone())
        .map_err(|e| Fatal::new(format!("opening the channel {:?}", settings.channel), e))?;
    supervise::Init::new(chan, signals).run(&settings)
}

fn main() {
    match std::panic::catch_unwind(run) {
        Ok(Ok(())) => {}
        Ok(Err(f)) => eprintln!("runv-init: {f}"),
        Err(_) => eprintln!("runv-init: panicked"),
    }
    supervise::power_off();
}

//! The event loop of PID 1: signals (signalfd), the container's output
//! pipes and the channel, with deadlines for the stop grace period and the
//! exit report.

use std::io::Read;
use std::os::fd::AsFd;
use std::process::{ChildStderr, ChildStdout};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use runv_vmm_api::guest::{Exited, Frame, GuestConfig, GuestState, MAX_OUTPUT_CHUNK};

use crate::channel::Channel;
use crate::process::{self, now_nanos};
use crate::settings::Settings;
use crate::{Fatal, net, root};

/// How long output may still arrive after the container ended.
const DRAIN: Duration = Duration::from_secs(2);
/// Reads per pipe per turn of the loop, so one stream cannot starve the rest.
const READS_PER_TURN: usize = 16;
/// How long a failure report may wait for a host before power-off.
const FAIL_REPORT: Duration = Duration::from_secs(10);

/// Blocks the signals PID 1 handles and returns a signalfd for them.
pub fn block_signals() -> Result<SignalFd, Fatal> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| Fatal::new("blocking signals", e))?;
    // Ctrl-Alt-Del (the VMM's i8042 reset) becomes SIGINT to PID 1. A host
    // process in a PID namespace cannot change it, and needs not.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Fatal::new("opening a signalfd", e))
}

/// Syncs and powers off (as a host process in a PID namespace, ends the
/// namespace, whose parent sees SIGINT).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("runv-init: powering off: {e:?}");
    std::process::exit(1)
}

#[derive(Debug, Default)]
struct Pipes {
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
}

enum Event {
    Host(Frame),
    Signal(Signal),
}

/// PID 1's state.
pub struct Init {
    chan: Channel,
    signals: SignalFd,
    state: GuestState,
    pipes: Pipes,
}

impl std::fmt::Debug for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Init").field("state", &self.state).finish()
    }
}

/// Where a running container is.
struct Run {
    pid: Pid,
    started_at: u64,
    oom_before: u64,
    status: Option<WaitStatus>,
    stop_deadline: Option<Instant>,
    drain_deadline: Option<Instant>,
    grace: Duration,
}

impl Init {
    /// PID 1 with its channel and signals.
    pub fn new(chan: Channel, signals: SignalFd) -> Init {
        Init {
            chan,
            signals,
            state: GuestState::WaitingForConfig,
            pipes: Pipes::default(),
        }
    }

    /// Everything after the channel is open; returns when it is time to
    /// power off.
    pub fn run(mut self, settings: &Settings) -> Result<(), Fatal> {
        let Some(config) = self.wait_for_config()? else {
            return self.report(
                start_failure("stopped before the container started"),
                FAIL_REPORT,
            );
        };
        let report_for = Duration::from_secs(config.exit_report_timeout_seconds.into());
        let exited = match self.start(settings, &config) {
            Ok(run) => self.supervise(run)?,
            Err(e) => {
                eprintln!("runv-init: {e}");
                self.chan.send(&Frame::Error(e.clone()));
                start_failure(&e)
            }
        };
        self.report(exited, report_for)
    }

    fn wait(&mut self, deadline: Option<Instant>) -> Result<Vec<Event>, Fatal> {
        let deadline = [deadline, self.chan.deadline()].into_iter().flatten().min();
        let timeout = deadline.map_or(PollTimeout::NONE, |d| {
            let ms = d.saturating_duration_since(Instant::now()).as_millis() + 1;
            PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        });
        {
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            for i in self.chan.poll_fds() {
                let mut f = PollFlags::POLLIN;
                if i.write {
                    f |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(i.fd, f));
            }
            if let Some(p) = &self.pipes.out {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(p) = &self.pipes.err {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Fatal::new("waiting for events", e)),
            }
        }
        self.pump();
        let mut events: Vec<Event> = self
            .chan
            .service(&self.state)
            .into_iter()
            .map(Event::Host)
            .collect();
        while let Ok(Some(info)) = self.signals.read_signal() {
            if let Ok(s) = Signal::try_from(info.ssi_signo as i32) {
                events.push(Event::Signal(s));
            }
        }
        Ok(events)
    }

    /// Moves what the container wrote into the outbox.
    fn pump(&mut self) {
        let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
        if let Some(p) = &mut self.pipes.out
            && !read_into(p, &mut buf, &mut self.chan, Frame::Stdout)
        {
            self.pipes.out = None;
        }
        if let Some(p) = &mut self.pipes.err
            && !read_into(p, &mut buf, &mut self.chan, Frame::Stderr)
        {
            self.pipes.err = None;
        }
    }

    fn wait_for_config(&mut self) -> Result<Option<GuestConfig>, Fatal> {
        loop {
            for e in self.wait(None)? {
                match e {
                    Event::Host(Frame::Config(c)) => return Ok(Some(*c)),
                    Event::Host(Frame::Stop(_)) => return Ok(None),
                    Event::Signal(s) if is_stop(s) => return Ok(None),
                    _ => {}
                }
            }
        }
    }

    fn start(&mut self, settings: &Settings, c: &GuestConfig) -> Result<Run, String> {
        prepare_root(settings, c).map_err(|e| e.to_string())?;
        let oom_before = process::oom_kills();
        let container = process::spawn(&c.container)?;
        eprintln!(
            "runv-init: started {:?} as pid {}",
            c.container.argv[0], container.pid
        );
        self.pipes = Pipes {
            out: Some(container.stdout),
            err: Some(container.stderr),
        };
        self.state = GuestState::Running(container.started.clone());
        self.chan.send(&Frame::Started(container.started.clone()));
        Ok(Run {
            pid: container.pid,
            started_at: container.started.started_at_nanos,
            oom_before,
            status: None,
            stop_deadline: None,
            drain_deadline: None,
            grace: Duration::from_secs(c.termination_grace_period_seconds.into()),
        })
    }

    fn supervise(&mut self, mut run: Run) -> Result<Exited, Fatal> {
        loop {
            let deadline = [run.stop_deadline, run.drain_deadline]
                .into_iter()
                .flatten()
                .min();
            for e in self.wait(deadline)? {
                match e {
                    Event::Signal(Signal::SIGCHLD) => reap(&mut run),
                    Event::Signal(s) if is_stop(s) => begin_stop(&mut run),
                    Event::Host(Frame::Stop(s)) => {
                        run.grace = Duration::from_secs(s.grace_period_seconds.into());
                        begin_stop(&mut run);
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            if run.stop_deadline.is_some_and(|d| now >= d) && run.status.is_none() {
                eprintln!("runv-init: the grace period is over; killing the container");
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                run.stop_deadline = None;
            }
            if run.status.is_some() {
                let drained = self.pipes.out.is_none() && self.pipes.err.is_none();
                if drained || run.drain_deadline.is_some_and(|d| now >= d) {
                    return Ok(exited(&run));
                }
            }
        }
    }

    /// Tells the host how the container ended and waits (bounded) for it
    /// to say it recorded that.
    fn report(&mut self, exited: Exited, wait: Duration) -> Result<(), Fatal> {
        self.pipes = Pipes::default();
        self.state = GuestState::Exited(exited.clone());
        self.chan.send(&Frame::Exited(exited));
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            for e in self.wait(Some(deadline))? {
                match e {
                    Event::Host(Frame::ExitAck) => return Ok(()),
                    Event::Signal(Signal::SIGCHLD) => reap_orphans(),
                    _ => {}
                }
            }
        }
        eprintln!("runv-init: no host acknowledged the exit within {wait:?}");
        Ok(())
    }
}

fn read_into<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    chan: &mut Channel,
    frame: fn(Vec<u8>) -> Frame,
) -> bool {
    for _ in 0..READS_PER_TURN {
        match r.read(buf) {
            Ok(0) => return false,
            Ok(n) => chan.send(&frame(buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

fn is_stop(s: Signal) -> bool {
    matches!(s, Signal::SIGTERM | Signal::SIGINT | Signal::SIGPWR)
}

fn begin_stop(run: &mut Run) {
    if run.status.is_some() || run.stop_deadline.is_some() {
        return;
    }
    eprintln!(
        "runv-init: stopping the container (SIGTERM, then SIGKILL after {:?})",
        run.grace
    );
    let _ = kill(run.pid, Signal::SIGTERM);
    run.stop_deadline = Some(Instant::now() + run.grace);
}

/// Reaps every child; notes the container's end and then ends the rest.
fn reap(run: &mut Run) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(s) if s.pid() == Some(run.pid) => {
                run.status = Some(s);
                run.drain_deadline = Some(Instant::now() + DRAIN);
                // What the container left behind ends with it.
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            }
            Ok(_) => {}
        }
    }
}

fn reap_orphans() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            return;
        }
    }
}

fn exited(run: &Run) -> Exited {
    let (code, signal) = match run.status {
        Some(WaitStatus::Exited(_, c)) => (Some(c), None),
        Some(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
        _ => (None, None),
    };
    Exited {
        code,
        signal,
        oom_killed: signal == Some(Signal::SIGKILL as i32) && process::oom_kills() > run.oom_before,
        start_error: None,
        started_at_nanos: run.started_at,
        finished_at_nanos: now_nanos(),
    }
}

fn start_failure(why: &str) -> Exited {
    let now = now_nanos();
    Exited {
        code: None,
        signal: None,
        oom_killed: false,
        start_error: Some(why.to_owned()),
        started_at_nanos: 0,
        finished_at_nanos: now,
    }
}

fn prepare_root(settings: &Settings, c: &GuestConfig) -> Result<(), Fatal> {
    nix::unistd::sethostname(&c.hostname)
        .map_err(|e| Fatal::new(format!("setting the hostname {:?}", c.hostname), e))?;
    let root = root::assemble(&settings.stage, &c.rootfs)?;
    root::switch(&root)?;
    root::mount_container()?;
    let net = c.network.as_ref();
    net::configure(net)?;
    root::write_etc("hostname", &format!("{}\n", c.hostname))?;
    root::write_etc("hosts", &net::hosts(&c.hostname, net))?;
    root::write_etc("resolv.conf", &net::resolv_conf(net))
}

//! The control socket: newline-delimited JSON requests ([`runv_vmm_api::Request`])
//! over a unix stream socket, one thread per client (bounded).
//!
//! Owns request framing and dispatch. A malformed or oversized request gets an
//! error reply and never affects the VM. The `shutdown` request presses the
//! power button and starts a grace timer (the request's `graceSeconds`, else
//! the config's) that ends the VM if the guest ignores it.
//!
//! Binding ([`bind`]) and serving ([`serve`]) are separate so the socket can
//! be bound before the VMM enters its jail and served after.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use runv_vmm_api::control::MAX_REQUEST_BYTES;
use runv_vmm_api::{ExitReason, Request, Response, VmDescription};

use crate::seccomp::{Filter, ThreadKind};
use crate::state::Shared;

/// Most clients served at once; more are refused with an error line.
const MAX_CLIENTS: usize = 16;

/// Errors from setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding {0}")]
    Bind(String, #[source] std::io::Error),
    #[error("starting the control thread")]
    Thread(#[source] std::io::Error),
}

/// Static facts for `describe`.
#[derive(Debug, Clone)]
pub struct Facts {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    pub cmdline: String,
    pub hypervisor: String,
    /// Guest memory, for the resident-bytes counter.
    pub memory: Option<Arc<vm_memory::GuestMemoryMmap>>,
    /// How long `shutdown` waits when the request does not say
    /// ([`runv_vmm_api::VmConfig::shutdown_grace`]).
    pub shutdown_grace: Duration,
}

/// Answers one request.
pub fn handle(shared: &Arc<Shared>, facts: &Facts, req: Request) -> Response {
    match req {
        Request::Ping => Response::Pong,
        Request::Describe => Response::Described(VmDescription {
            api_version: runv_vmm_api::API_VERSION.into(),
            state: shared.state(),
            pid: std::process::id(),
            vcpus: facts.vcpus,
            memory_mib: facts.memory_mib,
            kernel: facts.kernel.clone(),
            cmdline: facts.cmdline.clone(),
            uptime_ms: shared.started.elapsed().as_millis() as u64,
            hypervisor: facts.hypervisor.clone(),
        }),
        Request::Pause => match shared.pause() {
            Ok(()) => Response::Ok,
            Err(e) => Response::error(e),
        },
        Request::Resume => {
            shared.resume();
            Response::Ok
        }
        Request::Shutdown { grace_seconds } => {
            let grace =
                grace_seconds.map_or(facts.shutdown_grace, |s| Duration::from_secs(u64::from(s)));
            // A paused guest must run to see the button.
            shared.resume();
            shared.press_power_button();
            let s = shared.clone();
            let timer = std::thread::Builder::new()
                .name("shutdown-grace".into())
                .spawn(move || {
                    if s.wait_exit(grace).is_none() {
                        s.request_exit(
                            ExitReason::Killed,
                            format!(
                                "guest did not power off within {} s of a shutdown request",
                                grace.as_secs()
                            ),
                        );
                    }
                });
            match timer {
                Ok(_) => Response::Ok,
                Err(e) => Response::error(format!("starting the grace timer: {e}")),
            }
        }
        // The VM ends in `after_reply`, once the client has its answer.
        Request::Kill => Response::Ok,
        Request::Counters => {
            let mut counters = shared.counters.snapshot();
            if let Some(mem) = &facts.memory {
                counters.insert(
                    "guest_memory_resident_bytes".into(),
                    crate::memory::resident_bytes(mem),
                );
            }
            Response::Counters { counters }
        }
    }
}

/// What a request does after its reply was written (so the client gets the
/// reply before the process ends).
pub fn after_reply(shared: &Shared, req: &Request) {
    if *req == Request::Kill {
        shared.request_exit(ExitReason::Killed, "killed through the control socket");
    }
}

/// Serves one connection until EOF.
fn serve_client(stream: UnixStream, shared: &Arc<Shared>, facts: &Facts) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let mut complete = line.last() == Some(&b'\n');
        let mut deferred: Option<Request> = None;
        let resp = if !complete && line.len() > MAX_REQUEST_BYTES {
            // Skip the rest of the oversized line, bounded by what the client sends.
            let mut sink = Vec::new();
            loop {
                sink.clear();
                let m = (&mut reader)
                    .take(MAX_REQUEST_BYTES as u64)
                    .read_until(b'\n', &mut sink)?;
                if sink.last() == Some(&b'\n') {
                    complete = true;
                    break;
                }
                if m == 0 {
                    break;
                }
            }
            Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            match Request::decode(text) {
                Ok(req) => {
                    let resp = handle(shared, facts, req.clone());
                    deferred = Some(req);
                    resp
                }
                Err(e) => Response::error(format!("malformed request: {e}")),
            }
        };
        shared
            .counters
            .get("control_requests")
            .fetch_add(1, Ordering::Relaxed);
        let written = writer.write_all(resp.encode().as_bytes());
        if let Some(req) = deferred.take() {
            after_reply(shared, &req);
        }
        written?;
        if !complete {
            return Ok(());
        }
    }
}

/// Binds `path` and serves it on a background thread, which installs
/// `seccomp` first (its client threads inherit it).
pub fn start(
    path: &Path,
    shared: Arc<Shared>,
    facts: Facts,
    seccomp: Option<Filter>,
) -> Result<PathBuf, ControlError> {
    serve(bind(path)?, shared, facts, seccomp)?;
    Ok(path.to_owned())
}

/// Binds the control socket at `path` (replacing a stale one).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| ControlError::Bind(path.display().to_string(), e))
}

/// Serves a bound control socket on a background thread, which installs
/// `seccomp` first (its client threads inherit it).
pub fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    facts: Facts,
    seccomp: Option<Filter>,
) -> Result<(), ControlError> {
    let facts = Arc::new(facts);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::enter(ThreadKind::Control, seccomp.as_ref()) {
                shared.request_exit(
                    ExitReason::VmmError,
                    format!("seccomp: {}", crate::error_chain(&e)),
                );
                return;
            }
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if active.load(Ordering::Acquire) >= MAX_CLIENTS {
                    let _ = conn.write_all(Response::error("too many clients").encode().as_bytes());
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (shared, facts, active2) = (shared.clone(), facts.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        let _ = serve_client(conn, &shared, &facts);
                        active2.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(ControlError::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            vcpus: 1,
            memory_mib: 64,
            kernel: "k".into(),
            cmdline: "c".into(),
            hypervisor: "kvm".into(),
            memory: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    #[test]
    fn shutdown_uses_the_request_grace_else_the_config_one() {
        let mut f = facts();
        f.shutdown_grace = Duration::from_millis(50);
        let shared = Arc::new(Shared::new(0));
        shared.start_paused();
        assert_eq!(handle(&shared, &f, Request::SHUTDOWN), Response::Ok);
        // The button reaches a paused guest: it runs again, shutting down.
        assert_eq!(shared.state(), runv_vmm_api::VmState::ShuttingDown);
        assert!(shared.power_button.pressed());
        let rec = shared.wait_exit(Duration::from_secs(5)).unwrap();
        assert_eq!(rec.reason, ExitReason::Killed);
        assert!(rec.message.contains("within 0 s"), "{rec:?}");

        let shared = Arc::new(Shared::new(0));
        let req = Request::decode(b"{\"op\":\"shutdown\",\"graceSeconds\":0}").unwrap();
        f.shutdown_grace = Duration::from_secs(3600);
        assert_eq!(handle(&shared, &f, req), Response::Ok);
        assert!(shared.wait_exit(Duration::from_secs(5)).is_some());

        let shared = Arc::new(Shared::new(0));
        let req = Request::Shutdown {
            grace_seconds: Some(3600),
        };
        f.shutdown_grace = Duration::ZERO;
        assert_eq!(handle(&shared, &f, req), Response::Ok);
        assert!(shared.wait_exit(Duration::from_millis(200)).is_none());
        shared.request_exit(ExitReason::PowerOff, "test");
    }

    #[test]
    fn socket_answers_good_and_bad_requests_on_one_connection() {
        let shared = Arc::new(Shared::new(0));
        let path = std::env::temp_dir().join(format!("runv-ctl-{}.sock", std::process::id()));
        let filter = Filter::for_thread(ThreadKind::Control).unwrap();
        start(&path, shared.clone(), facts(), Some(filter)).unwrap();
        let s = UnixStream::connect(&path).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut ask = |line: &[u8]| {
            w.write_all(line).unwrap();
            let mut out = String::new();
            r.read_line(&mut out).unwrap();
            Response::decode(out.trim_end().as_bytes()).unwrap()
        };
        assert_eq!(ask(b"{\"op\":\"ping\"}\n"), Response::Pong);
        assert!(matches!(ask(b"garbage\n"), Response::Error { .. }));
        assert!(matches!(
            ask(b"{\"op\":\"launch\"}\n"),
            Response::Error { .. }
        ));
        let mut big = vec![b'x'; MAX_REQUEST_BYTES * 3];
        big.push(b'\n');
        assert!(matches!(ask(&big), Response::Error { message } if message.contains("longer")));
        match ask(b"{\"op\":\"describe\"}\r\n") {
            Response::Described(d) => assert_eq!((d.memory_mib, d.vcpus), (64, 1)),
            r => panic!("{r:?}"),
        }
        assert_eq!(ask(b"{\"op\":\"pause\"}\n"), Response::Ok);
        assert_eq!(shared.state(), runv_vmm_api::VmState::Paused);
        assert_eq!(ask(b"{\"op\":\"resume\"}\n"), Response::Ok);
        match ask(b"{\"op\":\"counters\"}\n") {
            Response::Counters { counters } => assert!(counters["control_requests"] >= 7),
            r => panic!("{r:?}"),
        }
        assert!(!shared.exiting());
        assert_eq!(ask(b"{\"op\":\"kill\"}\n"), Response::Ok);
        assert_eq!(
            shared.wait_exit(Duration::from_secs(1)).unwrap().reason,
            ExitReason::Killed
        );
        std::fs::remove_file(&path).ok();
    }
}

//! A client of one VMM's control socket (`runv_vmm_api::control`): one JSON
//! request per line, one JSON response per line, with bounded waits.
//!
//! Blocking on purpose: each call is a few hundred bytes on a local socket; the
//! async agent calls it from `spawn_blocking`. It owns no VM state, and it
//! does not check who listens: the agent connects through
//! [`super::control`], which makes sure the peer is the VMM it recorded
//! and hands the connection to [`VmmClient::from_stream`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runv_vmm_api::{Request, Response, VmDescription};

/// Longest response line accepted (a `counters` answer of a VM with many devices).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Why a control-socket call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No VMM listens on the socket.
    #[error("connecting to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The VMM answered a line longer than any response.
    #[error("response line too long")]
    TooLong,
    /// The VMM answered something that is not a response.
    #[error("malformed response {line:?}")]
    Malformed {
        /// The line it sent.
        line: String,
        /// Why it is no response.
        source: serde_json::Error,
    },
    /// The VMM refused the request.
    #[error("the VMM refused {op}: {message}")]
    Refused {
        /// The request.
        op: &'static str,
        /// Its message.
        message: String,
    },
    /// The VMM answered with the wrong kind of response.
    #[error("unexpected response to {op}: {got:?}")]
    Unexpected {
        /// The request.
        op: &'static str,
        /// The response.
        got: Box<Response>,
    },
}

/// A connected client.
#[derive(Debug)]
pub struct VmmClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The longest one call may take, all its reads and writes together.
    timeout: Duration,
}

fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Ping => "ping",
        Request::Describe => "describe",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Shutdown { .. } => "shutdown",
        Request::Kill => "kill",
        Request::Counters => "counters",
    }
}

impl VmmClient {
    /// Connects to whatever listens at `path` (following links, checking no
    /// peer: for tools and tests); every later call takes at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let s = UnixStream::connect(path).map_err(connect_err)?;
        Self::from_stream(s, timeout)
    }

    /// A client over a connected stream; every later call takes at most
    /// `timeout`, however slowly the VMM answers.
    pub fn from_stream(s: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            timeout,
        })
    }

    /// Sends one request and reads its response; an error response is returned
    /// as is. The whole call is bounded by the client's timeout: a VMM that
    /// answers a byte at a time (each read in time) is cut off all the same.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let deadline = std::time::Instant::now() + self.timeout;
        self.writer.write_all(req.encode().as_bytes())?;
        let line = self.read_line_by(deadline)?;
        Response::decode(line.trim_ascii_end()).map_err(|source| ClientError::Malformed {
            line: String::from_utf8_lossy(line.trim_ascii_end()).into_owned(),
            source,
        })
    }

    /// One response line (with its newline), read before `deadline`.
    fn read_line_by(&mut self, deadline: std::time::Instant) -> Result<Vec<u8>, ClientError> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ClientError::Io(std::io::ErrorKind::TimedOut.into()));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if line.len() > MAX_RESPONSE_BYTES {
                return Err(ClientError::TooLong);
            }
            if done {
                return Ok(line);
            }
        }
    }

    fn expect_ok(&mut self, req: Request) -> Result<(), ClientError> {
        let op = op_name(&req);
        match self.call(&req)? {
            Response::Ok | Response::Pong => Ok(()),
            Response::Error { message } => Err(ClientError::Refused { op, message }),
            got => Err(ClientError::Unexpected {
                op,
                got: Box::new(got),
            }),
        }
    }

    /// Liveness.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.expect_ok(Request::Ping)
    }
    /// Stops the vCPUs.
    pub fn pause(&mut self) -> Result<(), ClientError> {
        self.expect_ok(Request::Pause)
    }
    /// Lets them run again.
    pub fn resume(&mut self) -> Result<(), ClientError> {
        self.expect_ok(Request::Resume)
    }
    /// Presses the power button; the VMM ends the VM after `grace` (its
    /// default when `None`) if the guest has not powered off.
    pub fn shutdown(&mut self, grace: Option<Duration>) -> Result<(), ClientError> {
        self.expect_ok(grace.map_or(Request::SHUTDOWN, Request::shutdown_within))
    }
    /// Ends the VM now.
    pub fn kill(&mut self) -> Result<(), ClientError> {
        self.expect_ok(Request::Kill)
    }

    /// Configuration and state.
    pub fn describe(&mut self) -> Result<VmDescription, ClientError> {
        match self.call(&Request::Describe)? {
            Response::Described(d) => Ok(d),
            Response::Error { message } => Err(ClientError::Refused {
                op: "describe",
                message,
            }),
            got => Err(ClientError::Unexpected {
                op: "describe",
                got: Box::new(got),
            }),
        }
    }

    /// Device and vCPU counters.
    pub fn counters(&mut self) -> Result<BTreeMap<String, u64>, ClientError> {
        match self.call(&Request::Counters)? {
            Response::Counters { counters } => Ok(counters),
            Response::Error { message } => Err(ClientError::Refused {
                op: "counters",
                message,
            }),
            got => Err(ClientError::Unexpected {
                op: "counters",
                got: Box::new(got),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use runv_vmm_api::VmState;

    use super::*;

    /// A scripted VMM: answers each request line with the next canned line.
    fn serve(path: &Path, answers: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut seen = Vec::new();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim_end().to_owned());
                w.write_all(a.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn speaks_the_line_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let server = serve(
            &sock,
            vec![
                "{\"kind\":\"pong\"}\n",
                "{\"kind\":\"described\",\"apiVersion\":\"runv.dev/vmm/v1alpha1\",\"state\":\"paused\",\"pid\":7,\"vcpus\":1,\"memoryMib\":64,\"kernel\":\"/k\",\"cmdline\":\"\",\"uptimeMs\":5,\"hypervisor\":\"kvm\"}\n",
                "{\"kind\":\"counters\",\"counters\":{\"serial_tx_bytes_total\":12}}\n",
                "{\"kind\":\"error\",\"message\":\"not paused\"}\n",
                "{\"kind\":\"ok\"}\n",
                "not json\n",
            ],
        );
        let mut c = VmmClient::connect(&sock, Duration::from_secs(5)).unwrap();
        c.ping().unwrap();
        let d = c.describe().unwrap();
        assert_eq!((d.state, d.pid), (VmState::Paused, 7));
        assert_eq!(c.counters().unwrap()["serial_tx_bytes_total"], 12);
        let e = c.resume().unwrap_err();
        assert!(
            matches!(e, ClientError::Refused { op: "resume", .. }),
            "{e}"
        );
        c.pause().unwrap();
        assert!(matches!(c.kill(), Err(ClientError::Malformed { .. })));
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "{\"op\":\"ping\"}",
                "{\"op\":\"describe\"}",
                "{\"op\":\"counters\"}",
                "{\"op\":\"resume\"}",
                "{\"op\":\"pause\"}",
                "{\"op\":\"kill\"}"
            ]
        );
    }

    #[test]
    fn no_vmm_and_silent_vmm_are_errors_not_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        assert!(matches!(
            VmmClient::connect(&sock, Duration::from_secs(1)),
            Err(ClientError::Connect { .. })
        ));
        let _l = UnixListener::bind(&sock).unwrap();
        // The listener never answers: the call times out.
        let mut c = VmmClient::connect(&sock, Duration::from_millis(100)).unwrap();
        assert!(matches!(c.ping(), Err(ClientError::Io(_))));
    }

    #[test]
    fn a_vmm_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let drip = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Bounded: one byte per 20 ms, well inside each read's wait, for at
            // most 30 s, never a newline.
            for _ in 0..1500 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut c = VmmClient::connect(&sock, Duration::from_millis(300)).unwrap();
        let e = c.ping().unwrap_err();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(c);
        drip.join().unwrap();
        assert!(
            matches!(&e, ClientError::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{e:?}"
        );
    }
}

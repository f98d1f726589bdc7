//! A client of one VMM's control socket (`runv_vmm_api::control`): one JSON
//! request per line, one JSON response per line, with bounded waits.
//!
//! Blocking on purpose: each call is a few hundred bytes on a local socket; the
//! async agent calls it from `spawn_blocking`. It owns no VM state, and it
//! does not check who listens: the agent connects through
//! [`super::control`], which makes sure the peer is the VMM it recorded
//! and hands the connection to [`VmmClient::from_stream`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
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
    /// peer: for tools and tests); every later read and write waits at most
    /// `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let s = UnixStream::connect(path).map_err(connect_err)?;
        Self::from_stream(s, timeout)
    }

    /// A client over a connected stream; every later read and write waits at
    /// most `timeout`.
    pub fn from_stream(s: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends one request and reads its response; an error response is returned as is.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.writer.write_all(req.encode().as_bytes())?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE_BYTES as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(ClientError::TooLong);
        }
        Response::decode(line.trim_ascii_end()).map_err(|source| ClientError::Malformed {
            line: String::from_utf8_lossy(line.trim_ascii_end()).into_owned(),
            source,
        })
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
}

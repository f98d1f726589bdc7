//! The control protocol: one JSON object per line over a unix stream socket.
//!
//! A client writes a [`Request`] followed by `\n` and reads one [`Response`]
//! line back. The protocol is stateless; any number of requests may share one
//! connection. This module owns the types and their encoding only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest request line the VMM accepts; longer lines get an error reply.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// What a client can ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Configuration and state; answered with [`Response::Described`].
    Describe,
    /// Stop running vCPUs (idempotent).
    Pause,
    /// Let paused vCPUs run again (idempotent).
    Resume,
    /// Ask the guest to power off (ACPI power button), then wait up to
    /// `graceSeconds` (absent: the config's `shutdownGraceSeconds`, else 10 s)
    /// before ending the VM with reason `killed`. `{"op":"shutdown"}` is
    /// still a complete request; a VMM from before `graceSeconds` ignores it.
    Shutdown {
        #[serde(
            default,
            rename = "graceSeconds",
            skip_serializing_if = "Option::is_none"
        )]
        grace_seconds: Option<u32>,
    },
    /// Stop the VM now.
    Kill,
    /// Device and vCPU counters; answered with [`Response::Counters`].
    Counters,
}

/// The VMM's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Response {
    Pong,
    Ok,
    Described(VmDescription),
    Counters { counters: BTreeMap<String, u64> },
    Error { message: String },
}

/// Lifecycle state of a VM as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

/// The answer to [`Request::Describe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmDescription {
    pub api_version: String,
    pub state: VmState,
    pub pid: u32,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    pub cmdline: String,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// `kvm_pvm` or `kvm`.
    pub hypervisor: String,
}

impl Request {
    /// A `shutdown` with the VMM's default grace.
    pub const SHUTDOWN: Self = Self::Shutdown {
        grace_seconds: None,
    };

    /// A `shutdown` whose guest gets `grace` (whole seconds, rounded up) to power off.
    pub fn shutdown_within(grace: std::time::Duration) -> Self {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        Self::Shutdown {
            grace_seconds: Some(u32::try_from(secs).unwrap_or(u32::MAX)),
        }
    }

    /// Decodes one request line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// Encodes as one line including the trailing newline.
    pub fn encode(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

impl Response {
    /// An error reply.
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            message: message.into(),
        }
    }

    /// Decodes one response line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// Encodes as one line including the trailing newline.
    pub fn encode(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_have_a_stable_shape() {
        for r in [
            Request::Ping,
            Request::Describe,
            Request::Pause,
            Request::Resume,
            Request::SHUTDOWN,
            Request::Shutdown {
                grace_seconds: Some(0),
            },
            Request::shutdown_within(std::time::Duration::from_secs(30)),
            Request::Kill,
            Request::Counters,
        ] {
            let line = r.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(Request::decode(line.trim_end().as_bytes()).unwrap(), r);
        }
        assert_eq!(Request::Ping.encode(), "{\"op\":\"ping\"}\n");
    }

    #[test]
    fn shutdown_carries_an_optional_grace_and_old_requests_still_parse() {
        // The request of a client from before graceSeconds.
        assert_eq!(
            Request::decode(b"{\"op\":\"shutdown\"}").unwrap(),
            Request::SHUTDOWN
        );
        assert_eq!(Request::SHUTDOWN.encode(), "{\"op\":\"shutdown\"}\n");
        assert_eq!(
            Request::decode(b"{\"op\":\"shutdown\",\"graceSeconds\":45}").unwrap(),
            Request::Shutdown {
                grace_seconds: Some(45)
            }
        );
        assert_eq!(
            Request::shutdown_within(std::time::Duration::from_millis(1500)).encode(),
            "{\"op\":\"shutdown\",\"graceSeconds\":2}\n"
        );
        for bad in [
            &b"{\"op\":\"shutdown\",\"graceSeconds\":-1}"[..],
            b"{\"op\":\"shutdown\",\"graceSeconds\":\"10\"}",
            b"{\"op\":\"shutdown\",\"graceSeconds\":4294967296}",
        ] {
            assert!(Request::decode(bad).is_err(), "{:?}", bad);
        }
    }

    /// A VMM started before `graceSeconds` existed keeps running across an
    /// agent upgrade; the new agent's request must still mean `shutdown` to it.
    #[test]
    fn a_vmm_from_before_grace_seconds_reads_the_new_request_as_shutdown() {
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(rename_all = "camelCase", tag = "op")]
        enum OldRequest {
            Ping,
            Shutdown,
        }
        let line = Request::shutdown_within(std::time::Duration::from_secs(7)).encode();
        let old: OldRequest = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(old, OldRequest::Shutdown);
        assert_eq!(
            serde_json::from_str::<OldRequest>(&Request::Ping.encode()).unwrap(),
            OldRequest::Ping
        );
    }

    #[test]
    fn malformed_requests_are_errors() {
        for bad in [
            &b"{\"op\":\"fly\"}"[..],
            b"{}",
            b"ping",
            b"{\"op\":1}",
            b"\xff\xfe",
        ] {
            assert!(Request::decode(bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn responses_round_trip() {
        let d = VmDescription {
            api_version: crate::API_VERSION.into(),
            state: VmState::Paused,
            pid: 7,
            vcpus: 2,
            memory_mib: 128,
            kernel: "/k".into(),
            cmdline: "x=1".into(),
            uptime_ms: 5,
            hypervisor: "kvm".into(),
        };
        let mut counters = BTreeMap::new();
        counters.insert("serial_bytes".to_string(), 3);
        for r in [
            Response::Pong,
            Response::Ok,
            Response::Described(d),
            Response::Counters { counters },
            Response::error("bad request"),
        ] {
            let line = r.encode();
            assert_eq!(Response::decode(line.trim_end().as_bytes()).unwrap(), r);
        }
        assert!(Response::error("x").encode().contains("\"kind\":\"error\""));
        assert!(
            Response::Described(VmDescription {
                api_version: String::new(),
                state: VmState::Running,
                pid: 0,
                vcpus: 1,
                memory_mib: 8,
                kernel: String::new(),
                cmdline: String::new(),
                uptime_ms: 0,
                hypervisor: String::new(),
            })
            .encode()
            .contains("\"state\":\"running\"")
        );
    }
}

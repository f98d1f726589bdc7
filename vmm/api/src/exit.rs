//! The exit record: why a VMM process ended.
//!
//! The VMM prints its one-line summary to stderr and writes this record as JSON
//! to its exit file, so a supervisor that was not watching can still tell a
//! power-off from a triple fault. This module owns the type and the mapping from
//! reason to process exit code.

use serde::{Deserialize, Serialize};

/// Why the VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExitReason {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI); a microVM does not reboot in place.
    Reset,
    /// A control-socket `kill` or `shutdown` ended the VM.
    Killed,
    /// KVM reported a shutdown exit: the guest triple-faulted.
    TripleFault,
    /// KVM reported an internal error (on `kvm_pvm`: an instruction it cannot emulate).
    InternalError,
    /// KVM could not emulate an instruction, or the guest touched an address with no device.
    EmulationFailure,
    /// The guest reported a panic (pvpanic).
    GuestPanic,
    /// The guest broke a device protocol (malformed virtio descriptors).
    GuestFault,
    /// The VMM itself failed (setup or an I/O error).
    VmmError,
}

impl ExitReason {
    /// The process exit code for this reason: 0 for orderly ends.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::PowerOff | Self::Reset | Self::Killed => 0,
            Self::TripleFault => 10,
            Self::InternalError => 11,
            Self::EmulationFailure => 12,
            Self::GuestPanic => 13,
            Self::GuestFault => 14,
            Self::VmmError => 1,
        }
    }
}

/// The content of the exit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    pub reason: ExitReason,
    pub exit_code: i32,
    /// One human-readable line.
    pub message: String,
}

impl ExitRecord {
    pub fn new(reason: ExitReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            exit_code: reason.exit_code(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orderly_ends_exit_zero_and_faults_do_not() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        for r in [
            ExitReason::TripleFault,
            ExitReason::InternalError,
            ExitReason::EmulationFailure,
            ExitReason::GuestPanic,
            ExitReason::GuestFault,
            ExitReason::VmmError,
        ] {
            assert_ne!(r.exit_code(), 0, "{r:?}");
        }
    }

    #[test]
    fn record_round_trips() {
        let r = ExitRecord::new(ExitReason::TripleFault, "triple fault at rip 0x1000");
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"reason\":\"tripleFault\""));
        assert_eq!(serde_json::from_str::<ExitRecord>(&text).unwrap(), r);
    }
}

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
    /// Every reason, in declaration order.
    pub const ALL: [Self; 9] = [
        Self::PowerOff,
        Self::Reset,
        Self::Killed,
        Self::TripleFault,
        Self::InternalError,
        Self::EmulationFailure,
        Self::GuestPanic,
        Self::GuestFault,
        Self::VmmError,
    ];

    /// The reason's name in the exit record (its serialized form).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PowerOff => "powerOff",
            Self::Reset => "reset",
            Self::Killed => "killed",
            Self::TripleFault => "tripleFault",
            Self::InternalError => "internalError",
            Self::EmulationFailure => "emulationFailure",
            Self::GuestPanic => "guestPanic",
            Self::GuestFault => "guestFault",
            Self::VmmError => "vmmError",
        }
    }

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

    /// Where `r` sits in `ALL`; the match has no wildcard, so a new variant
    /// does not compile until it is given a place.
    fn position(r: ExitReason) -> usize {
        match r {
            ExitReason::PowerOff => 0,
            ExitReason::Reset => 1,
            ExitReason::Killed => 2,
            ExitReason::TripleFault => 3,
            ExitReason::InternalError => 4,
            ExitReason::EmulationFailure => 5,
            ExitReason::GuestPanic => 6,
            ExitReason::GuestFault => 7,
            ExitReason::VmmError => 8,
        }
    }

    #[test]
    fn all_lists_every_reason_and_as_str_is_its_serialized_name() {
        for (i, r) in ExitReason::ALL.into_iter().enumerate() {
            assert_eq!(position(r), i, "{r:?}");
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<ExitReason>(&json).unwrap(), r);
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

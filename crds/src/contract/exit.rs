//! How a VM's last run ended, as `status.lastExit.reason` names it.
//!
//! The agent turns the VMM's exit record (or the absence of one) into an
//! [`ExitReason`]; everything downstream (phase, the `Ready` reason, Events,
//! restarts) decides on this enum. The status keeps the wire spelling, and a
//! status read back from the API is parsed with [`ExitReason::parse`].

use super::Reason;

/// Why the VM's last run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// The guest powered itself off.
    GuestPowerOff,
    /// The guest asked for a reset (a microVM does not reboot in place).
    GuestReset,
    /// The VMM was ended by a signal, or by a control request.
    Killed,
    /// The kernel's OOM killer ended the VMM.
    OOMKilled,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM reported an internal error.
    InternalError,
    /// KVM could not emulate an instruction.
    EmulationFailure,
    /// The guest reported a panic.
    GuestPanicked,
    /// The guest broke a device protocol.
    GuestFault,
    /// The VMM itself failed.
    VMMError,
}

impl ExitReason {
    /// Every exit reason.
    pub const ALL: [ExitReason; 10] = [
        ExitReason::GuestPowerOff,
        ExitReason::GuestReset,
        ExitReason::Killed,
        ExitReason::OOMKilled,
        ExitReason::TripleFault,
        ExitReason::InternalError,
        ExitReason::EmulationFailure,
        ExitReason::GuestPanicked,
        ExitReason::GuestFault,
        ExitReason::VMMError,
    ];

    /// The wire spelling in `status.lastExit.reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExitReason::GuestPowerOff => "GuestPowerOff",
            ExitReason::GuestReset => "GuestReset",
            ExitReason::Killed => "Killed",
            ExitReason::OOMKilled => "OOMKilled",
            ExitReason::TripleFault => "TripleFault",
            ExitReason::InternalError => "InternalError",
            ExitReason::EmulationFailure => "EmulationFailure",
            ExitReason::GuestPanicked => "GuestPanicked",
            ExitReason::GuestFault => "GuestFault",
            ExitReason::VMMError => "VMMError",
        }
    }

    /// The reason of this wire spelling, if it is one of ours.
    pub fn parse(s: &str) -> Option<ExitReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The guest ended on its own terms (power-off or reset).
    pub fn is_guest_end(self) -> bool {
        matches!(self, ExitReason::GuestPowerOff | ExitReason::GuestReset)
    }

    /// The `Ready` reason of a VM that failed this way and is not restarted.
    pub fn failure(self) -> Reason {
        match self {
            ExitReason::GuestPanicked => Reason::GuestPanicked,
            ExitReason::TripleFault => Reason::TripleFault,
            ExitReason::InternalError => Reason::InternalError,
            ExitReason::EmulationFailure => Reason::EmulationFailure,
            ExitReason::GuestFault => Reason::GuestFault,
            ExitReason::VMMError => Reason::VMMError,
            ExitReason::OOMKilled => Reason::OOMKilled,
            ExitReason::Killed | ExitReason::GuestPowerOff | ExitReason::GuestReset => {
                Reason::Killed
            }
        }
    }

    /// The `GuestBooted=False` reason once the VM is down after this exit:
    /// the guest's own failures are named, anything else is `NotRunning`.
    pub fn not_booted(self) -> Reason {
        match self {
            ExitReason::GuestPanicked => Reason::GuestPanicked,
            ExitReason::TripleFault => Reason::TripleFault,
            _ => Reason::NotRunning,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_reason_parses_back() {
        for r in ExitReason::ALL {
            assert_eq!(ExitReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(ExitReason::parse("PowerOff"), None);
    }

    #[test]
    fn failures_name_a_condition_reason_of_the_same_spelling_or_killed() {
        for r in ExitReason::ALL {
            let f = r.failure();
            assert!(f.as_str() == r.as_str() || f == Reason::Killed, "{r}");
        }
    }
}

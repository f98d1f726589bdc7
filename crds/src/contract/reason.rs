//! The reasons of MicroVM conditions, as one enum both writers use.
//!
//! A reason is CamelCase on the wire (`metav1.Condition.reason`); code builds
//! and compares [`Reason`] values and turns them into strings only at the
//! edge, with [`Reason::as_str`]. Reading a reason back from the API goes
//! through [`Reason::parse`], never through ad-hoc string matches.

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// A MicroVM condition reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $name, )*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The wire spelling.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Reason::$name => stringify!($name), )*
                }
            }
        }
    };
}

reasons! {
    // Placement (the operator's).
    /// Bound to the node the placer chose.
    Placed,
    /// Bound to the node `spec.nodeName` names.
    Pinned,
    /// No node can take the VM now.
    Unschedulable,
    /// Not placed yet.
    NotScheduled,
    /// Waiting for a node with room.
    WaitingForNode,
    /// The spec does not ask the VM to run.
    NotRequested,
    /// The node's agent stopped renewing its Lease.
    NodeLost,
    /// The pinned node is fenced or gone; the VM cannot move.
    PinnedNodeLost,
    /// Bound, waiting for the node's agent.
    Pending,
    /// `spec.tenant.name` is not the tenant the namespace belongs to.
    TenantNotAllowed,
    /// `spec.nodeName` is set in a namespace whose administrator does not
    /// allow pinning.
    NodeNameNotAllowed,
    /// `spec.tenant.nodeIsolation: Exclusive` is set in a namespace whose
    /// administrator does not allow exclusive nodes.
    ExclusiveNotAllowed,
    // Lifecycle (the agent's, and the operator's while it holds them).
    /// The VMM is being started.
    Starting,
    /// The VMM runs.
    Started,
    /// The guest is booting.
    Booting,
    /// The guest booted.
    Booted,
    /// The guest runs.
    Running,
    /// Nothing runs.
    NotRunning,
    /// The vCPUs are paused.
    Paused,
    /// The vCPUs are not paused.
    NotPaused,
    /// The vCPUs are being paused.
    Pausing,
    /// The guest was asked to power off.
    Stopping,
    /// Down on purpose.
    Stopped,
    /// The VMM exited.
    VMMExited,
    /// The guest ended cleanly and will not be restarted.
    Succeeded,
    /// The VM failed and will not be restarted.
    Failed,
    /// Waiting before the next restart.
    CrashLoopBackOff,
    /// Reconciled to the spec.
    Reconciled,
    /// Not stalled.
    Progressing,
    // Why a VM cannot start.
    /// `spec.boot.kernel` is not on the node.
    KernelNotFound,
    /// `spec.boot.initrd` is not on the node.
    InitrdNotFound,
    /// A disk file is not on the node.
    DiskNotFound,
    /// A host file the spec names is outside the directories the node
    /// allows for it, leads out of them, or is not a regular file.
    HostPathNotAllowed,
    /// A device the spec names (a tap) is not one the node allows VMs to use.
    DeviceNotAllowed,
    /// The spec cannot become a VMM config.
    InvalidSpec,
    /// The node cannot enforce `spec.isolation.limits`.
    LimitsNotEnforceable,
    /// `spec.isolation` switches off the jail or seccomp, and the node's
    /// administrator does not allow that on this node.
    SandboxNotAllowed,
    /// The last start attempt failed.
    StartFailed,
    /// Pulling `spec.container.image` failed (kubelet's reason).
    ErrImagePull,
    /// Waiting before pulling `spec.container.image` again (kubelet's back-off).
    ImagePullBackOff,
    /// `spec.container.image` is not a valid image reference.
    InvalidImageName,
    /// `spec.container.image` is not on the node and its pull policy is `Never`.
    ErrImageNeverPull,
    /// The VMM's control socket is not its own.
    ControlSocketMismatch,
    /// The VM's state record on the node cannot be read.
    StateUnreadable,
    /// The node carries a fencing taint: its agent stopped the VM and starts
    /// none there.
    NodeFenced,
    /// The VM does not fit in what the node's agent advertises, beside the
    /// VMs that hold a place there.
    OutOfCapacity,
    /// Starting the VM would put an `Exclusive` tenant's VM beside another
    /// tenant's on the node.
    IsolationConflict,
    // How the last run ended, when it failed (see [`super::ExitReason`]).
    /// The guest kernel panicked.
    GuestPanicked,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM reported an internal error.
    InternalError,
    /// KVM could not emulate an instruction.
    EmulationFailure,
    /// The guest faulted in a way the VMM cannot recover.
    GuestFault,
    /// The VMM itself failed.
    VMMError,
    /// The OOM killer ended the VMM.
    OOMKilled,
    /// The VMM was killed by a signal.
    Killed,
}

impl Reason {
    /// The reason of this wire spelling, if it is one of ours.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// Whether a `Ready=False` with this reason needs someone to act, and so
    /// deserves a Warning Event.
    pub fn warns(self) -> bool {
        matches!(
            self,
            Reason::CrashLoopBackOff
                | Reason::KernelNotFound
                | Reason::InitrdNotFound
                | Reason::DiskNotFound
                | Reason::HostPathNotAllowed
                | Reason::DeviceNotAllowed
                | Reason::InvalidSpec
                | Reason::LimitsNotEnforceable
                | Reason::SandboxNotAllowed
                | Reason::StartFailed
                | Reason::ErrImagePull
                | Reason::ImagePullBackOff
                | Reason::InvalidImageName
                | Reason::ErrImageNeverPull
                | Reason::ControlSocketMismatch
                | Reason::StateUnreadable
                | Reason::NodeFenced
                | Reason::OutOfCapacity
                | Reason::IsolationConflict
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_parses_back_and_is_camel_case() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert!(r.as_str().starts_with(|c: char| c.is_ascii_uppercase()));
            assert!(r.as_str().chars().all(|c| c.is_ascii_alphanumeric()));
        }
        assert_eq!(Reason::parse("running"), None);
    }
}

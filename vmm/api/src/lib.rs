//! Types shared by `runv-vmm` and the processes that drive it (the node agent).
//!
//! This crate owns the wire formats only: the versioned VM configuration
//! ([`config`]), the control-socket protocol ([`control`]), the exit record a
//! VMM leaves behind ([`exit`]), and the channel between the agent and the
//! guest's `runv-init` ([`guest`]). It must stay small and free of KVM or OS code so
//! that the agent can depend on it cheaply.

pub mod config;
pub mod control;
pub mod exit;
pub mod guest;

pub use config::{
    ConfigError, CpuPolicy, DiskConfig, JailConfig, NetConfig, SerialConfig, SerialRotation,
    VmConfig, VsockConfig,
};
pub use control::{Request, Response, VmDescription, VmState};
pub use exit::{ExitReason, ExitRecord};

/// The API version every config file and description carries.
pub const API_VERSION: &str = "runv.dev/vmm/v1alpha1";

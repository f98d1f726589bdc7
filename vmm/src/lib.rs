//! runv-vmm: a KVM microVM monitor, one process per microVM.
//!
//! Layout: [`kvm`] wraps every KVM ioctl; [`memory`] and [`boot`] lay out and
//! fill guest memory; [`devices`] emulate hardware; [`vcpu`] runs vCPU threads;
//! [`state`] and [`control`] are the shared run state and the control socket;
//! [`jail`] confines the process once its host resources are open;
//! [`vmm`] puts it together in boot order (docs/vmm-boot.md).

pub mod boot;
pub mod control;
pub mod counters;
pub mod devices;
pub mod jail;
pub mod kvm;
pub mod memory;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod vmm;

/// Path of the in-repo test guest with a PVH note (built by build.rs).
pub const TEST_GUEST_PVH: &str = env!("RUNV_GUEST_PVH");
/// Path of the in-repo test guest without a PVH note (64-bit entry).
pub const TEST_GUEST_64: &str = env!("RUNV_GUEST_64");

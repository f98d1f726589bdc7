//! The runv node agent (`runv-agent`): realizes MicroVMs on a node, one
//! `runv-vmm` process per VM, and reports what it observes.
//!
//! Layout: [`host`] holds every side effect on the node behind traits (with
//! fakes), the VMM control-socket client and the agent's file writes, and
//! depends on nothing above it; [`state`] is the layout of the agent's state
//! directory; [`jail`] the uid/gid each jailed VMM gets; [`vmconfig`] turns a
//! MicroVM spec into a VMM config; [`reconcile`] decides, as pure functions,
//! what to do and what status to report; [`runtime`] observes, decides and
//! acts for each VM; [`standalone`] and [`cluster`] are the two modes;
//! [`metrics`] renders `/metrics`; [`testing`] gates tests that need `/dev/kvm`, root or taps.

pub mod cluster;
pub mod host;
pub mod jail;
pub mod metrics;
pub mod reconcile;
pub mod runtime;
pub mod standalone;
pub mod state;
pub use host::testing;
pub mod vmconfig;

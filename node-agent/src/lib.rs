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
//! [`metrics`] renders `/metrics`; [`console`] makes guest console output
//! safe to print.
//!
//! Not in a release build: `dev` (building `runv-vmm` and installing the test
//! guest under `cargo run`, debug builds only), and the test support behind
//! the `testing` feature: `testing` (the gate for tests that need `/dev/kvm`,
//! root or taps) and `host::fake`.

pub mod cluster;
pub mod console;
#[cfg(any(debug_assertions, feature = "testing"))]
pub mod dev;
pub mod host;
pub mod images;
pub mod jail;
pub mod metrics;
pub mod reconcile;
pub mod runtime;
pub mod scrape;
pub mod standalone;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub use host::testing;
pub mod vmconfig;

//! The runv operator: places every MicroVM on a node, watches node agents'
//! liveness, and runs each SecureWorkload as a set of MicroVM replicas.
//!
//! It meets the node agents only through the API (`status.nodeName`, Node
//! extended resources, agent Leases); it never talks to a node.

#![forbid(unsafe_code)]

pub mod context;
pub mod fencing;
pub mod http;
pub mod metrics;
pub mod microvm;
pub mod nodes;
pub mod placement;
pub mod run;
pub mod tenancy;
#[cfg(test)]
pub mod testing;
pub mod workload;

//! The SecureWorkload controller: replicas, rollouts and status.

pub mod claim;
pub mod plan;
pub mod reconcile;
pub mod replica;

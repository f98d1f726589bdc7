//! The SecureWorkload controller: replicas, rollouts and status.

pub mod plan;
pub mod reconcile;
pub mod replica;

//! The runv API: `MicroVM` and `SecureWorkload` custom resources in the
//! `runv.dev/v1alpha1` group.
//!
//! This crate owns the wire types every component shares (the operator, the
//! node agent, the test server and users' manifests), the CRD generation, the
//! condition vocabulary, the offline validation of manifests, and the retry
//! policy every controller shares ([`retry`]). It makes no API calls.

#![forbid(unsafe_code)]

pub mod conditions;
pub mod contract;
pub mod generate;
pub mod microvm;
pub mod names;
pub mod quantity;
pub mod retry;
pub mod secureworkload;
pub mod validate;

pub use microvm::{MicroVM, MicroVMSpec, MicroVMStatus};
pub use secureworkload::{SecureWorkload, SecureWorkloadSpec, SecureWorkloadStatus};

/// API group of every runv resource.
pub const GROUP: &str = "runv.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Category shared by all runv kinds (`kubectl get runv`).
pub const CATEGORY: &str = "runv";

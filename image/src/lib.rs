//! Container images on the node: pull through the OCI distribution protocol,
//! verify, cache in a content-addressed store, unpack layers safely, and build
//! a read-only root filesystem image shared by every VM of the image.

pub mod auth;
pub mod container;
pub mod digest;
pub mod images;
pub mod pull;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use digest::Digest;
pub use pull::{PullConfig, PulledImage, Puller};
pub use store::BlobStore;

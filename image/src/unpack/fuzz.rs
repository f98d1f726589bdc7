//! The layer applier's fuzz harness, shared by the bounded run in `cargo
//! test` and the libFuzzer target in `image/fuzz`: any byte string is a layer
//! applied into a fresh root beside a sentinel directory. The invariant is
//! that nothing outside the root changes; a panic is a finding too. Errors
//! from the applier are expected and fine.

use super::{Applier, Limits};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The media types an input may claim, chosen by its first byte.
const MEDIA_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
];

/// A root beside a sentinel directory, removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    base: PathBuf,
    /// Where layers are applied.
    pub root: PathBuf,
}

impl Sandbox {
    /// A fresh sandbox under the system's temporary directory.
    pub fn new() -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("runv-image-fuzz-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("root")).expect("create sandbox root");
        fs::create_dir_all(base.join("outside")).expect("create sentinel");
        fs::write(base.join("outside/secret"), b"secret").expect("write sentinel");
        Self {
            root: base.join("root"),
            base,
        }
    }

    /// The sentinel directory beside the root (it holds `secret`).
    pub fn sentinel(&self) -> PathBuf {
        self.base.join("outside")
    }

    /// Everything in the sandbox except the root, with file contents.
    pub fn outside(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.base.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("list sandbox") {
                let path = entry.expect("list sandbox").path();
                if path == self.root {
                    continue;
                }
                let meta = fs::symlink_metadata(&path).expect("stat sandbox");
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                let data = if meta.is_file() {
                    fs::read(&path).unwrap_or_default()
                } else {
                    Vec::new()
                };
                out.insert(path, data);
            }
        }
        out
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// Applies `layer` into `root` with small limits.
pub fn apply(root: &Path, media_type: &str, layer: &[u8]) -> Result<(), super::UnpackError> {
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_image_bytes: 1 << 20,
        max_entries: 1000,
        allow_devices: false,
    };
    Applier::new(root, limits)?.apply(layer, media_type)
}

/// One fuzz input: the first byte picks the media type, the rest is the
/// layer. Returns an error if anything outside the root changed.
pub fn run_bytes(data: &[u8]) -> Result<(), String> {
    let Some((&kind, layer)) = data.split_first() else {
        return Ok(());
    };
    let sandbox = Sandbox::new();
    let before = sandbox.outside();
    let _ = apply(
        &sandbox.root,
        MEDIA_TYPES[usize::from(kind) % MEDIA_TYPES.len()],
        layer,
    );
    if sandbox.outside() != before {
        return Err("a layer changed files outside its root".to_owned());
    }
    Ok(())
}

//! The guest kit on the node (the kernel and its modules, installed by
//! `vmm/scripts/guest-kit.sh`) and the initramfs built from it: `runv-init`
//! plus the modules a guest needs, laid out by [`super::initramfs`].
//!
//! The initramfs is cached under a name made of a hash of everything in it
//! (the layout's version, `runv-init`, each module's name and content), so a
//! new `runv-init` or kernel makes a new file and an unchanged kit reuses the
//! old one. It is written to a temporary file of this process and renamed into
//! place, so a crash never leaves a file under the final name that is not
//! complete, and two agents building the same kit at once both end with it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::initramfs::{self, Entry, ModuleFile, ModulesDep, ModulesError};

/// Bumped whenever [`initramfs::layout`] changes what it writes, so a cached
/// initramfs of an older layout is not reused.
const LAYOUT_VERSION: &str = "runv-initramfs-1";

/// How to install the kit, for error messages.
const INSTALL_HINT: &str = "install the guest kit with vmm/scripts/guest-kit.sh";

/// Why the initramfs cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestKitError {
    /// A file the kit must have is missing or unreadable.
    #[error("guest kit: cannot read {} ({hint})", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kit's module list does not give the modules a guest needs.
    #[error("guest kit {}: {source}", kit.display())]
    Modules {
        /// The kit directory.
        kit: PathBuf,
        /// What is wrong with its modules.
        source: ModulesError,
    },
    /// A module is compressed in a format the agent does not read.
    #[error(
        "guest kit: {} is compressed in a format the agent does not unpack \
         (plain .ko and .ko.zst are read); decompress it in the kit",
        path.display()
    )]
    UnsupportedCompression {
        /// The module file.
        path: PathBuf,
    },
    /// `runv-init` is not a static executable: as PID 1 of a guest it
    /// would find no dynamic loader.
    #[error(
        "{} is not a static executable; build runv-init with \
         CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
         cargo build -p runv-init --release --target x86_64-unknown-linux-gnu",
        path.display()
    )]
    NotStatic {
        /// The binary.
        path: PathBuf,
    },
    /// Writing the initramfs into the cache failed.
    #[error("writing the initramfs {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The initramfs for the kit in `kit_dir` with `init_binary` as `/init`: the
/// cached one if these inputs were built before, else built now into
/// `cache_dir` (created if missing). Returns its path.
pub fn initramfs(
    kit_dir: &Path,
    init_binary: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, GuestKitError> {
    let modules = modules(kit_dir)?;
    let init = read(init_binary, "build runv-init (cargo build -p runv-init)")?;
    if !is_static_elf(&init) {
        return Err(GuestKitError::NotStatic {
            path: init_binary.to_owned(),
        });
    }
    let key = cache_key(&init, &modules);
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let entries = initramfs::layout(init, modules);
    write_new(cache_dir, &path, &entries)?;
    Ok(path)
}

/// The modules a guest needs from the kit, in load order, with their
/// uncompressed content.
pub fn modules(kit_dir: &Path) -> Result<Vec<(ModuleFile, Vec<u8>)>, GuestKitError> {
    // Written last by the installer: without it the kit is not complete.
    read(&kit_dir.join("version"), INSTALL_HINT)?;
    let dir = kit_dir.join("modules");
    let text = |name: &str| {
        read(&dir.join(name), INSTALL_HINT)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    };
    let modules_error = |source| GuestKitError::Modules {
        kit: kit_dir.to_owned(),
        source,
    };
    let dep = ModulesDep::parse(&text("modules.dep")?).map_err(modules_error)?;
    let builtin: BTreeSet<String> = initramfs::parse_builtin(&text("modules.builtin")?);
    let order = initramfs::resolve(initramfs::WANTED, &dep, &builtin).map_err(modules_error)?;
    order
        .into_iter()
        .map(|module| {
            let content = module_content(&dir.join(&module.path))?;
            Ok((module, content))
        })
        .collect()
}

/// A module file's content, uncompressed.
fn module_content(path: &Path) -> Result<Vec<u8>, GuestKitError> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return read(path, INSTALL_HINT);
    }
    if name.ends_with(".ko.zst") {
        let compressed = read(path, INSTALL_HINT)?;
        return zstd::decode_all(compressed.as_slice()).map_err(|source| GuestKitError::Read {
            path: path.to_owned(),
            hint: "the module is not valid zstd; reinstall the guest kit",
            source,
        });
    }
    Err(GuestKitError::UnsupportedCompression {
        path: path.to_owned(),
    })
}

/// An ELF64 executable with no `PT_INTERP` program header (no dynamic
/// loader named).
pub fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..usize::from(count)).all(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|p| p.checked_add(i * usize::from(size)))
            .and_then(u32_at)
            .is_some_and(|t| t != PT_INTERP)
    })
}

fn read(path: &Path, hint: &'static str) -> Result<Vec<u8>, GuestKitError> {
    std::fs::read(path).map_err(|source| GuestKitError::Read {
        path: path.to_owned(),
        hint,
        source,
    })
}

/// The first 16 bytes of a SHA-256 over the layout version, `/init` and each
/// module's file name and content, each length-prefixed, in hex.
fn cache_key(init: &[u8], modules: &[(ModuleFile, Vec<u8>)]) -> String {
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(LAYOUT_VERSION.as_bytes());
    field(init);
    for (module, content) in modules {
        field(module.file_name().as_bytes());
        field(content);
    }
    hex::encode(&hash.finalize()[..16])
}

/// Writes the archive to a temporary file of this process in `dir`, syncs it
/// and renames it to `path`.
fn write_new(dir: &Path, path: &Path, entries: &[Entry]) -> Result<(), GuestKitError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| GuestKitError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".initramfs.{}.{n}.tmp", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut out = initramfs::write_cpio(entries, std::io::BufWriter::new(file))?;
        out.flush()?;
        out.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kit with the wanted modules (virtio_console zstd-compressed, vsock
    /// built in) and a runv-init stand-in.
    fn kit(dir: &Path) -> (PathBuf, PathBuf) {
        let kit = dir.join("kit");
        let mods = kit.join("modules");
        std::fs::create_dir_all(mods.join("kernel")).unwrap();
        let mut dep = String::new();
        for name in initramfs::WANTED {
            let (file, content) = match *name {
                "vsock" => continue,
                "virtio_console" => (
                    format!("kernel/{name}.ko.zst"),
                    zstd::encode_all(&b"console module"[..], 3).unwrap(),
                ),
                _ => (format!("kernel/{name}.ko"), name.as_bytes().to_vec()),
            };
            std::fs::write(mods.join(&file), content).unwrap();
            dep.push_str(&format!("{file}:\n"));
        }
        std::fs::write(mods.join("modules.dep"), dep).unwrap();
        std::fs::write(mods.join("modules.builtin"), "kernel/net/vsock.ko\n").unwrap();
        std::fs::write(kit.join("version"), "6.1.0-test\n").unwrap();
        let init = dir.join("runv-init");
        std::fs::write(&init, static_elf(b"init")).unwrap();
        (kit, init)
    }

    /// An ELF64 header with no program headers (so nothing names a loader),
    /// then `tail`.
    fn static_elf(tail: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf.extend_from_slice(tail);
        elf
    }

    #[test]
    fn the_initramfs_is_built_once_per_input_and_replaced_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let (kit, init) = kit(tmp.path());
        let cache = tmp.path().join("cache");
        let first = initramfs(&kit, &init, &cache).unwrap();
        let bytes = std::fs::read(&first).unwrap();
        assert_eq!(&bytes[..6], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("lib/modules/runv/virtio_console.ko"),
            "{text}"
        );
        assert!(text.contains("console module"), "decompressed");
        assert!(!text.contains("vsock.ko\n"), "built in: not loaded");
        // The same inputs: the cached file, untouched.
        let mtime = std::fs::metadata(&first).unwrap().modified().unwrap();
        assert_eq!(initramfs(&kit, &init, &cache).unwrap(), first);
        assert_eq!(
            std::fs::metadata(&first).unwrap().modified().unwrap(),
            mtime
        );
        // A new runv-init: a new file; nothing temporary left behind.
        std::fs::write(&init, static_elf(b"init 2")).unwrap();
        let second = initramfs(&kit, &init, &cache).unwrap();
        assert_ne!(second, first);
        let names: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".cpio") && !n.starts_with('.'))
        );
    }

    #[test]
    fn what_is_missing_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let (kit, init) = kit(tmp.path());
        let cache = tmp.path().join("cache");
        let missing_init = tmp.path().join("nope");
        let err = initramfs(&kit, &missing_init, &cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("runv-init"), "{err}");

        std::fs::remove_file(kit.join("modules/kernel/erofs.ko")).unwrap();
        let err = initramfs(&kit, &init, &cache).unwrap_err().to_string();
        assert!(
            err.contains("kernel/erofs.ko") && err.contains("guest-kit.sh"),
            "{err}"
        );

        std::fs::write(kit.join("modules/modules.dep"), "kernel/overlay.ko:\n").unwrap();
        let err = initramfs(&kit, &init, &cache).unwrap_err().to_string();
        assert!(err.contains("module virtio_mmio is neither"), "{err}");

        std::fs::remove_file(kit.join("modules/modules.dep")).unwrap();
        let err = initramfs(&kit, &init, &cache).unwrap_err().to_string();
        assert!(err.contains("modules/modules.dep"), "{err}");

        std::fs::remove_file(kit.join("version")).unwrap();
        let err = initramfs(&kit, &init, &cache).unwrap_err().to_string();
        assert!(
            err.contains("kit/version") && err.contains("guest-kit.sh"),
            "{err}"
        );
        assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none());
    }

    #[test]
    fn xz_modules_are_refused_with_their_name() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("erofs.ko.xz");
        std::fs::write(&path, b"x").unwrap();
        let err = module_content(&path).unwrap_err().to_string();
        assert!(
            err.contains("erofs.ko.xz") && err.contains("decompress"),
            "{err}"
        );
    }

    #[test]
    fn only_a_static_runv_init_goes_into_an_initramfs() {
        let tmp = tempfile::tempdir().unwrap();
        let (kit, init) = kit(tmp.path());
        std::fs::copy("/bin/sh", &init).unwrap();
        let err = initramfs(&kit, &init, &tmp.path().join("c")).unwrap_err();
        assert!(
            err.to_string().contains("is not a static executable"),
            "{err}"
        );
        assert!(
            !is_static_elf(&std::fs::read("/bin/sh").unwrap()),
            "dynamic"
        );
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&[0x7f, b'E', b'L', b'F', 2, 1, 1]));
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            assert!(is_static_elf(&busybox), "Debian's busybox-static");
        }
    }
}

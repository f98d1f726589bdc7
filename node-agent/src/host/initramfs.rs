//! The guest initramfs as data: which kernel modules a guest needs, in what
//! order they load, and the newc cpio that carries them with `runv-init`.
//!
//! Pure: it parses text it is given and writes to any [`Write`]; reading the
//! kit and caching the result is [`super::guestkit`]'s. The layout is the
//! contract `runv-init` relies on:
//! - `/init`: `runv-init`, mode 0755;
//! - `/dev/console`: character device 5:1, so the kernel gives init a console;
//!   empty `/dev`, `/proc`, `/sys`, `/run` and `/tmp`;
//! - `/lib/modules/runv/NAME.ko`: each module the guest needs that the kernel
//!   does not have built in, uncompressed, and `/lib/modules/runv/order`: their
//!   file names, one a line, dependencies first, in load order.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};

/// The modules a guest needs (virtio-mmio devices, the root disk, the network,
/// the vsock channel, the image's erofs under an overlay, the virtio-console
/// channel used under QEMU), before their dependencies are added.
pub const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "overlay",
    "erofs",
    "virtio_console",
];

/// Where the modules and their `order` file live in the initramfs.
pub const MODULE_DIR: &str = "lib/modules/runv";

/// Why the module list cannot be worked out.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModulesError {
    /// A line of `modules.dep` is not `PATH: [PATH...]`.
    #[error("modules.dep line {line}: expected `path.ko: dependencies...`, found {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A module is neither in `modules.dep` nor in `modules.builtin`.
    #[error(
        "module {module} is neither in modules.dep nor built into the kernel (modules.builtin)"
    )]
    Unknown {
        /// The module's name.
        module: String,
    },
    /// Dependencies that lead back to a module (a broken `modules.dep`).
    #[error("modules.dep has a dependency cycle through {module}")]
    Cycle {
        /// A module on the cycle.
        module: String,
    },
}

/// A module's name as the kernel knows it: the file name without `.ko`
/// (and a compression suffix), `-` read as `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The parsed `modules.dep` of a kernel: for each module, its file (relative to
/// the modules directory) and the files of the modules it needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModulesDep {
    modules: BTreeMap<String, (String, Vec<String>)>,
}

impl ModulesDep {
    /// Parses `modules.dep` (`kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko`).
    pub fn parse(text: &str) -> Result<Self, ModulesError> {
        let mut modules = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ModulesError::Syntax {
                    line: i + 1,
                    text: line.to_owned(),
                });
            };
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            modules.insert(module_name(path), (path.trim().to_owned(), deps));
        }
        Ok(Self { modules })
    }
}

/// The names of the modules built into the kernel, from `modules.builtin`
/// (one path a line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(module_name)
        .collect()
}

/// One module file to put in the initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleFile {
    /// The module's name (`virtio_ring`).
    pub name: String,
    /// Its file relative to the modules directory, as `modules.dep` names it.
    pub path: String,
}

impl ModuleFile {
    /// Its file name in the initramfs: `NAME.ko`, whatever compression the
    /// kernel package used.
    pub fn file_name(&self) -> String {
        let file = self.path.rsplit('/').next().unwrap_or(&self.path);
        let stem = file.split(".ko").next().unwrap_or(file);
        format!("{stem}.ko")
    }
}

/// The modules to load for `wanted`, dependencies first, each once; modules
/// built into the kernel are left out.
pub fn resolve(
    wanted: &[&str],
    dep: &ModulesDep,
    builtin: &BTreeSet<String>,
) -> Result<Vec<ModuleFile>, ModulesError> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let graph = Graph { dep, builtin };
    for name in wanted {
        graph.visit(&module_name(name), &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// What [`resolve`] walks: the module files and the modules built in.
struct Graph<'a> {
    dep: &'a ModulesDep,
    builtin: &'a BTreeSet<String>,
}

impl Graph<'_> {
    /// Depth-first: a module's dependencies before the module itself; a
    /// built-in one is not loaded.
    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<ModuleFile>,
    ) -> Result<(), ModulesError> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(ModulesError::Cycle {
                module: name.to_owned(),
            });
        }
        let Some((file, deps)) = self.dep.modules.get(name) else {
            return Err(ModulesError::Unknown {
                module: name.to_owned(),
            });
        };
        path.push(name.to_owned());
        for d in deps {
            self.visit(&module_name(d), path, done, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(ModuleFile {
            name: name.to_owned(),
            path: file.clone(),
        });
        Ok(())
    }
}

/// One entry of the initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory, with its permission bits.
    Dir(String, u32),
    /// A character device: name, permission bits, major, minor.
    CharDev(String, u32, u32, u32),
    /// A regular file: name, permission bits, content.
    File(String, u32, Vec<u8>),
}

/// The initramfs's entries for `init` (the runv-init binary) and `modules`
/// (each with its uncompressed content, in load order).
pub fn layout(init: Vec<u8>, modules: Vec<(ModuleFile, Vec<u8>)>) -> Vec<Entry> {
    let mut entries = vec![Entry::Dir("dev".into(), 0o755)];
    entries.push(Entry::CharDev("dev/console".into(), 0o600, 5, 1));
    for dir in ["proc", "sys", "run"] {
        entries.push(Entry::Dir(dir.into(), 0o755));
    }
    entries.push(Entry::Dir("tmp".into(), 0o1777));
    for dir in ["lib", "lib/modules", MODULE_DIR] {
        entries.push(Entry::Dir(dir.into(), 0o755));
    }
    let mut order = String::new();
    for (module, content) in modules {
        let file = module.file_name();
        order.push_str(&file);
        order.push('\n');
        entries.push(Entry::File(format!("{MODULE_DIR}/{file}"), 0o644, content));
    }
    entries.push(Entry::File(
        format!("{MODULE_DIR}/order"),
        0o644,
        order.into_bytes(),
    ));
    entries.push(Entry::File("init".into(), 0o755, init));
    entries
}

/// Writes `entries` as a newc cpio archive (owner root, time 0, so the same
/// inputs give the same bytes) and its trailer.
pub fn write_cpio<W: Write>(entries: &[Entry], mut out: W) -> io::Result<W> {
    for (i, entry) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).map_err(io::Error::other)?;
        let (name, mode, data): (&str, u32, &[u8]) = match entry {
            Entry::Dir(name, perm) => (name, libc::S_IFDIR | perm, &[]),
            Entry::CharDev(name, perm, _, _) => (name, libc::S_IFCHR | perm, &[]),
            Entry::File(name, perm, data) => (name, libc::S_IFREG | perm, data),
        };
        let mut builder = cpio::NewcBuilder::new(name).ino(ino).mode(mode);
        if let Entry::CharDev(_, _, major, minor) = entry {
            builder = builder.rdev_major(*major).rdev_minor(*minor);
        }
        if matches!(entry, Entry::Dir(..)) {
            builder = builder.nlink(2);
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::other(format!(
                "{name} is larger than a newc archive holds (4 GiB)"
            ))
        })?;
        let mut writer = builder.write(out, size);
        writer.write_all(data)?;
        out = writer.finish()?;
    }
    cpio::newc::trailer(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like Debian 6.1's cloud kernel (as busybox's depmod writes it).
    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/net/vmw_vsock/vsock.ko
kernel/fs/overlayfs/overlay.ko:
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/drivers/char/virtio_console.ko.zst: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    fn names(modules: &[ModuleFile]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn modules_load_after_their_dependencies_each_once() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let order = resolve(WANTED, &dep, &BTreeSet::new()).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "overlay",
                "libcrc32c",
                "erofs",
                "virtio_console",
            ]
        );
        let pos = |n: &str| order.iter().position(|m| m.name == n).unwrap();
        for (name, (_, deps)) in &dep.modules {
            for d in deps {
                assert!(pos(&module_name(d)) < pos(name), "{d} after {name}");
            }
        }
        assert_eq!(order[13].path, "kernel/drivers/char/virtio_console.ko.zst");
        assert_eq!(order[13].file_name(), "virtio_console.ko");
    }

    #[test]
    fn built_in_modules_are_left_out_and_unknown_ones_are_named() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let builtin = parse_builtin("kernel/lib/libcrc32c.ko\nkernel/fs/ext4/ext4.ko\n");
        let order = resolve(&["overlay", "ext4", "erofs"], &dep, &builtin);
        // A built-in dependency is not loaded either.
        assert_eq!(names(&order.unwrap()), ["overlay", "erofs"]);
        assert_eq!(
            resolve(&["ext4", "vfat"], &dep, &builtin),
            Err(ModulesError::Unknown {
                module: "vfat".into()
            })
        );
        let err = resolve(&["vfat"], &dep, &builtin).unwrap_err().to_string();
        assert!(
            err.contains("module vfat is neither in modules.dep"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_modules_dep_is_refused_with_the_line() {
        assert_eq!(
            ModulesDep::parse("a.ko:\nno colon here\n"),
            Err(ModulesError::Syntax {
                line: 2,
                text: "no colon here".into()
            })
        );
        let cyclic = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            resolve(&["a"], &cyclic, &BTreeSet::new()),
            Err(ModulesError::Cycle { .. })
        ));
    }

    #[test]
    fn names_follow_the_kernels_rules() {
        assert_eq!(module_name("kernel/a/snd-hda.ko.xz"), "snd_hda");
        assert_eq!(module_name("vsock"), "vsock");
        assert_eq!(
            parse_builtin("kernel/fs/ext4/ext4.ko\n\n"),
            BTreeSet::from(["ext4".to_owned()])
        );
    }

    /// One entry read back from an archive.
    #[derive(Debug)]
    struct ReadBack {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Every entry of a cpio archive.
    fn read_back(mut bytes: &[u8]) -> Vec<ReadBack> {
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(bytes).unwrap();
            if reader.entry().is_trailer() {
                return out;
            }
            let e = reader.entry();
            let mut entry = ReadBack {
                name: e.name().to_owned(),
                mode: e.mode(),
                rdev: (e.rdev_major(), e.rdev_minor()),
                data: Vec::new(),
            };
            io::Read::read_to_end(&mut reader, &mut entry.data).unwrap();
            out.push(entry);
            bytes = reader.finish().unwrap();
        }
    }

    #[test]
    fn the_archive_holds_init_the_console_and_the_modules_in_order() {
        let module = |name: &str| ModuleFile {
            name: name.into(),
            path: format!("kernel/x/{name}.ko.zst"),
        };
        let entries = layout(
            b"\x7fELF init".to_vec(),
            vec![
                (module("virtio_ring"), b"ring".to_vec()),
                (module("virtio"), b"v".to_vec()),
            ],
        );
        let bytes = write_cpio(&entries, Vec::new()).unwrap();
        assert_eq!(&bytes[..6], b"070701", "newc magic");
        assert_eq!(bytes.len() % 4, 0);
        let got = read_back(&bytes);
        let find = |n: &str| {
            got.iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(find("init").mode, 0o100755);
        assert_eq!(find("init").data, b"\x7fELF init");
        assert_eq!(find("dev/console").mode, 0o020600);
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("tmp").mode, 0o041777);
        for dir in ["dev", "proc", "sys", "run", "lib/modules/runv"] {
            assert_eq!(find(dir).mode, 0o040755, "{dir}");
        }
        assert_eq!(find("lib/modules/runv/virtio_ring.ko").data, b"ring");
        assert_eq!(find("lib/modules/runv/virtio.ko").mode, 0o100644);
        assert_eq!(
            find("lib/modules/runv/order").data,
            b"virtio_ring.ko\nvirtio.ko\n"
        );
        // A parent directory comes before what is in it.
        let pos = |n: &str| got.iter().position(|e| e.name == n).unwrap();
        assert!(pos("dev") < pos("dev/console"));
        assert!(pos("lib/modules/runv") < pos("lib/modules/runv/order"));
        // The same inputs, the same bytes.
        assert_eq!(bytes, write_cpio(&entries, Vec::new()).unwrap());
    }
}

//! The initramfs the agent builds from the node's real guest kit (Debian's
//! cloud kernel and its modules, installed by `vmm/scripts/guest-kit.sh` into
//! `$RUNV_GUEST_KIT_DIR`, default `/var/lib/runv/guests/kit`): every module a
//! guest needs is in it, uncompressed, after all it depends on by the kit's
//! `modules.dep`, and none that the kernel has built in. Skips without a kit,
//! except under `RUNV_REQUIRE_KVM=1` (CI), where that fails.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use runv_node_agent::host::{guestkit, initramfs};

/// Each file of a newc archive and its content.
fn files(mut bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    loop {
        let mut reader = cpio::NewcReader::new(bytes).unwrap();
        if reader.entry().is_trailer() {
            return out;
        }
        let name = reader.entry().name().to_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
        out.insert(name, data);
        bytes = reader.finish().unwrap();
    }
}

#[test]
fn the_kits_modules_are_packed_after_their_dependencies() {
    let test = "the_kits_modules_are_packed_after_their_dependencies";
    let Some(kit) = common::guest_kit(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    // A static executable's stand-in: an ELF64 header naming no loader.
    let mut elf = vec![0u8; 64];
    elf[..5].copy_from_slice(b"\x7fELF\x02");
    std::fs::write(&init, elf).unwrap();
    let path = guestkit::initramfs(&kit, &init, tmp.path()).unwrap();
    let files = files(&std::fs::read(&path).unwrap());
    let order = String::from_utf8(files["lib/modules/runv/order"].clone()).unwrap();
    let order: Vec<&str> = order.lines().collect();
    let dep = std::fs::read_to_string(kit.join("modules/modules.dep")).unwrap();
    let builtin = std::fs::read_to_string(kit.join("modules/modules.builtin")).unwrap();
    let builtin = initramfs::parse_builtin(&builtin);
    for wanted in initramfs::WANTED {
        assert!(
            builtin.contains(*wanted) || order.contains(&format!("{wanted}.ko").as_str()),
            "{wanted} missing from {order:?}"
        );
    }
    let at = |file: &str| order.iter().position(|o| *o == file);
    for (i, file) in order.iter().enumerate() {
        let content = &files[&format!("lib/modules/runv/{file}")];
        assert_eq!(
            &content[..4],
            b"\x7fELF",
            "{file} is not an uncompressed module"
        );
        let line = dep
            .lines()
            .find(|l| l.split(':').next().is_some_and(|p| module_file(p) == *file))
            .unwrap_or_else(|| panic!("{file} not in modules.dep"));
        for d in line.split(':').nth(1).unwrap().split_whitespace() {
            let d = module_file(d);
            assert!(
                at(&d).is_some_and(|j| j < i),
                "{d} must load before {file}: {order:?}"
            );
        }
    }
    eprintln!(
        "kit {}: {} modules, initramfs {} bytes",
        std::fs::read_to_string(kit.join("version")).unwrap().trim(),
        order.len(),
        std::fs::metadata(&path).unwrap().len()
    );
}

/// `kernel/fs/erofs/erofs.ko.zst` → `erofs.ko`.
fn module_file(path: &str) -> String {
    let file = Path::new(path.trim())
        .file_name()
        .unwrap()
        .to_string_lossy();
    format!("{}.ko", file.split(".ko").next().unwrap())
}

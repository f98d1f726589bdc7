//! Layer application: a functional tree, whiteouts, compression, a hostile
//! corpus, and a bounded fuzz run. Every hostile case runs in a root beside a
//! sentinel directory that must be left exactly as it was.

use super::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;

/// One raw tar entry; names and link names are written as given, even when
/// `tar::Builder` would refuse them.
struct E<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    link: &'a [u8],
    data: &'a [u8],
    mode: u32,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: tar::EntryType::Regular,
        link: b"",
        data,
        mode: 0o644,
    }
}
fn dir(name: &str) -> E<'_> {
    E {
        name: name.as_bytes(),
        kind: tar::EntryType::Directory,
        link: b"",
        data: b"",
        mode: 0o755,
    }
}
fn symlink<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: tar::EntryType::Symlink,
        link: target.as_bytes(),
        data: b"",
        mode: 0o777,
    }
}
fn hardlink<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E {
        name: name.as_bytes(),
        kind: tar::EntryType::Link,
        link: target.as_bytes(),
        data: b"",
        mode: 0o644,
    }
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..e.name.len()].copy_from_slice(e.name);
        gnu.linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_size(e.data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    io::Write::write_all(&mut enc, bytes).unwrap();
    enc.finish().unwrap()
}

/// A root beside a sentinel directory (the fuzz harness's).
struct Sandbox {
    inner: fuzz::Sandbox,
    root: PathBuf,
    outside: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let inner = fuzz::Sandbox::new();
        let (root, outside) = (inner.root.clone(), inner.sentinel());
        Self {
            inner,
            root,
            outside,
        }
    }

    fn apply(&self, layers: &[Vec<u8>], limits: Limits) -> Result<()> {
        let mut a = Applier::new(&self.root, limits)?;
        for l in layers {
            a.apply(l.as_slice(), "application/vnd.oci.image.layer.v1.tar")?;
        }
        Ok(())
    }

    /// Everything beside the root, with contents.
    fn outside_snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        self.inner.outside()
    }
}

#[test]
fn applies_files_dirs_links_modes_and_nodes() {
    let sb = Sandbox::new();
    let mut odd = file("bin/suid", b"#!/bin/sh\n");
    odd.mode = 0o4755;
    let mut sticky = dir("tmp");
    sticky.mode = 0o1777;
    let mut ro = dir("ro");
    ro.mode = 0o555;
    let fifo = E {
        name: b"run/fifo",
        kind: tar::EntryType::Fifo,
        link: b"",
        data: b"",
        mode: 0o600,
    };
    let layer = tar_of(&[
        dir("bin"),
        odd,
        sticky,
        ro,
        file("ro/inside", b"x"),
        file("etc/hosts", b"127.0.0.1 localhost\n"),
        symlink("etc/link", "/etc/hosts"),
        hardlink("etc/hard", "etc/hosts"),
        fifo,
    ]);
    sb.apply(&[layer], Limits::default()).unwrap();
    let r = &sb.root;
    assert_eq!(
        fs::read(r.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    let mode = |p: &str| {
        fs::symlink_metadata(r.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/suid"), 0o4755);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(
        fs::read_link(r.join("etc/link")).unwrap(),
        Path::new("/etc/hosts")
    );
    let ino = |p: &str| fs::symlink_metadata(r.join(p)).unwrap().ino();
    assert_eq!(ino("etc/hard"), ino("etc/hosts"));
    assert!(
        fs::symlink_metadata(r.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        fs::metadata(r.join("etc/hosts")).unwrap().mtime(),
        1_700_000_000
    );
    assert_eq!(fs::metadata(r.join("ro")).unwrap().mtime(), 1_700_000_000);
}

#[test]
fn whiteouts_hide_lower_layers_only() {
    let sb = Sandbox::new();
    let lower = tar_of(&[
        file("a/x", b"x"),
        file("a/y", b"y"),
        file("b/old1", b"1"),
        dir("b/olddir"),
        file("b/olddir/deep", b"d"),
        file("c", b"c"),
    ]);
    let upper = tar_of(&[
        file("a/.wh.x", b""),
        file("b/new", b"n"),
        file("b/.wh..wh..opq", b""),
        file("c2", b"c2"),
        file(".wh.c2", b""),
        file(".wh.c", b""),
        file("a/.wh.missing", b""),
    ]);
    sb.apply(&[lower, upper], Limits::default()).unwrap();
    let r = &sb.root;
    assert!(!r.join("a/x").exists() && r.join("a/y").exists());
    let mut b: Vec<_> = fs::read_dir(r.join("b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    b.sort();
    assert_eq!(
        b,
        vec![OsString::from("new")],
        "opaque dir keeps only this layer's entries"
    );
    assert!(!r.join("c").exists(), ".wh.c removes a lower file");
    assert!(
        r.join("c2").exists(),
        "a whiteout never hides its own layer's file"
    );
    assert!(!r.join("a/.wh.x").exists() && !r.join("b/.wh..wh..opq").exists());
}

#[test]
fn later_entries_replace_earlier_ones_of_another_type() {
    let sb = Sandbox::new();
    let lower = tar_of(&[
        dir("p/q"),
        file("p/q/f", b"1"),
        file("s", b"s"),
        symlink("t", "/nowhere"),
    ]);
    let upper = tar_of(&[file("p/q", b"now a file"), dir("s"), file("t", b"t")]);
    sb.apply(&[lower, upper], Limits::default()).unwrap();
    assert_eq!(fs::read(sb.root.join("p/q")).unwrap(), b"now a file");
    assert!(sb.root.join("s").is_dir());
    assert!(fs::symlink_metadata(sb.root.join("t")).unwrap().is_file());
}

#[test]
fn gzip_zstd_and_plain_layers_unpack_alike_and_lying_media_types_fail() {
    let plain = tar_of(&[file("a", b"hello"), dir("d")]);
    let zst = zstd::encode_all(plain.as_slice(), 3).unwrap();
    let cases: [(&[u8], &str); 4] = [
        (&plain, "application/vnd.oci.image.layer.v1.tar"),
        (&gzip(&plain), "application/vnd.oci.image.layer.v1.tar+gzip"),
        (&zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (
            &gzip(&plain),
            "application/vnd.docker.image.rootfs.diff.tar",
        ),
    ];
    for (blob, mt) in cases {
        let sb = Sandbox::new();
        Applier::new(&sb.root, Limits::default())
            .unwrap()
            .apply(blob, mt)
            .unwrap();
        assert_eq!(fs::read(sb.root.join("a")).unwrap(), b"hello", "{mt}");
    }
    let sb = Sandbox::new();
    let err = Applier::new(&sb.root, Limits::default())
        .unwrap()
        .apply(
            plain.as_slice(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
        .unwrap_err();
    assert!(matches!(err, UnpackError::Compression(_)), "{err:?}");
}

/// Each hostile layer is refused, or (for a symlink then a file of the same
/// name) made harmless, and nothing outside the root changes.
#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    type Check = fn(&UnpackError) -> bool;
    let escape: Check = |e| matches!(e, UnpackError::Escape(_));
    let eloop: Check = |e| matches!(e, UnpackError::Io { source, .. } if source.raw_os_error() == Some(libc::ELOOP));
    let any: Check = |_| true;
    let device = E {
        name: b"dev/sda",
        kind: tar::EntryType::Block,
        link: b"",
        data: b"",
        mode: 0o600,
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, Check)> = vec![
        (
            "dot-dot",
            vec![tar_of(&[file("../outside/pwned", b"x")])],
            escape,
        ),
        (
            "absolute",
            vec![tar_of(&[file("/tmp/pwned", b"x")])],
            escape,
        ),
        (
            "inner dot-dot",
            vec![tar_of(&[file("a/../../outside/pwned", b"x")])],
            escape,
        ),
        (
            "file through abs symlink",
            vec![tar_of(&[symlink("l", "/"), file("l/tmp/pwned", b"x")])],
            eloop,
        ),
        (
            "file through rel symlink",
            vec![tar_of(&[symlink("l", "../outside"), file("l/pwned", b"x")])],
            eloop,
        ),
        (
            "dir through symlink",
            vec![tar_of(&[symlink("l", "../outside"), dir("l/sub")])],
            eloop,
        ),
        (
            "symlink across layers",
            vec![
                tar_of(&[symlink("l", "../outside")]),
                tar_of(&[file("l/secret", b"x")]),
            ],
            eloop,
        ),
        (
            "whiteout through symlink",
            vec![tar_of(&[
                symlink("l", "../outside"),
                file("l/.wh.secret", b""),
            ])],
            eloop,
        ),
        (
            "opaque through symlink",
            vec![tar_of(&[
                symlink("l", "../outside"),
                file("l/.wh..wh..opq", b""),
            ])],
            eloop,
        ),
        (
            "hardlink to dot-dot",
            vec![tar_of(&[hardlink("h", "../outside/secret")])],
            escape,
        ),
        (
            "hardlink to absolute",
            vec![tar_of(&[hardlink("h", "/etc/passwd")])],
            escape,
        ),
        (
            "hardlink through symlink",
            vec![tar_of(&[
                symlink("l", "../outside"),
                hardlink("h", "l/secret"),
            ])],
            eloop,
        ),
        (
            "whiteout of dot-dot",
            vec![tar_of(&[file("a/x", b""), file("a/.wh...", b"")])],
            any,
        ),
        ("device node", vec![tar_of(&[device])], |e| {
            matches!(e, UnpackError::Device(_))
        }),
    ];
    for (what, layers, check) in cases {
        let sb = Sandbox::new();
        let before = sb.outside_snapshot();
        let err = sb.apply(&layers, Limits::default()).expect_err(what);
        assert!(check(&err), "{what}: unexpected error {err:?}");
        assert_eq!(
            sb.outside_snapshot(),
            before,
            "{what}: wrote outside the root"
        );
    }
}

#[test]
fn a_symlink_replaced_by_a_file_is_never_written_through() {
    let sb = Sandbox::new();
    let before = sb.outside_snapshot();
    let target = sb.outside.join("secret");
    let layers = [
        tar_of(&[symlink("f", target.to_str().unwrap())]),
        tar_of(&[file("f", b"mine"), hardlink("g", "f")]),
    ];
    sb.apply(&layers, Limits::default()).unwrap();
    assert_eq!(fs::read(sb.root.join("f")).unwrap(), b"mine");
    assert_eq!(sb.outside_snapshot(), before);
}

#[test]
fn devices_are_created_only_when_allowed() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("devices_are_created_only_when_allowed: skipping: mknod needs root");
        return;
    }
    let sb = Sandbox::new();
    let null = E {
        name: b"dev/null",
        kind: tar::EntryType::Char,
        link: b"",
        data: b"",
        mode: 0o666,
    };
    let limits = Limits {
        allow_devices: true,
        ..Limits::default()
    };
    sb.apply(&[tar_of(&[null])], limits).unwrap();
    let m = fs::symlink_metadata(sb.root.join("dev/null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.permissions().mode() & 0o777, 0o666);
}

#[test]
fn decompression_bombs_and_entry_floods_stop_at_the_limits() {
    let zeros = vec![0u8; 8 << 20];
    let bomb = gzip(&tar_of(&[file("zeros", &zeros)]));
    assert!(bomb.len() < 64 << 10, "the bomb compresses well");
    let sb = Sandbox::new();
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        ..Limits::default()
    };
    let err = Applier::new(&sb.root, limits)
        .unwrap()
        .apply(
            bomb.as_slice(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
        .unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge(_)), "{err:?}");

    let small = tar_of(&[file("a", b"1"), file("b", b"2"), file("c", b"3")]);
    let limits = Limits {
        max_image_bytes: small.len() as u64 + 10,
        ..Limits::default()
    };
    let err = Sandbox::new()
        .apply(&[small.clone(), small.clone()], limits)
        .unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge(_)),
        "image limit spans layers: {err:?}"
    );

    let limits = Limits {
        max_entries: 5,
        ..Limits::default()
    };
    let err = Sandbox::new()
        .apply(&[small.clone(), small], limits)
        .unwrap_err();
    assert!(matches!(err, UnpackError::TooManyEntries(5)), "{err:?}");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random bytes and mutated valid layers never panic the applier and never
/// write outside the root. `image/fuzz` runs the same harness under libFuzzer.
#[test]
fn fuzzed_layers_never_panic_or_escape() {
    let seeds = [
        tar_of(&[
            dir("a"),
            file("a/f", b"data"),
            symlink("a/l", "../../outside"),
            hardlink("a/h", "a/f"),
        ]),
        tar_of(&[
            file("x/.wh..wh..opq", b""),
            file(".wh.a", b""),
            symlink("s", "/"),
            file("s2/f", b"y"),
        ]),
        tar_of(&[
            symlink("l", "../outside"),
            file("l/secret", b"pwned"),
            hardlink("h", "../outside/secret"),
        ]),
    ];
    let iterations: usize = std::env::var("RUNV_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed = std::env::var("RUNV_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed);
    for i in 0..iterations {
        let mut bytes: Vec<u8> = if i % 5 == 0 {
            (0..rng.below(4096)).map(|_| rng.next() as u8).collect()
        } else if i % 2 == 0 {
            structured(&mut rng)
        } else {
            seeds[i % seeds.len()].clone()
        };
        for _ in 0..rng.below(8) {
            if !bytes.is_empty() {
                let at = rng.below(bytes.len());
                bytes[at] = match rng.below(3) {
                    0 => rng.next() as u8,
                    1 => b'/',
                    _ => b'.',
                };
            }
        }
        let kind = match i % 7 {
            0 => 1, // claims gzip
            _ => 0,
        };
        let input: Vec<u8> = std::iter::once(kind).chain(bytes).collect();
        if let Err(e) = fuzz::run_bytes(&input) {
            panic!("iteration {i} (seed {seed}): {e}");
        }
    }
}

/// The libFuzzer target's hand-made seeds replay in every `cargo test`.
#[test]
fn fuzz_seed_files_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/layers");
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if let Err(e) = fuzz::run_bytes(&fs::read(&path).unwrap()) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n >= 5, "seeds found in {}", dir.display());
}

/// A layer of well-formed entries whose names, types and link targets are
/// drawn from the pieces attacks are made of.
fn structured(rng: &mut Rng) -> Vec<u8> {
    const PIECES: [&str; 10] = [
        "a",
        "b",
        "..",
        ".",
        "l",
        ".wh.a",
        ".wh..wh..opq",
        "outside",
        "secret",
        "",
    ];
    let path = |rng: &mut Rng| {
        let parts: Vec<&str> = (0..1 + rng.below(4))
            .map(|_| PIECES[rng.below(PIECES.len())])
            .collect();
        let joined = parts.join("/");
        if rng.below(8) == 0 {
            format!("/{joined}")
        } else {
            joined
        }
    };
    let kinds = [
        tar::EntryType::Regular,
        tar::EntryType::Directory,
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Fifo,
        tar::EntryType::Char,
    ];
    let owned: Vec<(String, tar::EntryType, String)> = (0..1 + rng.below(12))
        .map(|_| (path(rng), kinds[rng.below(kinds.len())], path(rng)))
        .collect();
    let entries: Vec<E<'_>> = owned
        .iter()
        .map(|(name, kind, link)| E {
            name: name.as_bytes(),
            kind: *kind,
            link: link.as_bytes(),
            data: if *kind == tar::EntryType::Regular {
                b"pwned"
            } else {
                b""
            },
            mode: 0o755,
        })
        .collect();
    tar_of(&entries)
}

#[test]
fn user_xattrs_are_kept_and_trusted_ones_dropped() {
    let sb = Sandbox::new();
    let probe = sb.root.join("probe");
    fs::write(&probe, b"").unwrap();
    let probe_fd = fs::File::open(&probe).unwrap();
    if rustix::fs::fsetxattr(
        &probe_fd,
        "user.probe",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .is_err()
    {
        eprintln!(
            "user_xattrs_are_kept_and_trusted_ones_dropped: skipping: no user xattrs on this filesystem"
        );
        return;
    }
    let mut builder = tar::Builder::new(Vec::new());
    let xattrs: [(&str, &[u8]); 2] = [
        ("SCHILY.xattr.user.origin", b"layer"),
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
    ];
    builder.append_pax_extensions(xattrs).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(2);
    builder.append_data(&mut h, "tagged", &b"hi"[..]).unwrap();
    sb.apply(&[builder.into_inner().unwrap()], Limits::default())
        .unwrap();
    let file = fs::File::open(sb.root.join("tagged")).unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::fgetxattr(&file, "user.origin", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"layer");
    assert!(rustix::fs::fgetxattr(&file, "trusted.overlay.opaque", &mut buf).is_err());
}

#[test]
fn pax_owner_ids_past_the_octal_range_apply() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("pax_owner_ids_past_the_octal_range_apply: skipping: chown needs root");
        return;
    }
    let sb = Sandbox::new();
    let mut builder = tar::Builder::new(Vec::new());
    let ids: [(&str, &[u8]); 2] = [("uid", b"3000000"), ("gid", b"3000001")];
    builder.append_pax_extensions(ids).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    builder.append_data(&mut h, "big-ids", io::empty()).unwrap();
    sb.apply(&[builder.into_inner().unwrap()], Limits::default())
        .unwrap();
    let m = fs::metadata(sb.root.join("big-ids")).unwrap();
    assert_eq!((m.uid(), m.gid()), (3_000_000, 3_000_001));
}

//! Pulls from a real `docker-registry` on loopback, with images written by
//! the test and pushed with `skopeo`; the unpacked tree is compared file by
//! file with `umoci unpack` of the same layout.

mod support;

use oci_client::secrets::RegistryAuth;
use runv_image::auth::Keyring;
use runv_image::pull::{PullError, parse_reference};
use runv_image::unpack::{Limits, unpack_image};
use runv_image::{BlobStore, PullConfig, Puller};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use support::{LayerBlob, Layout, Registry, TarBuilder};

const TOOLS: [&str; 3] = ["docker-registry", "skopeo", "umoci"];

/// Three layers full of what appliers get wrong: whiteouts, an opaque
/// directory, hardlinks, symlinks, odd modes, replaced types.
fn tricky_layers() -> Vec<LayerBlob> {
    let base = TarBuilder::default()
        .dir("etc", 0o755)
        .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")
        .file("etc/shadow", 0o600, b"root:*:1::::::\n")
        .dir("bin", 0o755)
        .file("bin/tool", 0o4755, b"\x7fELF pretend\n")
        .hardlink("bin/tool-link", "bin/tool")
        .symlink("bin/sh", "tool")
        .dir("tmp", 0o1777)
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/a", 0o644, b"a")
        .file("var/cache/b", 0o644, b"b")
        .dir("opt", 0o755)
        .file("opt/old", 0o640, b"old")
        .dir("ro", 0o555)
        .file("ro/file", 0o444, b"read only")
        .finish();
    let middle = TarBuilder::default()
        .dir("etc", 0o755)
        .file("etc/.wh.shadow", 0o644, b"")
        .file("etc/motd", 0o2644, b"hello\n")
        .dir("var/cache", 0o700)
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/c", 0o644, b"c")
        .symlink("opt/old", "/etc/motd")
        .finish();
    let top = TarBuilder::default()
        .file("opt/.wh.old", 0o644, b"")
        .file("opt/new", 0o755, b"#!/bin/sh\necho new\n")
        .hardlink("etc/motd-link", "etc/motd")
        .file("bin/sh", 0o755, b"now a file")
        .finish();
    vec![
        LayerBlob {
            tar: base,
            gzip: true,
        },
        LayerBlob {
            tar: middle,
            gzip: false,
        },
        LayerBlob {
            tar: top,
            gzip: true,
        },
    ]
}

fn config() -> serde_json::Value {
    serde_json::json!({"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["PATH=/bin"]})
}

fn puller(root: &Path) -> Puller {
    Puller::new(
        Arc::new(BlobStore::open(root).unwrap()),
        PullConfig::default(),
    )
}

#[tokio::test]
async fn pulls_by_tag_and_digest_once_and_matches_umoci() {
    if !support::require_tools("pulls_by_tag_and_digest_once_and_matches_umoci", &TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let image = layout.image(&tricky_layers(), config(), "amd64");
    layout.tag(&image, "v1");
    let registry = Registry::start(None);
    registry.push(&layout.dir, "v1", "test/tricky", &[]);

    let p = puller(&tmp.path().join("store"));
    let reference = parse_reference(&format!("{}/test/tricky:v1", registry.addr)).unwrap();
    let anon = RegistryAuth::Anonymous;
    let (a, b) = tokio::join!(p.pull(&reference, &anon), p.pull(&reference, &anon));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert_eq!(
        p.blob_fetches(),
        4,
        "config and three layers, once each despite two pulls"
    );
    // skopeo compresses the plain layer on the way, so ask the registry.
    let raw = registry.raw_manifest("test/tricky:v1");
    assert_eq!(a.manifest_digest.to_string(), support::sha256(&raw));
    assert_eq!(
        a.image_id,
        format!("{}/test/tricky@{}", registry.addr, a.manifest_digest)
    );

    let pinned = parse_reference(&format!(
        "{}/test/tricky@{}",
        registry.addr, a.manifest_digest
    ))
    .unwrap();
    assert_eq!(p.pull(&pinned, &anon).await.unwrap(), a);
    assert_eq!(p.blob_fetches(), 4, "a present image fetches nothing");

    let missing = format!("{}/test/tricky@sha256:{}", registry.addr, "0".repeat(64));
    let err = p
        .pull(&parse_reference(&missing).unwrap(), &anon)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err:?}");

    let ours = tmp.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    unpack_image(p.store(), &a.layers, &ours, Limits::default()).unwrap();
    let bundle = tmp.path().join("bundle");
    let src = format!("{}:v1", layout.dir.display());
    let mut umoci = Command::new("umoci");
    umoci.args(["unpack", "--image", &src]);
    if !rustix::process::geteuid().is_root() {
        umoci.arg("--rootless");
    }
    support::run(umoci.arg(&bundle));
    let theirs = tree(&bundle.join("rootfs"));
    assert_eq!(tree(&ours), theirs);
    assert!(
        theirs.contains_key(Path::new("var/cache/c"))
            && !theirs.contains_key(Path::new("var/cache/a"))
    );
}

/// Type, mode, owner, size, content or link target, and link count of every
/// path under `root`.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    let as_root = rustix::process::geteuid().is_root();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if m.is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&path).unwrap().display()
                )
            } else if m.is_file() {
                format!(
                    "file {:?} nlink {}",
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()),
                    m.nlink()
                )
            } else {
                format!("other {:o}", m.mode())
            };
            let owner = if as_root {
                format!(" {}:{}", m.uid(), m.gid())
            } else {
                String::new()
            };
            let mode = if m.is_symlink() {
                0
            } else {
                m.permissions().mode() & 0o7777
            };
            let rel = path.strip_prefix(root).unwrap().to_owned();
            out.insert(rel, format!("{what} mode {mode:o}{owner}"));
        }
    }
    out
}

#[tokio::test]
async fn basic_auth_uses_the_docker_config_credential() {
    if !support::require_tools(
        "basic_auth_uses_the_docker_config_credential",
        &["docker-registry", "skopeo", "htpasswd"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let small = TarBuilder::default().file("hello", 0o644, b"hi").finish();
    let image = layout.image(
        &[LayerBlob {
            tar: small,
            gzip: true,
        }],
        config(),
        "amd64",
    );
    layout.tag(&image, "v1");
    let registry = Registry::start(Some(("alice", "s3cret")));
    registry.push(
        &layout.dir,
        "v1",
        "private/app",
        &["--dest-creds", "alice:s3cret"],
    );
    let reference = parse_reference(&format!("{}/private/app:v1", registry.addr)).unwrap();

    let p = puller(&tmp.path().join("store"));
    let err = p
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImagePull");
    let wrong = RegistryAuth::Basic("alice".into(), "wrong".into());
    assert!(
        puller(&tmp.path().join("store2"))
            .pull(&reference, &wrong)
            .await
            .is_err()
    );

    let docker_config = serde_json::json!({"auths": {
        format!("http://{}", registry.addr): {"username": "alice", "password": "s3cret"},
    }});
    let mut ring = Keyring::default();
    ring.add_docker_config(docker_config.to_string().as_bytes())
        .unwrap();
    let auth = ring.credential_for(reference.registry(), reference.repository());
    let p = puller(&tmp.path().join("store3"));
    let pulled = p.pull(&reference, &auth).await.unwrap();
    assert_eq!(
        pulled.manifest_digest.to_string(),
        image["digest"].as_str().unwrap()
    );
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64_and_docker_schema2_is_accepted() {
    if !support::require_tools(
        "an_index_resolves_to_linux_amd64_and_docker_schema2_is_accepted",
        &TOOLS,
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let tar = |s: &str| {
        TarBuilder::default()
            .file("arch", 0o644, s.as_bytes())
            .finish()
    };
    let arm = layout.image(
        &[LayerBlob {
            tar: tar("arm64"),
            gzip: true,
        }],
        config(),
        "arm64",
    );
    let amd = layout.image(
        &[LayerBlob {
            tar: tar("amd64"),
            gzip: true,
        }],
        config(),
        "amd64",
    );
    let index = layout.index(&[arm, amd.clone()]);
    layout.tag(&index, "multi");
    layout.tag(&amd, "single");
    let registry = Registry::start(None);
    registry.push(&layout.dir, "multi", "test/multi", &["--all"]);
    registry.push(&layout.dir, "single", "test/docker", &["--format", "v2s2"]);

    let p = puller(&tmp.path().join("store"));
    let anon = RegistryAuth::Anonymous;
    let multi = parse_reference(&format!("{}/test/multi:multi", registry.addr)).unwrap();
    let pulled = p.pull(&multi, &anon).await.unwrap();
    assert_eq!(
        pulled.manifest_digest.to_string(),
        amd["digest"].as_str().unwrap()
    );
    assert!(
        pulled.image_id.ends_with(index["digest"].as_str().unwrap()),
        "imageID names the index"
    );
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    unpack_image(p.store(), &pulled.layers, &root, Limits::default()).unwrap();
    assert_eq!(std::fs::read(root.join("arch")).unwrap(), b"amd64");

    let docker = parse_reference(&format!("{}/test/docker:single", registry.addr)).unwrap();
    let pulled = p.pull(&docker, &anon).await.unwrap();
    let manifest = p.store().read(&pulled.manifest_digest).unwrap();
    assert!(
        String::from_utf8_lossy(&manifest)
            .contains("application/vnd.docker.distribution.manifest.v2+json")
    );
    assert!(
        pulled.layers[0]
            .media_type
            .starts_with("application/vnd.docker.image.rootfs.diff.tar")
    );
}

#[tokio::test]
async fn the_image_service_follows_pull_policies_and_builds_one_rootfs() {
    let tools = ["docker-registry", "skopeo", "mkfs.erofs"];
    if !support::require_tools(
        "the_image_service_follows_pull_policies_and_builds_one_rootfs",
        &tools,
    ) {
        return;
    }
    use runv_image::images::{Images, PullPolicy};
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let image = layout.image(&tricky_layers(), config(), "amd64");
    layout.tag(&image, "v1");
    let registry = Registry::start(None);
    registry.push(&layout.dir, "v1", "test/app", &[]);
    let reference = parse_reference(&format!("{}/test/app:v1", registry.addr)).unwrap();
    let absent = parse_reference(&format!("{}/test/absent:v1", registry.addr)).unwrap();
    let anon = RegistryAuth::Anonymous;
    let images = Images::open(
        &tmp.path().join("node"),
        PullConfig::default(),
        Limits::default(),
        Default::default(),
    )
    .unwrap();

    let err = images
        .ensure(&reference, &anon, PullPolicy::Never)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImageNeverPull");
    let (first, second) = tokio::join!(
        images.ensure(&reference, &anon, PullPolicy::IfNotPresent),
        images.ensure(&reference, &anon, PullPolicy::IfNotPresent),
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.rootfs, second.rootfs);
    assert_eq!(images.puller().blob_fetches(), 4, "two VMs, one pull");
    let mut magic = [0u8; 4];
    let f = std::fs::File::open(&first.rootfs).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 1024).unwrap();
    assert_eq!(magic, [0xe2, 0xe1, 0xf5, 0xe0], "an erofs superblock");
    assert_eq!(
        first.config.config.entrypoint.as_deref(),
        Some(&["/bin/sh".to_owned()][..])
    );
    let built = std::fs::metadata(&first.rootfs)
        .unwrap()
        .modified()
        .unwrap();

    images
        .ensure(&reference, &anon, PullPolicy::Always)
        .await
        .unwrap();
    assert_eq!(
        images.puller().blob_fetches(),
        4,
        "Always resolves the tag; present blobs are not fetched"
    );
    drop(registry);
    let again = images
        .ensure(&reference, &anon, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert_eq!(
        again.pulled, first.pulled,
        "IfNotPresent needs no registry for a present image"
    );
    assert_eq!(
        std::fs::metadata(&again.rootfs)
            .unwrap()
            .modified()
            .unwrap(),
        built,
        "built once"
    );
    let err = images
        .ensure(&absent, &anon, PullPolicy::IfNotPresent)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImagePull");
}

#[tokio::test]
async fn bearer_tokens_come_from_the_realm_with_the_secret_credential() {
    let tools = ["docker-registry", "skopeo", "openssl"];
    if !support::require_tools(
        "bearer_tokens_come_from_the_realm_with_the_secret_credential",
        &tools,
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tokens = support::token::TokenService::start(tmp.path(), "bob", "hunter2");
    let registry = Registry::start_with(support::Auth::Token(tokens.registry_config()));
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let small = TarBuilder::default()
        .file("hello", 0o644, b"token")
        .finish();
    let image = layout.image(
        &[LayerBlob {
            tar: small,
            gzip: true,
        }],
        config(),
        "amd64",
    );
    layout.tag(&image, "v1");
    registry.push(
        &layout.dir,
        "v1",
        "tok/app",
        &["--dest-creds", "bob:hunter2"],
    );
    let reference = parse_reference(&format!("{}/tok/app:v1", registry.addr)).unwrap();

    let err = puller(&tmp.path().join("s1"))
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImagePull");
    let wrong = RegistryAuth::Basic("bob".into(), "nope".into());
    assert!(
        puller(&tmp.path().join("s2"))
            .pull(&reference, &wrong)
            .await
            .is_err()
    );

    let issued = tokens.issued.load(std::sync::atomic::Ordering::Relaxed);
    let mut ring = Keyring::default();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "bob:hunter2");
    let secret = serde_json::json!({"auths": {registry.addr.to_string(): {"auth": b64}}});
    ring.add_docker_config(secret.to_string().as_bytes())
        .unwrap();
    let auth = ring.credential_for(reference.registry(), reference.repository());
    let p = puller(&tmp.path().join("s3"));
    let pulled = p.pull(&reference, &auth).await.unwrap();
    assert_eq!(p.blob_fetches(), 2);
    assert!(
        tokens.issued.load(std::sync::atomic::Ordering::Relaxed) > issued,
        "the pull used a fresh token"
    );
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    unpack_image(p.store(), &pulled.layers, &root, Limits::default()).unwrap();
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"token");
}

#[tokio::test]
async fn tls_registries_need_a_trusted_ca() {
    if !support::require_tools(
        "tls_registries_need_a_trusted_ca",
        &["docker-registry", "skopeo", "openssl"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::tls_files(tmp.path());
    let registry = Registry::start_with(support::Auth::Tls(cert, key));
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let small = TarBuilder::default().file("hello", 0o644, b"tls").finish();
    let image = layout.image(
        &[LayerBlob {
            tar: small,
            gzip: true,
        }],
        config(),
        "amd64",
    );
    layout.tag(&image, "v1");
    registry.push(&layout.dir, "v1", "tls/app", &[]);
    let reference = parse_reference(&format!("{}/tls/app:v1", registry.addr)).unwrap();
    let anon = RegistryAuth::Anonymous;
    let tls_puller = |store: &str, extra_ca_pem: Vec<Vec<u8>>| {
        let store = Arc::new(BlobStore::open(&tmp.path().join(store)).unwrap());
        let config = PullConfig {
            plain_http_loopback: false,
            extra_ca_pem,
            ..PullConfig::default()
        };
        Puller::new(store, config)
    };

    let untrusted = tls_puller("s1", Vec::new())
        .pull(&reference, &anon)
        .await
        .unwrap_err();
    assert_eq!(untrusted.reason(), "ErrImagePull");
    let why = chain(&untrusted);
    assert!(
        why.contains("certificate") || why.contains("UnknownIssuer"),
        "{why}"
    );
    let plain = puller(&tmp.path().join("s2")).pull(&reference, &anon).await;
    assert!(plain.is_err(), "plain HTTP to a TLS registry fails");
    let trusted = tls_puller("s3", vec![std::fs::read(&ca).unwrap()]);
    let pulled = trusted.pull(&reference, &anon).await.unwrap();
    assert_eq!(pulled.layers.len(), 1);
}

/// An error and all its sources, as `{e:#}` would show them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}

#[tokio::test]
async fn a_hostile_image_fails_to_unpack_and_leaves_no_disk() {
    let tools = ["docker-registry", "skopeo", "mkfs.erofs"];
    if !support::require_tools("a_hostile_image_fails_to_unpack_and_leaves_no_disk", &tools) {
        return;
    }
    use runv_image::images::{ImageError, Images, PullPolicy};
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let good = TarBuilder::default().dir("etc", 0o755).finish();
    let evil = support::raw_tar(b"../../../escaped", b"pwned");
    let layers = [
        LayerBlob {
            tar: good,
            gzip: true,
        },
        LayerBlob {
            tar: evil,
            gzip: true,
        },
    ];
    let image = layout.image(&layers, config(), "amd64");
    layout.tag(&image, "v1");
    let registry = Registry::start(None);
    registry.push(&layout.dir, "v1", "evil/app", &[]);
    let reference = parse_reference(&format!("{}/evil/app:v1", registry.addr)).unwrap();
    let node = tmp.path().join("node");
    let images = Images::open(
        &node,
        PullConfig::default(),
        Limits::default(),
        Default::default(),
    )
    .unwrap();
    let err = images
        .ensure(
            &reference,
            &RegistryAuth::Anonymous,
            PullPolicy::IfNotPresent,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unpack(_)), "{err:?}");
    assert_eq!(err.reason(), "ErrImagePull");
    assert!(chain(&err).contains("escapes the root"), "{}", chain(&err));
    assert_eq!(
        std::fs::read_dir(node.join("rootfs")).unwrap().count(),
        0,
        "no disk"
    );
    assert_eq!(
        std::fs::read_dir(node.join("unpack")).unwrap().count(),
        0,
        "no half-unpacked tree"
    );
    assert!(
        images.records().unwrap().is_empty(),
        "no record of a usable image"
    );
    let escaped = ["escaped", "../escaped", "../../escaped"].map(|p| node.join("unpack").join(p));
    assert!(escaped.iter().all(|p| !p.exists()));
    assert!(!tmp.path().join("escaped").exists());
}

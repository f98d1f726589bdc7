//! Test support: the gate for host tools, a real `docker-registry` on
//! loopback, and OCI image layouts written by the test itself.
#![allow(dead_code)]

pub mod token;

use sha2::{Digest as _, Sha256};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the tools the test needs are installed. Outside CI a missing tool
/// skips the test with the reason on stderr; in CI (`CI=true` or
/// `RUNV_REQUIRE_KVM=1`) it fails the test.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("RUNV_REQUIRE_KVM").as_deref() == Ok("1");
    let why = format!("missing tools: {}", missing.join(", "));
    if ci {
        panic!("{test}: required in CI but unavailable: {why}");
    }
    eprintln!("{test}: skipping: {why} (CI=true makes this a failure)");
    false
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, returning its raw standard output.
pub fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// How a test registry authenticates.
pub enum Auth<'a> {
    /// Open to all.
    None,
    /// htpasswd basic auth with one user.
    Basic(&'a str, &'a str),
    /// Bearer tokens from a token service (its `auth:` config section).
    Token(String),
    /// Open, but over TLS with this certificate chain and key (PEM files).
    Tls(PathBuf, PathBuf),
}

/// A `docker-registry serve` on a free loopback port, stopped on drop.
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an open registry.
    pub fn start(basic: Option<(&str, &str)>) -> Self {
        Self::start_with(match basic {
            Some((u, p)) => Auth::Basic(u, p),
            None => Auth::None,
        })
    }

    /// Starts a registry with `auth`.
    pub fn start_with(auth: Auth<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Auth::Tls(cert, key) = &auth {
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        if let Auth::Token(section) = &auth {
            config += section;
        }
        if let Auth::Basic(user, pass) = auth {
            let entry = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            std::fs::write(dir.path().join("htpasswd"), entry).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        // TLS or not, the port accepting connections means it serves.
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Pushes `oci:LAYOUT:TAG` to `NAME:TAG` here; `extra` are skopeo flags.
    pub fn push(&self, layout: &Path, tag: &str, name: &str, extra: &[&str]) {
        let src = format!("oci:{}:{tag}", layout.display());
        let dst = format!("docker://{}/{name}:{tag}", self.addr);
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .args([&src, &dst]));
    }
}

impl Registry {
    /// The manifest bytes the registry serves for `name:tag`.
    pub fn raw_manifest(&self, name_tag: &str) -> Vec<u8> {
        let src = format!("docker://{}/{name_tag}", self.addr);
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", &src])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout being written.
pub struct Layout {
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

/// A layer: uncompressed tar bytes and how to ship them.
pub struct LayerBlob {
    pub tar: Vec<u8>,
    pub gzip: bool,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            index: Vec::new(),
        }
    }

    /// Writes a blob; returns its descriptor.
    pub fn blob(&self, bytes: &[u8], media_type: &str) -> serde_json::Value {
        let digest = sha256(bytes);
        let path = self
            .dir
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]);
        std::fs::write(path, bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// Writes an image manifest (not yet tagged); returns its descriptor.
    pub fn image(
        &self,
        layers: &[LayerBlob],
        config: serde_json::Value,
        arch: &str,
    ) -> serde_json::Value {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            diff_ids.push(sha256(&l.tar));
            descs.push(if l.gzip {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                std::io::Write::write_all(&mut enc, &l.tar).unwrap();
                self.blob(
                    &enc.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            } else {
                self.blob(&l.tar, "application/vnd.oci.image.layer.v1.tar")
            });
        }
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(
            config.to_string().as_bytes(),
            "application/vnd.oci.image.config.v1+json",
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": descs,
        });
        let mut desc = self.blob(
            manifest.to_string().as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
        );
        desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        desc
    }

    /// Writes an image index of `manifests`; returns its descriptor.
    pub fn index(&self, manifests: &[serde_json::Value]) -> serde_json::Value {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob(
            index.to_string().as_bytes(),
            "application/vnd.oci.image.index.v1+json",
        )
    }

    /// Tags a descriptor in `index.json`.
    pub fn tag(&mut self, desc: &serde_json::Value, tag: &str) {
        let mut desc = desc.clone();
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(desc);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// Builds a tar with the `tar` crate's builder, entry by entry.
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl Default for TarBuilder {
    fn default() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
}

impl TarBuilder {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h
    }
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, as PEM
/// files in `dir`: returns (CA certificate, server chain, server key).
pub fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=runv test CA",
        ])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext"))
        .arg("-out")
        .arg(p("server.crt")));
    (p("ca.crt"), p("server.crt"), p("server.key"))
}

/// A tar with one regular file under a raw name, which `tar::Builder`
/// would refuse (`../x`, `/x`).
pub fn raw_tar(name: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// The applets the busybox test image links to `/bin/busybox`.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "env", "id", "kill", "ls", "pwd", "sleep", "touch", "grep", "wc",
    "hostname", "ip", "true", "false", "test", "sync", "mkdir", "rm", "ping", "[",
];

/// A busybox image made from Debian's `busybox-static` (`/bin/busybox`):
/// the applets above, an `/etc/passwd` with root and `app` (1000:1000),
/// an `/etc/group` with `app` and `extra` (1001, listing app), `/home/app`,
/// `/etc/image-release` reading `busybox-test`, and `/etc/resolv.conf` a
/// symlink out of the image (to `/tmp/runv-escape-resolv.conf`). Its config runs
/// `/bin/sh` with `IMAGE_VAR=from-image` in the environment. Writes it to
/// `layout` and returns its manifest descriptor.
pub fn busybox_image(layout: &Layout) -> serde_json::Value {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static)");
    let mut tar = TarBuilder::default()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for a in BUSYBOX_APPLETS {
        tar = tar.symlink(&format!("bin/{a}"), "busybox");
    }
    let tar = tar
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\napp:x:1000:\nextra:x:1001:app\n",
        )
        .file("etc/image-release", 0o644, b"busybox-test\n")
        // A link out of the image, where a careless init would write.
        .symlink(
            "etc/resolv.conf",
            "../../../../../../tmp/runv-escape-resolv.conf",
        )
        .dir("home", 0o755)
        .dir("home/app", 0o755)
        .dir("root", 0o700)
        .finish();
    layout.image(
        &[LayerBlob { tar, gzip: true }],
        serde_json::json!({
            "Cmd": ["/bin/sh"],
            "Env": ["PATH=/bin", "IMAGE_VAR=from-image"],
        }),
        "amd64",
    )
}

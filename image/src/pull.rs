//! Pulling an image through the OCI distribution protocol into the blob store.
//!
//! The protocol client is `oci-client` (the ORAS project's crate, used by
//! Krustlet, wasmCloud and Sigstore's Rust tools): it speaks distribution v2
//! including the bearer-token flow (a `401` with `WWW-Authenticate: Bearer`
//! sends it to the token realm with the pull scope, with basic credentials if
//! it has them) and falls back to basic auth; it checks a manifest against a
//! digest-pinned reference and a blob against its descriptor's digest. We use
//! it for transport and auth only: index resolution, media-type policy, size
//! limits and a second digest/size check all happen here, before anything
//! becomes visible in the store.
//!
//! Transport: TLS with the system's roots plus configured CAs. Plain HTTP only
//! for a registry on a loopback address (as Docker and containerd allow) or one
//! listed as insecure.
//!
//! A `Client` (with its token cache) is kept per registry *and* credential, so
//! a pull with one namespace's Secret never reuses a token obtained with
//! another's.
//!
//! Known limit: oci-client reads a manifest response whole before we see it,
//! so [`PullConfig::max_document_bytes`] is checked after the download, not
//! during it; blobs are streamed and stopped at their declared size.

use crate::digest::{Digest, DigestError};
use crate::store::{BlobStore, StoreError};
use futures::StreamExt as _;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{self, OciDescriptor, OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Registry clients kept at most (one per registry and credential).
const MAX_CLIENTS: usize = 64;

/// Media types of manifests we accept (Docker v2 schema 2 and OCI).
pub const MANIFEST_TYPES: [&str; 4] = [
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
];

/// Why a pull failed. Each variant maps to one kubelet reason
/// ([`PullError::reason`]).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image name {name:?}")]
    InvalidImageName {
        /// What was given.
        name: String,
        /// The parser's complaint.
        #[source]
        source: oci_client::ParseError,
    },
    /// The registry refused, failed or sent bytes that do not verify.
    #[error("{op} for {reference}")]
    Registry {
        /// What was being fetched.
        op: &'static str,
        /// The image.
        reference: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// A blob's transfer broke off.
    #[error("transfer of blob {blob}")]
    Transfer {
        /// The blob.
        blob: Digest,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest's bytes do not hash to the digest that named it.
    #[error("manifest digest mismatch: expected {expected}, got {actual}")]
    ManifestDigest {
        /// The pinned or index-given digest.
        expected: Digest,
        /// The digest of what was received.
        actual: Digest,
    },
    /// A manifest or config is not the JSON it claims to be.
    #[error("malformed {what}")]
    Malformed {
        /// Which document.
        what: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest or layer of a kind we do not handle.
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    /// The index has no linux/amd64 manifest.
    #[error("image index of {0} has no linux/amd64 manifest")]
    NoPlatform(String),
    /// A descriptor's size is negative or over a configured limit.
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Which object.
        what: &'static str,
        /// Its declared size.
        size: i64,
        /// The limit.
        limit: u64,
    },
    /// A digest in a manifest is not a sha256 digest.
    #[error("digest in manifest")]
    Digest(#[from] DigestError),
    /// The blob store failed or a blob did not verify.
    #[error("blob store")]
    Store(#[from] StoreError),
}

impl PullError {
    /// The kubelet reason for an Event or condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidImageName { .. } => "InvalidImageName",
            _ => "ErrImagePull",
        }
    }
}

/// How to reach registries and how much to accept from them.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Registries (`host[:port]`) reached over plain HTTP although not on loopback.
    pub insecure_registries: Vec<String>,
    /// Whether a registry on a loopback address is reached over plain HTTP
    /// (as Docker and containerd do); `false` makes loopback use TLS too.
    pub plain_http_loopback: bool,
    /// Extra PEM CA certificates trusted besides the system's roots.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Layers fetched at once per pull (containerd's default is 3).
    pub max_concurrent_downloads: usize,
    /// Largest manifest or config accepted.
    pub max_document_bytes: u64,
    /// Largest (compressed) layer accepted.
    pub max_layer_bytes: u64,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            plain_http_loopback: true,
            extra_ca_pem: Vec::new(),
            max_concurrent_downloads: 3,
            max_document_bytes: 4 << 20,
            max_layer_bytes: 8 << 30,
        }
    }
}

/// One layer of a pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The compressed blob's digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A pulled image: everything is verified and present in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// `registry/repository@digest` of what the reference resolved to (the
    /// index's digest for a multi-platform image), as Pod status reports it.
    pub image_id: String,
    /// The linux/amd64 image manifest's digest: the key of the root filesystem.
    pub manifest_digest: Digest,
    /// The image config's digest.
    pub config_digest: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
}

/// Pulls images into a [`BlobStore`].
pub struct Puller {
    store: Arc<BlobStore>,
    config: PullConfig,
    clients: Mutex<HashMap<(String, String), Arc<Client>>>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("fetches", &self.fetches)
            .finish_non_exhaustive()
    }
}

/// Parses an image reference (`busybox`, `127.0.0.1:5000/a/b:tag`, `x@sha256:…`).
pub fn parse_reference(name: &str) -> Result<Reference, PullError> {
    name.parse().map_err(|source| PullError::InvalidImageName {
        name: name.to_owned(),
        source,
    })
}

/// Whether `registry` (`host[:port]`) is on a loopback address.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Puller {
    /// A puller storing into `store`.
    pub fn new(store: Arc<BlobStore>, config: PullConfig) -> Self {
        // reqwest is built without a default crypto provider; use ring, the
        // workspace's. Failing means one is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            store,
            config,
            clients: Mutex::default(),
            fetches: AtomicU64::new(0),
        }
    }

    /// The blob store.
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Blobs (configs and layers) fetched from registries so far.
    pub fn blob_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn client(&self, registry: &str, auth: &RegistryAuth) -> Arc<Client> {
        let who = match auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Basic(u, p) => Digest::of(format!("b\0{u}\0{p}").as_bytes()).to_string(),
            RegistryAuth::Bearer(t) => Digest::of(format!("t\0{t}").as_bytes()).to_string(),
        };
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        // Rotated credentials must not pile up clients (and tokens) forever.
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let key = (registry.to_owned(), who);
        clients
            .entry(key)
            .or_insert_with(|| Arc::new(Client::new(self.client_config(registry))))
            .clone()
    }

    fn client_config(&self, registry: &str) -> ClientConfig {
        let plain = (self.config.plain_http_loopback && is_loopback(registry))
            || self
                .config
                .insecure_registries
                .iter()
                .any(|r| r == registry);
        ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![registry.to_owned()])
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: (self.config.extra_ca_pem.iter())
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            ..ClientConfig::default()
        }
    }

    /// Pulls `reference`: resolves it to the linux/amd64 manifest, verifies
    /// and stores manifest, config and layers. Blobs already present are not
    /// fetched again.
    pub async fn pull(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<PulledImage, PullError> {
        let client = self.client(reference.resolve_registry(), auth);
        let (top_digest, bytes) = self
            .fetch_manifest(&client, reference, auth, reference.digest())
            .await?;
        let (manifest_digest, bytes) = match media_type_of(&bytes)?.as_str() {
            manifest::OCI_IMAGE_INDEX_MEDIA_TYPE | manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE => {
                let chosen = pick_linux_amd64(&bytes, reference)?;
                let pinned = reference.clone_with_digest(chosen.to_string());
                let (_, bytes) = self
                    .fetch_manifest(&client, &pinned, auth, Some(&chosen.to_string()))
                    .await?;
                (chosen, bytes)
            }
            _ => (top_digest.clone(), bytes),
        };
        let manifest: OciImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| PullError::Malformed {
                what: "image manifest",
                source,
            })?;
        let config_digest = self
            .fetch_config(&client, reference, &manifest.config)
            .await?;
        let layers = check_layers(&manifest.layers, self.config.max_layer_bytes)?;
        {
            let fetches = layers
                .iter()
                .map(|l| self.fetch_blob(&client, reference, l));
            let mut fetches = futures::stream::iter(fetches)
                .buffer_unordered(self.config.max_concurrent_downloads.max(1));
            while let Some(done) = fetches.next().await {
                done?;
            }
        }
        Ok(PulledImage {
            image_id: format!(
                "{}/{}@{top_digest}",
                reference.registry(),
                reference.repository()
            ),
            manifest_digest,
            config_digest,
            layers,
        })
    }

    /// Fetches a manifest, checks it against `pinned` (when given) and its
    /// size limit, stores it, and returns its digest and bytes.
    async fn fetch_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        pinned: Option<&str>,
    ) -> Result<(Digest, Vec<u8>), PullError> {
        let (bytes, _) = (client
            .pull_manifest_raw(reference, auth, &MANIFEST_TYPES)
            .await)
            .map_err(|source| PullError::Registry {
                op: "fetch manifest",
                reference: reference.whole(),
                source,
            })?;
        check_size(
            "manifest",
            bytes.len() as i64,
            self.config.max_document_bytes,
        )?;
        let actual = Digest::of(&bytes);
        if let Some(pinned) = pinned {
            let expected: Digest = pinned.parse()?;
            if expected != actual {
                return Err(PullError::ManifestDigest { expected, actual });
            }
        }
        self.store.put(&actual, &bytes)?;
        Ok((actual, bytes.to_vec()))
    }

    async fn fetch_config(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &OciDescriptor,
    ) -> Result<Digest, PullError> {
        if desc.media_type != manifest::IMAGE_CONFIG_MEDIA_TYPE
            && desc.media_type != manifest::IMAGE_DOCKER_CONFIG_MEDIA_TYPE
        {
            return Err(PullError::UnsupportedMediaType(desc.media_type.clone()));
        }
        let size = check_size("image config", desc.size, self.config.max_document_bytes)?;
        let config = Layer {
            digest: desc.digest.parse()?,
            media_type: desc.media_type.clone(),
            size,
        };
        self.fetch_blob(client, reference, &config).await?;
        Ok(config.digest)
    }

    /// Fetches one blob unless present, under the digest's lock.
    async fn fetch_blob(
        &self,
        client: &Client,
        reference: &Reference,
        blob: &Layer,
    ) -> Result<(), PullError> {
        let _guard = self.store.lock(&blob.digest).await;
        if self.store.contains(&blob.digest) {
            return Ok(());
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let registry_err = |source: OciDistributionError| PullError::Registry {
            op: "fetch blob",
            reference: format!("{}@{}", reference.whole(), blob.digest),
            source,
        };
        let desc = OciDescriptor {
            media_type: blob.media_type.clone(),
            digest: blob.digest.to_string(),
            size: blob.size as i64,
            ..OciDescriptor::default()
        };
        let mut stream = client
            .pull_blob_stream(reference, &desc)
            .await
            .map_err(registry_err)?;
        let mut writer = self.store.writer(&blob.digest, blob.size)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| PullError::Transfer {
                blob: blob.digest.clone(),
                source,
            })?;
            writer.write(&chunk)?;
        }
        writer.commit()?;
        Ok(())
    }
}

/// The manifest's media type: its `mediaType` field, or for an OCI document
/// without one, index or manifest by shape.
fn media_type_of(bytes: &[u8]) -> Result<String, PullError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<i64>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|source| PullError::Malformed {
        what: "manifest",
        source,
    })?;
    if probe.schema_version != Some(2) {
        return Err(PullError::UnsupportedMediaType(format!(
            "manifest schemaVersion {:?}",
            probe.schema_version
        )));
    }
    let media_type = probe.media_type.unwrap_or_else(|| {
        let t = match probe.manifests {
            Some(_) => manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
            None => manifest::OCI_IMAGE_MEDIA_TYPE,
        };
        t.to_owned()
    });
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(PullError::UnsupportedMediaType(media_type));
    }
    Ok(media_type)
}

fn pick_linux_amd64(bytes: &[u8], reference: &Reference) -> Result<Digest, PullError> {
    let index: OciImageIndex =
        serde_json::from_slice(bytes).map_err(|source| PullError::Malformed {
            what: "image index",
            source,
        })?;
    let entry = index.manifests.iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os.to_string() == "linux" && p.architecture.to_string() == "amd64")
    });
    let entry = entry.ok_or_else(|| PullError::NoPlatform(reference.whole()))?;
    Ok(entry.digest.parse()?)
}

/// Layer media types we can apply: OCI and Docker tar, gzip and zstd.
pub fn is_layer_type(media_type: &str) -> bool {
    matches!(
        media_type,
        manifest::IMAGE_LAYER_MEDIA_TYPE
            | manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE
            | manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE
            | manifest::IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE
            | manifest::IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

fn check_layers(layers: &[OciDescriptor], limit: u64) -> Result<Vec<Layer>, PullError> {
    layers
        .iter()
        .map(|d| {
            if !is_layer_type(&d.media_type) {
                return Err(PullError::UnsupportedMediaType(d.media_type.clone()));
            }
            Ok(Layer {
                digest: d.digest.parse()?,
                media_type: d.media_type.clone(),
                size: check_size("layer", d.size, limit)?,
            })
        })
        .collect()
}

fn check_size(what: &'static str, size: i64, limit: u64) -> Result<u64, PullError> {
    u64::try_from(size)
        .ok()
        .filter(|s| *s <= limit)
        .ok_or(PullError::TooLarge { what, size, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http_by_default() {
        for r in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:80",
            "[::1]:5000",
            "127.8.9.1",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "10.0.0.1:5000",
            "registry.example.com",
            "localhost.example.com",
            "[::2]:1",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
        let store = Arc::new(BlobStore::open(tempfile::tempdir().unwrap().path()).unwrap());
        let config = PullConfig {
            insecure_registries: vec!["10.0.0.1:5000".to_owned()],
            ..PullConfig::default()
        };
        let puller = Puller::new(store, config);
        let http = |r: &str| puller.client_config(r).protocol != ClientProtocol::Https;
        assert!(http("127.0.0.1:5000") && http("10.0.0.1:5000"));
        assert!(!http("10.0.0.1:5001") && !http("docker.io"));
    }

    #[test]
    fn manifests_are_classified_and_odd_ones_refused() {
        let oci_index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            media_type_of(oci_index).unwrap(),
            manifest::OCI_IMAGE_INDEX_MEDIA_TYPE
        );
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}"}}"#,
            manifest::IMAGE_MANIFEST_MEDIA_TYPE
        );
        assert_eq!(
            media_type_of(docker.as_bytes()).unwrap(),
            manifest::IMAGE_MANIFEST_MEDIA_TYPE
        );
        assert!(matches!(
            media_type_of(br#"{"schemaVersion":1}"#),
            Err(PullError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            media_type_of(b"{]"),
            Err(PullError::Malformed { .. })
        ));
        let wasm = br#"{"schemaVersion":2,"mediaType":"application/wasm"}"#;
        assert!(matches!(
            media_type_of(wasm),
            Err(PullError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn index_resolves_to_linux_amd64_only() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": manifest::OCI_IMAGE_MEDIA_TYPE, "digest": d('a'), "size": 1,
             "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": manifest::OCI_IMAGE_MEDIA_TYPE, "digest": d('b'), "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        let r = parse_reference("example.com/x:1").unwrap();
        let picked = pick_linux_amd64(index.to_string().as_bytes(), &r).unwrap();
        assert_eq!(picked.to_string(), d('b'));
        let arm_only =
            serde_json::json!({"schemaVersion": 2, "manifests": [index["manifests"][0]]});
        assert!(matches!(
            pick_linux_amd64(arm_only.to_string().as_bytes(), &r),
            Err(PullError::NoPlatform(_))
        ));
    }

    #[test]
    fn invalid_names_and_sizes_are_refused() {
        let e = parse_reference("UPPER/Case:tag").unwrap_err();
        assert_eq!(e.reason(), "InvalidImageName");
        assert!(check_size("layer", -1, 10).is_err());
        assert!(check_size("layer", 11, 10).is_err());
        assert_eq!(check_size("layer", 10, 10).unwrap(), 10);
    }
}

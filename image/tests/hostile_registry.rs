//! A registry that lies: wrong bytes for a digest, truncated and overlong
//! blobs, malformed manifests, a manifest that is not the pinned one. Each
//! pull fails with a clear error and the store holds nothing unverified.
//! Served by a few lines of HTTP in the test, so it runs everywhere.

use oci_client::secrets::RegistryAuth;
use runv_image::pull::{PullError, parse_reference};
use runv_image::{BlobStore, Digest, PullConfig, Puller};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::Arc;

/// Serves `routes` (path → body) forever; unknown paths get 404.
fn serve(routes: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap_or_default();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (status, body) = match routes.get(&path) {
                Some(body) => ("200 OK", body.clone()),
                None if path == "/v2/" => ("200 OK", b"{}".to_vec()),
                None => (
                    "404 Not Found",
                    b"{\"errors\":[{\"code\":\"BLOB_UNKNOWN\"}]}".to_vec(),
                ),
            };
            let media = if path.contains("/manifests/") {
                "application/vnd.oci.image.manifest.v1+json"
            } else {
                "application/octet-stream"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {media}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    addr
}

fn manifest(config: (&Digest, usize), layer: (&Digest, usize)) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0.to_string(), "size": config.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.0.to_string(), "size": layer.1}],
    })
    .to_string()
    .into_bytes()
}

/// A case: its name, then the manifest, config and layer bodies served.
type Case = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);

/// Each case: what the registry serves for the config and layer blobs, given
/// the true bytes; and whether the manifest is garbage.
#[tokio::test]
async fn lying_registries_fail_the_pull_and_leave_the_store_clean() {
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
    let layer = vec![0u8; 2048];
    let (cd, ld) = (Digest::of(&config), Digest::of(&layer));
    let good_manifest = manifest((&cd, config.len()), (&ld, layer.len()));
    let mut wrong = layer.clone();
    wrong[7] = 1;
    let cases: Vec<Case> = vec![
        (
            "wrong bytes for the layer digest",
            good_manifest.clone(),
            config.clone(),
            wrong,
        ),
        (
            "truncated layer",
            good_manifest.clone(),
            config.clone(),
            layer[..1000].to_vec(),
        ),
        (
            "overlong layer",
            good_manifest.clone(),
            config.clone(),
            [layer.clone(), vec![0; 512]].concat(),
        ),
        (
            "malformed manifest",
            b"{\"schemaVersion\": 2, \"layers\": [".to_vec(),
            config.clone(),
            layer.clone(),
        ),
        (
            "config with a wrong digest",
            good_manifest.clone(),
            b"{}".to_vec(),
            layer.clone(),
        ),
    ];
    for (what, manifest_body, config_body, layer_body) in cases {
        let routes = HashMap::from([
            ("/v2/x/manifests/t".to_owned(), manifest_body),
            (format!("/v2/x/blobs/{cd}"), config_body),
            (format!("/v2/x/blobs/{ld}"), layer_body),
        ]);
        let addr = serve(routes);
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(tmp.path()).unwrap());
        let puller = Puller::new(store.clone(), PullConfig::default());
        let reference = parse_reference(&format!("{addr}/x:t")).unwrap();
        let err = puller
            .pull(&reference, &RegistryAuth::Anonymous)
            .await
            .expect_err(what);
        assert_eq!(err.reason(), "ErrImagePull", "{what}");
        assert!(
            !store.contains(&ld) || what.starts_with("config"),
            "{what}: unverified layer stored"
        );
        for blob in store.list().unwrap() {
            store
                .read(&blob)
                .unwrap_or_else(|e| panic!("{what}: stored blob {blob} does not verify: {e}"));
        }
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.to_string_lossy().starts_with(".tmp-")),
            "{what}: temp files left: {names:?}"
        );
    }
}

#[tokio::test]
async fn a_pinned_reference_refuses_a_different_manifest() {
    let config = br#"{"config":{}}"#.to_vec();
    let layer = vec![1u8; 512];
    let (cd, ld) = (Digest::of(&config), Digest::of(&layer));
    let served = manifest((&cd, config.len()), (&ld, layer.len()));
    let pinned = Digest::of(b"some other manifest");
    let routes = HashMap::from([
        (format!("/v2/x/manifests/{pinned}"), served),
        (format!("/v2/x/blobs/{cd}"), config),
        (format!("/v2/x/blobs/{ld}"), layer),
    ]);
    let addr = serve(routes);
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(tmp.path()).unwrap());
    let puller = Puller::new(store.clone(), PullConfig::default());
    let reference = parse_reference(&format!("{addr}/x@{pinned}")).unwrap();
    let err = puller
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PullError::Registry { .. } | PullError::ManifestDigest { .. }
        ),
        "{err:?}"
    );
    assert_eq!(
        puller.blob_fetches(),
        0,
        "nothing fetched for an unverified manifest"
    );
    assert!(store.list().unwrap().is_empty());
}

//! Registry credentials from docker config JSON: `{"auths": {KEY: {...}}}`, the
//! format of `kubernetes.io/dockerconfigjson` Secrets and `~/.docker/config.json`.
//!
//! Keys are matched against an image's `registry/repository` the way kubelet's
//! credential keyring does: the scheme is ignored; the host matches exactly or
//! by a `*` glob per dot-separated label (`*.example.com` matches
//! `a.example.com`, not `example.com`); the port must be equal; a key with a
//! path matches repositories under that path. When several keys match, the
//! most specific (longest) wins. Docker Hub's aliases (`docker.io`,
//! `index.docker.io`, `registry-1.docker.io`, `https://index.docker.io/v1/`)
//! are one registry.

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Why a docker config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The document is not a docker config JSON.
    #[error("docker config is not valid JSON of the form {{\"auths\": {{...}}}}")]
    Json(#[source] serde_json::Error),
    /// An `auth` field is not base64 of `user:password`.
    #[error("docker config entry {key:?}: \"auth\" is not base64 of user:password")]
    BadAuthField {
        /// The entry's key.
        key: String,
    },
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    host: String,
    port: Option<String>,
    path: String,
}

/// Credentials from one or more docker configs, ready to be looked up by image.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    entries: Vec<(Key, RegistryAuth)>,
}

impl Keyring {
    /// Adds every entry of a docker config JSON document: `{"auths": {...}}`
    /// (`kubernetes.io/dockerconfigjson`, `~/.docker/config.json`) or the
    /// legacy bare map (`kubernetes.io/dockercfg`), as kubelet reads both.
    pub fn add_docker_config(&mut self, json: &[u8]) -> Result<(), AuthError> {
        let value: serde_json::Value = serde_json::from_slice(json).map_err(AuthError::Json)?;
        let auths = if value.get("auths").is_some() {
            serde_json::from_value::<DockerConfig>(value)
                .map_err(AuthError::Json)?
                .auths
        } else {
            serde_json::from_value::<BTreeMap<String, Entry>>(value).map_err(AuthError::Json)?
        };
        for (raw, entry) in auths {
            let auth = entry_auth(&raw, entry)?;
            self.entries.push((parse_key(&raw), auth));
        }
        // Most specific first; stable, so earlier configs win ties.
        self.entries.sort_by(|(a, _), (b, _)| {
            let len =
                |k: &Key| k.host.len() + k.path.len() + k.port.as_ref().map_or(0, String::len);
            len(b).cmp(&len(a))
        });
        Ok(())
    }

    /// Every matching credential, most specific first, as kubelet tries them
    /// one after another until a pull succeeds; empty when none matches (then
    /// pull anonymously).
    pub fn credentials_for(&self, registry: &str, repository: &str) -> Vec<RegistryAuth> {
        let target = parse_key(&format!("{registry}/{repository}"));
        self.entries
            .iter()
            .filter(|(key, _)| key_matches(key, &target))
            .map(|(_, auth)| auth.clone())
            .collect()
    }

    /// The credential for an image in `registry` (as written in the image
    /// reference, e.g. `docker.io` or `127.0.0.1:5000`) and `repository`;
    /// anonymous when no key matches.
    pub fn credential_for(&self, registry: &str, repository: &str) -> RegistryAuth {
        let target = parse_key(&format!("{registry}/{repository}"));
        self.entries
            .iter()
            .find(|(key, _)| key_matches(key, &target))
            .map_or(RegistryAuth::Anonymous, |(_, auth)| auth.clone())
    }
}

fn entry_auth(key: &str, entry: Entry) -> Result<RegistryAuth, AuthError> {
    if let Some(token) = entry.registrytoken.filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token));
    }
    if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
        let bad = || AuthError::BadAuthField {
            key: key.to_owned(),
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
    }
    match (entry.username, entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(RegistryAuth::Basic(u, p)),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

fn parse_key(raw: &str) -> Key {
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .unwrap_or(raw);
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, Some(p.to_owned()))
        }
        _ => (hostport, None),
    };
    let mut host = host.to_ascii_lowercase();
    let mut path = path.trim_end_matches('/').to_owned();
    if matches!(
        host.as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        host = "docker.io".to_owned();
        if path == "v1" || path == "v2" {
            path.clear();
        }
    }
    Key { host, port, path }
}

fn key_matches(key: &Key, target: &Key) -> bool {
    let labels = |h: &str| h.split('.').map(str::to_owned).collect::<Vec<_>>();
    let (k, t) = (labels(&key.host), labels(&target.host));
    let host_ok = k.len() == t.len() && k.iter().zip(&t).all(|(k, t)| glob(k, t));
    let path_ok = key.path.is_empty()
        || target.path == key.path
        || target.path.starts_with(&format!("{}/", key.path));
    host_ok && key.port == target.port && path_ok
}

/// `*` matches any run of characters within one label.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (head.len()..=text.len())
                    .any(|i| text.is_char_boundary(i) && glob(tail, &text[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_of(auth: RegistryAuth) -> String {
        match auth {
            RegistryAuth::Basic(u, _) => u,
            RegistryAuth::Bearer(t) => format!("bearer:{t}"),
            RegistryAuth::Anonymous => "anonymous".to_owned(),
        }
    }

    #[test]
    fn picks_the_credential_kubelet_would() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let json = serde_json::json!({"auths": {
            "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
            "registry.example.com": {"username": "plain", "password": "pw"},
            "registry.example.com/team": {"auth": b64("team:pw")},
            "*.corp.example": {"auth": b64("glob:pw")},
            "127.0.0.1:5000": {"auth": b64("local:pw")},
            "tokens.example": {"registrytoken": "tok"},
        }});
        let mut ring = Keyring::default();
        ring.add_docker_config(json.to_string().as_bytes()).unwrap();
        let cases = [
            ("docker.io", "library/busybox", "hub"),
            ("registry.example.com", "other/app", "plain"),
            ("registry.example.com", "team/app", "team"),
            ("registry.example.com", "teammate/app", "plain"),
            ("a.corp.example", "x", "glob"),
            ("corp.example", "x", "anonymous"),
            ("a.b.corp.example", "x", "anonymous"),
            ("127.0.0.1:5000", "x", "local"),
            ("127.0.0.1:5001", "x", "anonymous"),
            ("127.0.0.1", "x", "anonymous"),
            ("tokens.example", "x", "bearer:tok"),
            ("quay.io", "x", "anonymous"),
        ];
        for (registry, repo, want) in cases {
            assert_eq!(
                user_of(ring.credential_for(registry, repo)),
                want,
                "{registry}/{repo}"
            );
        }
    }

    #[test]
    fn the_legacy_dockercfg_map_is_read_too() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("old:pw");
        let legacy =
            format!(r#"{{"registry.example.com": {{"auth": "{b64}", "email": "x@example.com"}}}}"#);
        let mut ring = Keyring::default();
        ring.add_docker_config(legacy.as_bytes()).unwrap();
        assert_eq!(
            user_of(ring.credential_for("registry.example.com", "a/b")),
            "old"
        );
    }

    #[test]
    fn malformed_configs_are_clear_errors() {
        let mut ring = Keyring::default();
        assert!(matches!(
            ring.add_docker_config(b"{"),
            Err(AuthError::Json(_))
        ));
        let bad = br#"{"auths": {"r.example": {"auth": "not base64!"}}}"#;
        assert!(matches!(
            ring.add_docker_config(bad),
            Err(AuthError::BadAuthField { .. })
        ));
        let no_colon = format!(
            r#"{{"auths": {{"r.example": {{"auth": "{}"}}}}}}"#,
            base64::engine::general_purpose::STANDARD.encode("nocolon")
        );
        assert!(ring.add_docker_config(no_colon.as_bytes()).is_err());
    }
}

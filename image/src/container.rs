//! The merged container config the guest reads: the image's config
//! overridden by the workload's `spec.container`.
//!
//! Kubernetes' rules, as kubelet applies them:
//! - `command` replaces the image's `Entrypoint` and drops its `Cmd`;
//! - `args` replaces `Cmd` (and follows `command` when both are given);
//! - an empty list counts as unset;
//! - `$(NAME)` in `command` and `args` expands to the value of `NAME` from
//!   the spec's `env` (left as written when undefined), `$$` is a literal `$`;
//! - `env` entries override the image's variables of the same name, in the
//!   image's order, new names appended in the spec's order; a `PATH` is
//!   added, as containerd does, when neither defines one;
//! - `workingDir` replaces the image's `WorkingDir`, `/` when neither sets it;
//! - the user is the image's `User` (`""` means root).
//!
//! # The file (version 1)
//!
//! ```json
//! {
//!   "version": 1,
//!   "imageID": "registry.example/app@sha256:…",
//!   "manifestDigest": "sha256:…",
//!   "argv": ["/bin/sh", "-c", "echo hi"],
//!   "env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
//!   "workingDir": "/",
//!   "user": "1000:1000"
//! }
//! ```
//! A reader refuses a `version` it does not know. New optional fields may
//! appear within a version; a field's meaning never changes within one.

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub use runv_vmm_api::guest::{CONFIG_VERSION as VERSION, ContainerConfig, DEFAULT_PATH};

/// Why the container config could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The image config is not OCI/Docker image config JSON.
    #[error("malformed image config")]
    ImageConfig(#[source] serde_json::Error),
    /// Neither the image nor the spec names a program to run.
    #[error("no command specified: the image has no Entrypoint or Cmd and the spec no command")]
    NoCommand,
    /// The file could not be written.
    #[error("write container config {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The part of an image config that concerns the process.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ImageConfig {
    /// `config` of the image config document.
    #[serde(default)]
    pub config: ProcessConfig,
}

/// The image's defaults for the process (Docker's capitalised names).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessConfig {
    /// `User`.
    #[serde(default)]
    pub user: Option<String>,
    /// `Env`, `NAME=value` strings.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
}

impl ImageConfig {
    /// Parses an image config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, ContainerError> {
        serde_json::from_slice(bytes).map_err(ContainerError::ImageConfig)
    }
}

/// The workload's overrides (`spec.container` minus the image).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `command`.
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// `env`, in order.
    pub env: Vec<(String, String)>,
    /// `workingDir`.
    pub working_dir: Option<String>,
}

/// Merges the image's config with the overrides by Kubernetes' rules.
pub fn merge(
    image: &ImageConfig,
    overrides: &Overrides,
    image_id: &str,
    manifest_digest: &str,
) -> Result<ContainerConfig, ContainerError> {
    let c = &image.config;
    let expand_all = |v: &[String]| {
        v.iter()
            .map(|s| expand(s, &overrides.env))
            .collect::<Vec<_>>()
    };
    let (entry, args) = match (overrides.command.is_empty(), overrides.args.is_empty()) {
        (true, true) => (
            c.entrypoint.clone().unwrap_or_default(),
            c.cmd.clone().unwrap_or_default(),
        ),
        (true, false) => (
            c.entrypoint.clone().unwrap_or_default(),
            expand_all(&overrides.args),
        ),
        (false, _) => (expand_all(&overrides.command), expand_all(&overrides.args)),
    };
    let argv: Vec<String> = entry.into_iter().chain(args).collect();
    if argv.is_empty() {
        return Err(ContainerError::NoCommand);
    }
    let working_dir = (overrides.working_dir.clone().filter(|w| !w.is_empty()))
        .or_else(|| c.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_owned());
    Ok(ContainerConfig {
        version: VERSION,
        image_id: image_id.to_owned(),
        manifest_digest: manifest_digest.to_owned(),
        argv,
        env: merge_env(c.env.as_deref().unwrap_or_default(), &overrides.env),
        working_dir,
        user: c.user.clone().unwrap_or_default(),
    })
}

fn merge_env(image: &[String], spec: &[(String, String)]) -> Vec<String> {
    let name = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_owned();
    let mut out: Vec<(String, String)> = image.iter().map(|kv| (name(kv), kv.clone())).collect();
    for (k, v) in spec {
        let kv = format!("{k}={v}");
        match out.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = kv,
            None => out.push((k.clone(), kv)),
        }
    }
    if !out.iter().any(|(n, _)| n == "PATH") {
        out.insert(0, ("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    out.into_iter().map(|(_, kv)| kv).collect()
}

/// Kubernetes' `$(NAME)` expansion against the spec's env.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[i..i + 3 + name.len()]),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Writes the file atomically (temporary file, fsync, rename).
pub fn write(config: &ContainerConfig, path: &Path) -> Result<(), ContainerError> {
    let err = |source| ContainerError::Write {
        path: path.to_owned(),
        source,
    };
    let temp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(config).expect("plain data serialises");
    std::fs::write(&temp, body).map_err(err)?;
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&temp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageConfig {
        ImageConfig::parse(
            br#"{"config": {"Entrypoint": ["/entry"], "Cmd": ["--default"], "Env": ["PATH=/bin", "A=image"],
                 "WorkingDir": "/app", "User": "1000:1000"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn command_and_args_follow_kubernetes_rules() {
        let cases = [
            (v(&[]), v(&[]), v(&["/entry", "--default"])),
            (v(&["/cmd"]), v(&[]), v(&["/cmd"])),
            (v(&[]), v(&["--arg"]), v(&["/entry", "--arg"])),
            (v(&["/cmd"]), v(&["--arg"]), v(&["/cmd", "--arg"])),
        ];
        for (command, args, want) in cases {
            let o = Overrides {
                command: command.clone(),
                args: args.clone(),
                ..Overrides::default()
            };
            assert_eq!(
                merge(&image(), &o, "id", "d").unwrap().argv,
                want,
                "{command:?} {args:?}"
            );
        }
    }

    #[test]
    fn env_workdir_user_and_expansion_merge() {
        let o = Overrides {
            command: v(&["echo", "$(A)", "$(B)", "$$(A)", "$(UNSET)", "cost $5"]),
            env: vec![("A".into(), "spec".into()), ("B".into(), "new".into())],
            working_dir: Some("/work".into()),
            ..Overrides::default()
        };
        let c = merge(&image(), &o, "reg/app@sha256:x", "sha256:y").unwrap();
        assert_eq!(
            c.argv,
            v(&["echo", "spec", "new", "$(A)", "$(UNSET)", "cost $5"])
        );
        assert_eq!(c.env, v(&["PATH=/bin", "A=spec", "B=new"]));
        assert_eq!(
            (c.working_dir.as_str(), c.user.as_str()),
            ("/work", "1000:1000")
        );
        let bare = ImageConfig::parse(br#"{"config": {"Cmd": ["/x"]}}"#).unwrap();
        let c = merge(&bare, &Overrides::default(), "i", "d").unwrap();
        assert_eq!(
            (c.env, c.working_dir, c.user),
            (v(&[DEFAULT_PATH]), "/".to_owned(), String::new())
        );
        assert!(matches!(
            merge(&ImageConfig::default(), &Overrides::default(), "i", "d"),
            Err(ContainerError::NoCommand)
        ));
    }

    #[test]
    fn the_file_is_versioned_json_that_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let c = merge(
            &image(),
            &Overrides::default(),
            "reg/app@sha256:x",
            "sha256:y",
        )
        .unwrap();
        let path = tmp.path().join("container.json");
        write(&c, &path).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["imageID"], "reg/app@sha256:x");
        assert_eq!(json["workingDir"], "/app");
        let back: ContainerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }
}

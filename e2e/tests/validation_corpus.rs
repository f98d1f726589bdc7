//! One corpus of MicroVM and SecureWorkload manifests, run through the offline
//! validator (`runv_crds::validate`, what `runv-agent standalone` and crdgen
//! use) and through the test server's admission. On every case both accept or
//! both refuse, and when they refuse they name the same fields, the ones the
//! case expects.
//!
//! A case is one file: `tests/corpus/valid/*.yaml` must be accepted;
//! `tests/corpus/invalid/*.yaml` must be refused, and starts with comments
//! saying why and an `# expect:` line listing every field path both must name,
//! comma separated (`<object>` is the object itself, where the API server says
//! "some validation rules were not checked"). Adding a file adds a case.
//! `--nocapture` prints every case's refusals from both, for review.
//!
//! Messages agree exactly for metadata, `x-kubernetes-list-type: map`
//! duplicates and unknown fields, which both take from one implementation
//! (a name the server generates from `generateName` is compared with the
//! offline validator's stand-in for it, `GENERATED_NAME_SUFFIX`).
//! Two documented differences remain, and are allowed only in this shape:
//! - a CEL rule's message: the server wraps it as a field error
//!   (`Invalid value: "object": <message>`), the offline validator reports the
//!   rule's message alone, so the server's ends with `": <message>"`;
//! - a structural schema error (type, required, enum, bounds, pattern, length,
//!   item count): the server words it as kube-openapi does (`... in body should
//!   match ...`, `Required value`, `Unsupported value: ...`), the offline
//!   validator as JSON Schema does, the wording `runv-agent standalone` has
//!   always printed and `crds/tests/rules.rs` pins. Only the field is compared.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use common::{Env, bounded};
use runv_crds::validate::{GENERATED_NAME_SUFFIX, ValidateError, Validator, parse_documents};
use serde_json::Value;

/// One refused field: its dotted path (`<object>` for the object) and message.
type Refusal = (String, String);

struct Case {
    path: PathBuf,
    text: String,
    /// `None` for a valid case; the fields both must name for an invalid one.
    expect: Option<BTreeSet<String>>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load(dir: &str) -> Result<Vec<Case>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir().join(dir))
        .with_context(|| format!("reading corpus/{dir}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)?;
            let expect = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect:"))
                .map(|l| l.split(',').map(|f| f.trim().to_owned()).collect());
            ensure!(
                expect.is_some() == (dir == "invalid"),
                "{}: an invalid case needs an `# expect:` line, a valid one none",
                path.display()
            );
            Ok(Case { path, text, expect })
        })
        .collect()
}

fn field_name(field: &str) -> String {
    if field.is_empty() {
        "<object>".into()
    } else {
        field.to_owned()
    }
}

/// What the offline validator refuses (empty when it accepts).
fn offline(validator: &Validator, text: &str) -> Result<Vec<Refusal>> {
    match validator.validate_yaml(text) {
        Ok(_) => Ok(Vec::new()),
        Err(ValidateError::Invalid { errors, .. }) => Ok(errors
            .into_iter()
            .map(|e| (field_name(&e.field), e.message))
            .collect()),
        Err(e) => bail!("not a validation verdict: {e}"),
    }
}

/// What the server refuses (empty when it accepts), creating with kubectl's
/// defaults (strict field validation), as a dry run.
async fn server(env: &Env, text: &str) -> Result<Vec<Refusal>> {
    let docs = parse_documents(text)?;
    let [doc] = docs.as_slice() else {
        bail!("a case is one document");
    };
    let plural = format!(
        "{}s",
        doc["kind"].as_str().unwrap_or_default().to_lowercase()
    );
    let mut config = kube::Config::new(env.server.url().parse()?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "/apis/runv.dev/v1alpha1/namespaces/default/{plural}?fieldValidation=Strict&dryRun=All"
        ))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(serde_json::to_vec(doc)?)?;
    let res = client.send(req.map(Into::into)).await?;
    let code = res.status().as_u16();
    let bytes = axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 22).await?;
    let status: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    match code {
        200..=299 => Ok(Vec::new()),
        422 => {
            // A name the server generated shows as the offline validator's stand-in.
            let generated = status["details"]["name"].as_str().unwrap_or_default();
            let stand_in = format!(
                "{}{GENERATED_NAME_SUFFIX}",
                doc["metadata"]["generateName"].as_str().unwrap_or_default()
            );
            let named = doc["metadata"]["name"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            Ok(status["details"]["causes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                    let mut message = text("message");
                    if !named && !generated.is_empty() {
                        message = message.replace(generated, &stand_in);
                    }
                    (field_name(&text("field")), message)
                })
                .collect())
        }
        // Strict field validation: `... strict decoding error: unknown field "a", unknown field "b"`.
        400 => {
            let message = status["message"].as_str().unwrap_or_default();
            let Some((_, list)) = message.split_once("strict decoding error: ") else {
                bail!("400 that is not a strict decoding error: {message}");
            };
            Ok(list
                .split(", ")
                .map(|u| {
                    let field = u
                        .trim_start_matches("unknown field \"")
                        .trim_end_matches('"');
                    (field.to_owned(), u.to_owned())
                })
                .collect())
        }
        _ => bail!("unexpected {code}: {status}"),
    }
}

/// Whether the server's message for a field agrees with one of the offline
/// validator's for it, allowing only the two differences the module names.
fn message_agrees(server: &str, offline: &[&str]) -> bool {
    let structural = server == "Required value"
        || server.contains(" in body ")
        || server.starts_with("Unsupported value: ")
        || server.starts_with("Too long: ")
        || server.starts_with("Too many: ");
    structural
        || offline
            .iter()
            .any(|o| server == *o || server.ends_with(&format!(": {o}")))
}

/// Every way one case's two verdicts disagree with each other or the case.
fn disagreements(case: &Case, offline: &[Refusal], server: &[Refusal]) -> Vec<String> {
    let fields = |r: &[Refusal]| r.iter().map(|(f, _)| f.clone()).collect::<BTreeSet<_>>();
    let (off_fields, srv_fields) = (fields(offline), fields(server));
    let mut out = Vec::new();
    match &case.expect {
        None if !offline.is_empty() || !server.is_empty() => {
            out.push("a valid case was refused".to_owned());
        }
        None => {}
        Some(expect) => {
            if off_fields != *expect {
                out.push(format!(
                    "offline fields {off_fields:?} != expected {expect:?}"
                ));
            }
            if srv_fields != *expect {
                out.push(format!(
                    "server fields {srv_fields:?} != expected {expect:?}"
                ));
            }
        }
    }
    for (field, message) in server {
        let mine: Vec<&str> = offline
            .iter()
            .filter(|(f, _)| f == field)
            .map(|(_, m)| m.as_str())
            .collect();
        if !mine.is_empty() && !message_agrees(message, &mine) {
            out.push(format!(
                "{field}: server says {message:?}, offline {mine:?}"
            ));
        }
    }
    if !out.is_empty() {
        out.push(format!("offline: {offline:#?}\nserver: {server:#?}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_validation_and_the_server_agree_on_the_corpus() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let validator = Validator::new();
        let mut cases = load("valid")?;
        let valid = cases.len();
        cases.extend(load("invalid")?);
        ensure!(
            valid >= 10 && cases.len() - valid >= 70,
            "the corpus is too small"
        );
        let mut failures = Vec::new();
        for case in &cases {
            let off = offline(&validator, &case.text)
                .with_context(|| format!("{}: offline", case.path.display()))?;
            let srv = server(&env, &case.text)
                .await
                .with_context(|| format!("{}: server", case.path.display()))?;
            // Every verdict, for review with `--nocapture`.
            println!("{}", case.path.display());
            for (who, refusals) in [("offline", &off), ("server", &srv)] {
                for (field, message) in refusals {
                    println!("  {who}: {field}: {message}");
                }
            }
            for d in disagreements(case, &off, &srv) {
                failures.push(format!("{}: {d}", case.path.display()));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    })
    .await
}

#[test]
fn message_agreement_allows_only_the_documented_differences() {
    assert!(message_agrees(
        "unknown field \"spec.x\"",
        &["unknown field \"spec.x\""]
    ));
    assert!(message_agrees(
        "Invalid value: \"object\": names must be unique",
        &["names must be unique"]
    ));
    assert!(message_agrees(
        "Invalid value: 0: spec.resources.vcpus in body should be greater than or equal to 1",
        &["0 is less than the minimum of 1"]
    ));
    assert!(!message_agrees(
        "Invalid value: \"a..b\": a lowercase RFC 1123 subdomain",
        &["Invalid value: \"a..b\": something else"]
    ));
    assert!(!message_agrees("names must be unique", &["other rule"]));
}

//! Every manifest in `examples/` parses into the typed API and validates against
//! the generated CRD schemas and CEL rules, as a cluster would accept it.

use std::path::PathBuf;

use runv_crds::validate::Validator;
use runv_crds::{MicroVM, SecureWorkload};

fn example_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_is_valid_and_typed() {
    let validator = Validator::new();
    let mut kinds = Vec::new();
    for path in example_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = validator
            .validate_yaml(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!docs.is_empty(), "{} has no object", path.display());
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "MicroVM" => {
                    let vm: MicroVM = serde_json::from_value(doc.clone())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_contained(
                        "spec",
                        &doc["spec"],
                        &serde_json::to_value(&vm.spec).unwrap(),
                    );
                }
                "SecureWorkload" => {
                    let swl: SecureWorkload = serde_json::from_value(doc.clone())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_contained(
                        "spec",
                        &doc["spec"],
                        &serde_json::to_value(&swl.spec).unwrap(),
                    );
                }
                other => panic!("{}: unexpected kind {other}", path.display()),
            }
            kinds.push(kind);
        }
    }
    for kind in ["MicroVM", "SecureWorkload"] {
        assert!(kinds.iter().any(|k| k == kind), "no example of {kind}");
    }
}

/// Every value the user wrote is present, unchanged, in `typed` (which may add defaults).
fn assert_contained(path: &str, user: &serde_json::Value, typed: &serde_json::Value) {
    use serde_json::Value;
    match (user, typed) {
        (Value::Object(u), Value::Object(t)) => {
            for (k, v) in u {
                let child = t
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} was dropped by the typed API"));
                assert_contained(&format!("{path}.{k}"), v, child);
            }
        }
        (Value::Array(u), Value::Array(t)) => {
            assert_eq!(u.len(), t.len(), "{path}: list length changed");
            for (i, (a, b)) in u.iter().zip(t).enumerate() {
                assert_contained(&format!("{path}[{i}]"), a, b);
            }
        }
        (u, t) => assert_eq!(u, t, "{path} changed"),
    }
}

#[test]
fn an_invalid_example_is_refused_with_the_field_named() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/microvm-minimal.yaml"),
    )
    .unwrap()
    .replace("memory: 64Mi", "memory: \"0\"");
    let err = Validator::new()
        .validate_yaml(&text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "MicroVM \"hello\" is invalid: spec.resources.memory: must be between 16Mi and 64Gi"
        ),
        "{err}"
    );
}

//! The generated CRDs: committed copies are fresh, the schemas are structural,
//! every CEL rule compiles and stays within the API server's cost budget.

use std::path::PathBuf;

use kube::core::cel::{CompiledSchema, ScopeContext, WarningKind, analyze_rule, compile_schema};
use runv_crds::generate;
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("every version has a schema"),
    )
    .unwrap()
}

#[test]
fn committed_crd_yaml_is_fresh() {
    // crds/yaml/, and the Helm chart's copy, which Helm installs as it is.
    for crd in generate::crds() {
        for dir in ["crds/yaml", "charts/runv/crds"] {
            let path = repo_root().join(dir).join(generate::file_name(&crd));
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == generate::crd_yaml(&crd).unwrap(),
                "{} is stale: run `cargo run -p runv-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn committed_api_reference_is_fresh() {
    let path = repo_root().join("docs/api.md");
    let committed = std::fs::read_to_string(&path).unwrap();
    let spliced =
        generate::splice_docs(&committed).expect("docs/api.md has the generated-section markers");
    assert!(
        committed == spliced,
        "docs/api.md field reference is stale: run `cargo run -p runv-crds --bin crdgen`"
    );
}

#[test]
fn crd_names_subresources_and_columns() {
    let crds = generate::crds();
    let mvm = &crds[0];
    assert_eq!(mvm.metadata.name.as_deref(), Some("microvms.runv.dev"));
    assert_eq!(mvm.spec.scope, "Namespaced");
    assert_eq!(
        mvm.spec.names.short_names.as_deref(),
        Some(&["mvm".to_owned()][..])
    );
    assert_eq!(
        mvm.spec.names.categories.as_deref(),
        Some(&["runv".to_owned()][..])
    );
    let v = &mvm.spec.versions[0];
    assert!(v.served && v.storage);
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some() && sub.scale.is_none());
    let cols: Vec<(&str, i32)> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.priority.unwrap_or(0)))
        .collect();
    assert_eq!(
        cols,
        [
            ("Phase", 0),
            ("Ready", 0),
            ("Node", 0),
            ("IP", 0),
            ("Age", 0),
            ("vCPUs", 1),
            ("Memory", 1),
            ("Boot ms", 1)
        ]
    );
    let selectable: Vec<_> = v
        .selectable_fields
        .as_ref()
        .unwrap()
        .iter()
        .map(|f| f.json_path.as_str())
        .collect();
    assert_eq!(selectable, [".status.nodeName", ".status.phase"]);

    let swl = &crds[1];
    assert_eq!(
        swl.spec.names.short_names.as_deref(),
        Some(&["swl".to_owned()][..])
    );
    let sub = swl.spec.versions[0].subresources.as_ref().unwrap();
    let scale = sub
        .scale
        .as_ref()
        .expect("SecureWorkload has the scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}

/// The structural-schema rules of apiextensions.k8s.io/v1: every node specifies a type
/// (or is int-or-string / preserves unknown fields), no `anyOf`/`oneOf` branch sets a
/// type, and there are no `$ref`s.
#[test]
fn schemas_are_structural() {
    fn check(path: &str, node: &Value, problems: &mut Vec<String>) {
        let Some(map) = node.as_object() else { return };
        let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if !map.contains_key("type") && !int_or_string && !preserve {
            problems.push(format!("{path}: no type"));
        }
        if map.contains_key("$ref") {
            problems.push(format!("{path}: $ref"));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for branch in map.get(key).and_then(Value::as_array).into_iter().flatten() {
                if branch.get("type").is_some() && !int_or_string {
                    problems.push(format!("{path}: {key} branch sets a type"));
                }
            }
        }
        if let Some(props) = map.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                check(&format!("{path}.{k}"), v, problems);
            }
        }
        if let Some(items) = map.get("items") {
            check(&format!("{path}[]"), items, problems);
        }
        if let Some(ap @ Value::Object(_)) = map.get("additionalProperties") {
            check(&format!("{path}{{}}"), ap, problems);
        }
    }
    for crd in generate::crds() {
        let mut problems = Vec::new();
        check("", &schema_of(&crd), &mut problems);
        assert!(
            problems.is_empty(),
            "{}: {problems:#?}",
            crd.spec.names.kind
        );
    }
}

/// Every rule compiles and is estimated within the API server's per-rule cost
/// budget, with no rule iterating an unbounded list, map or string.
#[test]
fn cel_rules_compile_within_cost_budget() {
    fn walk(
        path: &str,
        compiled: &CompiledSchema,
        raw: &Value,
        rules: &mut usize,
        problems: &mut Vec<String>,
    ) {
        for err in compiled.compilation_errors() {
            problems.push(format!("{path}: {err}"));
        }
        for rule in raw
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = rule["rule"].as_str().unwrap();
            *rules += 1;
            for w in analyze_rule(text, compiled, ScopeContext::CrdValidation) {
                if matches!(
                    w.kind,
                    WarningKind::CostExceeded | WarningKind::MissingBounds
                ) {
                    problems.push(format!("{path}: {}: {}", w.rule, w.message));
                }
            }
        }
        for (k, child) in &compiled.properties {
            walk(
                &format!("{path}.{k}"),
                child,
                &raw["properties"][k],
                rules,
                problems,
            );
        }
        if let Some(items) = &compiled.items {
            walk(&format!("{path}[]"), items, &raw["items"], rules, problems);
        }
    }
    for crd in generate::crds() {
        let raw = schema_of(&crd);
        let compiled = compile_schema(&raw);
        let (mut rules, mut problems) = (0, Vec::new());
        walk("", &compiled, &raw, &mut rules, &mut problems);
        assert!(
            problems.is_empty(),
            "{}: {problems:#?}",
            crd.spec.names.kind
        );
        assert!(
            rules >= 8,
            "{}: only {rules} rules found",
            crd.spec.names.kind
        );
    }
}

/// Every list and map in a spec is bounded, so that rules over them stay cheap
/// and a manifest cannot grow without limit.
#[test]
fn spec_lists_and_maps_are_bounded() {
    fn walk(path: &str, node: &Value, problems: &mut Vec<String>) {
        match node.get("type").and_then(Value::as_str) {
            Some("array") if node.get("maxItems").is_none() => {
                problems.push(format!("{path}: no maxItems"))
            }
            Some("object")
                if node
                    .get("additionalProperties")
                    .is_some_and(Value::is_object)
                    && node.get("maxProperties").is_none() =>
            {
                problems.push(format!("{path}: no maxProperties"))
            }
            _ => {}
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, problems);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
    }
    for crd in generate::crds() {
        let mut problems = Vec::new();
        walk(
            "spec",
            &schema_of(&crd)["properties"]["spec"],
            &mut problems,
        );
        // Toleration is Kubernetes' own type; its list is bounded by us, its fields are scalars.
        assert!(
            problems.is_empty(),
            "{}: {problems:#?}",
            crd.spec.names.kind
        );
    }
}

/// Every string a CEL rule can reach (anything below a node that carries a rule,
/// list items and map values included) has a maxLength, so the API server's cost
/// estimate for the rule is bounded. Map keys cannot carry a bound in a structural
/// schema; the API server bounds them itself (label and annotation keys are
/// qualified names) and the maps' maxProperties bounds how many there are.
#[test]
fn strings_reachable_by_rules_are_bounded() {
    fn strings(path: &str, node: &Value, problems: &mut Vec<String>) {
        let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        let is_string = node.get("type").and_then(Value::as_str) == Some("string");
        let bounded = node.get("maxLength").is_some() || node.get("enum").is_some();
        if (is_string || int_or_string) && !bounded {
            problems.push(format!("{path}: no maxLength"));
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                strings(&format!("{path}.{k}"), v, problems);
            }
        }
        if let Some(items) = node.get("items") {
            strings(&format!("{path}[]"), items, problems);
        }
        if let Some(values @ Value::Object(_)) = node.get("additionalProperties") {
            strings(&format!("{path}{{}}"), values, problems);
        }
    }
    // A rule that only asks whether fields are there (`has(self.a.b)`,
    // joined by `&&`, `||`, `!`) costs the same whatever the strings hold.
    fn presence_only(rules: &Value) -> bool {
        rules.as_array().is_some_and(|rules| {
            rules.iter().all(|r| {
                let rule = r["rule"].as_str().unwrap_or("self");
                let mut rest = rule.to_owned();
                while let Some(i) = rest.find("has(") {
                    let Some(end) = rest[i..].find(')') else {
                        break;
                    };
                    rest.replace_range(i..i + end + 1, "true");
                }
                !rest.contains("self")
            })
        })
    }
    fn rule_bearing(path: &str, node: &Value, problems: &mut Vec<String>) {
        let rules = node.get("x-kubernetes-validations");
        if rules.is_some_and(|r| !presence_only(r)) {
            // Everything below is reachable from this node's rules.
            strings(path, node, problems);
            return;
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                rule_bearing(&format!("{path}.{k}"), v, problems);
            }
        }
        if let Some(items) = node.get("items") {
            rule_bearing(&format!("{path}[]"), items, problems);
        }
        if let Some(values @ Value::Object(_)) = node.get("additionalProperties") {
            rule_bearing(&format!("{path}{{}}"), values, problems);
        }
    }
    for crd in generate::crds() {
        let mut problems = Vec::new();
        rule_bearing("", &schema_of(&crd), &mut problems);
        assert!(
            problems.is_empty(),
            "{}: {problems:#?}",
            crd.spec.names.kind
        );
    }
    // The label bounds are Kubernetes' own: a label value of 63 and a qualified key of 317.
    let swl = schema_of(&generate::crds()[1]);
    let selector = &swl["properties"]["spec"]["properties"]["selector"]["properties"];
    assert_eq!(
        selector["matchLabels"]["additionalProperties"]["maxLength"],
        63
    );
    let requirement = &selector["matchExpressions"]["items"]["properties"];
    assert_eq!(requirement["key"]["maxLength"], 317);
    assert_eq!(requirement["values"]["items"]["maxLength"], 63);
}

/// The cost check above can fail: a rule over an unbounded list is flagged.
#[test]
fn cost_check_flags_unbounded_rules() {
    let raw = serde_json::json!({
        "type": "array",
        "items": { "type": "string" },
        "x-kubernetes-validations": [{ "rule": "self.all(a, self.exists(b, a == b))" }]
    });
    let compiled = compile_schema(&raw);
    let warnings = analyze_rule(
        "self.all(a, self.exists(b, a == b))",
        &compiled,
        ScopeContext::CrdValidation,
    );
    assert!(
        warnings.iter().any(|w| matches!(
            w.kind,
            WarningKind::CostExceeded | WarningKind::MissingBounds
        )),
        "{warnings:?}"
    );
}

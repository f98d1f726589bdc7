//! Rules of the built-in kinds beyond the generic store: Namespace defaults,
//! Secret `stringData`, the two Event APIs over one store, and
//! CustomResourceDefinitions, whose creation serves their resources and
//! whose deletion removes their objects.
//!
//! Called by `objects` at fixed points of a write; it never parses requests.

use serde_json::{Value, json};

use crate::objects::{State, now};
use crate::registry::{Builtin, ResourceType, types_of_crd};
use crate::status::{ApiError, Cause};

/// Why a kind-specific step failed after the object was stored.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    /// A stored CRD could not be served.
    #[error("serving CRD: {0}")]
    Crd(#[from] crate::registry::RegistryError),
}

/// Storage key: both Event APIs share the core store, as in kube-apiserver.
pub fn store_key(rt: &ResourceType) -> String {
    match rt.builtin {
        Builtin::Event | Builtin::CoreEvent => "/events".into(),
        _ => rt.store_key(),
    }
}

const EVENT_FIELDS: [(&str, &str); 8] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingInstance", "reportingInstance"),
];

fn rename(obj: &Value, to_core: bool) -> Value {
    let mut out = obj.clone();
    if let Some(m) = out.as_object_mut() {
        for (new, core) in EVENT_FIELDS {
            let (from, to) = if to_core { (new, core) } else { (core, new) };
            if let Some(v) = m.remove(from) {
                m.insert(to.into(), v);
            }
        }
    }
    out
}

/// The stored form of an object written through `rt`.
pub fn convert_in(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = if rt.builtin == Builtin::Event {
        rename(obj, true)
    } else {
        obj.clone()
    };
    if rt.builtin == Builtin::Event || rt.builtin == Builtin::CoreEvent {
        o["apiVersion"] = json!("v1");
    } else if rt.version != rt.storage_version {
        o["apiVersion"] = json!(if rt.group.is_empty() {
            rt.storage_version.clone()
        } else {
            format!("{}/{}", rt.group, rt.storage_version)
        });
    }
    o
}

/// A stored object as `rt` shows it (apiVersion is set by the caller).
pub fn convert_out(rt: &ResourceType, obj: &Value) -> Value {
    if rt.builtin == Builtin::Event {
        rename(obj, false)
    } else {
        obj.clone()
    }
}

/// Standard base64 with padding, as Secret `data` holds it.
pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_base64(s: &str) -> bool {
    s.len().is_multiple_of(4)
        && s.trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The top-level fields of a built-in kind.
fn top_level(rt: &ResourceType) -> &'static [&'static str] {
    match rt.builtin {
        Builtin::ConfigMap => &["data", "binaryData", "immutable"],
        Builtin::Secret => &["data", "stringData", "type", "immutable"],
        Builtin::Namespace | Builtin::Node | Builtin::Crd => &["spec", "status"],
        Builtin::Lease => &["spec"],
        Builtin::CoreEvent => &[
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ],
        // Written through the events.k8s.io names, stored as core names.
        Builtin::Event => &[
            "regarding",
            "reason",
            "note",
            "deprecatedSource",
            "deprecatedFirstTimestamp",
            "deprecatedLastTimestamp",
            "deprecatedCount",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingController",
            "reportingInstance",
        ],
        Builtin::Custom => &[],
    }
}

/// Drops unknown top-level fields of a built-in object; returns their names.
/// (Nested fields of built-ins are stored as sent.)
pub fn prune_top_level(rt: &ResourceType, obj: &mut Value) -> Vec<String> {
    let allowed = top_level(rt);
    let Some(m) = obj.as_object_mut() else {
        return Vec::new();
    };
    let unknown: Vec<String> = m
        .keys()
        .filter(|k| {
            !["apiVersion", "kind", "metadata"].contains(&k.as_str())
                && !allowed.contains(&k.as_str())
        })
        .cloned()
        .collect();
    for k in &unknown {
        m.remove(k);
    }
    unknown
}

/// Server defaults applied on create.
pub fn prepare_create(rt: &ResourceType, obj: &mut Value) {
    match rt.builtin {
        Builtin::Namespace => {
            let name = obj["metadata"]["name"].clone();
            if obj["metadata"]["labels"].is_null() {
                obj["metadata"]["labels"] = json!({});
            }
            // A malformed labels value is left for metadata validation to refuse.
            if let Some(labels) = obj["metadata"]["labels"].as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), name);
            }
            obj["spec"] = json!({ "finalizers": ["kubernetes"] });
            obj["status"] = json!({ "phase": "Active" });
        }
        Builtin::Secret | Builtin::ConfigMap => {}
        _ => {}
    }
    prepare_write(rt, obj);
}

/// Server normalization applied on every write.
fn prepare_write(rt: &ResourceType, obj: &mut Value) {
    if rt.builtin == Builtin::Secret {
        if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
            if obj["data"].is_null() {
                obj["data"] = json!({});
            }
            // A malformed data value is left for validation to refuse.
            if let Some(data) = obj["data"].as_object_mut() {
                for (k, v) in sd {
                    let enc = base64_encode(v.as_str().unwrap_or_default().as_bytes());
                    data.insert(k, json!(enc));
                }
            }
        }
        if obj["type"].as_str().unwrap_or_default().is_empty() {
            obj["type"] = json!("Opaque");
        }
    }
}

fn invalid(rt: &ResourceType, obj: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::Invalid {
        kind: rt.kind.clone(),
        group: rt.group.clone(),
        name: obj["metadata"]["name"].as_str().unwrap_or_default().into(),
        causes,
    }
}

/// Kind-specific validation on create (`old` None) and update.
pub fn validate(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    if old.is_some() {
        prepare_write(rt, obj);
    }
    let mut causes = Vec::new();
    match rt.builtin {
        Builtin::ConfigMap | Builtin::Secret => {
            for (field, b64) in [
                ("data", rt.builtin == Builtin::Secret),
                ("binaryData", true),
            ] {
                match &obj[field] {
                    Value::Null => {}
                    Value::Object(m) => {
                        for (k, v) in m {
                            let ok = v.as_str().is_some_and(|s| !b64 || is_base64(s));
                            if !ok {
                                causes.push(Cause::invalid(
                                    format!("{field}[{k}]"),
                                    v,
                                    if b64 {
                                        "must be a base64-encoded string"
                                    } else {
                                        "must be a string"
                                    },
                                ));
                            }
                        }
                    }
                    other => causes.push(Cause::invalid(field, other, "must be a map of strings")),
                }
            }
        }
        Builtin::Crd => causes.extend(crd_causes(obj, old)),
        Builtin::Lease => {
            if let Some(d) = obj["spec"].get("leaseDurationSeconds")
                && !d.is_null()
                && d.as_i64().is_none_or(|d| d <= 0)
            {
                causes.push(Cause::invalid(
                    "spec.leaseDurationSeconds",
                    d,
                    "must be greater than 0",
                ));
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(rt, obj, causes))
    }
}

fn crd_causes(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if group.is_empty() || !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &spec["group"],
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            field: "spec.names.plural".into(),
            message: "Required value".into(),
        });
    }
    if spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            field: "spec.names.kind".into(),
            message: "Required value".into(),
        });
    }
    if name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &obj["metadata"]["name"],
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if !matches!(spec["scope"].as_str(), Some("Namespaced") | Some("Cluster")) {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                spec["scope"]
            ),
        });
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            field: "spec.versions".into(),
            message: "Required value: must have exactly one version marked as storage version"
                .into(),
        });
    } else if versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count()
        != 1
    {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must have exactly one version marked as storage version",
        ));
    }
    if let Some(old) = old {
        for f in ["group", "scope"] {
            if old["spec"][f] != spec[f] {
                causes.push(Cause::invalid(
                    format!("spec.{f}"),
                    &spec[f],
                    "field is immutable",
                ));
            }
        }
    }
    for (i, v) in versions.iter().enumerate() {
        let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
        match v["schema"].get("openAPIV3Schema") {
            Some(schema) if schema.is_object() => {
                structural_causes(schema, &path, Level::Root, &mut causes);
            }
            _ => causes.push(Cause::required(path, "schemas are required")),
        }
    }
    if causes.is_empty()
        && let Err(e) = types_of_crd(obj)
    {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!("object"),
            &e.to_string(),
        ));
    }
    causes
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Field,
    Item,
}

/// The structural-schema and CEL checks kube-apiserver makes on a CRD
/// version's schema, for the parts this server checks: every node has a
/// `type` (unless it is int-or-string, preserves unknown fields or embeds a
/// resource), and every `x-kubernetes-validations` rule and
/// `messageExpression` parses as CEL. Type-checking of CEL, cost limits,
/// and the other structural rules (no `type` inside `allOf`/`anyOf`/`oneOf`/
/// `not`, metadata restrictions, defaults that must prune cleanly) are not
/// checked.
fn structural_causes(schema: &Value, path: &str, level: Level, causes: &mut Vec<Cause>) {
    let ext = |k: &str| schema[k] == json!(true);
    if schema["type"].as_str().unwrap_or_default().is_empty()
        && !ext("x-kubernetes-int-or-string")
        && !ext("x-kubernetes-preserve-unknown-fields")
        && !ext("x-kubernetes-embedded-resource")
    {
        causes.push(Cause::required(
            format!("{path}.type"),
            match level {
                Level::Root => "must not be empty at the root",
                Level::Field => "must not be empty for specified object fields",
                Level::Item => "must not be empty for specified array items",
            },
        ));
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for (i, rule) in rules.iter().enumerate() {
            let one = json!({ "x-kubernetes-validations": [rule] });
            let compiled = kube::core::cel::compile_schema(&one);
            if let Some(e) = compiled.compilation_errors().first() {
                let field = if rule["messageExpression"].is_string()
                    && rule["rule"].is_string()
                    && e.to_string()
                        .starts_with("failed to compile messageExpression")
                {
                    "messageExpression"
                } else {
                    "rule"
                };
                causes.push(Cause::invalid(
                    format!("{path}.x-kubernetes-validations[{i}].{field}"),
                    &rule[field],
                    &format!("compilation failed: {e}"),
                ));
            }
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        for (k, v) in props {
            structural_causes(v, &format!("{path}.properties[{k}]"), Level::Field, causes);
        }
    }
    if schema["additionalProperties"].is_object() {
        structural_causes(
            &schema["additionalProperties"],
            &format!("{path}.additionalProperties"),
            Level::Field,
            causes,
        );
    }
    if schema["items"].is_object() {
        structural_causes(
            &schema["items"],
            &format!("{path}.items"),
            Level::Item,
            causes,
        );
    }
}

/// After an object is stored: CRDs start serving and get their status.
pub fn after_write(state: &mut State, rt: &ResourceType, stored: &Value) -> Result<(), KindError> {
    if rt.builtin != Builtin::Crd || !stored["metadata"]["deletionTimestamp"].is_null() {
        return Ok(());
    }
    let conflicts = name_conflicts(state, stored);
    if conflicts.is_empty() {
        state.registry.add_crd(stored)?;
    } else {
        // As kube-apiserver's naming controller: the CRD is stored but not served.
        let name = stored["metadata"]["name"].as_str().unwrap_or_default();
        state.registry.remove_crd(name);
    }
    let accepted = |ty: &str| {
        stored["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == ty && c["status"] == "True"))
    };
    let names = &stored["spec"]["names"];
    if !conflicts.is_empty() {
        if accepted("NamesAccepted") || stored["status"]["conditions"].is_null() {
            let mut obj = stored.clone();
            let t = now();
            obj["status"] = json!({
                "acceptedNames": {"plural": "", "kind": ""},
                "conditions": [
                    { "type": "NamesAccepted", "status": "False", "reason": "NameConflict",
                      "message": conflicts.join(", "), "lastTransitionTime": t },
                    { "type": "Established", "status": "False", "reason": "NotAccepted",
                      "message": "not all names are accepted", "lastTransitionTime": t },
                ],
                "storedVersions": [],
            });
            state.controller_put(rt, obj);
        }
        return Ok(());
    }
    if !accepted("Established") || stored["status"]["acceptedNames"] != *names {
        let mut obj = stored.clone();
        let t = now();
        let cond = |ty: &str, reason: &str, msg: &str| json!({ "type": ty, "status": "True", "reason": reason, "message": msg, "lastTransitionTime": t });
        let stored_versions: Vec<Value> = stored["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"] == json!(true))
            .map(|v| v["name"].clone())
            .collect();
        obj["status"] = json!({
            "acceptedNames": names,
            "conditions": [
                cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "storedVersions": stored_versions,
        });
        state.controller_put(rt, obj);
    }
    Ok(())
}

/// The names of `crd` that another CRD of its group already serves, worded as
/// kube-apiserver's naming controller words them: plural, singular and short
/// names share one namespace, kinds and list kinds another.
fn name_conflicts(state: &State, crd: &Value) -> Vec<String> {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    let group = &crd["spec"]["group"];
    let mut resources: Vec<String> = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    for other in state
        .store
        .list("apiextensions.k8s.io/customresourcedefinitions", None)
    {
        if other["metadata"]["name"] == name || other["spec"]["group"] != *group {
            continue;
        }
        // What the other CRD was granted: nothing if its own names were refused.
        let names = if other["status"]["acceptedNames"].is_object() {
            &other["status"]["acceptedNames"]
        } else {
            &other["spec"]["names"]
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        resources.push(text(&names["plural"]));
        resources.push(text(&names["singular"]));
        resources.extend(
            names["shortNames"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text),
        );
        kinds.push(text(&names["kind"]));
        kinds.push(text(&names["listKind"]));
    }
    resources.retain(|r| !r.is_empty());
    kinds.retain(|k| !k.is_empty());
    let names = &crd["spec"]["names"];
    let mut wanted: Vec<(&str, bool)> = vec![
        (names["plural"].as_str().unwrap_or_default(), true),
        (names["singular"].as_str().unwrap_or_default(), true),
    ];
    wanted.extend(
        names["shortNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|s| (s, true)),
    );
    wanted.push((names["kind"].as_str().unwrap_or_default(), false));
    wanted.push((names["listKind"].as_str().unwrap_or_default(), false));
    wanted
        .into_iter()
        .filter(|(n, is_resource)| {
            !n.is_empty()
                && if *is_resource {
                    resources.iter().any(|r| r == n)
                } else {
                    kinds.iter().any(|k| k == n)
                }
        })
        .map(|(n, _)| format!("{n:?} is already in use"))
        .collect()
}

/// After an object is removed: a CRD stops serving and its objects go.
pub fn after_delete(state: &mut State, rt: &ResourceType, gone: &Value) {
    if rt.builtin != Builtin::Crd {
        return;
    }
    let name = gone["metadata"]["name"].as_str().unwrap_or_default();
    let group = gone["spec"]["group"].as_str().unwrap_or_default();
    let plural = gone["spec"]["names"]["plural"].as_str().unwrap_or_default();
    state.registry.remove_crd(name);
    let key = format!("{group}/{plural}");
    for obj in state.store.list(&key, None) {
        let (ns, n) = crate::store::key_of(&obj);
        state.store.remove(&key, &ns, &n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_encodes() {
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_encode(b"hi!"), "aGkh");
        assert!(is_base64("aGVsbG8="));
        assert!(!is_base64("not base64"));
    }

    #[test]
    fn events_rename_both_ways() {
        let e = json!({"regarding": {"name": "x"}, "note": "n", "reason": "R"});
        let core = rename(&e, true);
        assert_eq!(core["involvedObject"]["name"], "x");
        assert_eq!(core["message"], "n");
        assert_eq!(rename(&core, false), e);
    }
}

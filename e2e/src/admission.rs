//! Admission of objects before they are stored: metadata rules, and for
//! custom resources pruning of unknown fields, schema defaulting, structural
//! validation and CEL `x-kubernetes-validations`, in kube-apiserver's order
//! (decode and prune, default, validate schema, then CEL with `oldSelf`).
//!
//! Errors come back as 422 `Invalid` with one cause per field, worded like
//! apimachinery's field errors. This module changes only the object it is
//! given; it never stores anything.

use kube::core::cel::{Validator as CelValidator, apply_defaults};
use runv_crds::{names, validate};
use serde_json::{Map, Value};

use crate::registry::{Builtin, ResourceType, Schema};
use crate::status::{ApiError, Cause, render_value};

/// What to do with unknown fields (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and warn.
    Warn,
    /// Refuse the request.
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter; unset means `Warn`, as in kube-apiserver.
    pub fn parse(v: Option<&str>) -> Result<Self, ApiError> {
        match v {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::BadRequest(format!(
                "fieldValidation {other:?} is invalid: valid values are Ignore, Warn, Strict"
            ))),
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

/// What strict field validation answers for unknown fields, worded as
/// kube-apiserver's decoder does.
pub fn strict_decoding_error(rt: &ResourceType, unknown: &[String]) -> ApiError {
    ApiError::BadRequest(format!(
        "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
        rt.kind,
        rt.version,
        rt.kind,
        unknown_field_warnings(unknown).join(", ")
    ))
}

/// One `unknown field "path"` line per pruned field, as warnings or errors.
pub fn unknown_field_warnings(unknown: &[String]) -> Vec<String> {
    unknown
        .iter()
        .map(|u| format!("unknown field {u:?}"))
        .collect()
}

/// Checks the metadata of a built-in kind: name, labels, annotations. A
/// custom resource's metadata is checked in [`admit_custom`], after unknown
/// fields and together with its schema, as kube-apiserver does.
pub fn validate_metadata(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    if rt.builtin == Builtin::Custom {
        return Ok(());
    }
    let (causes, _) = metadata_causes(rt, obj);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(rt, obj, causes))
    }
}

/// The API server's checks of `metadata`, one cause per refused field, and
/// whether one of them skips the CEL rules.
fn metadata_causes(rt: &ResourceType, obj: &Value) -> (Vec<Cause>, bool) {
    let name_rule = if rt.kind == "Namespace" {
        names::dns1123_label
    } else {
        names::dns1123_subdomain
    };
    let errors = validate::metadata_errors(&obj["metadata"], name_rule);
    let causes = errors
        .iter()
        .map(|e| Cause {
            reason: e.reason().into(),
            field: e.field().into(),
            message: e.message(),
        })
        .collect();
    (causes, errors.iter().any(validate::MetaError::is_blocking))
}

/// Removes fields the schema does not declare; returns their dotted paths.
pub fn prune(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let Some(map) = obj.as_object_mut() {
        let mut root = schema.clone();
        if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
            for k in ["apiVersion", "kind"] {
                props.insert(k.into(), serde_json::json!({"type": "string"}));
            }
            props.insert(
                "metadata".into(),
                serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        }
        prune_map(&root, map, "", &mut unknown);
    }
    unknown
}

fn prune_value(schema: &Value, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match v {
        Value::Object(map) => prune_map(schema, map, path, unknown),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

fn prune_map(schema: &Value, map: &mut Map<String, Value>, path: &str, unknown: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
    let embedded = schema["x-kubernetes-embedded-resource"] == Value::Bool(true);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            let child_path = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match props.get(&k) {
                Some(s) => {
                    if let Some(v) = map.get_mut(&k) {
                        prune_value(s, v, &child_path, unknown);
                    }
                }
                None if preserve
                    || (embedded && ["apiVersion", "kind", "metadata"].contains(&k.as_str())) => {}
                None => {
                    map.remove(&k);
                    unknown.push(child_path);
                }
            }
        }
    } else if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        for (k, v) in map.iter_mut() {
            prune_value(add, v, &format!("{path}.{k}"), unknown);
        }
    } else if !preserve && schema.get("type") == Some(&Value::String("object".into())) {
        // An object with neither properties nor additionalProperties keeps nothing.
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            map.remove(&k);
            unknown.push(if path.is_empty() {
                k
            } else {
                format!("{path}.{k}")
            });
        }
    }
}

/// The schema node at a dotted path (`spec.disks[0].size`).
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = schema;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            cur = cur
                .get("properties")
                .and_then(|p| p.get(name))
                .or_else(|| cur.get("additionalProperties"))?;
        }
        for _ in rest.matches(']') {
            cur = cur
                .get("items")
                .or_else(|| cur.get("additionalProperties"))?;
        }
    }
    Some(cur)
}

/// The schema node that declares `rule`, found on the way from the root to the
/// field an error names: the deepest node on that path carrying the rule.
fn rule_owner<'a>(schema: &'a Value, path: &str, rule: &str) -> Option<&'a Value> {
    let declares = |node: &Value| {
        node.get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .is_some_and(|rules| rules.iter().any(|r| r["rule"] == rule))
    };
    let mut owner = declares(schema).then_some(schema);
    let mut cur = schema;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            let Some(next) = cur
                .get("properties")
                .and_then(|p| p.get(name))
                .or_else(|| cur.get("additionalProperties"))
            else {
                break;
            };
            cur = next;
            if declares(cur) {
                owner = Some(cur);
            }
        }
        for _ in rest.matches(']') {
            let Some(next) = cur.get("items").or_else(|| cur.get("additionalProperties")) else {
                return owner;
            };
            cur = next;
            if declares(cur) {
                owner = Some(cur);
            }
        }
    }
    owner.or_else(|| schema_at(schema, path))
}

fn schema_causes(schema: &Schema, obj: &Value) -> Vec<Cause> {
    use jsonschema::error::ValidationErrorKind as K;
    schema
        .validator
        .iter_errors(obj)
        .map(|e| {
            let field = validate::schema_error_field(&e);
            match e.kind() {
                K::Required { .. } => Cause {
                    reason: "FieldValueRequired".into(),
                    field,
                    message: "Required value".into(),
                },
                K::Enum { options } => Cause {
                    reason: "FieldValueNotSupported".into(),
                    message: format!(
                        "Unsupported value: {}: supported values: {}",
                        render_value(e.instance()),
                        options
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(render_value)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    field,
                },
                // The wording of kube-openapi's validation errors, as the API server
                // turns them into field errors.
                K::MaxLength { limit } => Cause {
                    reason: "FieldValueTooLong".into(),
                    message: format!("Too long: may not be more than {limit} bytes"),
                    field,
                },
                // kube-apiserver reports too many map entries as it does too many items.
                K::MaxProperties { limit } => Cause {
                    reason: "FieldValueTooMany".into(),
                    message: format!(
                        "Too many: {}: must have at most {limit} items",
                        e.instance().as_object().map_or(0, Map::len)
                    ),
                    field,
                },
                K::MaxItems { limit } => Cause {
                    reason: "FieldValueTooMany".into(),
                    message: format!(
                        "Too many: {}: must have at most {limit} items",
                        e.instance().as_array().map_or(0, Vec::len)
                    ),
                    field,
                },
                K::Type { kind } => {
                    let want = match kind {
                        jsonschema::error::TypeKind::Single(t) => t.to_string(),
                        // A nullable field's `null` is the rewrite's, not a type
                        // the API server names.
                        jsonschema::error::TypeKind::Multiple(ts) => ts
                            .iter()
                            .map(|t| t.to_string())
                            .filter(|t| t != "null")
                            .collect::<Vec<_>>()
                            .join(","),
                    };
                    let got = Value::String(json_type(e.instance()).into());
                    Cause {
                        reason: "FieldValueTypeInvalid".into(),
                        message: format!(
                            "Invalid value: {}: {field} in body must be of type {want}: {}",
                            render_value(&got),
                            render_value(&got)
                        ),
                        field,
                    }
                }
                kind => {
                    let detail = match kind {
                        K::Pattern { pattern } => format!("should match '{pattern}'"),
                        K::Minimum { limit } => {
                            format!("should be greater than or equal to {limit}")
                        }
                        K::Maximum { limit } => format!("should be less than or equal to {limit}"),
                        K::MinLength { limit } => format!("should be at least {limit} chars long"),
                        K::MinItems { limit } => format!("should have at least {limit} items"),
                        K::MinProperties { limit } => {
                            format!("should have at least {limit} properties")
                        }
                        _ => {
                            return Cause {
                                reason: "FieldValueInvalid".into(),
                                message: format!(
                                    "Invalid value: {}: {}",
                                    render_value(e.instance()),
                                    e
                                ),
                                field,
                            };
                        }
                    };
                    Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!(
                            "Invalid value: {}: {field} in body {detail}",
                            render_value(e.instance())
                        ),
                        field,
                    }
                }
            }
        })
        .collect()
}

/// The JSON type name of a value, as the API server names it in type errors.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Prunes, defaults and validates a custom resource. `old` is the stored
/// object on updates (for CEL transition rules). Returns the unknown fields
/// that were pruned, for warnings.
pub fn admit_custom(
    rt: &ResourceType,
    cel: &CelValidator,
    obj: &mut Value,
    old: Option<&Value>,
    fv: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = rt.schema.as_ref() else {
        let (causes, _) = metadata_causes(rt, obj);
        return if causes.is_empty() {
            Ok(Vec::new())
        } else {
            Err(invalid(rt, obj, causes))
        };
    };
    let unknown = prune(&schema.structural, obj);
    if fv == FieldValidation::Strict && !unknown.is_empty() {
        return Err(strict_decoding_error(rt, &unknown));
    }
    let meta = obj["metadata"].take();
    let mut defaulted = apply_defaults(&schema.structural, obj);
    defaulted["metadata"] = meta;
    *obj = defaulted;
    // Metadata and schema errors come together, as from apiextensions'
    // customResourceValidator.
    let (mut causes, meta_blocking) = metadata_causes(rt, obj);
    causes.extend(schema_causes(schema, obj));
    // The API server's own check of `x-kubernetes-list-type: map` keys.
    let mut duplicates = Vec::new();
    validate::list_map_duplicates(&schema.structural, obj, "", &mut duplicates);
    causes.extend(duplicates.into_iter().map(|d| Cause {
        reason: "FieldValueDuplicate".into(),
        field: d.field,
        message: d.message,
    }));
    // CEL rules need values of the declared types and sizes: a blocking error
    // (required, too long, too many, unsupported, wrong type) skips them and says so,
    // as kube-apiserver does; pattern and bound errors do not.
    let blocking = meta_blocking
        || schema
            .validator
            .iter_errors(obj)
            .any(|e| validate::is_blocking(e.kind()));
    if blocking {
        causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            field: String::new(),
            message: format!("Invalid value: null: {}", validate::RULES_NOT_CHECKED),
        });
    } else {
        causes.extend(cel_causes(schema, cel, obj, old));
    }
    if causes.is_empty() {
        Ok(unknown)
    } else {
        Err(invalid(rt, obj, causes))
    }
}

/// The CEL rules' errors, worded as kube-apiserver words them.
fn cel_causes(schema: &Schema, cel: &CelValidator, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let Err(errors) = cel.validate_compiled(&schema.cel, obj, old) else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            // The value shown is the type of the schema node that declares the rule,
            // which is not the reported field when the rule has a `fieldPath`.
            let ty = rule_owner(&schema.structural, &e.field_path, &e.rule)
                .and_then(|s| s["type"].as_str())
                .unwrap_or("object");
            let ty = Value::String(ty.into());
            let reason = e
                .reason
                .clone()
                .unwrap_or_else(|| "FieldValueInvalid".into());
            let message = match reason.as_str() {
                "FieldValueRequired" => format!("Required value: {}", e.message),
                "FieldValueForbidden" => format!("Forbidden: {}", e.message),
                "FieldValueDuplicate" => format!("Duplicate value: {}", render_value(&ty)),
                _ => format!("Invalid value: {}: {}", render_value(&ty), e.message),
            };
            Cause {
                reason,
                // A rule on the object itself names `.spec.x`; kube-apiserver
                // reports `spec.x`.
                field: e.field_path.trim_start_matches('.').to_owned(),
                message,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prunes_unknown_fields_but_keeps_preserved_ones() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"},
              "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}});
        let mut obj = json!({"apiVersion": "g/v", "kind": "K", "metadata": {"name": "x", "labels": {"a": "b"}},
            "spec": {"a": "1", "b": 2, "free": {"z": 1}}, "extra": true});
        let unknown = prune(&schema, &mut obj);
        assert_eq!(unknown, vec!["extra".to_string(), "spec.b".to_string()]);
        assert_eq!(obj["spec"], json!({"a": "1", "free": {"z": 1}}));
        assert_eq!(obj["metadata"]["labels"]["a"], "b");
    }

    /// Int-or-string (nullable or not) and map sizes are worded as kube-apiserver
    /// words them, not as JSON Schema's `anyOf` and `maxProperties`.
    #[test]
    fn schema_errors_are_worded_as_kube_apiserver_words_them() {
        let structural = json!({"type": "object", "properties": {
            "n": {"x-kubernetes-int-or-string": true, "nullable": true},
            "m": {"type": "object", "maxProperties": 1,
                  "additionalProperties": {"type": "string"}}}});
        let schema = Schema {
            validator: jsonschema::validator_for(&validate::to_json_schema(&structural)).unwrap(),
            cel: kube::core::cel::compile_schema(&structural),
            structural,
        };
        let causes = schema_causes(&schema, &json!({"n": [1], "m": {"a": "x", "b": "y"}}));
        let got: Vec<(&str, &str, &str)> = causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str(), c.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "m",
                    "FieldValueTooMany",
                    "Too many: 2: must have at most 1 items"
                ),
                (
                    "n",
                    "FieldValueTypeInvalid",
                    r#"Invalid value: "array": n in body must be of type integer,string: "array""#
                ),
            ]
        );
        assert!(schema_causes(&schema, &json!({"n": null, "m": {}})).is_empty());
        assert!(schema_causes(&schema, &json!({"n": "25%"})).is_empty());
    }
}

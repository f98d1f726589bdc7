//! Offline validation of runv manifests, as the API server would do it at
//! apply time: unknown fields refused alone, as by `kubectl`'s strict field
//! validation while decoding; then, with schema defaults applied, `metadata`
//! (name, label and annotation keys, label values, by [`crate::names`]), the
//! structural OpenAPI schema of the generated CRD (types, bounds, patterns),
//! the uniqueness of keys in `x-kubernetes-list-type: map` lists, and every
//! CEL `x-kubernetes-validations` rule.
//!
//! As on the API server, the CEL rules are skipped only when an error is one
//! that makes them unsafe to run (a wrong type, a missing required field or
//! name, a value that is too long or not one of an enum, too many items or
//! entries); after a pattern, minimum or maximum error they still run, so
//! every rule must hold up on such values.
//!
//! Standalone mode uses this so a bad manifest fails on the same fields as it
//! would on a cluster, with the same messages except for structural schema
//! errors, which keep JSON Schema's wording; tests use it to pin each rule's
//! message, and `e2e/tests/validation_corpus.rs` checks it against the test
//! server case by case. It does not admit or store anything.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{Validator as CelValidator, compile_schema};
use serde_json::Value;

use crate::{generate, names};

/// One rejected field, worded like the API server's `Invalid` status causes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`spec.resources.memory`), empty for the object itself.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Why a manifest was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The text is not YAML or JSON.
    #[error("manifest is not valid YAML")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// A document is not an object with `apiVersion` and `kind`.
    #[error("document {index} is not a Kubernetes object: it needs apiVersion and kind")]
    NotAnObject {
        /// Zero-based document index in the stream.
        index: usize,
    },
    /// The kind is not one of runv's.
    #[error(
        "{api_version} {kind} is not a runv kind (expected runv.dev/v1alpha1 MicroVM or SecureWorkload)"
    )]
    UnknownKind {
        /// The object's apiVersion.
        api_version: String,
        /// The object's kind.
        kind: String,
    },
    /// The object breaks its schema or a CEL rule.
    #[error("{kind} {name:?} is invalid: {}", join(.errors))]
    Invalid {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// Every rejected field.
        errors: Vec<FieldError>,
    },
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

struct Kind {
    api_version: String,
    kind: String,
    schema: Value,
    structural: jsonschema::Validator,
    cel: kube::core::cel::CompiledSchema,
}

/// What the API server adds when it skips the CEL rules because of a blocking error.
pub const RULES_NOT_CHECKED: &str = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

/// Validates runv objects against the generated CRDs.
pub struct Validator {
    kinds: Vec<Kind>,
    cel: CelValidator,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<_> = self.kinds.iter().map(|k| k.kind.as_str()).collect();
        f.debug_struct("Validator").field("kinds", &kinds).finish()
    }
}

impl Default for Validator {
    fn default() -> Self {
        Self::new()
    }
}

impl Validator {
    /// A validator for every runv kind.
    pub fn new() -> Self {
        let kinds = generate::crds().iter().flat_map(kinds_of).collect();
        Self {
            kinds,
            cel: CelValidator::new(),
        }
    }

    /// Validates one object as a create (`old` is `None`) or an update of `old`.
    ///
    /// In kube-apiserver's order: unknown fields fail the request alone (strict
    /// field validation refuses them while decoding); then schema defaults are
    /// applied, and metadata, the structural schema, list-map keys and (unless a
    /// blocking error came first) the CEL rules are checked together.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Result<(), ValidateError> {
        let api_version = str_at(obj, "apiVersion");
        let kind_name = str_at(obj, "kind");
        let kind = self
            .kinds
            .iter()
            .find(|k| k.api_version == api_version && k.kind == kind_name)
            .ok_or_else(|| ValidateError::UnknownKind {
                api_version: api_version.to_owned(),
                kind: kind_name.to_owned(),
            })?;
        let invalid = |errors: Vec<FieldError>| ValidateError::Invalid {
            kind: kind_name.to_owned(),
            name: str_at(&obj["metadata"], "name").to_owned(),
            errors,
        };
        let unknown = unknown_fields(&kind.structural, obj);
        if !unknown.is_empty() {
            return Err(invalid(unknown));
        }
        let obj = &defaulted(&kind.schema, obj);

        let meta = metadata_errors(
            &with_generated_name(&obj["metadata"]),
            names::dns1123_subdomain,
        );
        let mut blocking = meta.iter().any(MetaError::is_blocking);
        let mut errors: Vec<FieldError> = meta.iter().map(MetaError::to_field_error).collect();
        for e in kind.structural.iter_errors(obj) {
            blocking |= is_blocking(e.kind());
            errors.push(FieldError {
                field: schema_error_field(&e),
                message: e.to_string(),
            });
        }
        list_map_duplicates(&kind.schema, obj, "", &mut errors);
        // CEL rules need values of the declared types and sizes, so a blocking error
        // skips them, as on the API server; other schema errors do not.
        if blocking {
            errors.push(FieldError {
                field: String::new(),
                message: RULES_NOT_CHECKED.into(),
            });
        } else if let Err(cel_errors) = self.cel.validate_compiled(&kind.cel, obj, old) {
            errors.extend(cel_errors.iter().map(|e| FieldError {
                // A rule on the object itself names `.spec.x`; the API
                // server reports `spec.x`.
                field: e.field_path.trim_start_matches('.').to_owned(),
                message: e.message.clone(),
            }));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(invalid(errors))
        }
    }

    /// Parses a multi-document YAML stream and validates every object in it as a create.
    pub fn validate_yaml(&self, text: &str) -> Result<Vec<Value>, ValidateError> {
        let docs = parse_documents(text)?;
        for doc in &docs {
            self.validate(doc, None)?;
        }
        Ok(docs)
    }
}

/// Splits a YAML stream into its non-empty documents, each an object with apiVersion and kind.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ValidateError> {
    let mut docs = Vec::new();
    for (index, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(de)?;
        if value.is_null() {
            continue;
        }
        if !value.is_object() || value.get("apiVersion").is_none() || value.get("kind").is_none() {
            return Err(ValidateError::NotAnObject { index });
        }
        docs.push(value);
    }
    Ok(docs)
}

fn kinds_of(crd: &CustomResourceDefinition) -> Vec<Kind> {
    crd.spec
        .versions
        .iter()
        .filter_map(|v| {
            let schema = v.schema.as_ref()?.open_api_v3_schema.as_ref()?;
            let schema = serde_json::to_value(schema).ok()?;
            let structural = jsonschema::validator_for(&to_json_schema(&schema)).ok()?;
            Some(Kind {
                api_version: format!("{}/{}", crd.spec.group, v.name),
                kind: crd.spec.names.kind.clone(),
                cel: compile_schema(&schema),
                schema,
                structural,
            })
        })
        .collect()
}

/// Rewrites a Kubernetes structural schema into plain JSON Schema: `nullable`
/// becomes a `null` type, int-or-string the types integer and string, and objects with declared
/// properties refuse unknown fields (kubectl's default strict field validation)
/// unless they preserve them. `metadata` is left to [`metadata_errors`].
pub fn to_json_schema(schema: &Value) -> Value {
    let mut out = schema.clone();
    rewrite(&mut out);
    // The API server supplies these for every kind; CRD schemas leave them out.
    if let Some(props) = out.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), serde_json::json!({ "type": "string" }));
        props.insert("kind".into(), serde_json::json!({ "type": "string" }));
        props.insert("metadata".into(), serde_json::json!({ "type": "object" }));
    }
    out
}

fn rewrite(v: &mut Value) {
    let Some(map) = v.as_object_mut() else { return };
    // The API server validates int-or-string as the two types, and so words a
    // wrong type (`must be of type integer,string`).
    if map.remove("x-kubernetes-int-or-string") == Some(Value::Bool(true)) {
        map.insert("type".into(), serde_json::json!(["integer", "string"]));
    }
    if map.remove("nullable") == Some(Value::Bool(true)) {
        match map.get_mut("type") {
            Some(Value::String(t)) => {
                let t = t.clone();
                map.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Some(Value::Array(types)) => types.push("null".into()),
            _ => {}
        }
    }
    let preserve = map.remove("x-kubernetes-preserve-unknown-fields") == Some(Value::Bool(true));
    if map.contains_key("properties") && !preserve && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, child) in map.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Some(props) = child.as_object_mut() {
                    props.values_mut().for_each(rewrite);
                }
            }
            "items" | "additionalProperties" => rewrite(child),
            "anyOf" | "allOf" | "oneOf" => {
                if let Some(list) = child.as_array_mut() {
                    list.iter_mut().for_each(rewrite);
                }
            }
            _ => {}
        }
    }
}

/// Whether the API server would skip the CEL rules after this schema error. It
/// skips them after Required, TooLong, TooMany, NotSupported (enum) and wrong-type
/// errors; an unknown field fails the request before validation under strict field
/// validation. Pattern, minimum, maximum, minLength and minItems errors are plain
/// Invalid errors, after which the rules still run.
pub fn is_blocking(kind: &jsonschema::error::ValidationErrorKind) -> bool {
    use jsonschema::error::ValidationErrorKind as K;
    !matches!(
        kind,
        K::Pattern { .. }
            | K::Minimum { .. }
            | K::Maximum { .. }
            | K::ExclusiveMinimum { .. }
            | K::ExclusiveMaximum { .. }
            | K::MinLength { .. }
            | K::MinItems { .. }
            | K::MinProperties { .. }
            | K::MultipleOf { .. }
            | K::Format { .. }
            | K::UniqueItems
    )
}

/// The API server's own check of `x-kubernetes-list-type: map` lists: the second
/// item with the same key values is a `Duplicate value`, shown as the Go map of its
/// keys (`spec.disks[1]: Duplicate value: map[string]interface {}{"name":"root"}`).
pub fn list_map_duplicates(
    schema: &Value,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    match value {
        Value::Array(items) => {
            let Some(item_schema) = schema.get("items") else {
                return;
            };
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_map =
                schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map");
            if is_map && !keys.is_empty() && items.iter().all(|i| i.is_object() || i.is_null()) {
                let mut seen: Vec<(String, usize)> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let key: serde_json::Map<String, Value> = keys
                        .iter()
                        .filter_map(|k| Some(((*k).to_owned(), item.get(*k)?.clone())))
                        .collect();
                    let id = Value::Object(key.clone()).to_string();
                    match seen.iter_mut().find(|(s, _)| *s == id) {
                        Some((_, times)) => {
                            *times += 1;
                            if *times == 2 {
                                errors.push(FieldError {
                                    field: format!("{path}[{i}]"),
                                    message: format!("Duplicate value: {}", go_map(&key)),
                                });
                            }
                        }
                        None => seen.push((id, 1)),
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                list_map_duplicates(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Object(fields) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            for (name, child) in fields {
                let child_schema = props.and_then(|p| p.get(name)).or(extra);
                if let Some(child_schema) = child_schema {
                    let child_path = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    list_map_duplicates(child_schema, child, &child_path, errors);
                }
            }
        }
        _ => {}
    }
}

/// A key map as Go's `%#v` prints a `map[string]interface{}`: keys sorted, strings quoted.
fn go_map(key: &serde_json::Map<String, Value>) -> String {
    let mut entries: Vec<(&String, &Value)> = key.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::String((*k).clone())))
        .collect();
    format!("map[string]interface {{}}{{{}}}", body.join(", "))
}

/// One refused `metadata` field, as apimachinery's `ValidateObjectMetaAccessor`
/// reports it. The offline validator and the test server share these checks.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaError {
    /// A missing value: `Required value: <detail>`.
    Required {
        /// Dotted path of the field.
        field: String,
        /// Why it is needed.
        detail: String,
    },
    /// A value that breaks a rule: `Invalid value: <value>: <detail>`.
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// The value refused.
        value: Value,
        /// The rule it breaks.
        detail: String,
    },
    /// Too many bytes in all: `Too long: may not be more than <limit> bytes`.
    TooLong {
        /// Dotted path of the field.
        field: String,
        /// The limit in bytes.
        limit: usize,
    },
}

/// Most bytes of all annotations' keys and values together.
pub const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

impl MetaError {
    /// Dotted path of the field.
    pub fn field(&self) -> &str {
        match self {
            Self::Required { field, .. }
            | Self::Invalid { field, .. }
            | Self::TooLong { field, .. } => field,
        }
    }

    /// The Status cause's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Required { .. } => "FieldValueRequired",
            Self::Invalid { .. } => "FieldValueInvalid",
            Self::TooLong { .. } => "FieldValueTooLong",
        }
    }

    /// The message, worded as apimachinery's field errors.
    pub fn message(&self) -> String {
        match self {
            Self::Required { detail, .. } => format!("Required value: {detail}"),
            Self::Invalid { value, detail, .. } => {
                format!("Invalid value: {}: {detail}", render(value))
            }
            Self::TooLong { limit, .. } => format!("Too long: may not be more than {limit} bytes"),
        }
    }

    /// Whether the API server skips the CEL rules after this error.
    pub fn is_blocking(&self) -> bool {
        !matches!(self, Self::Invalid { .. })
    }

    /// The same error as a [`FieldError`].
    pub fn to_field_error(&self) -> FieldError {
        FieldError {
            field: self.field().to_owned(),
            message: self.message(),
        }
    }
}

/// A value as apimachinery's field errors show it: strings quoted, containers by type.
fn render(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

/// The API server's checks of `metadata`: the name (by `name_rule`, e.g.
/// [`names::dns1123_subdomain`] for a custom resource), `generateName`, label
/// keys and values, annotation keys and their total size. The namespace is not
/// checked: it comes from the request, not the manifest.
pub fn metadata_errors(meta: &Value, name_rule: fn(&str) -> Vec<String>) -> Vec<MetaError> {
    let mut errs = Vec::new();
    let mut invalid = |field: String, value: &Value, details: Vec<String>| {
        errs.extend(details.into_iter().map(|detail| MetaError::Invalid {
            field: field.clone(),
            value: value.clone(),
            detail,
        }));
    };
    let name = str_at(meta, "name");
    let generate_name = str_at(meta, "generateName");
    if !generate_name.is_empty() {
        // A prefix may end in `-`: the generated suffix will follow it.
        let prefix = match generate_name.strip_suffix('-') {
            Some(p) if !p.is_empty() => format!("{p}a"),
            _ => generate_name.to_owned(),
        };
        invalid(
            "metadata.generateName".into(),
            &meta["generateName"],
            name_rule(&prefix),
        );
    }
    if !name.is_empty() {
        invalid("metadata.name".into(), &meta["name"], name_rule(name));
    }
    for (field, value_rule) in [
        (
            "labels",
            Some(names::label_value as fn(&str) -> Vec<String>),
        ),
        ("annotations", None),
    ] {
        let path = format!("metadata.{field}");
        let Some(map) = meta[field].as_object() else {
            if !meta[field].is_null() {
                invalid(path, &meta[field], vec!["must be a map of strings".into()]);
            }
            continue;
        };
        for (k, v) in map {
            let key = Value::String(k.clone());
            match value_rule {
                Some(_) => invalid(path.clone(), &key, names::qualified_name(k)),
                // Annotation keys are qualified names in any case.
                None => invalid(path.clone(), &key, names::qualified_name(&k.to_lowercase())),
            }
            match (v.as_str(), value_rule) {
                (Some(s), Some(rule)) => invalid(path.clone(), v, rule(s)),
                (Some(_), None) => {}
                (None, _) => invalid(format!("{path}.{k}"), v, vec!["must be a string".into()]),
            }
        }
    }
    let annotation_bytes: usize = meta["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if annotation_bytes > ANNOTATIONS_MAX_BYTES {
        errs.push(MetaError::TooLong {
            field: "metadata.annotations".into(),
            limit: ANNOTATIONS_MAX_BYTES,
        });
    }
    if name.is_empty() && generate_name.is_empty() {
        errs.insert(
            0,
            MetaError::Required {
                field: "metadata.name".into(),
                detail: "name or generateName is required".into(),
            },
        );
    }
    errs
}

/// What the offline validator appends to `generateName` where the API server
/// appends five random characters, to check the name a create would get.
pub const GENERATED_NAME_SUFFIX: &str = "xxxxx";

/// `metadata` with the name the API server would generate from `generateName`
/// when there is no name, so that name is checked too, as on a create.
fn with_generated_name(meta: &Value) -> Value {
    let mut meta = meta.clone();
    let generate_name = str_at(&meta, "generateName");
    if str_at(&meta, "name").is_empty() && !generate_name.is_empty() {
        let name = format!("{generate_name}{GENERATED_NAME_SUFFIX}");
        meta["name"] = Value::String(name);
    }
    meta
}

/// Fields the schema does not declare, as strict field validation refuses them
/// (`unknown field "spec.cpus"`).
fn unknown_fields(structural: &jsonschema::Validator, obj: &Value) -> Vec<FieldError> {
    use jsonschema::error::ValidationErrorKind as K;
    let mut out = Vec::new();
    for e in structural.iter_errors(obj) {
        if let K::AdditionalProperties { unexpected } = e.kind() {
            let parent = names::dotted(e.instance_path().as_str());
            for name in unexpected {
                let field = if parent.is_empty() {
                    name.clone()
                } else {
                    format!("{parent}.{name}")
                };
                out.push(FieldError {
                    message: format!("unknown field {field:?}"),
                    field,
                });
            }
        }
    }
    out
}

/// The object with its schema's defaults applied, as the API server decodes it;
/// `metadata` is left as it was.
fn defaulted(schema: &Value, obj: &Value) -> Value {
    let mut out = kube::core::cel::apply_defaults(schema, obj);
    if let Some(meta) = obj.get("metadata") {
        out["metadata"] = meta.clone();
    }
    out
}

/// The field a schema error names: the missing property itself for `required`
/// (`spec.boot.kernel`), as the API server names it, else the value's path.
pub fn schema_error_field(e: &jsonschema::ValidationError<'_>) -> String {
    let path = names::dotted(e.instance_path().as_str());
    match e.kind() {
        jsonschema::error::ValidationErrorKind::Required { property } => {
            let property = property.as_str().unwrap_or_default();
            if path.is_empty() {
                property.to_owned()
            } else {
                format!("{path}.{property}")
            }
        }
        _ => path,
    }
}

fn str_at<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_print_as_go_maps() {
        let key = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            go_map(&key(serde_json::json!({ "name": "x" }))),
            r#"map[string]interface {}{"name":"x"}"#
        );
        assert_eq!(
            go_map(&key(serde_json::json!({ "port": 80, "name": "a\"b" }))),
            r#"map[string]interface {}{"name":"a\"b", "port":80}"#
        );
        assert_eq!(
            go_map(&key(serde_json::json!({}))),
            "map[string]interface {}{}"
        );
    }

    #[test]
    fn metadata_is_checked_as_the_api_server_does() {
        let fields = |meta: Value| -> Vec<(String, String)> {
            metadata_errors(&meta, names::dns1123_subdomain)
                .iter()
                .map(|e| (e.field().to_owned(), e.message()))
                .collect()
        };
        assert!(
            fields(serde_json::json!({ "name": "a.b", "labels": { "runv.dev/x": "" } })).is_empty()
        );
        assert!(fields(serde_json::json!({ "generateName": "web-" })).is_empty());
        assert_eq!(
            fields(serde_json::json!({})),
            [(
                "metadata.name".into(),
                "Required value: name or generateName is required".into()
            )]
        );
        let bad = fields(serde_json::json!({
            "name": "a..b",
            "generateName": "Web-",
            "labels": { "-k": "-v" },
            "annotations": { "Example.com/Key": "any value", "a/b/c": "v", "n": 1 },
        }));
        let paths: Vec<&str> = bad.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            paths,
            [
                "metadata.generateName",
                "metadata.name",
                "metadata.labels",
                "metadata.labels",
                "metadata.annotations",
                "metadata.annotations.n",
            ]
        );
        assert!(
            bad[1]
                .1
                .starts_with("Invalid value: \"a..b\": a lowercase RFC 1123 subdomain")
        );
        assert!(
            bad[2]
                .1
                .starts_with("Invalid value: \"-k\": name part must consist of")
        );
        assert!(
            bad[3]
                .1
                .starts_with("Invalid value: \"-v\": a valid label must be")
        );
        assert_eq!(bad[5].1, "Invalid value: 1: must be a string");
        let big = serde_json::json!({ "name": "x", "annotations": { "a": "v".repeat(ANNOTATIONS_MAX_BYTES) } });
        let errs = metadata_errors(&big, names::dns1123_subdomain);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].is_blocking());
        assert_eq!(
            errs[0].message(),
            "Too long: may not be more than 262144 bytes"
        );
    }

    #[test]
    fn nullable_and_int_or_string_are_rewritten() {
        let s = serde_json::json!({
            "type": "object",
            "properties": {
                "a": { "type": "string", "nullable": true },
                "b": { "x-kubernetes-int-or-string": true },
                "c": { "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                       "properties": { "d": { "type": "integer" } } }
            }
        });
        let out = to_json_schema(&s);
        assert_eq!(out["additionalProperties"], false);
        assert_eq!(
            out["properties"]["a"]["type"],
            serde_json::json!(["string", "null"])
        );
        assert_eq!(
            out["properties"]["b"]["type"],
            serde_json::json!(["integer", "string"])
        );
        assert!(out["properties"]["c"].get("additionalProperties").is_none());
    }

    #[test]
    fn non_objects_are_refused() {
        assert!(matches!(
            parse_documents("- a\n- b\n"),
            Err(ValidateError::NotAnObject { index: 0 })
        ));
        assert!(matches!(
            parse_documents("a: [\n"),
            Err(ValidateError::Yaml(_))
        ));
        assert_eq!(parse_documents("---\n---\n").unwrap().len(), 0);
    }
}

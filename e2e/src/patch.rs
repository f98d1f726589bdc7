//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! strategic merge patch for the built-in kinds.
//!
//! Each function turns the stored object and a patch into the object the
//! client asked for; the handlers then run it through the same admission as
//! an update. Strategic merge patch knows only the merge keys of the fields
//! the built-in kinds served here have (finalizers, ownerReferences, Node
//! conditions, addresses and taints); custom resources refuse it as
//! kube-apiserver does. Server-side apply lives in `managed`.

use serde_json::{Map, Value};

use crate::managed::{ListType, list_type};
use crate::registry::ResourceType;

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The body is not valid JSON for this patch type.
    #[error("error decoding patch: {0}")]
    Decode(String),
    /// A JSON patch operation failed.
    #[error("the server rejected our request due to an error in our request: {0}")]
    Apply(String),
}

/// Applies an RFC 7386 merge patch.
pub fn merge(obj: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| PatchError::Decode(e.to_string()))?;
    if !patch.is_object() {
        return Err(PatchError::Decode(
            "a merge patch must be a JSON object".into(),
        ));
    }
    json_patch::merge(obj, &patch);
    Ok(())
}

/// Applies an RFC 6902 JSON patch, all or nothing. As in kube-apiserver
/// (evanphx/json-patch), a `test` for `null` passes on a missing path:
/// kube-runtime's `finalizer()` relies on it.
pub fn json(obj: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    let patch: json_patch::Patch =
        serde_json::from_slice(body).map_err(|e| PatchError::Decode(e.to_string()))?;
    let mut work = obj.clone();
    for op in &patch.0 {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && work.pointer(t.path.as_str()).is_none_or(Value::is_null)
        {
            continue;
        }
        json_patch::patch(&mut work, std::slice::from_ref(op))
            .map_err(|e| PatchError::Apply(e.to_string()))?;
    }
    *obj = work;
    Ok(())
}

/// Applies a strategic merge patch to a built-in kind.
pub fn strategic(rt: &ResourceType, obj: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| PatchError::Decode(e.to_string()))?;
    let Value::Object(p) = patch else {
        return Err(PatchError::Decode(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    if let Value::Object(o) = obj {
        merge_map(rt, o, &p, &mut Vec::new())?;
    }
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_map(
    rt: &ResourceType,
    orig: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *orig = match strip_directives(&Value::Object(patch.clone())) {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            return Ok(());
        }
        Some("delete") => {
            orig.clear();
            return Ok(());
        }
        Some(other) => return Err(PatchError::Apply(format!("unknown patch type: {other}"))),
        None => {}
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (orig.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Null => {
                orig.remove(k);
            }
            Value::Object(pm) => {
                let entry = orig.entry(k.clone()).or_insert(Value::Null);
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    orig.remove(k);
                } else {
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    if let Value::Object(em) = entry {
                        merge_map(rt, em, pm, path)?;
                    }
                }
            }
            Value::Array(items) => {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let merged = match (list_type(rt, &refs), orig.get(k)) {
                    (ListType::Map(keys), Some(Value::Array(cur))) => {
                        merge_keyed(rt, cur.clone(), items, &keys, path)?
                    }
                    (ListType::Set, Some(Value::Array(cur))) => {
                        let mut out = cur.clone();
                        for item in items {
                            if !out.contains(item) {
                                out.push(item.clone());
                            }
                        }
                        out
                    }
                    _ => items
                        .iter()
                        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                        .map(strip_directives)
                        .collect(),
                };
                orig.insert(k.clone(), Value::Array(merged));
            }
            other => {
                orig.insert(k.clone(), other.clone());
            }
        }
        path.pop();
    }
    Ok(())
}

fn merge_keyed(
    rt: &ResourceType,
    mut cur: Vec<Value>,
    items: &[Value],
    keys: &[String],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, PatchError> {
    let same = |a: &Value, b: &Value| keys.iter().all(|k| a.get(k) == b.get(k));
    for item in items {
        let pos = cur.iter().position(|c| same(c, item));
        let directive = item.get("$patch").and_then(Value::as_str);
        match (pos, directive) {
            (Some(i), Some("delete")) => {
                cur.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), Some("replace")) => cur[i] = strip_directives(item),
            (Some(i), _) => {
                if let (Value::Object(c), Value::Object(p)) = (&mut cur[i], item) {
                    merge_map(rt, c, p, path)?;
                }
            }
            (None, _) => cur.push(strip_directives(item)),
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use serde_json::json;

    #[test]
    fn strategic_merges_finalizers_and_keyed_lists() {
        let reg = Registry::builtins();
        let rt = reg.find("", "v1", "nodes").unwrap();
        let mut obj = json!({"metadata": {"finalizers": ["a"]}, "status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Disk", "status": "True"}]}});
        let patch = json!({"metadata": {"finalizers": ["b"]}, "status": {"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Disk", "$patch": "delete"}]}});
        strategic(&rt, &mut obj, patch.to_string().as_bytes()).unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            obj["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
    }

    #[test]
    fn merge_and_json_patches() {
        let mut obj = json!({"a": {"b": 1, "c": 2}});
        merge(&mut obj, br#"{"a": {"b": null, "d": 3}}"#).unwrap();
        assert_eq!(obj, json!({"a": {"c": 2, "d": 3}}));
        json(
            &mut obj,
            br#"[{"op": "replace", "path": "/a/c", "value": 5}]"#,
        )
        .unwrap();
        assert_eq!(obj["a"]["c"], 5);
        assert!(json(&mut obj, br#"[{"op": "test", "path": "/a/c", "value": 6}]"#).is_err());
        // A null test passes on a missing path; a failing op leaves the object untouched.
        json(&mut obj, br#"[{"op": "test", "path": "/z", "value": null}, {"op": "add", "path": "/z", "value": [1]}]"#).unwrap();
        assert_eq!(obj["z"], json!([1]));
        let before = obj.clone();
        assert!(json(&mut obj, br#"[{"op": "add", "path": "/y", "value": 1}, {"op": "test", "path": "/y", "value": 2}]"#).is_err());
        assert_eq!(obj, before);
    }
}

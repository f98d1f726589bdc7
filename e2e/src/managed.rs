//! Field management: `metadata.managedFields` and server-side apply.
//!
//! A field set is the set of paths a manager owns, each path a list of
//! fieldsV1 elements (`f:spec`, `k:{"type":"Ready"}`, `v:"x"`). Updates
//! (PUT, merge/JSON/strategic patches) give their manager the fields they
//! changed and take them from everyone else; an apply gives its manager
//! exactly the fields in its configuration, refuses with 409 Conflict when it
//! would change a field another manager owns (unless forced, which takes the
//! field), removes fields the manager applied before and no longer applies
//! when nobody else owns them, and merges lists by their list type
//! (`atomic`, `set`, `map` with keys) as structured-merge-diff does.
//! Server-set metadata (name, uid, resourceVersion...) is never tracked.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::registry::{Builtin, ResourceType};
use crate::status::{ApiError, Cause};

/// How a list merges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole.
    Atomic,
    /// A set of scalars.
    Set,
    /// Items keyed by these fields.
    Map(Vec<String>),
}

fn schema_list_type(schema: &Value, path: &[&str]) -> ListType {
    let mut cur = schema;
    for p in path {
        let next = cur
            .get("properties")
            .and_then(|props| props.get(*p))
            .or_else(|| cur.get("additionalProperties").filter(|a| a.is_object()));
        cur = match next {
            Some(n) => n,
            None => match cur
                .get("items")
                .and_then(|i| i.get("properties"))
                .and_then(|props| props.get(*p))
            {
                Some(n) => n,
                None => return ListType::Atomic,
            },
        };
    }
    match cur["x-kubernetes-list-type"].as_str() {
        Some("set") => ListType::Set,
        Some("map") => ListType::Map(
            cur["x-kubernetes-list-map-keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(String::from))
                .collect(),
        ),
        _ => ListType::Atomic,
    }
}

/// The list type of the field at `path` (field names only, list items skipped).
pub fn list_type(rt: &ResourceType, path: &[&str]) -> ListType {
    match path {
        ["metadata", "finalizers"] => return ListType::Set,
        ["metadata", "ownerReferences"] => return ListType::Map(vec!["uid".into()]),
        _ => {}
    }
    match rt.builtin {
        Builtin::Custom => rt
            .schema
            .as_ref()
            .map_or(ListType::Atomic, |s| schema_list_type(&s.structural, path)),
        Builtin::Node => match path {
            ["status", "conditions"] | ["status", "addresses"] => {
                ListType::Map(vec!["type".into()])
            }
            ["spec", "taints"] => ListType::Map(vec!["key".into(), "effect".into()]),
            _ => ListType::Atomic,
        },
        Builtin::Namespace | Builtin::Crd => match path {
            ["status", "conditions"] => ListType::Map(vec!["type".into()]),
            _ => ListType::Atomic,
        },
        _ => ListType::Atomic,
    }
}

/// A path element in fieldsV1 form.
pub type Path = Vec<String>;
/// A set of owned paths.
pub type FieldSet = BTreeSet<Path>;

const IGNORED_META: [&str; 10] = [
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
];

fn key_element(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    format!("k:{}", Value::Object(m))
}

/// The fields an object (or an apply configuration) sets.
pub fn fields_of(rt: &ResourceType, obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            if k == "metadata" {
                if let Value::Object(meta) = v {
                    for (mk, mv) in meta {
                        if !IGNORED_META.contains(&mk.as_str()) {
                            walk(
                                rt,
                                mv,
                                &mut vec!["metadata".into(), mk.clone()],
                                &mut vec![format!("f:{k}"), format!("f:{mk}")],
                                &mut out,
                            );
                        }
                    }
                }
                continue;
            }
            walk(
                rt,
                v,
                &mut vec![k.clone()],
                &mut vec![format!("f:{k}")],
                &mut out,
            );
        }
    }
    out
}

fn walk(
    rt: &ResourceType,
    v: &Value,
    names: &mut Vec<String>,
    path: &mut Path,
    out: &mut FieldSet,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                names.push(k.clone());
                path.push(format!("f:{k}"));
                walk(rt, child, names, path, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_type(rt, &refs) {
                ListType::Atomic => {
                    out.insert(path.clone());
                }
                ListType::Set => {
                    for item in items {
                        let mut p = path.clone();
                        p.push(format!("v:{item}"));
                        out.insert(p);
                    }
                }
                ListType::Map(keys) => {
                    for item in items {
                        path.push(key_element(item, &keys));
                        out.insert(path.clone());
                        if let Value::Object(m) = item {
                            for (k, child) in m {
                                names.push(k.clone());
                                path.push(format!("f:{k}"));
                                walk(rt, child, names, path, out);
                                path.pop();
                                names.pop();
                            }
                        }
                        path.pop();
                    }
                }
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a field path, if present.
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for el in path {
        cur = if let Some(f) = el.strip_prefix("f:") {
            cur.get(f)?
        } else if let Some(k) = el.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array()?.iter().find(|i| {
                key.iter()
                    .all(|(kk, kv)| i.get(kk).unwrap_or(&Value::Null) == kv)
            })?
        } else if let Some(v) = el.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur.as_array()?.iter().find(|i| **i == want)?
        } else {
            return None;
        };
    }
    Some(cur)
}

fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for el in parent_path {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = el.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut().find(|i| {
                    key.iter()
                        .all(|(kk, kv)| i.get(kk).unwrap_or(&Value::Null) == kv)
                })
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(key), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            cur.as_array_mut(),
        ) {
            a.retain(|i| {
                !key.iter()
                    .all(|(kk, kv)| i.get(kk).unwrap_or(&Value::Null) == kv)
            });
        }
    } else if let Some(v) = last.strip_prefix("v:")
        && let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(v), cur.as_array_mut())
    {
        a.retain(|i| *i != want);
    }
}

/// Encodes a field set as fieldsV1.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for el in path {
            let entry = cur.entry(el.clone()).or_insert_with(|| json!({}));
            cur = match entry.as_object_mut() {
                Some(m) => m,
                None => break,
            };
        }
    }
    // A member with children is marked with ".".
    fn mark(m: &mut Map<String, Value>, set: &FieldSet, path: &mut Path) {
        for (k, v) in m.iter_mut() {
            path.push(k.clone());
            if let Some(child) = v.as_object_mut()
                && !child.is_empty()
            {
                mark(child, set, path);
                if set.contains(path) {
                    child.insert(".".into(), json!({}));
                }
            }
            path.pop();
        }
    }
    mark(&mut root, set, &mut Vec::new());
    Value::Object(root)
}

/// Decodes fieldsV1.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn rec(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if (m.is_empty() || m.contains_key(".")) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, child) in m {
            if k == "." {
                continue;
            }
            path.push(k.clone());
            rec(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    rec(v, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion of the request.
    pub api_version: String,
    /// When the set last changed.
    pub time: String,
    /// `status` or empty.
    pub subresource: String,
    /// Owned paths.
    pub fields: FieldSet,
}

/// Reads `metadata.managedFields`.
pub fn entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().into(),
            operation: e["operation"].as_str().unwrap_or_default().into(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
            time: e["time"].as_str().unwrap_or_default().into(),
            subresource: e["subresource"].as_str().unwrap_or_default().into(),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Writes `metadata.managedFields`, dropping managers that own nothing.
pub fn set_entries(obj: &mut Value, list: Vec<Entry>) {
    let list: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if list.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(list);
    }
}

/// Restricts a field set to what a request on `subresource` may own.
pub fn scope(rt: &ResourceType, subresource: &str, set: FieldSet) -> FieldSet {
    set.into_iter()
        .filter(|p| {
            let top = p.first().map(String::as_str);
            match subresource {
                "status" => top == Some("f:status"),
                _ => !(rt.status && top == Some("f:status")),
            }
        })
        .collect()
}

/// Records an update by `manager`: it owns the fields it changed, others lose them.
pub fn record_update(
    rt: &ResourceType,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: &str,
    now: &str,
) {
    let mut list = old.map(entries).unwrap_or_default();
    let new_fields = fields_of(rt, new);
    let old_fields = old.map(|o| fields_of(rt, o)).unwrap_or_default();
    let changed: FieldSet = scope(
        rt,
        subresource,
        new_fields
            .iter()
            .filter(|p| {
                !old_fields.contains(*p) || old.and_then(|o| value_at(o, p)) != value_at(new, p)
            })
            .cloned()
            .collect(),
    );
    for e in &mut list {
        e.fields
            .retain(|p| new_fields.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        match list.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.into();
                e.api_version = rt.api_version();
            }
            None => list.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                api_version: rt.api_version(),
                time: now.into(),
                subresource: subresource.into(),
                fields: changed,
            }),
        }
    }
    set_entries(new, list);
}

fn render_path(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

fn merge_apply(rt: &ResourceType, live: &mut Value, cfg: &Value, names: &mut Vec<String>) {
    match (live, cfg) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, cv) in c {
                names.push(k.clone());
                let lv = l.entry(k.clone()).or_insert(Value::Null);
                merge_apply(rt, lv, cv, names);
                names.pop();
            }
        }
        (l @ Value::Array(_), Value::Array(c)) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_type(rt, &refs) {
                ListType::Atomic => *l = Value::Array(c.clone()),
                ListType::Set => {
                    if let Value::Array(la) = l {
                        for item in c {
                            if !la.contains(item) {
                                la.push(item.clone());
                            }
                        }
                    }
                }
                ListType::Map(keys) => {
                    if let Value::Array(la) = l {
                        for item in c {
                            match la
                                .iter_mut()
                                .find(|i| keys.iter().all(|k| i.get(k) == item.get(k)))
                            {
                                Some(existing) => merge_apply(rt, existing, item, names),
                                None => la.push(item.clone()),
                            }
                        }
                    }
                }
            }
        }
        (l, c) => *l = c.clone(),
    }
}

/// Server-side apply of `cfg` by `manager` onto `live` (None: create).
/// Returns the merged object with its managedFields, or 409 on conflicts.
pub fn apply(
    rt: &ResourceType,
    live: Option<&Value>,
    cfg: &Value,
    manager: &str,
    subresource: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApiError> {
    let applied = scope(rt, subresource, fields_of(rt, cfg));
    let mut list = live.map(entries).unwrap_or_default();
    let mut obj = live.cloned().unwrap_or_else(|| json!({}));
    let mine =
        |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == subresource;

    let mut causes = Vec::new();
    for e in list.iter_mut().filter(|e| !mine(e)) {
        let taken: Vec<Path> = e
            .fields
            .iter()
            .filter(|p| applied.contains(*p) && value_at(&obj, p) != value_at(cfg, p))
            .cloned()
            .collect();
        for p in taken {
            if force {
                e.fields.remove(&p);
            } else {
                causes.push(Cause {
                    reason: "FieldManagerConflict".into(),
                    field: render_path(&p),
                    message: format!(
                        "conflict with {:?}{} using {}: {}",
                        e.manager,
                        if e.subresource.is_empty() {
                            String::new()
                        } else {
                            format!(" with subresource {:?}", e.subresource)
                        },
                        e.api_version,
                        render_path(&p)
                    ),
                });
            }
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::ApplyConflict { causes });
    }

    // Fields this manager applied before and no longer applies go away when nobody else owns them.
    let before: FieldSet = list
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.clone())
        .collect();
    let others: FieldSet = list
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.clone())
        .collect();
    for p in before.iter().rev() {
        if !applied.contains(p)
            && !others.contains(p)
            && !others.iter().any(|o| o.starts_with(p))
            && !applied.iter().any(|a| a.starts_with(p))
        {
            remove_at(&mut obj, p);
            // A map left empty goes too, as structured-merge-diff removes a
            // map the manager owned (`waiting: {reason}` applied, then only
            // `running`: no `waiting: {}` stays behind).
            for end in (1..p.len()).rev() {
                let prefix = &p[..end];
                let empty = value_at(&obj, prefix)
                    .and_then(Value::as_object)
                    .is_some_and(Map::is_empty);
                let kept = others.contains(prefix) || applied.contains(prefix);
                if !empty || kept || !prefix[end - 1].starts_with("f:") {
                    break;
                }
                remove_at(&mut obj, prefix);
            }
        }
    }
    let meta = obj["metadata"].clone();
    merge_apply(rt, &mut obj, cfg, &mut Vec::new());
    // Server-owned metadata is not the applier's to change.
    if let (Some(live_meta), Some(m)) = (meta.as_object(), obj["metadata"].as_object_mut()) {
        for k in [
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "managedFields",
        ] {
            match live_meta.get(k) {
                Some(v) => {
                    m.insert(k.into(), v.clone());
                }
                None => {
                    m.remove(k);
                }
            }
        }
    }
    list.retain(|e| !mine(e));
    list.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: rt.api_version(),
        time: now.into(),
        subresource: subresource.into(),
        fields: applied,
    });
    // Keep entries in their previous order, the applier's where it was.
    set_entries(&mut obj, list);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn cm() -> std::sync::Arc<ResourceType> {
        Registry::builtins().find("", "v1", "configmaps").unwrap()
    }

    #[test]
    fn fields_v1_round_trips() {
        let rt = cm();
        let obj = json!({"metadata": {"name": "x", "labels": {"a": "1"}, "finalizers": ["f"]}, "data": {"k": "v"}});
        let set = fields_of(&rt, &obj);
        let v1 = to_fields_v1(&set);
        assert_eq!(v1["f:data"]["f:k"], json!({}));
        assert_eq!(v1["f:metadata"]["f:finalizers"]["v:\"f\""], json!({}));
        assert!(v1["f:metadata"].get("f:name").is_none());
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_conflicts_unless_forced_and_removes_dropped_fields() {
        let rt = cm();
        let first = apply(
            &rt,
            None,
            &json!({"metadata": {"name": "x"}, "data": {"a": "1", "b": "2"}}),
            "one",
            "",
            false,
            "t",
        )
        .unwrap();
        let err = apply(
            &rt,
            Some(&first),
            &json!({"metadata": {"name": "x"}, "data": {"a": "9"}}),
            "two",
            "",
            false,
            "t",
        )
        .unwrap_err();
        assert_eq!(err.code(), 409);
        assert!(err.to_string().contains(".data.a"), "{err}");
        let forced = apply(
            &rt,
            Some(&first),
            &json!({"metadata": {"name": "x"}, "data": {"a": "9"}}),
            "two",
            "",
            true,
            "t",
        )
        .unwrap();
        assert_eq!(forced["data"], json!({"a": "9", "b": "2"}));
        let dropped = apply(
            &rt,
            Some(&forced),
            &json!({"metadata": {"name": "x"}, "data": {}}),
            "one",
            "",
            false,
            "t",
        )
        .unwrap();
        assert_eq!(dropped["data"], json!({"a": "9"}));
    }

    #[test]
    fn a_map_the_manager_stops_applying_goes_whole() {
        let rt = cm();
        let apply_as = |live: Option<&Value>, cfg: Value| {
            apply(&rt, live, &cfg, "one", "", false, "t").unwrap()
        };
        let waiting = apply_as(
            None,
            json!({"metadata": {"name": "x"}, "data": {"state": {"waiting": {"reason": "r"}}}}),
        );
        let running = apply_as(
            Some(&waiting),
            json!({"metadata": {"name": "x"}, "data": {"state": {"running": {"at": "1"}}}}),
        );
        assert_eq!(running["data"], json!({"state": {"running": {"at": "1"}}}));
    }
}

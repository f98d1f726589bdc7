//! `meta.k8s.io/v1` Table output for `kubectl get`.
//!
//! Columns are Name then the kind's printer columns (a CRD's
//! `additionalPrinterColumns`, or the built-in kinds' usual ones); columns
//! with priority above 0 are sent too and kubectl shows them with `-o wide`.
//! Cell values follow the CRD table convertor: `date` columns carry the
//! timestamp (kubectl renders it as an age), integers as integers, strings
//! as strings, missing values as null. Rows carry the object as
//! PartialObjectMetadata, the full object or nothing, per `includeObject`.

use serde_json::{Value, json};

use crate::jsonpath;
use crate::registry::ResourceType;

/// What each row's `object` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// PartialObjectMetadata (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses `includeObject`.
    pub fn parse(v: Option<&str>) -> Option<Self> {
        match v {
            None | Some("") | Some("Metadata") => Some(Self::Metadata),
            Some("None") => Some(Self::None),
            Some("Object") => Some(Self::Object),
            Some(_) => None,
        }
    }
}

fn cell(col_type: &str, path: &str, obj: &Value) -> Value {
    match path {
        "#data" => {
            let n = obj["data"].as_object().map_or(0, |m| m.len())
                + obj["binaryData"].as_object().map_or(0, |m| m.len());
            return json!(n);
        }
        "#involved" => {
            let o = &obj["involvedObject"];
            return json!(format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default().to_lowercase(),
                o["name"].as_str().unwrap_or_default()
            ));
        }
        _ => {}
    }
    let Some(v) = jsonpath::find(obj, path) else {
        return Value::Null;
    };
    match col_type {
        "integer" => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map_or(Value::Null, |i| json!(i)),
        "number" => v.as_f64().map_or(Value::Null, |f| json!(f)),
        "boolean" => v.as_bool().map_or(Value::Null, |b| json!(b)),
        "date" => v.as_str().map_or(Value::Null, |s| json!(age(s))),
        _ => match v {
            Value::String(s) => json!(s),
            Value::Object(_) | Value::Array(_) => json!(v.to_string()),
            other => json!(other.to_string()),
        },
    }
}

/// How long ago an RFC 3339 timestamp was, as kubectl shows ages (`5m3s`, `2d`).
pub fn age(ts: &str) -> String {
    match ts.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => {
            let secs = k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second();
            human_duration(secs)
        }
        Err(_) => "<invalid>".into(),
    }
}

/// apimachinery's `HumanDuration` of a number of seconds.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    let pair = |a: i64, ua: &str, b: i64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        pair(m, "m", secs % 60, "s")
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        pair(h, "h", m % 60, "m")
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        pair(d, "d", h % 24, "h")
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if h < 24 * 365 * 8 {
        pair(d / 365, "y", d % 365, "d")
    } else {
        format!("{}y", d / 365)
    }
}

fn row_object(obj: &Value, include: IncludeObject) -> Value {
    match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }),
    }
}

/// One row.
pub fn row(rt: &ResourceType, obj: &Value, include: IncludeObject) -> Value {
    let mut cells = vec![obj["metadata"]["name"].clone()];
    cells.extend(rt.columns.iter().map(|c| cell(&c.type_, &c.json_path, obj)));
    let mut r = json!({ "cells": cells });
    if include != IncludeObject::None {
        r["object"] = row_object(obj, include);
    }
    r
}

/// A Table of `objects`, with list metadata (resourceVersion, continue).
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    list_meta: Value,
    include: IncludeObject,
) -> Value {
    let mut defs = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    })];
    defs.extend(rt.columns.iter().map(|c| {
        json!({
            "name": c.name, "type": c.type_, "format": c.format,
            "description": c.description, "priority": c.priority,
        })
    }));
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": objects.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_apimachinery() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400), "3d");
        assert_eq!(human_duration(400 * 86400), "400d");
    }
}

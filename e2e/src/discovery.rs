//! Discovery and OpenAPI: `/version`, `/api`, `/apis`, the per group-version
//! resource lists, and the OpenAPI documents kubectl reads.
//!
//! Discovery is served in both forms: aggregated (`apidiscovery.k8s.io/v2`,
//! what kubectl asks for first) and the per group-version lists. OpenAPI v3 is served with one
//! document per group-version that lists, for every resource, the PATCH
//! operation with the `x-kubernetes-group-version-kind` extension and the
//! `fieldValidation` query parameter: that is how kubectl decides that the
//! server validates fields itself (so `kubectl apply` with its default
//! `--validate=strict` sends `fieldValidation=Strict`). Schemas are not
//! published (`kubectl explain` is not supported). OpenAPI v2 is an empty
//! document. This module reads the registry only.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::registry::{Registry, ResourceType};

/// Kubernetes version the server reports.
pub const KUBE_MINOR: &str = "32";

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0-runv-testserver"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "rustc",
        "platform": "linux/amd64",
        "emulationMajor": "1",
        "emulationMinor": KUBE_MINOR,
    })
}

/// `/api`.
pub fn core_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": addr }],
    })
}

/// Served groups, each with its versions, preferred (storage) version first.
fn groups(reg: &Registry) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in reg.all() {
        if t.group.is_empty() {
            continue;
        }
        let versions = out.entry(t.group.clone()).or_default();
        if !versions.contains(&t.version) {
            if t.version == t.storage_version {
                versions.insert(0, t.version.clone());
            } else {
                versions.push(t.version.clone());
            }
        }
    }
    out
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({ "groupVersion": format!("{name}/{v}"), "version": v }))
        .collect();
    json!({
        "name": name,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`.
pub fn group_list(reg: &Registry) -> Value {
    let groups: Vec<Value> = groups(reg)
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `/apis/{group}`, if served.
pub fn group(reg: &Registry, name: &str) -> Option<Value> {
    let groups = groups(reg);
    let vs = groups.get(name)?;
    let mut g = group_json(name, vs);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/api/v1` or `/apis/{group}/{version}`, if served.
pub fn resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = reg
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .map(|t| t.as_ref())
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if t.scale.is_some() {
            resources.push(json!({
                "name": format!("{}/scale", t.plural), "singularName": "",
                "namespaced": t.namespaced, "group": "autoscaling", "version": "v1",
                "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

/// `/openapi/v3`: one entry per served group-version.
pub fn openapi_v3_root(reg: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<(String, String)> = reg
        .all()
        .iter()
        .map(|t| (t.group.clone(), t.version.clone()))
        .collect();
    gvs.sort();
    gvs.dedup();
    for (g, v) in gvs {
        let doc = openapi_v3_doc(reg, &g, &v).unwrap_or(Value::Null);
        let p = gv_path(&g, &v);
        paths.insert(
            p.clone(),
            json!({ "serverRelativeURL": format!("/openapi/v3/{p}?hash={}", fnv(&doc.to_string())) }),
        );
    }
    json!({ "paths": paths })
}

/// The OpenAPI v3 schema of a custom resource, as kube-apiserver publishes it
/// for `kubectl explain`: the CRD's structural schema, with `apiVersion`, `kind`
/// and `metadata` added where the CRD leaves them out, tagged with its GVK.
fn custom_resource_schema(t: &ResourceType, structural: &Value) -> Value {
    let mut schema = structural.clone();
    if !schema["properties"].is_object() {
        schema["properties"] = json!({});
    }
    let props = &mut schema["properties"];
    if props.get("apiVersion").is_none() {
        props["apiVersion"] = json!({ "type": "string", "description": "APIVersion defines the versioned schema of this representation of an object." });
    }
    if props.get("kind").is_none() {
        props["kind"] = json!({ "type": "string", "description": "Kind is a string value representing the REST resource this object represents." });
    }
    if props
        .get("metadata")
        .is_none_or(|m| m.as_object().is_some_and(|m| m.len() <= 1))
    {
        props["metadata"] =
            json!({ "type": "object", "description": "Standard object's metadata." });
    }
    schema["x-kubernetes-group-version-kind"] =
        json!([{ "group": t.group, "version": t.version, "kind": t.kind }]);
    schema
}

/// The name kube-apiserver gives a custom resource's schema: the group's
/// labels reversed, then version and kind (`dev.runv.v1alpha1.MicroVM`).
fn schema_name(t: &ResourceType) -> String {
    let group: Vec<&str> = t.group.split('.').rev().collect();
    format!("{}.{}.{}", group.join("."), t.version, t.kind)
}

/// `/openapi/v3/apis/{group}/{version}`: PATCH operations with their GVK and
/// the `fieldValidation` parameter, and the schemas of custom resources.
pub fn openapi_v3_doc(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for t in reg
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        if let Some(schema) = &t.schema {
            schemas.insert(
                schema_name(t),
                custom_resource_schema(t, &schema.structural),
            );
        }
        let base = if t.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                gv_path(group, version),
                t.plural
            )
        } else {
            format!("/{}/{}", gv_path(group, version), t.plural)
        };
        let gvk = json!({ "group": group, "version": version, "kind": t.kind });
        let params = json!([
            { "name": "dryRun", "in": "query", "schema": { "type": "string" } },
            { "name": "fieldManager", "in": "query", "schema": { "type": "string" } },
            { "name": "fieldValidation", "in": "query", "schema": { "type": "string" } },
            { "name": "force", "in": "query", "schema": { "type": "boolean" } },
        ]);
        let op = |id: &str| {
            json!({
                "operationId": format!("{id}{}", t.kind),
                "parameters": params,
                "responses": { "200": { "description": "OK" } },
                "x-kubernetes-action": id,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        paths.insert(
            format!("{base}/{{name}}"),
            json!({ "get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete") }),
        );
        paths.insert(base, json!({ "get": op("list"), "post": op("post") }));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": format!("v1.{KUBE_MINOR}.0") },
        "paths": paths,
        "components": { "schemas": schemas },
    }))
}

/// `/openapi/v2` as JSON: a valid document with no definitions.
pub fn openapi_v2() -> Value {
    json!({
        "swagger": "2.0",
        "info": { "title": "Kubernetes", "version": format!("v1.{KUBE_MINOR}.0") },
        "paths": {},
        "definitions": {},
    })
}

/// Media type of aggregated discovery (`apidiscovery.k8s.io/v2`).
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether an Accept header asks for aggregated discovery v2 (its first
/// acceptable choice, as client-go lists it first).
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        params.first() == Some(&"application/json")
            && params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

fn aggregated_resource(t: &ResourceType) -> Value {
    let scope = if t.namespaced {
        "Namespaced"
    } else {
        "Cluster"
    };
    let kind = json!({ "group": t.group, "version": t.version, "kind": t.kind });
    let mut subresources = Vec::new();
    if t.status {
        subresources.push(json!({ "subresource": "status", "responseKind": kind, "verbs": ["get", "patch", "update"] }));
    }
    if t.scale.is_some() {
        subresources.push(json!({ "subresource": "scale",
            "responseKind": { "group": "autoscaling", "version": "v1", "kind": "Scale" },
            "verbs": ["get", "patch", "update"] }));
    }
    let mut r = json!({
        "resource": t.plural,
        "responseKind": kind,
        "scope": scope,
        "singularResource": t.singular,
        "verbs": VERBS,
    });
    if !t.short_names.is_empty() {
        r["shortNames"] = json!(t.short_names);
    }
    if !t.categories.is_empty() {
        r["categories"] = json!(t.categories);
    }
    if !subresources.is_empty() {
        r["subresources"] = json!(subresources);
    }
    r
}

/// `/api` (`core` true) or `/apis` as an `APIGroupDiscoveryList`.
pub fn aggregated(reg: &Registry, core: bool) -> Value {
    let mut items = Vec::new();
    let names: Vec<(String, Vec<String>)> = if core {
        vec![(String::new(), vec!["v1".to_string()])]
    } else {
        groups(reg).into_iter().collect()
    };
    for (group, versions) in names {
        let versions: Vec<Value> = versions
            .iter()
            .map(|v| {
                let resources: Vec<Value> = reg
                    .all()
                    .iter()
                    .filter(|t| t.group == group && &t.version == v)
                    .map(|t| aggregated_resource(t))
                    .collect();
                json!({ "version": v, "resources": resources, "freshness": "Current" })
            })
            .collect();
        items.push(json!({ "metadata": { "name": group }, "versions": versions }));
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

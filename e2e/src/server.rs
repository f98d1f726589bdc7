//! HTTP: parses Kubernetes REST paths, query parameters and media types,
//! calls the object verbs, and encodes responses (JSON objects, Tables,
//! watch streams, Status errors).
//!
//! Anything not served answers with a Status: 404 for unknown paths, 405 for
//! verbs a path does not take, 406/415 for media types (protobuf, CBOR) the
//! server does not speak, 501 for the one request shape it does not
//! implement (`?watch=true` on one object's path). Query parameters it does
//! not know are ignored, as kube-apiserver ignores them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures::FutureExt;
use serde_json::{Value, json};

use crate::admission::FieldValidation;
use crate::discovery;
use crate::objects::{DeleteOpts, ListQuery, PatchType, State, Sub, WriteOpts, present};
use crate::registry::{Builtin, ResourceType};
use crate::selectors::{FieldRead, FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause};
use crate::table::{self, IncludeObject};
use crate::watch::{self, WatchParams};

/// What every request handler shares.
#[derive(Debug)]
pub struct Shared {
    /// The lock over all state.
    pub state: Arc<Mutex<State>>,
    /// `host:port` the server listens on.
    pub addr: String,
    /// Bookmark period for watches.
    pub bookmark_every: Duration,
    /// Becomes true when the server shuts down; open watches end.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

const MAX_BODY: usize = 16 << 20;

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// How the client wants the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Json,
    Table,
}

fn negotiate(headers: &HeaderMap) -> Result<Want, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut json_ok = false;
    for part in accept.split(',') {
        let mut params = part.split(';').map(str::trim);
        let media = params.next().unwrap_or_default();
        let params: Vec<&str> = params.collect();
        let is_json = matches!(media, "application/json" | "*/*" | "application/*" | "");
        if is_json && params.contains(&"as=Table") {
            return Ok(Want::Table);
        }
        if is_json && !params.iter().any(|p| p.starts_with("as=")) {
            json_ok = true;
        }
    }
    if json_ok {
        Ok(Want::Json)
    } else {
        Err(ApiError::NotAcceptable(
            "application/json, application/json;as=Table;v=v1;g=meta.k8s.io".into(),
        ))
    }
}

fn respond(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {:?}", w)) {
            resp.headers_mut().append("warning", v);
        }
    }
    resp
}

fn error(e: &ApiError) -> Response {
    respond(e.code(), &e.to_status(), &[])
}

/// The one handler behind every path.
pub async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error(&ApiError::BadRequest(format!("reading request body: {e}"))),
    };
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let routed = AssertUnwindSafe(route(
        &shared,
        &parts.method,
        &path,
        &query,
        &parts.headers,
        body,
    ))
    .catch_unwind()
    .await
    .unwrap_or_else(|_| {
        tracing::error!(method = %parts.method, path, "handler panicked");
        Err(ApiError::Internal(
            "the test server failed on this request (a bug: please report it)".into(),
        ))
    });
    match routed {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(method = %parts.method, path, code = e.code(), "refused: {e}");
            error(&e)
        }
    }
}

fn lock(shared: &Shared) -> Result<std::sync::MutexGuard<'_, State>, ApiError> {
    Ok(crate::lock(&shared.state))
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let get_only = |v: Value| -> Result<Response, ApiError> {
        if method == Method::GET {
            Ok(respond(200, &v, &[]))
        } else {
            Err(ApiError::MethodNotAllowed(format!(
                "the server does not allow this method on the requested resource: {method} {path}"
            )))
        }
    };
    match segs.as_slice() {
        ["version"] => get_only(discovery::version()),
        ["healthz"] | ["readyz"] | ["livez"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(r)
        }
        ["api"] | ["apis"] if method == Method::GET && discovery::wants_aggregated(accept) => {
            let body = discovery::aggregated(&lock(shared)?.registry, segs[0] == "api");
            let mut r = respond(200, &body, &[]);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(discovery::AGGREGATED),
            );
            Ok(r)
        }
        ["api"] => get_only(discovery::core_versions(&shared.addr)),
        ["apis"] => get_only(discovery::group_list(&lock(shared)?.registry)),
        ["api", v] => get_only(
            discovery::resource_list(&lock(shared)?.registry, "", v).ok_or(ApiError::NoRoute)?,
        ),
        ["apis", g] => {
            get_only(discovery::group(&lock(shared)?.registry, g).ok_or(ApiError::NoRoute)?)
        }
        ["apis", g, v] => get_only(
            discovery::resource_list(&lock(shared)?.registry, g, v).ok_or(ApiError::NoRoute)?,
        ),
        ["openapi", "v2"] => {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if accept.contains("protobuf") && !accept.contains("application/json") {
                // An empty protobuf message is a valid, empty openapi_v2.Document.
                let mut r = Response::new(Body::empty());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    ),
                );
                Ok(r)
            } else {
                get_only(discovery::openapi_v2())
            }
        }
        ["openapi", "v3"] => get_only(discovery::openapi_v3_root(&lock(shared)?.registry)),
        ["openapi", "v3", "api", v] => get_only(
            discovery::openapi_v3_doc(&lock(shared)?.registry, "", v).ok_or(ApiError::NoRoute)?,
        ),
        ["openapi", "v3", "apis", g, v] => get_only(
            discovery::openapi_v3_doc(&lock(shared)?.registry, g, v).ok_or(ApiError::NoRoute)?,
        ),
        ["api", v, rest @ ..] => resource(shared, method, "", v, rest, q, headers, body).await,
        ["apis", g, v, rest @ ..] => resource(shared, method, g, v, rest, q, headers, body).await,
        _ => Err(ApiError::NoRoute),
    }
}

struct Target {
    rt: Arc<ResourceType>,
    ns: Option<String>,
    name: Option<String>,
    sub: Sub,
}

fn target(state: &State, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let find = |plural: &str| state.registry.find(group, version, plural);
    let (ns, rest) = match rest {
        ["namespaces", ns, res, tail @ ..] if find(res).is_some_and(|t| t.namespaced) => {
            (Some(ns.to_string()), {
                let mut v = vec![*res];
                v.extend_from_slice(tail);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let (res, name, sub) = match rest.as_slice() {
        [res] => (*res, None, None),
        [res, name] => (*res, Some(name.to_string()), None),
        [res, name, sub] => (*res, Some(name.to_string()), Some(*sub)),
        _ => return Err(ApiError::NoRoute),
    };
    let rt = find(res).ok_or(ApiError::NoRoute)?;
    if rt.namespaced && ns.is_none() && name.is_some() {
        return Err(ApiError::NoRoute);
    }
    let sub = match sub {
        None => Sub::Main,
        Some("status") if rt.status => Sub::Status,
        Some("scale") if rt.scale.is_some() => Sub::Scale,
        Some(_) => return Err(ApiError::NoRoute),
    };
    Ok(Target { rt, ns, name, sub })
}

fn flag(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true") | Some("1"))
}

fn dry_run(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "dryRun {other:?} is invalid: the only valid value is All"
        ))),
    }
}

fn write_opts(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    apply: bool,
) -> Result<WriteOpts, ApiError> {
    let manager = match q.get("fieldManager") {
        Some(m) if !m.is_empty() => m.clone(),
        _ if apply => String::new(),
        _ => headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_string(),
    };
    if manager.len() > 128 {
        return Err(ApiError::BadRequest(
            "fieldManager must be at most 128 characters".into(),
        ));
    }
    Ok(WriteOpts {
        dry_run: dry_run(q)?,
        manager,
        validation: FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?,
        force: flag(q, "force"),
    })
}

fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let media = ct.split(';').next().unwrap_or_default().trim();
    match media {
        "application/json" | "" => serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding JSON body: {e}"))),
        "application/yaml" => serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML body: {e}"))),
        "application/vnd.kubernetes.protobuf" => crate::proto::decode(body).map_err(|e| {
            ApiError::UnsupportedMediaType(format!(
                "application/json, application/yaml, application/vnd.kubernetes.protobuf for v1 Namespace, ConfigMap and Secret ({e})"
            ))
        }),
        _ => Err(ApiError::UnsupportedMediaType(
            "application/json, application/yaml".into(),
        )),
    }
}

/// How long a list or watch waits for the store to reach a resourceVersion
/// newer than its latest, as the watch cache does, before answering 504.
const FRESHNESS_WAIT: Duration = Duration::from_secs(3);

/// kube-apiserver's `ValidateListOptions`: a 422 on `ListOptions.meta.k8s.io`.
fn validate_list_options(q: &HashMap<String, String>, watch: bool) -> Result<(), ApiError> {
    let get = |k: &str| q.get(k).map_or("", String::as_str);
    let rvm = get("resourceVersionMatch");
    let rv = get("resourceVersion");
    let cont = get("continue");
    let send_initial = !get("sendInitialEvents").is_empty();
    let field = "resourceVersionMatch";
    let mut causes = Vec::new();
    if watch {
        if send_initial && rvm != "NotOlderThan" {
            causes.push(Cause::forbidden(
                field,
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !rvm.is_empty() {
            if !send_initial {
                causes.push(Cause::forbidden(
                    field,
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
            if rvm != "NotOlderThan" {
                causes.push(Cause::not_supported(field, &json!(rvm), &["NotOlderThan"]));
            }
            if !cont.is_empty() {
                causes.push(Cause::forbidden(
                    field,
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
        }
    } else {
        if !rvm.is_empty() {
            if rv.is_empty() {
                causes.push(Cause::forbidden(
                    field,
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            if !cont.is_empty() {
                causes.push(Cause::forbidden(
                    field,
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            if rvm != "Exact" && rvm != "NotOlderThan" {
                causes.push(Cause::not_supported(
                    field,
                    &json!(rvm),
                    &["Exact", "NotOlderThan", ""],
                ));
            }
            if rvm == "Exact" && rv == "0" {
                causes.push(Cause::forbidden(
                    field,
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
        }
        if send_initial {
            causes.push(Cause::forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            kind: "ListOptions".into(),
            group: "meta.k8s.io".into(),
            name: String::new(),
            causes,
        })
    }
}

/// The `resourceVersion` parameter: None when unset, else a number.
fn resource_version(q: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid resource version: resourceVersion: Invalid value: {v:?}: strconv.ParseUint: parsing {v:?}: invalid syntax"
            ))
        }),
    }
}

/// Waits (without the lock) until the store reaches `rv`, for at most
/// [`FRESHNESS_WAIT`]; then 504 `Too large resource version`.
async fn wait_fresh(shared: &Shared, rv: u64) -> Result<(), ApiError> {
    let mut changes = {
        let st = lock(shared)?;
        if st.store.rv() >= rv {
            return Ok(());
        }
        st.store.subscribe()
    };
    let deadline = tokio::time::Instant::now() + FRESHNESS_WAIT;
    loop {
        let current = lock(shared)?.store.rv();
        if current >= rv {
            return Ok(());
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(ApiError::TooLargeResourceVersion { requested: rv, current });
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let current = lock(shared)?.store.rv();
                if current >= rv {
                    return Ok(());
                }
                return Err(ApiError::TooLargeResourceVersion { requested: rv, current });
            }
        }
    }
}

fn list_query(rt: &ResourceType, q: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let builtin = rt.builtin;
    let fields = FieldSelector::parse_with(
        q.get("fieldSelector").map_or("", String::as_str),
        &rt.selectable,
        |f| match (builtin, f) {
            (Builtin::Node, "spec.unschedulable") => FieldRead::BoolOrFalse,
            (Builtin::CoreEvent, "source") => FieldRead::EventSource,
            _ => FieldRead::Path,
        },
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let limit = match q.get("limit") {
        Some(l) if !l.is_empty() => l
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest(format!("limit {l:?} is not an integer")))?
            .max(0) as usize,
        _ => 0,
    };
    Ok(ListQuery {
        labels,
        fields,
        limit,
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
    })
}

/// `DeleteOptions` from the body, or from the query when there is no body
/// (as kube-apiserver reads them), validated like `ValidateDeleteOptions`.
/// `gracePeriodSeconds` must be an integer but has no effect: upstream only
/// pods delete gracefully, and negative values count as 1.
fn delete_opts(q: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOpts, ApiError> {
    let decode_err = |field: &str, go_type: &str, v: &Value| {
        ApiError::BadRequest(format!(
            "DeleteOptions in version \"v1\" cannot be handled as a DeleteOptions: json: cannot unmarshal {} into Go struct field DeleteOptions.{field} of type {go_type}",
            match v {
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
                Value::Bool(_) => "bool",
                _ => "number",
            }
        ))
    };
    let (propagation, orphan, grace) = if body.is_empty() {
        let orphan = match q.get("orphanDependents").map(String::as_str) {
            None | Some("") => None,
            Some("true") | Some("1") => Some(true),
            Some("false") | Some("0") => Some(false),
            Some(v) => {
                return Err(ApiError::BadRequest(format!(
                    "orphanDependents: invalid boolean value {v:?}"
                )));
            }
        };
        let grace = match q.get("gracePeriodSeconds").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(v.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!("gracePeriodSeconds: invalid integer value {v:?}"))
            })?),
        };
        (
            q.get("propagationPolicy")
                .filter(|v| !v.is_empty())
                .cloned(),
            orphan,
            grace,
        )
    } else {
        let b: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding DeleteOptions: {e}")))?;
        if !b.is_object() {
            return Err(ApiError::BadRequest(
                "error decoding DeleteOptions: the body must be a JSON object".into(),
            ));
        }
        let propagation = match &b["propagationPolicy"] {
            Value::Null => None,
            Value::String(p) => Some(p.clone()),
            other => {
                return Err(decode_err(
                    "propagationPolicy",
                    "v1.DeletionPropagation",
                    other,
                ));
            }
        };
        let orphan = match &b["orphanDependents"] {
            Value::Null => None,
            Value::Bool(o) => Some(*o),
            other => return Err(decode_err("orphanDependents", "bool", other)),
        };
        let grace = match &b["gracePeriodSeconds"] {
            Value::Null => None,
            Value::Number(n) if n.as_i64().is_some() => n.as_i64(),
            other => return Err(decode_err("gracePeriodSeconds", "int64", other)),
        };
        (propagation, orphan, grace)
    };
    // Read and checked only; see the doc comment.
    let _ = grace;
    let mut causes = Vec::new();
    if let (Some(p), Some(_)) = (&propagation, orphan) {
        causes.push(Cause::invalid(
            "propagationPolicy",
            &json!(p),
            "orphanDependents and deletionPropagation cannot be both set",
        ));
    }
    if let Some(p) = &propagation
        && !matches!(p.as_str(), "Foreground" | "Background" | "Orphan")
    {
        causes.push(Cause::not_supported(
            "propagationPolicy",
            &json!(p),
            &["Foreground", "Background", "Orphan", "nil"],
        ));
    }
    let body_dry: Vec<Value> = if body.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|b| b["dryRun"].as_array().cloned())
            .unwrap_or_default()
    };
    for d in &body_dry {
        if d != "All" {
            causes.push(Cause::not_supported("dryRun", &json!([d]), &["All"]));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: "DeleteOptions".into(),
            group: "meta.k8s.io".into(),
            name: String::new(),
            causes,
        });
    }
    let propagation = propagation.or(match orphan {
        Some(true) => Some("Orphan".into()),
        Some(false) => Some("Background".into()),
        None => None,
    });
    let preconditions = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice::<Value>(body)
            .map(|b| b["preconditions"].clone())
            .unwrap_or_default()
    };
    let dry = !body_dry.is_empty() || dry_run(q)?;
    Ok(DeleteOpts {
        propagation,
        uid: preconditions["uid"].as_str().map(String::from),
        resource_version: preconditions["resourceVersion"].as_str().map(String::from),
        dry_run: dry,
    })
}

/// A list as JSON text, encoding one object at a time (no copy of the whole list).
fn list_json(rt: &ResourceType, items: &[Arc<Value>], meta: &Value) -> String {
    let mut out = String::with_capacity(64 + items.len() * 1024);
    out.push_str(&format!(
        "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{meta},\"items\":[",
        json!(format!("{}List", rt.kind)),
        json!(rt.api_version()),
    ));
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&present(rt, o).to_string());
    }
    out.push_str("]}");
    out
}

fn one_body(rt: &ResourceType, obj: Value, want: Want, include: IncludeObject) -> Value {
    match want {
        Want::Table if obj["kind"] != "Status" => {
            let meta = json!({ "resourceVersion": obj["metadata"]["resourceVersion"] });
            table::table(rt, &[obj], meta, include)
        }
        _ => obj,
    }
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = {
        let st = lock(shared)?;
        target(&st, group, version, rest)?
    };
    let want = negotiate(headers)?;
    let include =
        IncludeObject::parse(q.get("includeObject").map(String::as_str)).ok_or_else(|| {
            ApiError::BadRequest("includeObject must be None, Metadata or Object".into())
        })?;
    let ns = t.ns.clone().unwrap_or_default();
    let rt = t.rt.clone();
    let not_allowed = || {
        ApiError::MethodNotAllowed(format!(
            "the server does not allow this method on the requested resource: {method}"
        ))
    };
    match (method.clone(), &t.name) {
        (Method::GET, None) if flag(q, "watch") => {
            watch_response(shared, &t, q, want, include).await
        }
        (Method::GET, None) => {
            validate_list_options(q, false)?;
            let rv = resource_version(q)?;
            let lq = list_query(&rt, q)?;
            if lq.continue_token.is_some() && rv.is_some_and(|v| v != 0) {
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            if let Some(rv) = rv.filter(|v| *v > 0) {
                wait_fresh(shared, rv).await?;
            }
            let mut st = lock(shared)?;
            if let Some(rv) = rv
                && q.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
                && rv != st.store.rv()
            {
                return Err(ApiError::Gone(format!(
                    "too old resource version: {rv} ({})",
                    st.store.rv()
                )));
            }
            let (items, meta) = st.list(&rt, t.ns.as_deref(), &lq)?;
            drop(st);
            Ok(match want {
                Want::Table => {
                    let items: Vec<Value> = items.iter().map(|o| present(&rt, o)).collect();
                    respond(200, &table::table(&rt, &items, meta, include), &[])
                }
                Want::Json => {
                    let mut resp = Response::new(Body::from(list_json(&rt, &items, &meta)));
                    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    resp
                }
            })
        }
        (Method::GET, Some(_)) if flag(q, "watch") => Err(ApiError::NotImplemented(
            "watching one object by its path is not implemented: watch the list with fieldSelector=metadata.name=NAME".into(),
        )),
        (Method::GET, Some(name)) => {
            let st = lock(shared)?;
            let obj = present(&rt, st.get(&rt, &ns, name)?.as_ref());
            let obj = if t.sub == Sub::Scale {
                st.scale_of(&rt, &obj)?
            } else {
                obj
            };
            Ok(respond(200, &one_body(&rt, obj, want, include), &[]))
        }
        // The all-namespaces path of a namespaced kind serves list and watch only.
        (Method::POST | Method::DELETE, None) if rt.namespaced && t.ns.is_none() => {
            Err(not_allowed())
        }
        (Method::POST, None) if t.sub == Sub::Main => {
            let opts = write_opts(q, headers, false)?;
            let obj = decode_body(headers, &body)?;
            let (obj, warnings) = lock(shared)?.create(&rt, &ns, obj, &opts)?;
            Ok(respond(201, &one_body(&rt, obj, want, include), &warnings))
        }
        (Method::PUT, Some(name)) => {
            let opts = write_opts(q, headers, false)?;
            let obj = decode_body(headers, &body)?;
            let mut st = lock(shared)?;
            let (obj, warnings) = st.update(&rt, &ns, name, obj, t.sub, &opts)?;
            let obj = if t.sub == Sub::Scale {
                st.scale_of(&rt, &obj)?
            } else {
                obj
            };
            Ok(respond(200, &one_body(&rt, obj, want, include), &warnings))
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let ty = match ct.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/json-patch+json" => PatchType::Json,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                _ => return Err(ApiError::UnsupportedMediaType("application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json".into())),
            };
            let opts = write_opts(q, headers, ty == PatchType::Apply)?;
            if opts.force && ty != PatchType::Apply {
                return Err(ApiError::BadRequest(
                    "force: Invalid value: true: may not be specified for non-apply patch".into(),
                ));
            }
            let mut st = lock(shared)?;
            let (obj, warnings) = st.patch(&rt, &ns, name, ty, &body, t.sub, &opts)?;
            let obj = if t.sub == Sub::Scale {
                st.scale_of(&rt, &obj)?
            } else {
                obj
            };
            Ok(respond(200, &one_body(&rt, obj, want, include), &warnings))
        }
        (Method::DELETE, Some(name)) if t.sub == Sub::Main => {
            let opts = delete_opts(q, &body)?;
            let (code, obj) = lock(shared)?.delete(&rt, &ns, name, &opts)?;
            Ok(respond(code, &obj, &[]))
        }
        (Method::DELETE, None) => {
            let opts = delete_opts(q, &body)?;
            let lq = list_query(&rt, q)?;
            let list = lock(shared)?.delete_collection(&rt, t.ns.as_deref(), &lq, &opts)?;
            Ok(respond(200, &list, &[]))
        }
        _ => Err(not_allowed()),
    }
}

async fn watch_response(
    shared: &Arc<Shared>,
    t: &Target,
    q: &HashMap<String, String>,
    want: Want,
    include: IncludeObject,
) -> Result<Response, ApiError> {
    validate_list_options(q, true)?;
    let lq = list_query(&t.rt, q)?;
    let rv = resource_version(q)?.filter(|v| *v > 0);
    let send_initial = flag(q, "sendInitialEvents");
    // Upstream's default is a random 30 to 60 minutes; 0 means that default,
    // and a negative value ends the watch at once.
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        None => Duration::from_secs(1800),
        Some(s) => match s.parse::<i64>() {
            Ok(0) => Duration::from_secs(1800),
            Ok(n) => Duration::from_secs(n.max(0) as u64),
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "timeoutSeconds {s:?} is not an integer"
                )));
            }
        },
    };
    // A watch that sends the initial state waits for the store to reach the
    // requested version, as the watch cache does, and otherwise ends with one
    // ERROR event; a plain watch from a future version gets the changes after it.
    if send_initial
        && let Some(rv) = rv
        && let Err(e) = wait_fresh(shared, rv).await
    {
        let mut line = json!({ "type": "ERROR", "object": e.to_status() }).to_string();
        line.push('\n');
        let mut resp = Response::new(Body::from(line));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let params = WatchParams {
        rt: t.rt.clone(),
        ns: t.ns.clone(),
        labels: lq.labels,
        fields: lq.fields,
        rv,
        send_initial,
        bookmarks: flag(q, "allowWatchBookmarks"),
        timeout,
        bookmark_every: shared.bookmark_every,
        table: (want == Want::Table).then_some(include),
        stop: shared.stop.clone(),
    };
    let rx = watch::start(shared.state.clone(), params)?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Bytes::from(line)), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_without_panics() {
        assert_eq!(percent_decode("a%3Db%2Cc+d"), "a=b,c d");
        assert_eq!(percent_decode("%E2%9C%93"), "\u{2713}");
        assert_eq!(percent_decode("%\u{e9}x"), "%\u{e9}x");
        assert_eq!(percent_decode("50%"), "50%");
        let q = parse_query(Some("labelSelector=app%3Dweb&watch=1&x"));
        assert_eq!(q.get("labelSelector").map(String::as_str), Some("app=web"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
    }

    #[test]
    fn accept_headers_pick_json_or_table() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            ),
        );
        assert_eq!(negotiate(&h).ok(), Some(Want::Table));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf, */*"),
        );
        assert_eq!(negotiate(&h).ok(), Some(Want::Json));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf"),
        );
        assert!(negotiate(&h).is_err());
    }
}

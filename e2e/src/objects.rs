//! The object verbs: get, list, create, update, patch, delete and
//! deletecollection, with kube-apiserver's rules for resourceVersion
//! preconditions, generation, status and scale subresources, finalizers and
//! deletionTimestamp, dry runs and field management.
//!
//! All of it runs under the server's one lock on [`State`]; nothing here does
//! I/O. Kind-specific rules (Namespaces, CRDs, Secrets, Events) are in
//! `kinds`; garbage collection of dependents is in `gc`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use kube::core::cel::Validator as CelValidator;
use serde_json::{Value, json};

use crate::admission::{self, FieldValidation};
use crate::jsonpath;
use crate::kinds;
use crate::managed;
use crate::patch;
use crate::registry::{Builtin, Registry, ResourceType};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError, Cause};
use crate::store::Store;

mod delete;
mod patching;
mod scale;

/// Which part of an object a request addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    /// The object.
    Main,
    /// `/status`.
    Status,
    /// `/scale`.
    Scale,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Self::Main => "",
            Self::Status => "status",
            Self::Scale => "scale",
        }
    }
}

/// Options shared by writes.
#[derive(Clone, Debug)]
pub struct WriteOpts {
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `fieldManager`, or the user agent's program name.
    pub manager: String,
    /// `fieldValidation`.
    pub validation: FieldValidation,
    /// `force` (apply only).
    pub force: bool,
}

/// PATCH body types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

/// `DeleteOptions` that matter here.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    /// `Orphan`, `Background` or `Foreground`.
    pub propagation: Option<String>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// List parameters.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Parsed `labelSelector`.
    pub labels: LabelSelector,
    /// Parsed `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit`, 0 for all.
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
}

/// The objects a paginated list walks: every object of the resource in its
/// scope at one resourceVersion, in key order, unfiltered, so a continue
/// token applies the selectors of the request that carries it, as upstream.
struct Snapshot {
    id: u64,
    key: String,
    ns: Option<String>,
    rv: u64,
    taken: std::time::Instant,
    items: Arc<Vec<Arc<Value>>>,
}

/// What the lock guards.
#[derive(Debug)]
pub struct State {
    /// Objects and events.
    pub store: Store,
    /// Served kinds.
    pub registry: Registry,
    cel: CelValidatorBox,
    snapshots: VecDeque<SnapshotBox>,
    next_snapshot: u64,
    next_uid: u64,
    uid_seed: u64,
    history: usize,
}

struct CelValidatorBox(CelValidator);
impl std::fmt::Debug for CelValidatorBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CelValidator")
    }
}
struct SnapshotBox(Snapshot);
impl std::fmt::Debug for SnapshotBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot({})", self.0.id)
    }
}

/// At most this many list snapshots are kept for continue tokens; the
/// oldest goes first.
const MAX_SNAPSHOTS: usize = 64;
/// A continue token works, and can be retried, for this long; then 410.
/// (Upstream a token lives until etcd compacts its revision, 5 minutes by default.)
const SNAPSHOT_TTL: std::time::Duration = std::time::Duration::from_secs(300);

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";

/// The current time as an RFC 3339 timestamp with second precision.
pub fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Sets the apiVersion a client asked for on a stored object.
pub fn present(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = kinds::convert_out(rt, obj);
    o["apiVersion"] = json!(rt.api_version());
    o["kind"] = json!(rt.kind);
    o
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::Conflict {
        resource: rt.qualified(),
        name: name.into(),
        detail: "the object has been modified; please apply your changes to the latest version and try again".into(),
    }
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::NotFound {
        resource: rt.qualified(),
        name: name.into(),
    }
}

/// The object without metadata (and status, when it has its own subresource).
fn spec_part(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        if rt.status {
            m.remove("status");
        }
    }
    o
}

fn without_volatile(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    o
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(String::from))
        .collect()
}

impl State {
    /// An empty state serving the built-in kinds, with the usual namespaces.
    pub fn new(history: usize) -> Self {
        let mut s = Self {
            store: Store::new(history),
            registry: Registry::builtins(),
            cel: CelValidatorBox(CelValidator::new()),
            snapshots: VecDeque::new(),
            next_snapshot: 0,
            next_uid: 0,
            history,
            uid_seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        if let Some(ns) = s.registry.find("", "v1", "namespaces") {
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let body =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                let opts = WriteOpts {
                    dry_run: false,
                    manager: "runv-testserver".into(),
                    validation: FieldValidation::Strict,
                    force: false,
                };
                // Fixed, valid names: creation cannot fail.
                let _ = s.create(&ns, "", body, &opts);
            }
        }
        s
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        let a = self.uid_seed ^ self.next_uid.wrapping_mul(0x9e3779b97f4a7c15);
        let b = self.next_uid;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            (b >> 48) as u16 & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Reads one object.
    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.store
            .get(&kinds::store_key(rt), ns, name)
            .ok_or_else(|| not_found(rt, name))
    }

    /// Lists objects; returns items and list metadata. With a `limit`, the
    /// rest is kept as a snapshot that continue tokens page through; a token
    /// can be used again until the snapshot expires.
    pub fn list(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        q: &ListQuery,
    ) -> Result<(Vec<Arc<Value>>, Value), ApiError> {
        let key = kinds::store_key(rt);
        let matches = |o: &Value| {
            // Labels read the same in every version; fields may need conversion.
            q.labels.matches(&o["metadata"]["labels"])
                && (q.fields.is_empty() || q.fields.matches(&present(rt, o)))
        };
        let now = std::time::Instant::now();
        self.snapshots
            .retain(|s| now.duration_since(s.0.taken) < SNAPSHOT_TTL);
        let (snapshot, rv, all, start) = match &q.continue_token {
            Some(token) => {
                let invalid = || ApiError::BadRequest("continue key is not valid".into());
                let mut parts = token.splitn(3, ':').map(str::parse::<u64>);
                let Some(Ok(id)) = parts.next() else {
                    return Err(invalid());
                };
                let snap = self
                    .snapshots
                    .iter()
                    .find(|s| s.0.id == id)
                    .ok_or_else(|| ApiError::Gone(CONTINUE_EXPIRED.into()))?;
                let (Some(Ok(_)), Some(Ok(pos))) = (parts.next(), parts.next()) else {
                    return Err(invalid());
                };
                if snap.0.key != key || snap.0.ns.as_deref() != ns {
                    return Err(invalid());
                }
                (
                    Some(id),
                    snap.0.rv,
                    snap.0.items.clone(),
                    (pos as usize).min(snap.0.items.len()),
                )
            }
            None if q.limit == 0 => {
                let all = match q.fields.name() {
                    Some(name) => match ns {
                        Some(ns) => self.store.get(&key, ns, name).into_iter().collect(),
                        None => self
                            .store
                            .list(&key, None)
                            .into_iter()
                            .filter(|o| o["metadata"]["name"] == name)
                            .collect(),
                    },
                    None => self.store.list(&key, ns),
                };
                let items: Vec<Arc<Value>> = all.into_iter().filter(|o| matches(o)).collect();
                let meta = json!({ "resourceVersion": self.store.rv().to_string() });
                return Ok((items, meta));
            }
            None => (
                None,
                self.store.rv(),
                Arc::new(self.store.list(&key, ns)),
                0,
            ),
        };
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut items = Vec::new();
        let mut next = start;
        while next < all.len() && items.len() < limit {
            if matches(&all[next]) {
                items.push(all[next].clone());
            }
            next += 1;
        }
        let more = all[next..].iter().any(|o| matches(o));
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if more {
            let id = match snapshot {
                Some(id) => id,
                None => {
                    self.next_snapshot += 1;
                    let id = self.next_snapshot;
                    self.snapshots.push_back(SnapshotBox(Snapshot {
                        id,
                        key: key.clone(),
                        ns: ns.map(String::from),
                        rv,
                        taken: now,
                        items: all.clone(),
                    }));
                    while self.snapshots.len() > MAX_SNAPSHOTS {
                        self.snapshots.pop_front();
                    }
                    id
                }
            };
            meta["continue"] = json!(format!("{id}:{rv}:{next}"));
            // Upstream counts the rest only when nothing filters it.
            if q.labels.is_empty() && q.fields.is_empty() {
                meta["remainingItemCount"] = json!(all.len() - next);
            }
        }
        Ok((items, meta))
    }

    fn check_namespace(&self, rt: &ResourceType, ns: &str, creating: bool) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        let nsrt = self
            .registry
            .find("", "v1", "namespaces")
            .ok_or(ApiError::NoRoute)?;
        let Some(n) = self.store.get(&kinds::store_key(&nsrt), "", ns) else {
            return Err(ApiError::NotFound {
                resource: "namespaces".into(),
                name: ns.into(),
            });
        };
        if creating && !n["metadata"]["deletionTimestamp"].is_null() {
            return Err(ApiError::Forbidden(format!(
                "{} {:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                rt.qualified(),
                ""
            )));
        }
        Ok(())
    }

    fn check_type(rt: &ResourceType, body: &mut Value) -> Result<(), ApiError> {
        if !body.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        let av = body["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = body["kind"].as_str().unwrap_or_default().to_string();
        if (!av.is_empty() && av != rt.api_version()) || (!kind.is_empty() && kind != rt.kind) {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        if rt.builtin != Builtin::Custom {
            for field in [
                "spec",
                "status",
                "data",
                "binaryData",
                "stringData",
                "involvedObject",
                "regarding",
                "source",
            ] {
                let v = &body[field];
                if !v.is_null() && !v.is_object() {
                    return Err(ApiError::BadRequest(format!(
                        "{kind} in version {:?} cannot be handled as a {kind}: json: cannot unmarshal {} into Go struct field {kind}.{field}",
                        rt.version,
                        match v {
                            Value::String(_) => "string",
                            Value::Array(_) => "array",
                            Value::Bool(_) => "bool",
                            _ => "number",
                        },
                        kind = rt.kind,
                    )));
                }
            }
        }
        body["apiVersion"] = json!(rt.api_version());
        body["kind"] = json!(rt.kind);
        match &body["metadata"] {
            Value::Object(_) => {}
            Value::Null => body["metadata"] = json!({}),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "{kind} in version {:?} cannot be handled as a {kind}: metadata must be an object",
                    rt.version,
                    kind = rt.kind
                )));
            }
        }
        Ok(())
    }

    fn admit(
        &self,
        rt: &ResourceType,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOpts,
    ) -> Result<Vec<String>, ApiError> {
        admission::validate_metadata(rt, obj)?;
        kinds::validate(rt, obj, old)?;
        let unknown = if rt.builtin == Builtin::Custom {
            let old = old.map(|o| present(rt, o));
            admission::admit_custom(rt, &self.cel.0, obj, old.as_ref(), opts.validation)?
        } else {
            let unknown = kinds::prune_top_level(rt, obj);
            if opts.validation == FieldValidation::Strict && !unknown.is_empty() {
                return Err(admission::strict_decoding_error(rt, &unknown));
            }
            unknown
        };
        if opts.validation == FieldValidation::Warn {
            Ok(admission::unknown_field_warnings(&unknown))
        } else {
            Ok(Vec::new())
        }
    }

    /// Creates an object; returns it and any warnings.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut body: Value,
        opts: &WriteOpts,
    ) -> Result<(Value, Vec<String>), ApiError> {
        Self::check_type(rt, &mut body)?;
        let meta = &mut body["metadata"];
        if rt.namespaced {
            match meta["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => meta["namespace"] = json!(ns),
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if meta["resourceVersion"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::BadRequest(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        if meta["name"].as_str().unwrap_or_default().is_empty()
            && let Some(prefix) = meta["generateName"].as_str()
        {
            let suffix: String = self
                .uid()
                .chars()
                .rev()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(5)
                .collect();
            meta["name"] = json!(format!("{prefix}{suffix}"));
        }
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        self.check_namespace(rt, ns, true)?;
        let uid = self.uid();
        let meta = &mut body["metadata"];
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(now());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("generation");
        }
        if rt.has_generation() {
            body["metadata"]["generation"] = json!(1);
        }
        if rt.status
            && matches!(rt.builtin, Builtin::Custom | Builtin::Crd)
            && let Some(m) = body.as_object_mut()
        {
            m.remove("status");
        }
        kinds::prepare_create(rt, &mut body);
        let warnings = self.admit(rt, &mut body, None, opts)?;
        let key = kinds::store_key(rt);
        if self
            .store
            .get(&key, if rt.namespaced { ns } else { "" }, &name)
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                resource: rt.qualified(),
                name,
            });
        }
        if opts.manager != "__apply" {
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
            managed::record_update(rt, None, &mut body, &opts.manager, "", &now());
        }
        if opts.dry_run {
            return Ok((body, warnings));
        }
        let stored = kinds::convert_in(rt, &body);
        let stored = self.store.put(&key, stored);
        kinds::after_write(self, rt, &stored).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((present(rt, &stored), warnings))
    }

    /// Replaces an object (PUT) on the main resource or a subresource.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut body: Value,
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let old = self.get(rt, ns, name)?;
        let old_shown = present(rt, &old);
        if sub == Sub::Scale {
            body = self.scale_to_object(rt, &old_shown, &body)?;
        } else {
            Self::check_type(rt, &mut body)?;
        }
        if rt.namespaced
            && sub != Sub::Scale
            && body["metadata"]["namespace"]
                .as_str()
                .is_some_and(|n| !n.is_empty() && n != ns)
        {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                body["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        match body["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() => {
                let current = old["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if rv != current {
                    return Err(conflict(rt, name));
                }
            }
            _ if rt.builtin == Builtin::Custom && sub == Sub::Main => {
                return Err(ApiError::Invalid {
                    kind: rt.kind.clone(),
                    group: rt.group.clone(),
                    name: name.into(),
                    causes: vec![Cause::invalid(
                        "metadata.resourceVersion",
                        &json!("0x0"),
                        "must be specified for an update",
                    )],
                });
            }
            _ => {}
        }
        if let Some(uid) = body["metadata"]["uid"].as_str()
            && !uid.is_empty()
            && uid != old["metadata"]["uid"].as_str().unwrap_or_default()
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                detail: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            });
        }
        self.write_update(rt, &old_shown, body, sub, opts, false)
    }

    /// Common tail of PUT, PATCH and apply: subresource isolation,
    /// server-owned metadata, generation, admission, field management, store.
    fn write_update(
        &mut self,
        rt: &ResourceType,
        old: &Value,
        mut new: Value,
        sub: Sub,
        opts: &WriteOpts,
        applied: bool,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let name = old["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ns = old["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match sub {
            Sub::Status => {
                let mut merged = old.clone();
                match new.get("status") {
                    Some(s) => merged["status"] = s.clone(),
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                merged["metadata"]["managedFields"] = new["metadata"]["managedFields"].clone();
                merged["metadata"]["resourceVersion"] = new["metadata"]["resourceVersion"].clone();
                new = merged;
            }
            Sub::Main | Sub::Scale => {
                if rt.status {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
            }
        }
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        if rt.builtin == Builtin::Custom
            && sub == Sub::Main
            && !rt.namespaced
            && let Some(m) = new["metadata"].as_object_mut()
        {
            m.remove("namespace");
        }
        let deleting = !old["metadata"]["deletionTimestamp"].is_null();
        if deleting {
            let before = finalizers(old);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::Invalid {
                    kind: rt.kind.clone(),
                    group: rt.group.clone(),
                    name: name.clone(),
                    causes: vec![Cause {
                        reason: "FieldValueForbidden".into(),
                        field: "metadata.finalizers".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{added:?}}}"
                        ),
                    }],
                });
            }
        }
        let warnings = self.admit(rt, &mut new, Some(old), opts)?;
        if rt.has_generation() && spec_part(rt, &new) != spec_part(rt, old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if !applied {
            managed::record_update(rt, Some(old), &mut new, &opts.manager, sub.name(), &now());
        }
        if without_volatile(&new) == without_volatile(old)
            && new["metadata"]["managedFields"] == old["metadata"]["managedFields"]
        {
            return Ok((old.clone(), warnings));
        }
        if opts.dry_run {
            return Ok((new, warnings));
        }
        let key = kinds::store_key(rt);
        if deleting && finalizers(&new).is_empty() {
            let gone = self
                .store
                .remove(&key, &ns, &name)
                .ok_or_else(|| not_found(rt, &name))?;
            kinds::after_delete(self, rt, &gone);
            let mut shown = present(rt, &new);
            shown["metadata"]["resourceVersion"] = gone["metadata"]["resourceVersion"].clone();
            return Ok((shown, warnings));
        }
        let stored = self.store.put(&key, kinds::convert_in(rt, &new));
        kinds::after_write(self, rt, &stored).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((present(rt, &stored), warnings))
    }

    /// Writes an object on behalf of a server controller, skipping admission.
    pub fn controller_put(&mut self, rt: &ResourceType, obj: Value) -> Arc<Value> {
        self.store
            .put(&kinds::store_key(rt), kinds::convert_in(rt, &obj))
    }

    /// Drops every object (before a restore from a file).
    pub fn reset_objects(&mut self) {
        self.store = Store::new(self.history);
    }

    /// Counts stored objects per resource, for the benchmark and tests.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.store
            .keys()
            .into_iter()
            .map(|k| {
                let n = self.store.list(&k, None).len();
                (k, n)
            })
            .collect()
    }
}

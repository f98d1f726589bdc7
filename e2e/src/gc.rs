//! Server-side controllers that kube-apiserver's control plane runs: the
//! garbage collector (ownerReferences with background, foreground and orphan
//! propagation) and the namespace lifecycle controller (a deleted namespace
//! is emptied, then removed).
//!
//! [`run`] follows the event log and reacts to deletions and to objects
//! marked for deletion; each pass is one [`sweep`] under the state lock.
//! Dependents are found by a scan of the store, so a sweep costs a pass
//! over the objects only when something was deleted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::lock;
use crate::objects::{DeleteOpts, State, present};
use crate::registry::{Builtin, ResourceType};
use crate::store::EventType;

fn owners(obj: &Value) -> Vec<Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn has_finalizer(obj: &Value, f: &str) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == f))
}

fn type_for_key(state: &State, key: &str) -> Option<Arc<ResourceType>> {
    state
        .registry
        .all()
        .iter()
        .find(|t| {
            crate::kinds::store_key(t) == key
                && t.version == t.storage_version
                && t.builtin != Builtin::Event
        })
        .cloned()
}

/// Whether the owner an ownerReference names exists (same uid). Unknown kinds count as present.
fn owner_exists(state: &State, dependent_ns: &str, r: &Value) -> bool {
    let Some(rt) = state.registry.find_kind(
        r["apiVersion"].as_str().unwrap_or_default(),
        r["kind"].as_str().unwrap_or_default(),
    ) else {
        return true;
    };
    let ns = if rt.namespaced { dependent_ns } else { "" };
    state
        .store
        .get(
            &crate::kinds::store_key(&rt),
            ns,
            r["name"].as_str().unwrap_or_default(),
        )
        .is_some_and(|o| o["metadata"]["uid"] == r["uid"])
}

/// All objects (with their types) that reference `uid` as an owner.
fn dependents(state: &State, uid: &Value) -> Vec<(Arc<ResourceType>, Arc<Value>)> {
    let mut out = Vec::new();
    for key in state.store.keys() {
        let Some(rt) = type_for_key(state, &key) else {
            continue;
        };
        for obj in state.store.list(&key, None) {
            if owners(&obj).iter().any(|r| r["uid"] == *uid) {
                out.push((rt.clone(), obj));
            }
        }
    }
    out
}

/// One pass over the events after `cursor`; returns the new cursor.
pub fn sweep(state: &mut State, cursor: u64) -> u64 {
    let mut owners_gone = Vec::new();
    let mut deleting = Vec::new();
    let mut namespaces = Vec::new();
    let latest = state.store.rv();
    let keys = state.store.keys();
    let mut events = Vec::new();
    for key in keys {
        match state.store.events_after(&key, cursor, usize::MAX) {
            Ok(e) => events.extend(e),
            Err(_) => {
                // The log moved past us: re-check every object marked for deletion.
                for obj in state.store.list(&key, None) {
                    if !obj["metadata"]["deletionTimestamp"].is_null() {
                        deleting.push((key.clone(), obj));
                    }
                }
            }
        }
    }
    events.sort_by_key(|e| e.rv);
    for e in &events {
        let ns = e.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match e.kind {
            EventType::Deleted => {
                owners_gone.push(e.object["metadata"]["uid"].clone());
                if !ns.is_empty() {
                    namespaces.push(ns);
                }
                for r in owners(&e.object) {
                    owners_gone.push(json!({"check": r["uid"]}));
                }
            }
            _ if !e.object["metadata"]["deletionTimestamp"].is_null() => {
                deleting.push((e.key.clone(), e.object.clone()));
            }
            _ => {}
        }
    }
    // One pass over the store per sweep, however many objects went:
    // dependents of a removed owner whose owners are all gone are deleted
    // in the background, and owners waiting in foreground deletion for a
    // removed dependent are re-checked.
    let gone: HashSet<Value> = owners_gone
        .iter()
        .filter(|u| !u.is_object())
        .cloned()
        .collect();
    let check: HashSet<Value> = owners_gone
        .iter()
        .filter_map(|u| u.get("check"))
        .cloned()
        .collect();
    if !gone.is_empty() || !check.is_empty() {
        let mut orphans = Vec::new();
        for key in state.store.keys() {
            let Some(rt) = type_for_key(state, &key) else {
                continue;
            };
            for obj in state.store.list(&key, None) {
                if check.contains(&obj["metadata"]["uid"]) {
                    deleting.push((key.clone(), obj.clone()));
                }
                if owners(&obj).iter().any(|r| gone.contains(&r["uid"])) {
                    orphans.push((rt.clone(), obj));
                }
            }
        }
        for (rt, dep) in orphans {
            let (ns, name) = crate::store::key_of(&dep);
            if owners(&dep).iter().all(|r| !owner_exists(state, &ns, r)) {
                let _ = state.delete(&rt, &ns, &name, &DeleteOpts::default());
            }
        }
    }
    for (key, obj) in deleting {
        let Some(rt) = type_for_key(state, &key) else {
            continue;
        };
        let (ns, name) = crate::store::key_of(&obj);
        // Work from the current version of the object.
        let Some(obj) = state.store.get(&key, &ns, &name) else {
            continue;
        };
        if obj["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let uid = obj["metadata"]["uid"].clone();
        if rt.builtin == Builtin::Namespace {
            namespaces.push(name.clone());
            continue;
        }
        if has_finalizer(&obj, "orphan") {
            for (drt, dep) in dependents(state, &uid) {
                let mut d = present(&drt, &dep);
                let refs: Vec<Value> = owners(&d).into_iter().filter(|r| r["uid"] != uid).collect();
                if refs.is_empty() {
                    if let Some(m) = d["metadata"].as_object_mut() {
                        m.remove("ownerReferences");
                    }
                } else {
                    d["metadata"]["ownerReferences"] = json!(refs);
                }
                state.controller_put(&drt, d);
            }
            state.remove_finalizer(&rt, &obj, "orphan");
        } else if has_finalizer(&obj, "foregroundDeletion") {
            let deps = dependents(state, &uid);
            let mut blocking = 0;
            for (drt, dep) in &deps {
                let (dns, dname) = crate::store::key_of(dep);
                if dep["metadata"]["deletionTimestamp"].is_null() {
                    let opts = DeleteOpts {
                        propagation: Some("Foreground".into()),
                        ..DeleteOpts::default()
                    };
                    let _ = state.delete(drt, &dns, &dname, &opts);
                }
                if state
                    .store
                    .get(&crate::kinds::store_key(drt), &dns, &dname)
                    .is_some()
                {
                    let blocks = owners(dep)
                        .iter()
                        .any(|r| r["uid"] == uid && r["blockOwnerDeletion"] == json!(true));
                    if blocks {
                        blocking += 1;
                    }
                }
            }
            if blocking == 0 {
                state.remove_finalizer(&rt, &obj, "foregroundDeletion");
            }
        }
    }
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        finish_namespace(state, &ns);
    }
    latest
}

fn finish_namespace(state: &mut State, ns: &str) {
    let Some(nsrt) = state.registry.find("", "v1", "namespaces") else {
        return;
    };
    let Some(obj) = state.store.get(&crate::kinds::store_key(&nsrt), "", ns) else {
        return;
    };
    if obj["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    let types: Vec<Arc<ResourceType>> = state
        .registry
        .all()
        .iter()
        .filter(|t| t.namespaced && t.version == t.storage_version && t.builtin != Builtin::Event)
        .cloned()
        .collect();
    for rt in &types {
        for o in state.store.list(&crate::kinds::store_key(rt), Some(ns)) {
            if o["metadata"]["deletionTimestamp"].is_null() {
                let name = o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let _ = state.delete(rt, ns, &name, &DeleteOpts::default());
            }
        }
    }
    let still: usize = types
        .iter()
        .map(|t| {
            state
                .store
                .list(&crate::kinds::store_key(t), Some(ns))
                .len()
        })
        .sum();
    if still > 0 {
        return;
    }
    // Empty: the "kubernetes" spec finalizer is done, and the namespace goes
    // unless metadata finalizers still hold it.
    let key = crate::kinds::store_key(&nsrt);
    if obj["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        state.store.remove(&key, "", ns);
    } else if obj["spec"]["finalizers"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        let mut o = present(&nsrt, &obj);
        o["spec"] = json!({ "finalizers": [] });
        state.controller_put(&nsrt, o);
    }
}

/// Follows the event log until the state is dropped or the server stops.
pub async fn run(state: Arc<Mutex<State>>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let (mut changes, mut cursor) = {
        let s = lock(&state);
        (s.store.subscribe(), s.store.rv())
    };
    // Objects restored from a file may still be waiting.
    sweep_all_deleting(&mut lock(&state));
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        let mut s = lock(&state);
        cursor = sweep(&mut s, cursor);
    }
}

fn sweep_all_deleting(state: &mut State) {
    let _ = sweep(state, 0);
}

//! Watch streams: newline-delimited JSON `WatchEvent`s from a
//! resourceVersion, with initial state, bookmarks, timeouts and 410 Gone.
//!
//! Semantics follow kube-apiserver: no `resourceVersion` (or `"0"`) sends the
//! current objects as ADDED first; a given version sends exactly the changes
//! after it, or one ERROR event with a 410 Expired Status when it is older
//! than the event log keeps; `sendInitialEvents=true` ends the initial state
//! with a bookmark annotated `k8s.io/initial-events-end`; selectors turn a
//! modification into ADDED or DELETED when an object starts or stops
//! matching; `timeoutSeconds` ends the stream cleanly. This module reads the
//! store only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::objects::{State, present};
use crate::registry::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::EventType;
use crate::table::{self, IncludeObject};

/// What a watch asked for.
#[derive(Clone, Debug)]
pub struct WatchParams {
    /// The resource.
    pub rt: Arc<ResourceType>,
    /// One namespace, or all.
    pub ns: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// Start after this version; None sends the current state first.
    pub rv: Option<u64>,
    /// `sendInitialEvents=true`.
    pub send_initial: bool,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// End after this long.
    pub timeout: Duration,
    /// Bookmark period.
    pub bookmark_every: Duration,
    /// Events carry one-row Tables (`kubectl get -w`).
    pub table: Option<IncludeObject>,
    /// Server shutdown.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

fn matches(p: &WatchParams, obj: &Value) -> bool {
    let ns_ok =
        p.ns.as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str().unwrap_or_default() == ns);
    ns_ok && p.labels.matches(&obj["metadata"]["labels"]) && p.fields.matches(obj)
}

fn event_line(p: &WatchParams, kind: &str, obj: &Value) -> String {
    let object = match p.table {
        Some(include) => table::table(
            &p.rt,
            std::slice::from_ref(obj),
            json!({"resourceVersion": obj["metadata"]["resourceVersion"]}),
            include,
        ),
        None => obj.clone(),
    };
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    line
}

fn bookmark(p: &WatchParams, rv: u64, initial_end: bool) -> String {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let obj = json!({ "kind": p.rt.kind, "apiVersion": p.rt.api_version(), "metadata": meta });
    let mut line = json!({ "type": "BOOKMARK", "object": obj }).to_string();
    line.push('\n');
    line
}

fn gone(message: String) -> String {
    let mut line =
        json!({ "type": "ERROR", "object": ApiError::Gone(message).to_status() }).to_string();
    line.push('\n');
    line
}

/// Starts a watch; lines arrive on the returned channel until it ends.
pub fn start(state: Arc<Mutex<State>>, p: WatchParams) -> Result<mpsc::Receiver<String>, ApiError> {
    let (tx, rx) = mpsc::channel(256);
    let key = crate::kinds::store_key(&p.rt);
    let (mut cursor, initial, mut changes) = {
        let st = crate::lock(&state);
        let changes = st.store.subscribe();
        match p.rv {
            Some(rv) if !p.send_initial => {
                if st.store.is_compacted(rv) {
                    let msg = format!("too old resource version: {rv} ({})", st.store.rv());
                    let _ = tx.try_send(gone(msg));
                    return Ok(rx);
                }
                (rv, Vec::new(), changes)
            }
            _ => {
                let items: Vec<Value> = st
                    .store
                    .list(&key, p.ns.as_deref())
                    .iter()
                    .map(|o| present(&p.rt, o))
                    .filter(|o| matches(&p, o))
                    .collect();
                (st.store.rv(), items, changes)
            }
        }
    };
    tokio::spawn(async move {
        for obj in &initial {
            if tx.send(event_line(&p, "ADDED", obj)).await.is_err() {
                return;
            }
        }
        if p.send_initial && tx.send(bookmark(&p, cursor, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + p.timeout;
        let mut ticker = tokio::time::interval(p.bookmark_every);
        let mut stop = p.stop.clone();
        ticker.tick().await;
        loop {
            let batch = {
                let st = crate::lock(&state);
                match st.store.events_after(&key, cursor, 512) {
                    Ok(events) => {
                        let full = events.len() == 512;
                        let latest = st.store.rv();
                        Ok((events, full, latest))
                    }
                    Err(e) => Err(e.to_string()),
                }
            };
            let (events, full, latest) = match batch {
                Ok(b) => b,
                Err(msg) => {
                    let _ = tx.send(gone(msg)).await;
                    return;
                }
            };
            for e in &events {
                cursor = e.rv;
                let obj = present(&p.rt, &e.object);
                let now_matches = matches(&p, &obj);
                let kind = match e.kind {
                    EventType::Added if now_matches => "ADDED",
                    EventType::Deleted if now_matches => "DELETED",
                    EventType::Modified => {
                        let before = e
                            .old
                            .as_ref()
                            .is_some_and(|o| matches(&p, &present(&p.rt, o)));
                        match (before, now_matches) {
                            (true, true) => "MODIFIED",
                            (false, true) => "ADDED",
                            (true, false) => "DELETED",
                            (false, false) => continue,
                        }
                    }
                    _ => continue,
                };
                if tx.send(event_line(&p, kind, &obj)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            cursor = cursor.max(latest);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = ticker.tick() => {
                    if p.bookmarks && tx.send(bookmark(&p, cursor, false)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = stop.changed() => return,
            }
        }
    });
    Ok(rx)
}

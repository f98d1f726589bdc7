//! In-memory object storage with one monotonic resourceVersion and a bounded
//! watch event log.
//!
//! Objects are kept per resource (all versions of a resource share one map),
//! ordered by namespace then name as etcd orders its keys. Every write takes
//! the next resourceVersion, stamps it into `metadata.resourceVersion` and
//! appends an event to the log; the oldest events are compacted away once the
//! log holds `history` of them, and a watch from before that point gets 410
//! Gone. The store checks nothing about the objects it holds: admission,
//! preconditions and kind rules belong to the handlers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

/// Why a read of the event log failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested resourceVersion is older than the log's history.
    #[error("too old resource version: {requested} ({oldest})")]
    Compacted {
        /// What the client asked for.
        requested: u64,
        /// The oldest version still available.
        oldest: u64,
    },
}

/// Watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`.
    Added,
    /// `MODIFIED`.
    Modified,
    /// `DELETED`.
    Deleted,
}

impl EventType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change in the log.
#[derive(Clone, Debug)]
pub struct Event {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// Store key of the resource.
    pub key: String,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (for a delete: as it was, with the new version).
    pub object: Arc<Value>,
    /// The object before the change, for modifications.
    pub old: Option<Arc<Value>>,
}

/// Namespace (empty for cluster-scoped) and name.
pub type ObjectKey = (String, String);

/// All objects and the event log.
#[derive(Debug)]
pub struct Store {
    objects: BTreeMap<String, BTreeMap<ObjectKey, Arc<Value>>>,
    rv: u64,
    log: VecDeque<Event>,
    history: usize,
    /// Events with a version up to this one have been compacted away.
    compacted: u64,
    notify: watch::Sender<u64>,
}

/// Namespace and name of an object.
pub fn key_of(obj: &Value) -> ObjectKey {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl Store {
    /// An empty store keeping up to `history` events.
    pub fn new(history: usize) -> Self {
        let (notify, _) = watch::channel(0);
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            log: VecDeque::new(),
            history: history.max(1),
            compacted: 0,
            notify,
        }
    }

    /// The latest resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// A receiver woken on every write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// One object.
    pub fn get(&self, key: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(key)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// All objects of a resource, in one namespace or in all (`None`), in key order.
    pub fn list(&self, key: &str, ns: Option<&str>) -> Vec<Arc<Value>> {
        let Some(map) = self.objects.get(key) else {
            return Vec::new();
        };
        match ns {
            Some(ns) => map
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v.clone())
                .collect(),
            None => map.values().cloned().collect(),
        }
    }

    /// Every store key with objects.
    pub fn keys(&self) -> Vec<String> {
        self.objects.keys().cloned().collect()
    }

    /// Writes an object under the next resourceVersion and logs ADDED or MODIFIED.
    pub fn put(&mut self, key: &str, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let obj = Arc::new(obj);
        let old = self
            .objects
            .entry(key.to_string())
            .or_default()
            .insert(key_of(&obj), obj.clone());
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(key, kind, obj.clone(), old);
        obj
    }

    /// Removes an object and logs DELETED with a new resourceVersion.
    pub fn remove(&mut self, key: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        let old = self
            .objects
            .get_mut(key)?
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let last = Arc::new(last);
        self.record(key, EventType::Deleted, last.clone(), Some(old));
        Some(last)
    }

    fn record(&mut self, key: &str, kind: EventType, object: Arc<Value>, old: Option<Arc<Value>>) {
        self.log.push_back(Event {
            rv: self.rv,
            key: key.to_string(),
            kind,
            object,
            old,
        });
        while self.log.len() > self.history {
            if let Some(e) = self.log.pop_front() {
                self.compacted = e.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    /// Events of resource `key` after `rv`, at most `max`.
    pub fn events_after(&self, key: &str, rv: u64, max: usize) -> Result<Vec<Event>, StoreError> {
        if rv < self.compacted {
            return Err(StoreError::Compacted {
                requested: rv,
                oldest: self.compacted + 1,
            });
        }
        let start = self.log.partition_point(|e| e.rv <= rv);
        Ok(self
            .log
            .range(start..)
            .filter(|e| e.key == key)
            .take(max)
            .cloned()
            .collect())
    }

    /// Whether a version is still in the log's window.
    pub fn is_compacted(&self, rv: u64) -> bool {
        rv < self.compacted
    }

    /// Every object, for persistence.
    pub fn dump(&self) -> Vec<(String, Arc<Value>)> {
        self.objects
            .iter()
            .flat_map(|(k, m)| m.values().map(move |v| (k.clone(), v.clone())))
            .collect()
    }

    /// Restores objects and the version counter without logging events.
    pub fn restore(&mut self, rv: u64, objects: Vec<(String, Value)>) {
        for (key, obj) in objects {
            self.objects
                .entry(key)
                .or_default()
                .insert(key_of(&obj), Arc::new(obj));
        }
        self.rv = rv;
        self.compacted = rv;
        self.notify.send_replace(rv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(ns: &str, name: &str) -> Value {
        json!({ "metadata": { "namespace": ns, "name": name } })
    }

    #[test]
    fn versions_increase_and_events_compact() {
        let mut s = Store::new(2);
        s.put("g/r", obj("a", "x"));
        s.put("g/r", obj("a", "y"));
        s.put("g/r", obj("b", "x"));
        assert_eq!(s.rv(), 3);
        assert_eq!(s.list("g/r", Some("a")).len(), 2);
        assert_eq!(s.list("g/r", None).len(), 3);
        assert!(matches!(
            s.events_after("g/r", 0, 10),
            Err(StoreError::Compacted { .. })
        ));
        let ev = s.events_after("g/r", 1, 10).unwrap();
        assert_eq!(ev.iter().map(|e| e.rv).collect::<Vec<_>>(), vec![2, 3]);
        let gone = s.remove("g/r", "a", "x").unwrap();
        assert_eq!(gone["metadata"]["resourceVersion"], "4");
        assert_eq!(
            s.events_after("g/r", 3, 10).unwrap()[0].kind,
            EventType::Deleted
        );
    }
}

//! Optional persistence of the store to one JSON file, so a test can stop
//! the server and start a new one on the same state.
//!
//! The file holds the latest resourceVersion and every object; it is written
//! atomically (temporary file, then rename) at most every 200 ms while
//! writes happen and once more at shutdown. The event log is not kept: a
//! watch from a version before the restart gets 410 Gone, as after an etcd
//! compaction.

use std::path::Path;

use serde_json::{Value, json};

use crate::objects::State;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// File I/O.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a state file.
    #[error("state file {path} is not valid: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Writes the state to `path`.
pub fn save(state: &State, path: &Path) -> Result<(), PersistError> {
    save_snapshot(&snapshot(state), path)
}

/// The objects and version of a state, cheap to take under the lock
/// (objects are shared, not copied).
pub fn snapshot(state: &State) -> (u64, Vec<(String, std::sync::Arc<Value>)>) {
    (state.store.rv(), state.store.dump())
}

/// Writes a snapshot to `path`, outside the lock.
pub fn save_snapshot(
    (rv, objects): &(u64, Vec<(String, std::sync::Arc<Value>)>),
    path: &Path,
) -> Result<(), PersistError> {
    let objects: Vec<Value> = objects
        .iter()
        .map(|(key, obj)| json!({ "key": key, "object": **obj }))
        .collect();
    let doc = json!({ "resourceVersion": rv, "objects": objects });
    let tmp = path.with_extension("tmp");
    let io = |source| PersistError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, doc.to_string()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Loads `path` into an empty state; a missing file leaves the state as it is.
pub fn load(state: &mut State, path: &Path) -> Result<bool, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(PersistError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let format = |message: String| PersistError::Format {
        path: path.display().to_string(),
        message,
    };
    let doc: Value = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    let rv = doc["resourceVersion"]
        .as_u64()
        .ok_or_else(|| format("no resourceVersion".into()))?;
    let objects: Vec<(String, Value)> = doc["objects"]
        .as_array()
        .ok_or_else(|| format("no objects".into()))?
        .iter()
        .map(|o| {
            (
                o["key"].as_str().unwrap_or_default().to_string(),
                o["object"].clone(),
            )
        })
        .collect();
    state.reset_objects();
    for (key, obj) in &objects {
        // A CRD whose names were refused was stored but never served.
        let refused = obj["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "NamesAccepted" && c["status"] == "False");
        if key == "apiextensions.k8s.io/customresourcedefinitions" && !refused {
            state
                .registry
                .add_crd(obj)
                .map_err(|e| format(e.to_string()))?;
        }
    }
    state.store.restore(rv, objects);
    Ok(true)
}

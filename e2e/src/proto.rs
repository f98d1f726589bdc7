//! Decoding of the protobuf request bodies kubectl's generators send
//! (`kubectl create namespace|configmap|secret`): the `k8s\0` envelope
//! (`runtime.Unknown`) around a Namespace, ConfigMap or Secret.
//!
//! Only these kinds and the ObjectMeta fields a client sets on create are
//! understood; any other protobuf body is refused by the caller with 415.
//! Responses are always JSON (those clients accept it). Malformed input is an
//! error, never a panic.

use serde_json::{Map, Value, json};

/// Why a protobuf body was not understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Not a Kubernetes protobuf envelope.
    #[error("missing the k8s protobuf envelope")]
    Envelope,
    /// The wire data is cut short or malformed.
    #[error("malformed protobuf data")]
    Malformed,
    /// A kind this server cannot decode from protobuf.
    #[error("protobuf is not supported for {0}")]
    Kind(String),
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ProtoError> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(ProtoError::Malformed)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(ProtoError::Malformed)
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ProtoError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            2 => {
                let len =
                    usize::try_from(varint(buf, &mut pos)?).map_err(|_| ProtoError::Malformed)?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or(ProtoError::Malformed)?;
                let b = &buf[pos..end];
                pos = end;
                Wire::Bytes(b)
            }
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|e| *e <= buf.len())
                    .ok_or(ProtoError::Malformed)?;
                continue;
            }
            5 => {
                pos = pos
                    .checked_add(4)
                    .filter(|e| *e <= buf.len())
                    .ok_or(ProtoError::Malformed)?;
                continue;
            }
            _ => return Err(ProtoError::Malformed),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed)
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ProtoError> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = string(x)?,
            (2, Wire::Bytes(x)) if bytes_value => v = json!(crate::kinds::base64_encode(x)),
            (2, Wire::Bytes(x)) => v = json!(string(x)?),
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_entry(
    obj: &mut Value,
    field: &str,
    b: &[u8],
    bytes_value: bool,
) -> Result<(), ProtoError> {
    let (k, v) = map_entry(b, bytes_value)?;
    if !obj[field].is_object() {
        obj[field] = Value::Object(Map::new());
    }
    obj[field][k] = v;
    Ok(())
}

fn push(obj: &mut Value, field: &str, v: Value) {
    if !obj[field].is_array() {
        obj[field] = json!([]);
    }
    if let Some(a) = obj[field].as_array_mut() {
        a.push(v);
    }
}

fn object_meta(b: &[u8]) -> Result<Value, ProtoError> {
    let mut m = json!({});
    for (n, w) in fields(b)? {
        // gogo-protobuf writes empty strings; JSON clients leave them out.
        if matches!(w, Wire::Bytes(x) if x.is_empty()) && n <= 6 {
            continue;
        }
        match (n, w) {
            (1, Wire::Bytes(x)) => m["name"] = json!(string(x)?),
            (2, Wire::Bytes(x)) => m["generateName"] = json!(string(x)?),
            (3, Wire::Bytes(x)) => m["namespace"] = json!(string(x)?),
            (5, Wire::Bytes(x)) => m["uid"] = json!(string(x)?),
            (6, Wire::Bytes(x)) => m["resourceVersion"] = json!(string(x)?),
            (11, Wire::Bytes(x)) => insert_entry(&mut m, "labels", x, false)?,
            (12, Wire::Bytes(x)) => insert_entry(&mut m, "annotations", x, false)?,
            (13, Wire::Bytes(x)) => {
                let mut r = json!({});
                for (n, w) in fields(x)? {
                    match (n, w) {
                        (1, Wire::Bytes(s)) => r["kind"] = json!(string(s)?),
                        (3, Wire::Bytes(s)) => r["name"] = json!(string(s)?),
                        (4, Wire::Bytes(s)) => r["uid"] = json!(string(s)?),
                        (5, Wire::Bytes(s)) => r["apiVersion"] = json!(string(s)?),
                        (6, Wire::Varint(v)) => r["controller"] = json!(v != 0),
                        (7, Wire::Varint(v)) => r["blockOwnerDeletion"] = json!(v != 0),
                        _ => {}
                    }
                }
                push(&mut m, "ownerReferences", r);
            }
            (14, Wire::Bytes(x)) => push(&mut m, "finalizers", json!(string(x)?)),
            _ => {}
        }
    }
    Ok(m)
}

/// Decodes a protobuf request body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let inner = body.strip_prefix(b"k8s\0").ok_or(ProtoError::Envelope)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, w) in fields(inner)? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (n, w) in fields(tm)? {
                    match (n, w) {
                        (1, Wire::Bytes(s)) => api_version = string(s)?,
                        (2, Wire::Bytes(s)) => kind = string(s)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    let mut obj = json!({ "apiVersion": api_version, "kind": kind });
    for (n, w) in fields(raw)? {
        let Wire::Bytes(x) = w else {
            if let (Wire::Varint(v), "ConfigMap", 4) | (Wire::Varint(v), "Secret", 5) =
                (w, kind.as_str(), n)
            {
                obj["immutable"] = json!(v != 0);
            }
            continue;
        };
        match (api_version.as_str(), kind.as_str(), n) {
            (_, _, 1) => obj["metadata"] = object_meta(x)?,
            ("v1", "ConfigMap", 2) => insert_entry(&mut obj, "data", x, false)?,
            ("v1", "ConfigMap", 3) => insert_entry(&mut obj, "binaryData", x, true)?,
            ("v1", "Secret", 2) => insert_entry(&mut obj, "data", x, true)?,
            ("v1", "Secret", 3) => obj["type"] = json!(string(x)?),
            ("v1", "Secret", 4) => insert_entry(&mut obj, "stringData", x, false)?,
            ("v1", "Namespace", 2) => {
                for (n, w) in fields(x)? {
                    if let (1, Wire::Bytes(s)) = (n, w) {
                        let f = json!(string(s)?);
                        if !obj["spec"].is_object() {
                            obj["spec"] = json!({});
                        }
                        push(&mut obj["spec"], "finalizers", f);
                    }
                }
            }
            ("v1", "Namespace" | "ConfigMap" | "Secret", _) => {}
            _ => return Err(ProtoError::Kind(format!("{api_version} {kind}"))),
        }
    }
    if !matches!(kind.as_str(), "Namespace" | "ConfigMap" | "Secret") || api_version != "v1" {
        return Err(ProtoError::Kind(format!("{api_version} {kind}")));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, b: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, u8::try_from(b.len()).unwrap_or(0)];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn decodes_a_configmap_and_refuses_garbage() {
        let meta = [
            field(1, b"c"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &tm), field(2, &raw)].concat();
        let obj = decode(&body).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
        assert!(decode(b"k8s\0\x0a\xff").is_err());
        assert!(decode(b"{}").is_err());
    }
}

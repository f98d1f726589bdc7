//! Label and field selectors from list and watch query parameters.
//!
//! Parses `labelSelector` (equality and set-based) and `fieldSelector`
//! (`=`, `==`, `!=`) and matches objects. Which fields a kind supports is the
//! caller's list; an unsupported field is refused here with the API server's
//! message.

use serde_json::Value;

use crate::jsonpath;

/// Why a selector was refused.
#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    /// The selector does not parse.
    #[error("unable to parse requirement: {0}")]
    Parse(String),
    /// The field cannot be selected on this kind.
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

#[derive(Clone, Debug)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector.
#[derive(Clone, Debug, Default)]
pub struct LabelSelector(Vec<(String, Op)>);

fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn set_values(s: &str) -> Result<Vec<String>, SelectorError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::Parse(s.into()))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (x,y),!f,g`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(k) = part.strip_prefix('!') {
                (k.trim().to_string(), Op::NotExists)
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim().into(), Op::NotEq(v.trim().into()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k.trim().into(), Op::Eq(v.trim().into()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k.trim().into(), Op::Eq(v.trim().into()))
            } else if let Some((k, v)) = part.split_once(" notin ") {
                (k.trim().into(), Op::NotIn(set_values(v)?))
            } else if let Some((k, v)) = part.split_once(" in ") {
                (k.trim().into(), Op::In(set_values(v)?))
            } else if part.contains(' ') || part.contains('(') {
                return Err(SelectorError::Parse(part));
            } else {
                (part.clone(), Op::Exists)
            };
            if req.0.is_empty() {
                return Err(SelectorError::Parse(part));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether the labels match every requirement.
    pub fn matches(&self, labels: &Value) -> bool {
        self.0.iter().all(|(k, op)| {
            let v = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq(w) => v == Some(w.as_str()),
                Op::NotEq(w) => v != Some(w.as_str()),
                Op::In(ws) => v.is_some_and(|v| ws.iter().any(|w| w == v)),
                Op::NotIn(ws) => !v.is_some_and(|v| ws.iter().any(|w| w == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }
}

/// A parsed field selector.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`, accepting only `metadata.name`,
    /// `metadata.namespace` and the fields in `supported`.
    pub fn parse(s: &str, supported: &[String]) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(SelectorError::Parse(part));
            };
            let k = k.trim().to_string();
            if k != "metadata.name" && k != "metadata.namespace" && !supported.contains(&k) {
                return Err(SelectorError::UnsupportedField(k));
            }
            reqs.push((k, eq, v.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// Whether the object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, want)| {
            let got = match jsonpath::find(obj, &format!(".{k}")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }

    /// Whether the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name this selector pins with `metadata.name=`, if any.
    pub fn name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, eq, _)| k == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let l = json!({"app": "web", "tier": "fe"});
        assert!(
            LabelSelector::parse("app=web,tier in (fe, be)")
                .unwrap()
                .matches(&l)
        );
        assert!(!LabelSelector::parse("app!=web").unwrap().matches(&l));
        assert!(LabelSelector::parse("!missing,app").unwrap().matches(&l));
        assert!(!LabelSelector::parse("tier notin (fe)").unwrap().matches(&l));
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "x", "namespace": "d"}, "status": {"nodeName": "n1"}});
        let supported = vec!["status.nodeName".to_string()];
        assert!(
            FieldSelector::parse("metadata.name=x,status.nodeName==n1", &supported)
                .unwrap()
                .matches(&o)
        );
        assert!(
            !FieldSelector::parse("status.nodeName!=n1", &supported)
                .unwrap()
                .matches(&o)
        );
        assert!(FieldSelector::parse("spec.other=1", &supported).is_err());
    }
}

//! The simple JSONPath subset that CRDs use in printer columns, selectable
//! fields and scale paths: `.a.b`, `.a[0]`, `.a['k.x']` and filters
//! `.a[?(@.type=="Ready")]`.
//!
//! Evaluation never fails: a path that does not resolve yields no value.

use serde_json::Value;

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    Filter(String, String),
}

fn parse(path: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    let chars: Vec<char> = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .chars()
        .collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if !name.is_empty() {
                    steps.push(Step::Field(name));
                }
            }
            '[' => {
                let end = chars[i..].iter().position(|c| *c == ']')? + i;
                let inner: String = chars[i + 1..end].iter().collect();
                i = end + 1;
                if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                    let (field, value) = filter.split_once("==")?;
                    let value = value.trim().trim_matches('"').trim_matches('\'');
                    steps.push(Step::Filter(field.trim().into(), value.into()));
                } else if let Ok(n) = inner.parse() {
                    steps.push(Step::Index(n));
                } else {
                    steps.push(Step::Field(
                        inner.trim_matches('\'').trim_matches('"').into(),
                    ));
                }
            }
            _ => {
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                steps.push(Step::Field(chars[start..i].iter().collect()));
            }
        }
    }
    Some(steps)
}

/// The first value `path` selects in `obj`.
pub fn find<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let steps = parse(path)?;
    let mut cur = vec![obj];
    for step in &steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => next.extend(v.get(f.as_str())),
                Step::Index(n) => next.extend(v.get(*n)),
                Step::Filter(field, want) => {
                    next.extend(v.as_array().into_iter().flatten().filter(|item| {
                        match item.get(field.as_str()) {
                            Some(Value::String(s)) => s == want,
                            Some(other) => {
                                *other == Value::String(want.clone())
                                    || other.to_string().as_str() == want.as_str()
                            }
                            None => false,
                        }
                    }))
                }
            }
        }
        cur = next;
    }
    cur.into_iter().find(|v| !v.is_null())
}

/// Sets the value at a plain field path (`.spec.replicas`), creating objects on the way.
pub fn set(obj: &mut Value, path: &str, value: Value) -> bool {
    let Some(steps) = parse(path) else {
        return false;
    };
    let mut cur = obj;
    for step in &steps {
        let Step::Field(f) = step else {
            return false;
        };
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        let Some(map) = cur.as_object_mut() else {
            return false;
        };
        cur = map.entry(f.clone()).or_insert(Value::Null);
    }
    *cur = value;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_fields_indexes_and_filters() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "x"}, {"type": "Ready", "status": "True"}], "ifs": [{"ip": "1"}]}});
        assert_eq!(
            find(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(find(&o, ".status.ifs[0].ip"), Some(&json!("1")));
        assert_eq!(find(&o, ".status.missing"), None);
        let mut o = json!({});
        assert!(set(&mut o, ".spec.replicas", json!(3)));
        assert_eq!(o, json!({"spec": {"replicas": 3}}));
    }
}

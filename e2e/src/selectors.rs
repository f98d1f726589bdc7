//! Label and field selectors from list and watch query parameters.
//!
//! `labelSelector` follows apimachinery's `labels.Parse` grammar: `=`, `==`,
//! `!=`, `in`, `notin`, existence (`key`), `!key`, and `>`/`<` against
//! integers; keys must be qualified names and values label values, refused
//! with the same messages. `fieldSelector` follows `fields.ParseSelector`:
//! `=`, `==` and `!=` with `\`-escaped values. Which fields a kind supports is
//! the caller's list; an unsupported field is refused with the API server's
//! message. A field's value is read the way the kind's field set builds it
//! upstream (a Node's absent `spec.unschedulable` is `false`, a core Event's
//! `source` is `source.component`).

use runv_crds::names;
use serde_json::Value;

use crate::jsonpath;

/// Why a selector was refused.
#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    /// The selector does not parse (the message is upstream's).
    #[error("{0}")]
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
    Gt(i64),
    Lt(i64),
}

/// A parsed label selector.
#[derive(Clone, Debug, Default)]
pub struct LabelSelector(Vec<(String, Op)>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    End,
    Ident(String),
    Error(String),
    ClosedPar,
    Comma,
    Not,
    DoubleEq,
    Eq,
    Gt,
    In,
    Lt,
    NotEq,
    NotIn,
    OpenPar,
}

impl Tok {
    fn literal(&self) -> &str {
        match self {
            Self::End => "",
            Self::Ident(s) | Self::Error(s) => s,
            Self::ClosedPar => ")",
            Self::Comma => ",",
            Self::Not => "!",
            Self::DoubleEq => "==",
            Self::Eq => "=",
            Self::Gt => ">",
            Self::In => "in",
            Self::Lt => "<",
            Self::NotEq => "!=",
            Self::NotIn => "notin",
            Self::OpenPar => "(",
        }
    }
}

fn special(c: char) -> bool {
    matches!(c, '=' | '!' | '(' | ')' | ',' | '>' | '<')
}

fn symbol(s: &str) -> Option<Tok> {
    Some(match s {
        ")" => Tok::ClosedPar,
        "," => Tok::Comma,
        "!" => Tok::Not,
        "==" => Tok::DoubleEq,
        "=" => Tok::Eq,
        ">" => Tok::Gt,
        "<" => Tok::Lt,
        "!=" => Tok::NotEq,
        "(" => Tok::OpenPar,
        _ => return None,
    })
}

/// apimachinery's label selector lexer.
fn lex(s: &str) -> Vec<Tok> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\r' | '\n') {
            i += 1;
        }
        if i >= chars.len() {
            out.push(Tok::End);
            return out;
        }
        if special(chars[i]) {
            let mut buf = String::new();
            let mut best: Option<(Tok, usize)> = None;
            let mut j = i;
            while j < chars.len() && special(chars[j]) {
                buf.push(chars[j]);
                j += 1;
                match symbol(&buf) {
                    Some(t) => best = Some((t, j)),
                    None if best.is_some() => break,
                    None => {}
                }
            }
            match best {
                Some((t, end)) => {
                    out.push(t);
                    i = end;
                }
                None => {
                    out.push(Tok::Error(format!("error expected: keyword found '{buf}'")));
                    i = j;
                }
            }
        } else {
            let start = i;
            while i < chars.len()
                && !special(chars[i])
                && !matches!(chars[i], ' ' | '\t' | '\r' | '\n')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push(match word.as_str() {
                "in" => Tok::In,
                "notin" => Tok::NotIn,
                _ => Tok::Ident(word),
            });
        }
    }
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    /// The next token; in value position `in` and `notin` are identifiers.
    fn peek(&self, values: bool) -> Tok {
        let t = self.toks.get(self.pos).cloned().unwrap_or(Tok::End);
        match t {
            Tok::In | Tok::NotIn if values => Tok::Ident(t.literal().into()),
            t => t,
        }
    }

    fn next(&mut self, values: bool) -> Tok {
        let t = self.peek(values);
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn parse(&mut self) -> Result<Vec<(String, Op)>, String> {
        let mut reqs = Vec::new();
        loop {
            match self.peek(true) {
                Tok::Ident(_) | Tok::Not => {
                    let r = self
                        .requirement()
                        .map_err(|e| format!("unable to parse requirement: {e}"))?;
                    reqs.push(r);
                    match self.next(true) {
                        Tok::End => return Ok(reqs),
                        Tok::Comma => {
                            let t = self.peek(true);
                            if !matches!(t, Tok::Ident(_) | Tok::Not) {
                                return Err(format!(
                                    "found '{}', expected: identifier after ','",
                                    t.literal()
                                ));
                            }
                        }
                        t => {
                            return Err(format!(
                                "found '{}', expected: ',' or 'end of string'",
                                t.literal()
                            ));
                        }
                    }
                }
                Tok::End => return Ok(reqs),
                t => {
                    return Err(format!(
                        "found '{}', expected: !, identifier, or 'end of string'",
                        t.literal()
                    ));
                }
            }
        }
    }

    fn requirement(&mut self) -> Result<(String, Op), String> {
        let mut tok = self.next(true);
        let not = tok == Tok::Not;
        if not {
            tok = self.next(true);
        }
        let Tok::Ident(key) = tok else {
            return Err(format!("found '{}', expected: identifier", tok.literal()));
        };
        let errs = names::qualified_name(&key);
        if !errs.is_empty() {
            return Err(format!(
                "<nil>: Invalid value: {key:?}: {}",
                errs.join("; ")
            ));
        }
        if matches!(self.peek(true), Tok::End | Tok::Comma) {
            return Ok((key, if not { Op::NotExists } else { Op::Exists }));
        }
        if not {
            // As upstream: `!key` ends the requirement; whatever follows is
            // refused by the caller.
            return Ok((key, Op::NotExists));
        }
        let op = self.next(false);
        let values = match op {
            Tok::In | Tok::NotIn => self.set_values()?,
            Tok::Eq | Tok::DoubleEq | Tok::NotEq | Tok::Gt | Tok::Lt => self.exact_value()?,
            t => {
                return Err(format!(
                    "found '{}', expected: in, notin, =, ==, !=, gt, lt",
                    t.literal()
                ));
            }
        };
        let mut errs = Vec::new();
        match op {
            Tok::In | Tok::NotIn if values.is_empty() => errs.push(
                "values: Invalid value: []string{}: for 'in', 'notin' operators, values set can't be empty"
                    .to_string(),
            ),
            Tok::Gt | Tok::Lt => {
                for (i, v) in values.iter().enumerate() {
                    if v.parse::<i64>().is_err() {
                        errs.push(format!(
                            "values[{i}]: Invalid value: {v:?}: for 'Gt', 'Lt' operators, the value must be an integer"
                        ));
                    }
                }
            }
            _ => {}
        }
        for (i, v) in values.iter().enumerate() {
            let bad = names::label_value(v);
            if !bad.is_empty() {
                errs.push(format!(
                    "values[{i}]: Invalid value: {v:?}: {}",
                    bad.join("; ")
                ));
            }
        }
        match errs.len() {
            0 => {}
            1 => return Err(errs.remove(0)),
            _ => return Err(format!("[{}]", errs.join(", "))),
        }
        let one = || values.first().cloned().unwrap_or_default();
        Ok((
            key,
            match op {
                Tok::In => Op::In(values),
                Tok::NotIn => Op::NotIn(values),
                Tok::NotEq => Op::NotEq(one()),
                Tok::Gt => Op::Gt(one().parse().unwrap_or_default()),
                Tok::Lt => Op::Lt(one().parse().unwrap_or_default()),
                _ => Op::Eq(one()),
            },
        ))
    }

    fn set_values(&mut self) -> Result<Vec<String>, String> {
        let t = self.next(true);
        if t != Tok::OpenPar {
            return Err(format!("found '{}' expected: '('", t.literal()));
        }
        let look = self.peek(true);
        let mut set = std::collections::BTreeSet::new();
        match look {
            Tok::ClosedPar => {
                self.next(true);
                set.insert(String::new());
            }
            Tok::Ident(_) | Tok::Comma => {
                loop {
                    match self.next(true) {
                        Tok::Ident(v) => {
                            set.insert(v);
                            match self.peek(true) {
                                Tok::Comma => continue,
                                Tok::ClosedPar => break,
                                t => {
                                    return Err(format!(
                                        "found '{}', expected: ',' or ')'",
                                        t.literal()
                                    ));
                                }
                            }
                        }
                        Tok::Comma => {
                            set.insert(String::new());
                            match self.peek(true) {
                                Tok::ClosedPar => break,
                                Tok::Comma => {
                                    self.next(true);
                                }
                                _ => {}
                            }
                        }
                        t => {
                            return Err(format!(
                                "found '{}', expected: ',', or identifier",
                                t.literal()
                            ));
                        }
                    }
                }
                let t = self.next(true);
                if t != Tok::ClosedPar {
                    return Err(format!("found '{}', expected: ')'", look.literal()));
                }
            }
            t => {
                return Err(format!(
                    "found '{}', expected: ',', ')' or identifier",
                    t.literal()
                ));
            }
        }
        Ok(set.into_iter().collect())
    }

    fn exact_value(&mut self) -> Result<Vec<String>, String> {
        if matches!(self.peek(true), Tok::End | Tok::Comma) {
            return Ok(vec![String::new()]);
        }
        match self.next(true) {
            Tok::Ident(v) => Ok(vec![v]),
            t => Err(format!("found '{}', expected: identifier", t.literal())),
        }
    }
}

impl LabelSelector {
    /// Parses a selector with apimachinery's grammar: `a=b,c!=d,e in (x,y),!f,g,h>1`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut p = Parser {
            toks: lex(s),
            pos: 0,
        };
        p.parse().map(Self).map_err(SelectorError::Parse)
    }

    /// Whether the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

/// How a selectable field's value is read from an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldRead {
    /// The value at the path; absent reads as "".
    Path,
    /// A boolean; absent reads as "false" (a Node's `spec.unschedulable`).
    BoolOrFalse,
    /// A core Event's `source`: `source.component`, else `reportingComponent`.
    EventSource,
}

/// A parsed field selector.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector(Vec<(String, bool, String, FieldRead)>);

/// Splits on commas that are not escaped with a backslash.
fn split_terms(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            cur.push(c);
            escaped = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape_field_value(v: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => {
                    return Err(format!(
                        "invalid field selector: invalid escape sequence: {v}"
                    ));
                }
            },
            ',' | '=' => {
                return Err(format!(
                    "invalid field selector: unescaped character '{c}' in {v:?}"
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`, accepting only `metadata.name`,
    /// `metadata.namespace` and the fields in `supported`.
    pub fn parse(s: &str, supported: &[String]) -> Result<Self, SelectorError> {
        Self::parse_with(s, supported, |_| FieldRead::Path)
    }

    /// As [`FieldSelector::parse`], reading each field as `read` says.
    pub fn parse_with(
        s: &str,
        supported: &[String],
        read: impl Fn(&str) -> FieldRead,
    ) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_terms(s) {
            if part.is_empty() {
                continue;
            }
            let split = part.char_indices().find_map(|(i, _)| {
                let rest = &part[i..];
                ["!=", "==", "="]
                    .iter()
                    .find(|op| rest.starts_with(**op))
                    .map(|op| (&part[..i], *op, &rest[op.len()..]))
            });
            let Some((k, op, v)) = split else {
                return Err(SelectorError::Parse(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let v = unescape_field_value(v).map_err(SelectorError::Parse)?;
            if k != "metadata.name"
                && k != "metadata.namespace"
                && !supported.iter().any(|f| f == k)
            {
                return Err(SelectorError::UnsupportedField(k.to_string()));
            }
            reqs.push((k.to_string(), op != "!=", v, read(k)));
        }
        Ok(Self(reqs))
    }

    /// Whether the object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, want, read)| {
            let text = |v: Option<&Value>| match v {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            let got = match read {
                FieldRead::Path => text(jsonpath::find(obj, &format!(".{k}"))),
                FieldRead::BoolOrFalse => match jsonpath::find(obj, &format!(".{k}")) {
                    Some(Value::Bool(b)) => b.to_string(),
                    _ => "false".into(),
                },
                FieldRead::EventSource => {
                    match obj["source"]["component"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                    {
                        Some(c) => c.to_string(),
                        None => text(obj.get("reportingComponent")),
                    }
                }
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
            .find(|(k, eq, _, _)| k == "metadata.name" && *eq)
            .map(|(_, _, v, _)| v.as_str())
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
    fn label_selector_grammar_matches_apimachinery() {
        let l = json!({"n": "7", "app": "web"});
        assert!(LabelSelector::parse("n>5,n<8").unwrap().matches(&l));
        assert!(!LabelSelector::parse("app>5").unwrap().matches(&l));
        assert!(LabelSelector::parse("in in (in, notin)").is_ok());
        assert!(
            LabelSelector::parse("a in (,b)")
                .unwrap()
                .matches(&json!({"a": ""}))
        );
        let err = |s: &str| LabelSelector::parse(s).unwrap_err().to_string();
        assert_eq!(err("a=b=c"), "found '=', expected: ',' or 'end of string'");
        assert_eq!(
            err("a b"),
            "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"
        );
        assert!(err("a/b/c").starts_with("unable to parse requirement: <nil>: Invalid value: \"a/b/c\": a qualified name must consist of"));
        assert!(err("a in (b c)").contains("found 'c', expected: ',' or ')'"));
        assert!(err("a=b,").contains("expected: identifier after ','"));
        assert!(err("=b").contains("expected: !, identifier, or 'end of string'"));
        assert_eq!(
            names::qualified_name("example.com/app"),
            Vec::<String>::new()
        );
        assert_eq!(
            names::qualified_name("/app"),
            ["prefix part must be non-empty"]
        );
        assert_eq!(names::label_value(""), Vec::<String>::new());
    }

    #[test]
    fn field_selectors_unescape_and_read_like_upstream() {
        let o = json!({"spec": {}, "source": {}, "reportingComponent": "op"});
        let s = FieldSelector::parse_with(
            "spec.unschedulable=false,source=op",
            &["spec.unschedulable".into(), "source".into()],
            |f| match f {
                "source" => FieldRead::EventSource,
                _ => FieldRead::BoolOrFalse,
            },
        )
        .unwrap();
        assert!(s.matches(&o));
        let f = FieldSelector::parse("metadata.name=a\\,b", &[]).unwrap();
        assert_eq!(f.name(), Some("a,b"));
        assert!(FieldSelector::parse("metadata.name=a=b", &[]).is_err());
        assert!(FieldSelector::parse("metadata.name", &[]).is_err());
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

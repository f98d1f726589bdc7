//! Kubernetes' name rules, as kube-apiserver applies them (apimachinery's
//! `IsDNS1123Label`, `IsDNS1123Subdomain`, `IsQualifiedName` and
//! `IsValidLabelValue`), with apimachinery's messages.
//!
//! Each check returns every message that applies, empty when the value is
//! valid, so a caller can turn each into one `Invalid` field error as the API
//! server does. The offline validator and the test server both use these; a
//! second copy is how `a..b` came to be accepted by one and refused by the other.
//!
//! `metadata.name` of a custom resource follows [`dns1123_subdomain`]
//! (apiextensions' `NameIsDNSSubdomain`); a Namespace's name follows
//! [`dns1123_label`]; label keys and annotation keys follow [`qualified_name`]
//! and label values [`label_value`].

/// Longest DNS-1123 label.
pub const DNS1123_LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain.
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// Longest label value, and longest name part of a qualified name.
pub const LABEL_VALUE_MAX: usize = 63;

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, any length.
fn label_shape(s: &str) -> bool {
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty() && edge(b[0]) && edge(b[b.len() - 1]) && b.iter().all(|&c| edge(c) || c == b'-')
}

/// Dot-separated labels: no empty label, so no leading, trailing or double dot.
fn subdomain_shape(s: &str) -> bool {
    s.split('.').all(label_shape)
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, any length.
fn name_part_shape(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

fn max_len(limit: usize) -> String {
    format!("must be no more than {limit} characters")
}

/// apimachinery's `RegexError`: the rule, examples, and the regex itself.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let examples: String = examples
        .iter()
        .map(|e| format!("'{e}', "))
        .collect::<Vec<_>>()
        .join("or ");
    format!("{msg} (e.g. {examples}regex used for validation is '{fmt}')")
}

/// A DNS-1123 label: at most 63 characters of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns1123_label(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        errs.push(max_len(DNS1123_LABEL_MAX));
    }
    if !label_shape(value) {
        errs.push(if subdomain_shape(value) {
            "must not contain dots".to_owned()
        } else {
            regex_error(
                DNS1123_LABEL_MSG,
                DNS1123_LABEL_FMT,
                &["my-name", "123-abc"],
            )
        });
    }
    errs
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated DNS-1123
/// labels (each label's own length is not limited here, as in apimachinery).
pub fn dns1123_subdomain(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(max_len(DNS1123_SUBDOMAIN_MAX));
    }
    if !subdomain_shape(value) {
        errs.push(regex_error(
            DNS1123_SUBDOMAIN_MSG,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errs
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_` and `.`,
/// alphanumeric at both ends.
pub fn label_value(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        errs.push(max_len(LABEL_VALUE_MAX));
    }
    if !value.is_empty() && !name_part_shape(value) {
        errs.push(regex_error(
            LABEL_VALUE_MSG,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errs
}

/// A qualified name (label and annotation keys): an optional DNS-1123
/// subdomain prefix and `/`, then a non-empty name part shaped like a label
/// value, at most 63 characters.
pub fn qualified_name(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let name = match value.split('/').collect::<Vec<_>>()[..] {
        [name] => name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_owned());
            } else {
                errs.extend(
                    dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            let shape = regex_error(
                QUALIFIED_NAME_MSG,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"],
            );
            return vec![format!(
                "a qualified name {shape} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_owned());
    } else if name.len() > LABEL_VALUE_MAX {
        errs.push(format!("name part {}", max_len(LABEL_VALUE_MAX)));
    }
    if !name_part_shape(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_MSG,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errs
}

/// A JSON pointer as the API server names fields: `/spec/disks/0/name` →
/// `spec.disks[0].name`, with `~1` and `~0` unescaped.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(errs: Vec<String>) -> bool {
        errs.is_empty()
    }

    #[test]
    fn dns1123_labels() {
        let cases: &[(&str, bool)] = &[
            ("a", true),
            ("web-1", true),
            ("0abc", true),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
            ("", false),
            ("-a", false),
            ("a-", false),
            ("A", false),
            ("a_b", false),
            ("a.b", false),
        ];
        for (value, want) in cases {
            assert_eq!(ok(dns1123_label(value)), *want, "{value:?}");
        }
        assert_eq!(dns1123_label("a.b"), ["must not contain dots"]);
        assert_eq!(
            dns1123_label(&"a".repeat(64)),
            ["must be no more than 63 characters"]
        );
    }

    #[test]
    fn dns1123_subdomains() {
        let long_ok = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let long_bad = format!("{}.{}", "a".repeat(126), "b".repeat(127));
        assert_eq!(long_ok.len(), 253);
        assert_eq!(long_bad.len(), 254);
        let cases: &[(&str, bool)] = &[
            ("web", true),
            ("web-1.example", true),
            ("a.b.c", true),
            ("1.2.3", true),
            // apimachinery limits the whole name, not each label, to 253.
            (&"a".repeat(64), true),
            (&"a".repeat(253), true),
            (&"a".repeat(254), false),
            (&long_ok, true),
            (&long_bad, false),
            ("", false),
            ("a..b", false),
            ("a.-b", false),
            ("a-.b", false),
            (".a", false),
            ("a.", false),
            ("-a", false),
            ("a-", false),
            ("Web", false),
            ("web_1", false),
            ("a/b", false),
        ];
        for (value, want) in cases {
            assert_eq!(ok(dns1123_subdomain(value)), *want, "{value:?}");
        }
        assert_eq!(
            dns1123_subdomain("a..b"),
            [
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            ]
        );
        let too_long = dns1123_subdomain(&"a".repeat(254));
        assert_eq!(too_long, ["must be no more than 253 characters"]);
    }

    #[test]
    fn label_values() {
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("v1", true),
            ("My_Value.2-x", true),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
            ("-a", false),
            ("a-", false),
            ("_a", false),
            (".a", false),
            ("a b", false),
            ("a/b", false),
        ];
        for (value, want) in cases {
            assert_eq!(ok(label_value(value)), *want, "{value:?}");
        }
        assert_eq!(
            label_value("-a"),
            [
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue', or 'my_value', or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            ]
        );
    }

    #[test]
    fn qualified_names() {
        let cases: &[(&str, bool)] = &[
            ("app", true),
            ("App.Name_1", true),
            ("runv.dev/node", true),
            ("example.com/My-Name", true),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
            (&format!("{}/a", "b".repeat(253)), true),
            (&format!("{}/a", "b".repeat(254)), false),
            ("", false),
            ("-app", false),
            ("app-", false),
            ("/app", false),
            ("example.com/", false),
            ("Example.com/app", false),
            ("a..b/app", false),
            ("a/b/c", false),
            ("a b", false),
        ];
        for (value, want) in cases {
            assert_eq!(ok(qualified_name(value)), *want, "{value:?}");
        }
        assert_eq!(qualified_name("/app"), ["prefix part must be non-empty"]);
        assert_eq!(
            qualified_name("example.com/"),
            [
                "name part must be non-empty",
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
            ]
        );
        assert_eq!(
            qualified_name(&"a".repeat(64)),
            ["name part must be no more than 63 characters"]
        );
        assert!(
            qualified_name("Example.com/app")[0]
                .starts_with("prefix part a lowercase RFC 1123 subdomain")
        );
        assert!(qualified_name("a/b/c")[0].starts_with("a qualified name must consist of"));
    }

    #[test]
    fn pointer_becomes_dotted_path() {
        assert_eq!(dotted("/spec/disks/0/name"), "spec.disks[0].name");
        assert_eq!(dotted(""), "");
        assert_eq!(dotted("/metadata/labels/a~1b"), "metadata.labels.a/b");
        assert_eq!(dotted("/a/~0b"), "a.~b");
    }
}

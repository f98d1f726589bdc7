//! API errors and their `metav1.Status` bodies.
//!
//! Every refusal the server makes goes through [`ApiError`], which knows the
//! HTTP code, the `reason` and the message wording kube-apiserver uses, so
//! kubectl prints the same text and kube-rs maps it to the same
//! `ErrorResponse`. This module builds bodies only; it decides nothing.

use serde_json::{Value, json};

/// One field rejected by validation, as a `StatusCause`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: String,
    /// Dotted field path (`spec.resources.memory`).
    pub field: String,
    /// The message without the field prefix.
    pub message: String,
}

impl Cause {
    /// A cause for an invalid value, worded like the API server's
    /// `Invalid value: "0": <detail>`.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Self {
            reason: "FieldValueInvalid".into(),
            field: field.into(),
            message: format!("Invalid value: {}: {detail}", render_value(value)),
        }
    }

    /// A cause for a forbidden field, worded like `Forbidden: <detail>`.
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Self {
            reason: "FieldValueForbidden".into(),
            field: field.into(),
            message: format!("Forbidden: {detail}"),
        }
    }

    /// A cause for a value outside a fixed set, worded like
    /// `Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self {
            reason: "FieldValueNotSupported".into(),
            field: field.into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                render_value(value),
                list.join(", ")
            ),
        }
    }

    /// A cause for a missing field, worded like `Required value: <detail>`.
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        Self {
            reason: "FieldValueRequired".into(),
            field: field.into(),
            message: if detail.is_empty() {
                "Required value".into()
            } else {
                format!("Required value: {detail}")
            },
        }
    }

    fn line(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// Renders a value the way apimachinery's field errors do.
pub fn render_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Why a request was refused; each variant maps to one HTTP code and Status reason.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 for a named object.
    #[error("{resource} {name:?} not found")]
    NotFound {
        /// `microvms.runv.dev`, or `configmaps` for the core group.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 404 for a path the server does not serve.
    #[error("the server could not find the requested resource")]
    NoRoute,
    /// 409 on create of an existing name.
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        /// Qualified resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 409 on a stale resourceVersion or failed precondition.
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {detail}")]
    Conflict {
        /// Qualified resource.
        resource: String,
        /// Object name.
        name: String,
        /// What conflicted.
        detail: String,
    },
    /// 409 on server-side apply field ownership conflicts.
    #[error("Apply failed with {} conflict{}: {}", causes.len(), if causes.len() == 1 { "" } else { "s" }, causes.iter().map(|c| c.message.clone()).collect::<Vec<_>>().join("\n"))]
    ApplyConflict {
        /// One cause per conflicting field.
        causes: Vec<Cause>,
    },
    /// 422 with field causes.
    #[error("{kind}.{group} {name:?} is invalid: {}", join_causes(causes))]
    Invalid {
        /// Kind (`MicroVM`).
        kind: String,
        /// Group (`runv.dev`), empty for core.
        group: String,
        /// Object name.
        name: String,
        /// The rejected fields.
        causes: Vec<Cause>,
    },
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 406.
    #[error("only the following media types are accepted: {0}")]
    NotAcceptable(String),
    /// 415.
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
    /// 410 for a compacted resourceVersion or an expired continue token.
    #[error("{0}")]
    Gone(String),
    /// 501 for a feature this test server does not implement.
    #[error("{0}")]
    NotImplemented(String),
    /// 504 for a list whose resourceVersion the store did not reach in time.
    #[error("Timeout: Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion {
        /// The resourceVersion asked for.
        requested: u64,
        /// The store's latest resourceVersion.
        current: u64,
    },
    /// 500.
    #[error("{0}")]
    Internal(String),
}

fn join_causes(causes: &[Cause]) -> String {
    match causes {
        [one] => one.line(),
        many => format!(
            "[{}]",
            many.iter().map(Cause::line).collect::<Vec<_>>().join(", ")
        ),
    }
}

impl ApiError {
    /// HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound { .. } | Self::NoRoute => 404,
            Self::AlreadyExists { .. } | Self::Conflict { .. } | Self::ApplyConflict { .. } => 409,
            Self::Invalid { .. } => 422,
            Self::BadRequest(_) => 400,
            Self::Forbidden(_) => 403,
            Self::MethodNotAllowed(_) => 405,
            Self::NotAcceptable(_) => 406,
            Self::UnsupportedMediaType(_) => 415,
            Self::Gone(_) => 410,
            Self::NotImplemented(_) => 501,
            Self::TooLargeResourceVersion { .. } => 504,
            Self::Internal(_) => 500,
        }
    }

    /// `metav1.StatusReason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::NoRoute => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } | Self::ApplyConflict { .. } => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::Forbidden(_) => "Forbidden",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::NotAcceptable(_) => "NotAcceptable",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Gone(_) => "Expired",
            Self::NotImplemented(_) => "NotImplemented",
            Self::TooLargeResourceVersion { .. } => "Timeout",
            Self::Internal(_) => "InternalError",
        }
    }

    /// The `Status` object for the body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. } => {
                let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
                Some(json!({ "name": name, "group": group, "kind": kind }))
            }
            Self::Invalid {
                kind,
                group,
                name,
                causes,
            } => Some(json!({
                "name": name, "group": group, "kind": kind,
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason, "message": c.message, "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            Self::TooLargeResourceVersion { .. } => Some(json!({
                "causes": [{
                    "reason": "ResourceVersionTooLarge",
                    "message": "Too large resource version",
                }],
                "retryAfterSeconds": 1,
            })),
            Self::ApplyConflict { causes } => Some(json!({
                "causes": causes.iter().map(|c| json!({
                    "reason": "FieldManagerConflict", "message": c.message, "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            _ => None,
        };
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }
}

/// A `Status` with `status: Success`, as DELETE of an object without finalizers returns.
pub fn success(resource: &str, name: &str, uid: &str) -> Value {
    let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": { "name": name, "group": group, "kind": kind, "uid": uid },
    })
}

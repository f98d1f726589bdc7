//! The `SecureWorkload` kind: a replica set of MicroVMs that each run one
//! container image, rolled out like a Deployment.
//!
//! The operator owns the MicroVMs through ownerReferences and the selector;
//! this module only defines the API and its validation.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{self as metav1, Condition};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::microvm::{
    ANNOTATIONS_TOTAL_MAX, LABEL_VALUE_MAX, LABEL_VALUE_PATTERN, MicroVMSpec, QUALIFIED_NAME_MAX,
    QUALIFIED_NAME_PATTERN, Tenant, label_value_schema,
};

/// Desired state of a set of identical microVM replicas.
// `#[kube(printcolumn(..))]` repeats keys by design, one group per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "runv.dev",
    version = "v1alpha1",
    kind = "SecureWorkload",
    plural = "secureworkloads",
    singular = "secureworkload",
    shortname = "swl",
    category = "runv",
    namespaced,
    status = "SecureWorkloadStatus",
    derive = "PartialEq",
    doc = "A SecureWorkload runs a container image in each of a set of identical MicroVM replicas, scaled and rolled out like a Deployment.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Up-to-date",
        type_ = "integer",
        json_path = ".status.updatedReplicas",
        priority = "1"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableReplicas",
        priority = "1"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.container.image",
        priority = "1"
    ),
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".spec.tenant.name",
        priority = "1"
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.selector.matchLabels) || self.selector.matchLabels.all(k, has(self.template.metadata.labels) && k in self.template.metadata.labels && self.template.metadata.labels[k] == self.selector.matchLabels[k])")
        .message("matchLabels must match template.metadata.labels")
        .field_path(".selector")
        .reason(Reason::FieldValueInvalid),
    // A requirement without the values it needs is reported by its own rule.
    validation = Rule::new("!has(self.selector.matchExpressions) || self.selector.matchExpressions.all(r, (r.operator in ['In', 'NotIn'] && !has(r.values)) || ((has(self.template.metadata.labels) && r.key in self.template.metadata.labels) ? (r.operator == 'In' ? self.template.metadata.labels[r.key] in r.values : r.operator == 'NotIn' ? !(self.template.metadata.labels[r.key] in r.values) : r.operator == 'Exists') : r.operator in ['NotIn', 'DoesNotExist']))")
        .message("matchExpressions must match template.metadata.labels")
        .field_path(".selector")
        .reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.template.spec.tenant)")
        .message("cannot be set: set spec.tenant, which the operator copies to each replica")
        .field_path(".template.spec.tenant")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.template.spec.container)")
        .message("cannot be set: set spec.container, which the operator copies to each replica")
        .field_path(".template.spec.container")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.template.spec.nodeName)")
        .message("cannot be set: the operator places each replica")
        .field_path(".template.spec.nodeName")
        .reason(Reason::FieldValueForbidden),
)]
#[serde(rename_all = "camelCase")]
pub struct SecureWorkloadSpec {
    /// Number of MicroVM replicas, 0 to 1000.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Selects the MicroVMs this workload owns. Must match the template's labels.
    /// Immutable.
    #[x_kube(
        validation = Rule::new("self == oldSelf")
            .message("field is immutable")
            .reason(Reason::FieldValueInvalid),
        validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)")
            .message("must not be empty: it would select every MicroVM in the namespace")
            .reason(Reason::FieldValueRequired),
    )]
    pub selector: LabelSelector,

    /// The MicroVM each replica is created from.
    pub template: MicroVMTemplate,

    /// The container each replica runs inside its VM, copied to each replica's
    /// `spec.container`.
    pub container: Container,

    /// How replicas are replaced when the template or container changes.
    #[serde(default)]
    pub strategy: UpdateStrategy,

    /// The tenant the workload belongs to, copied to each replica's `spec.tenant`.
    /// Placement uses it to keep tenants apart. As for a MicroVM, the name must be
    /// the namespace's tenant, and `Exclusive` needs the namespace's
    /// `runv.dev/allow-exclusive` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Tenant>,
}

fn default_replicas() -> i32 {
    1
}

/// A label selector, as `metav1.LabelSelector` with bounded sizes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = label_value_schema()
    ))]
    pub match_labels: BTreeMap<String, String>,

    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One label requirement.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)")
    .message("must be non-empty for In and NotIn, and empty for Exists and DoesNotExist")
    .field_path(".values")
    .reason(Reason::FieldValueInvalid))]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[schemars(
        length(min = 1, max = QUALIFIED_NAME_MAX),
        regex(pattern = QUALIFIED_NAME_PATTERN)
    )]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: SelectorOperator,
    /// Values for In and NotIn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(max = LABEL_VALUE_MAX), regex(pattern = LABEL_VALUE_PATTERN))
    )]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl From<&LabelSelector> for metav1::LabelSelector {
    fn from(s: &LabelSelector) -> Self {
        let op = |o: SelectorOperator| match o {
            SelectorOperator::In => "In",
            SelectorOperator::NotIn => "NotIn",
            SelectorOperator::Exists => "Exists",
            SelectorOperator::DoesNotExist => "DoesNotExist",
        };
        metav1::LabelSelector {
            match_labels: (!s.match_labels.is_empty()).then(|| s.match_labels.clone()),
            match_expressions: (!s.match_expressions.is_empty()).then(|| {
                s.match_expressions
                    .iter()
                    .map(|r| metav1::LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: op(r.operator).to_owned(),
                        values: (!r.values.is_empty()).then(|| r.values.clone()),
                    })
                    .collect()
            }),
        }
    }
}

/// A MicroVM template: the labels and annotations each replica gets, and its spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMTemplate {
    /// Labels and annotations for each replica.
    #[serde(default)]
    pub metadata: TemplateMetadata,
    /// The MicroVM spec of each replica.
    pub spec: MicroVMSpec,
}

/// Labels and annotations copied onto each replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    /// Labels; must include the selector's matchLabels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = label_value_schema()
    ))]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = { "type": "string", "maxLength": ANNOTATIONS_TOTAL_MAX }
    ))]
    pub annotations: BTreeMap<String, String>,
}

/// Linux's limit on one command-line argument (`MAX_ARG_STRLEN`).
const ARG_MAX: u32 = 128 * 1024;

/// The container run inside each replica's VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// OCI image reference (`registry.example/app:1.2`, or pinned by `@sha256:` digest).
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Entrypoint, replacing the image's ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = ARG_MAX)))]
    pub command: Vec<String>,

    /// Arguments, replacing the image's CMD.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = ARG_MAX)))]
    pub args: Vec<String>,

    /// Environment variables, in addition to the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(e, self.exists_one(f, f.name == e.name))")
            .message("names must be unique")
            .reason(Reason::FieldValueInvalid),
    )]
    pub env: Vec<EnvVar>,

    /// Working directory, replacing the image's WORKDIR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("must be an absolute path")
        .reason(Reason::FieldValueInvalid))]
    pub working_dir: Option<String>,

    /// When the node pulls the image: `Always` (resolve the tag with the registry
    /// at every start), `IfNotPresent` or `Never`. Unset, as for a Pod: `Always`
    /// for a `:latest` or untagged image, else `IfNotPresent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
}

/// When the node pulls a container image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Resolve the reference with the registry at every start; blobs the node
    /// has are not fetched again.
    Always,
    /// Use the node's copy when it has one.
    IfNotPresent,
    /// Only the node's copy; a start without one fails with `ErrImageNeverPull`.
    Never,
}

impl Container {
    /// The pull policy, defaulted as a Pod's: `Always` for a `:latest` or
    /// untagged (and not digest-pinned) image, else `IfNotPresent`.
    pub fn pull_policy(&self) -> ImagePullPolicy {
        if let Some(p) = self.image_pull_policy {
            return p;
        }
        let image = self.image.as_str();
        if image.contains('@') {
            return ImagePullPolicy::IfNotPresent;
        }
        // The tag follows the last `:` after the last `/` (a registry port
        // comes before a `/`).
        let last = image.rsplit('/').next().unwrap_or(image);
        match last.rsplit_once(':') {
            Some((_, "latest")) | None => ImagePullPolicy::Always,
            Some(_) => ImagePullPolicy::IfNotPresent,
        }
    }
}

/// One environment variable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    )]
    pub name: String,
    /// Value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// How replicas are replaced.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'RollingUpdate' || !has(self.rollingUpdate)")
    .message("only allowed when type is RollingUpdate")
    .field_path(".rollingUpdate")
    .reason(Reason::FieldValueForbidden))]
pub struct UpdateStrategy {
    /// RollingUpdate or Recreate.
    #[serde(rename = "type", default)]
    pub kind: StrategyType,
    /// Bounds of a rolling update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
}

/// The update strategy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StrategyType {
    /// Replace replicas a few at a time, within maxUnavailable and maxSurge.
    #[default]
    RollingUpdate,
    /// Delete all old replicas, then create the new ones.
    Recreate,
}

/// Bounds of a rolling update, as for Deployments.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])")
    .message("maxSurge and maxUnavailable cannot both be 0")
    .reason(Reason::FieldValueInvalid))]
pub struct RollingUpdate {
    /// Replicas that may be unavailable during the update: a count or a percentage of
    /// `replicas` (rounded down).
    #[serde(default = "default_quarter")]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new("string(self).matches('^[0-9]+%?$') && (!string(self).endsWith('%') || int(string(self).replace('%', '')) <= 100)")
        .message("must be a non-negative count or a percentage up to 100%")
        .reason(Reason::FieldValueInvalid))]
    pub max_unavailable: IntOrString,
    /// Replicas that may be created above `replicas` during the update: a count or a
    /// percentage (rounded up).
    #[serde(default = "default_quarter")]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new("string(self).matches('^[0-9]+%?$')")
        .message("must be a non-negative count or a percentage")
        .reason(Reason::FieldValueInvalid))]
    pub max_surge: IntOrString,
}

fn default_quarter() -> IntOrString {
    IntOrString::String("25%".into())
}

impl Default for RollingUpdate {
    /// The defaults the schema applies: 25% each, as for Deployments.
    fn default() -> Self {
        Self {
            max_unavailable: default_quarter(),
            max_surge: default_quarter(),
        }
    }
}

/// What the operator observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecureWorkloadStatus {
    /// MicroVMs owned by the workload.
    #[serde(default)]
    pub replicas: i32,
    /// Owned MicroVMs that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Owned MicroVMs that are Ready and running.
    #[serde(default)]
    pub available_replicas: i32,
    /// Owned MicroVMs created from the current template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Available, Progressing, ReplicaFailure, Reconciling, Stalled and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The selector as a string (`app=web,tier in (a,b)`), for the scale subresource and
    /// HorizontalPodAutoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, policy: Option<ImagePullPolicy>) -> Container {
        Container {
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            image_pull_policy: policy,
        }
    }

    #[test]
    fn the_pull_policy_defaults_as_a_pods() {
        use ImagePullPolicy::{Always, IfNotPresent, Never};
        for (image, want) in [
            ("web", Always),
            ("web:latest", Always),
            ("registry:5000/team/web", Always),
            ("registry:5000/team/web:latest", Always),
            ("registry:5000/team/web:1.2", IfNotPresent),
            ("web:1.2", IfNotPresent),
            ("web@sha256:0123", IfNotPresent),
            ("web:latest@sha256:0123", IfNotPresent),
        ] {
            assert_eq!(container(image, None).pull_policy(), want, "{image}");
        }
        assert_eq!(container("web", Some(Never)).pull_policy(), Never);
        assert_eq!(container("web:1", Some(Always)).pull_policy(), Always);
    }
}

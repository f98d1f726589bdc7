//! The kinds the server serves: built-ins and the resources of every
//! established CustomResourceDefinition.
//!
//! A [`ResourceType`] says where a kind lives (group, version, plural,
//! scope), which subresources it has, how it prints as a Table, which fields
//! can be selected and which schema admits it. The registry does not store
//! objects and does not admit them; it only answers "what is this path".

use std::sync::Arc;

use kube::core::cel::{CompiledSchema, compile_schema};
use serde_json::{Value, json};

/// Why a CRD could not be turned into served resources.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A version's schema could not be compiled to JSON Schema.
    #[error("spec.versions[{version}].schema.openAPIV3Schema: {message}")]
    Schema {
        /// Version name.
        version: String,
        /// Compiler message.
        message: String,
    },
}

/// Which built-in behaviour a kind has beyond the generic store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// A custom resource: schema, CEL, printer columns from its CRD.
    Custom,
    /// `v1` Namespace.
    Namespace,
    /// `v1` Node.
    Node,
    /// `v1` ConfigMap.
    ConfigMap,
    /// `v1` Secret.
    Secret,
    /// `v1` Event.
    CoreEvent,
    /// `events.k8s.io/v1` Event.
    Event,
    /// `coordination.k8s.io/v1` Lease.
    Lease,
    /// `apiextensions.k8s.io/v1` CustomResourceDefinition.
    Crd,
}

/// `additionalPrinterColumns` entry.
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    /// Header.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `date`.
    pub type_: String,
    /// Optional format.
    pub format: String,
    /// Description.
    pub description: String,
    /// 0 for the default view, more for `-o wide`.
    pub priority: i64,
    /// Simple JSONPath (`.status.phase`).
    pub json_path: String,
}

/// The scale subresource's paths.
#[derive(Clone, Debug)]
pub struct ScaleSpec {
    /// `.spec.replicas`.
    pub spec_replicas: String,
    /// `.status.replicas`.
    pub status_replicas: String,
    /// `.status.selector`, if any.
    pub label_selector: Option<String>,
}

/// A compiled structural schema of one CRD version.
pub struct Schema {
    /// The `openAPIV3Schema` as written.
    pub structural: Value,
    /// Plain JSON Schema validator of it.
    pub validator: jsonschema::Validator,
    /// CEL rules.
    pub cel: CompiledSchema,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

/// One served group/version/resource.
#[derive(Clone, Debug)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// Version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural resource name.
    pub plural: String,
    /// Singular.
    pub singular: String,
    /// Short names.
    pub short_names: Vec<String>,
    /// Categories.
    pub categories: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has `/status`.
    pub status: bool,
    /// Has `/scale`.
    pub scale: Option<ScaleSpec>,
    /// Table columns after Name.
    pub columns: Vec<PrinterColumn>,
    /// Extra selectable field paths (`spec.nodeName`), without the leading dot.
    pub selectable: Vec<String>,
    /// Schema for custom resources.
    pub schema: Option<Arc<Schema>>,
    /// Built-in behaviour.
    pub builtin: Builtin,
    /// This version is the storage version (its objects are stored as it).
    pub storage_version: String,
}

impl ResourceType {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `microvms.runv.dev` or `configmaps`, as in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Key of the shared storage of all versions of this resource.
    pub fn store_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// Whether writes on the main resource bump `metadata.generation`.
    pub fn has_generation(&self) -> bool {
        matches!(self.builtin, Builtin::Custom | Builtin::Crd)
    }
}

/// Every served resource.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
}

fn col(name: &str, type_: &str, path: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: path.into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    short: &[&str],
    namespaced: bool,
    status: bool,
    builtin: Builtin,
    columns: Vec<PrinterColumn>,
    selectable: &[&str],
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: short.iter().map(|s| (*s).into()).collect(),
        categories: Vec::new(),
        namespaced,
        status,
        scale: None,
        columns,
        selectable: selectable.iter().map(|s| (*s).into()).collect(),
        schema: None,
        builtin,
        storage_version: version.into(),
    }
}

impl Registry {
    /// The built-in kinds.
    pub fn builtins() -> Self {
        let age = || col("Age", "date", ".metadata.creationTimestamp", 0);
        let types = vec![
            builtin(
                "",
                "v1",
                "Namespace",
                "namespaces",
                &["ns"],
                false,
                true,
                Builtin::Namespace,
                vec![col("Status", "string", ".status.phase", 0), age()],
                &["status.phase"],
            ),
            builtin(
                "",
                "v1",
                "Node",
                "nodes",
                &["no"],
                false,
                true,
                Builtin::Node,
                vec![
                    col(
                        "Status",
                        "string",
                        ".status.conditions[?(@.type==\"Ready\")].status",
                        0,
                    ),
                    age(),
                    col("Version", "string", ".status.nodeInfo.kubeletVersion", 0),
                    col(
                        "Internal-IP",
                        "string",
                        ".status.addresses[?(@.type==\"InternalIP\")].address",
                        1,
                    ),
                ],
                &["spec.unschedulable"],
            ),
            builtin(
                "",
                "v1",
                "ConfigMap",
                "configmaps",
                &["cm"],
                true,
                false,
                Builtin::ConfigMap,
                vec![col("Data", "integer", "#data", 0), age()],
                &[],
            ),
            builtin(
                "",
                "v1",
                "Secret",
                "secrets",
                &[],
                true,
                false,
                Builtin::Secret,
                vec![
                    col("Type", "string", ".type", 0),
                    col("Data", "integer", "#data", 0),
                    age(),
                ],
                &["type"],
            ),
            builtin(
                "",
                "v1",
                "Event",
                "events",
                &["ev"],
                true,
                false,
                Builtin::CoreEvent,
                vec![
                    col("Type", "string", ".type", 0),
                    col("Reason", "string", ".reason", 0),
                    col("Object", "string", "#involved", 0),
                    col("Message", "string", ".message", 0),
                    age(),
                ],
                &[
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "source",
                    "type",
                ],
            ),
            builtin(
                "events.k8s.io",
                "v1",
                "Event",
                "events",
                &["ev"],
                true,
                false,
                Builtin::Event,
                vec![
                    col("Type", "string", ".type", 0),
                    col("Reason", "string", ".reason", 0),
                    col("Note", "string", ".note", 0),
                    age(),
                ],
                &[],
            ),
            builtin(
                "coordination.k8s.io",
                "v1",
                "Lease",
                "leases",
                &[],
                true,
                false,
                Builtin::Lease,
                vec![col("Holder", "string", ".spec.holderIdentity", 0), age()],
                &[],
            ),
            builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                &["crd", "crds"],
                false,
                true,
                Builtin::Crd,
                vec![col("Created At", "date", ".metadata.creationTimestamp", 0)],
                &[],
            ),
        ];
        let mut types: Vec<_> = types.into_iter().map(Arc::new).collect();
        for t in &mut types {
            if t.builtin == Builtin::Event || t.builtin == Builtin::CoreEvent {
                // Both Event APIs read and write one store, as in kube-apiserver.
                Arc::make_mut(t).storage_version = "v1".into();
            }
        }
        Self { types }
    }

    /// All served resources.
    pub fn all(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// The resource served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// The resource for an apiVersion and kind.
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.api_version() == api_version && t.kind == kind)
            .cloned()
    }

    /// Drops the resources of the CRD `name` (`plural.group`).
    pub fn remove_crd(&mut self, name: &str) {
        self.types.retain(|t| {
            t.builtin != Builtin::Custom || format!("{}.{}", t.plural, t.group) != name
        });
    }

    /// Serves the versions of a CRD, replacing what it served before.
    pub fn add_crd(&mut self, crd: &Value) -> Result<(), RegistryError> {
        let types = types_of_crd(crd)?;
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        self.remove_crd(name);
        self.types.extend(types.into_iter().map(Arc::new));
        Ok(())
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The resource types one CRD serves (one per served version).
pub fn types_of_crd(crd: &Value) -> Result<Vec<ResourceType>, RegistryError> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let group = spec["group"].as_str().unwrap_or_default();
    let storage_version = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == json!(true))
        .and_then(|v| v["name"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut out = Vec::new();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"] != json!(true) {
            continue;
        }
        let version = v["name"].as_str().unwrap_or_default().to_string();
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(s) => {
                let validator = jsonschema::validator_for(&runv_crds::validate::to_json_schema(s))
                    .map_err(|e| RegistryError::Schema {
                        version: version.clone(),
                        message: e.to_string(),
                    })?;
                Some(Arc::new(Schema {
                    structural: s.clone(),
                    validator,
                    cel: compile_schema(s),
                }))
            }
            None => None,
        };
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c["name"].as_str().unwrap_or_default().into(),
                        type_: c["type"].as_str().unwrap_or("string").into(),
                        format: c["format"].as_str().unwrap_or_default().into(),
                        description: c["description"].as_str().unwrap_or_default().into(),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        json_path: c["jsonPath"].as_str().unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_else(|| {
                vec![PrinterColumn {
                    name: "Age".into(),
                    type_: "date".into(),
                    format: String::new(),
                    description: String::new(),
                    priority: 0,
                    json_path: ".metadata.creationTimestamp".into(),
                }]
            });
        let scale = v.pointer("/subresources/scale").map(|s| ScaleSpec {
            spec_replicas: s["specReplicasPath"].as_str().unwrap_or_default().into(),
            status_replicas: s["statusReplicasPath"].as_str().unwrap_or_default().into(),
            label_selector: s["labelSelectorPath"].as_str().map(String::from),
        });
        let selectable = v["selectableFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["jsonPath"].as_str())
            .map(|p| p.trim_start_matches('.').to_string())
            .collect();
        out.push(ResourceType {
            group: group.into(),
            version,
            kind: names["kind"].as_str().unwrap_or_default().into(),
            plural: names["plural"].as_str().unwrap_or_default().into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| names["kind"].as_str().unwrap_or_default().to_lowercase()),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            namespaced: spec["scope"] != json!("Cluster"),
            status: v.pointer("/subresources/status").is_some(),
            scale,
            columns,
            selectable,
            schema,
            builtin: Builtin::Custom,
            storage_version: storage_version.clone(),
        });
    }
    Ok(out)
}

//! The `MicroVM` kind: one KVM microVM, placed on a node and run by that
//! node's agent.
//!
//! The spec says what the user wants (machine shape, boot, disks, network,
//! run policy, power state, placement, isolation); the status says what the
//! agent observed. Controllers never write the spec. Cross-field rules are
//! CEL `x-kubernetes-validations` so a bad manifest is refused at apply time
//! with the field named; every string and list is bounded so the API server's
//! CEL cost estimator accepts them. The error names the full path of the field
//! and the messages are worded relative to it, since the same rules apply in a
//! SecureWorkload's `spec.template.spec`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::secureworkload::Container;

/// Desired state of a microVM.
// `#[kube(printcolumn(..))]` repeats keys by design, one group per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "runv.dev",
    version = "v1alpha1",
    kind = "MicroVM",
    plural = "microvms",
    singular = "microvm",
    shortname = "mvm",
    category = "runv",
    namespaced,
    status = "MicroVMStatus",
    derive = "PartialEq",
    doc = "A MicroVM is one KVM microVM: a guest kernel with its disks, network interfaces and vsock, placed on a node and run there by the runv node agent.",
    selectable = ".status.nodeName",
    selectable = ".status.phase",
    validation = Rule::new("has(self.spec.container) || (has(self.spec.boot) && has(self.spec.boot.kernel))")
        .message("a MicroVM without spec.container names the kernel it boots")
        .field_path(".spec.boot.kernel")
        .reason(Reason::FieldValueRequired),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Reconciled to spec"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.nodeName",
        description = "Node running the VM"
    ),
    printcolumn(
        name = "IP",
        type_ = "string",
        json_path = ".status.interfaces[0].ip",
        description = "Guest IP of the first interface"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "vCPUs",
        type_ = "integer",
        json_path = ".spec.resources.vcpus",
        priority = "1"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".spec.resources.memory",
        priority = "1"
    ),
    printcolumn(
        name = "Boot ms",
        type_ = "integer",
        json_path = ".status.bootDurationMillis",
        priority = "1",
        description = "VMM start to guest booted, last boot"
    )
)]
#[x_kube(
    validation = Rule::new("!has(oldSelf.nodeName) || (has(self.nodeName) && self.nodeName == oldSelf.nodeName)")
        .message("field is immutable once set: delete and re-create the MicroVM to move it")
        .field_path(".nodeName")
        .reason(Reason::FieldValueInvalid),
    validation = Rule::new("has(self.tenant) == has(oldSelf.tenant) && (!has(self.tenant) || self.tenant == oldSelf.tenant)")
        .message("field is immutable: delete and re-create the MicroVM to change it")
        .field_path(".tenant")
        .reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.isolation) || !has(self.isolation.limits) || !has(self.isolation.limits.memory) || !isQuantity(self.isolation.limits.memory) || !isQuantity(self.resources.memory) || quantity(self.isolation.limits.memory).compareTo(quantity(self.resources.memory)) >= 0")
        .message("must be at least resources.memory: the VMM process holds all of the guest's memory")
        .field_path(".isolation.limits.memory")
        .reason(Reason::FieldValueInvalid),
)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMSpec {
    /// Machine shape: vCPUs and memory.
    #[serde(default)]
    pub resources: Resources,

    /// What the VM boots: kernel, optional initrd and kernel command line.
    /// A VM with `container` and no `boot.kernel` boots the node's guest kit
    /// (its kernel, and an initramfs with `runv-init`).
    #[serde(default)]
    pub boot: Boot,

    /// Block devices, attached as virtio-blk in list order (`/dev/vda`, `/dev/vdb`, ...).
    /// At most 12: with 4 interfaces, vsock and the entropy device that fills
    /// the VMM's 18 virtio-mmio slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_DISKS))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(d, self.exists_one(e, e.name == d.name))")
            .message("names must be unique within the MicroVM")
            .reason(Reason::FieldValueInvalid),
    )]
    pub disks: Vec<Disk>,

    /// Network interfaces, attached as virtio-net in list order. Empty means no network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_INTERFACES))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(i, self.exists_one(j, j.name == i.name))")
            .message("names must be unique within the MicroVM")
            .reason(Reason::FieldValueInvalid),
    )]
    pub interfaces: Vec<Interface>,

    /// A virtio-vsock device for host-guest sockets without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,

    /// What the agent does when the VM exits on its own. See docs/api.md for the full semantics.
    #[serde(default)]
    pub run_policy: RunPolicy,

    /// The power state the user wants: Running, Stopped or Paused.
    #[serde(default)]
    pub power_state: PowerState,

    /// Seconds the guest gets to shut down after being asked (power state Stopped, deletion)
    /// before the VMM is killed.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i64,

    /// Only nodes carrying all these labels can run the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = label_value_schema()
    ))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints of nodes that the VM tolerates, as for Pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), schema_with = "tolerations_schema")]
    pub tolerations: Vec<Toleration>,

    /// Pins the VM to this node, bypassing placement's choice (selectors, taints,
    /// cordon). Only in a namespace its administrator labelled
    /// `runv.dev/allow-node-name: "true"`; elsewhere the VM is not placed
    /// (`Scheduled=False`, reason `NodeNameNotAllowed`). The node's agent still
    /// refuses to start it over the node's capacity or beside another tenant's
    /// Exclusive VM. Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub node_name: Option<String>,

    /// How the VMM process is confined on the node.
    #[serde(default)]
    pub isolation: Isolation,

    /// The tenant the VM belongs to, and whether it shares nodes with other tenants.
    /// The tenant is the namespace's (its `runv.dev/tenant` label, set by an
    /// administrator, else its name): a different `name` is refused
    /// (`Scheduled=False`, reason `TenantNotAllowed`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Tenant>,

    /// A container image for the VM: the node pulls it, builds a read-only root
    /// filesystem image from it and attaches that as the VM's first disk
    /// (`/dev/vda`, before `disks`), and writes the container's merged config
    /// for the guest. `boot.kernel` is still required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,

    /// Secrets of type `kubernetes.io/dockerconfigjson` in the VM's namespace that
    /// the node uses to pull `container.image`, as a Pod's `imagePullSecrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
}

/// A reference to an object in the same namespace, by name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// The object's name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// Longest label value Kubernetes accepts.
pub const LABEL_VALUE_MAX: u32 = 63;
/// Longest qualified name (label or annotation key) Kubernetes accepts: a DNS subdomain
/// prefix of 253, `/`, and a name of 63.
pub const QUALIFIED_NAME_MAX: u32 = 317;
/// Kubernetes' limit on the total size of an object's annotations, which bounds each value.
pub const ANNOTATIONS_TOTAL_MAX: u32 = 256 * 1024;

/// What a label value may be, as Kubernetes checks it: empty, or alphanumeric
/// characters, `-`, `_` and `.`, starting and ending with an alphanumeric character.
/// The schema also bounds it at [`LABEL_VALUE_MAX`].
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// The unanchored regular expression of a qualified name, for the patterns below.
macro_rules! qualified_name {
    () => {
        r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
    };
}

/// What a label key (a qualified name) may be, as Kubernetes checks it: an optional
/// DNS subdomain prefix and `/`, then a name of at most 63 alphanumeric characters,
/// `-`, `_` or `.`, starting and ending with an alphanumeric character. Used where a
/// key is a bounded string rather than a map key.
pub const QUALIFIED_NAME_PATTERN: &str = concat!("^", qualified_name!(), "$");
/// [`QUALIFIED_NAME_PATTERN`], or empty.
const OPTIONAL_QUALIFIED_NAME_PATTERN: &str = concat!("^(", qualified_name!(), ")?$");

/// The schema of one label value in a map of labels: a bounded string of
/// [`LABEL_VALUE_PATTERN`]'s shape. (A CRD schema cannot check map keys, and a CEL
/// rule over them would have no bound on its cost.)
pub fn label_value_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "maxLength": LABEL_VALUE_MAX,
        "pattern": LABEL_VALUE_PATTERN,
    })
}

/// The schema of `tolerations`: Kubernetes' own `Toleration`, with its strings bounded as
/// the API server bounds them (a qualified key, a label value, and the short operator
/// and effect words), the key shaped as a label key, the operator and effect limited to what placement understands, and the API server's rules for Pods: an empty
/// key only with `Exists`, and no value with `Exists`.
fn tolerations_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<Toleration>>::json_schema(generator);
    let Some(items) = schema
        .get_mut("items")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return schema;
    };
    if let Some(props) = items
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for (name, max) in [
            ("key", QUALIFIED_NAME_MAX),
            ("value", LABEL_VALUE_MAX),
            ("operator", 16),
            ("effect", 16),
        ] {
            if let Some(field) = props
                .get_mut(name)
                .and_then(serde_json::Value::as_object_mut)
            {
                field.insert("maxLength".into(), max.into());
            }
        }
        if let Some(key) = props
            .get_mut("key")
            .and_then(serde_json::Value::as_object_mut)
        {
            // Empty (every key, with Exists) or a label key.
            key.insert("pattern".into(), OPTIONAL_QUALIFIED_NAME_PATTERN.into());
        }
        for (name, allowed) in [
            ("operator", &["Exists", "Equal"][..]),
            (
                "effect",
                &["", "NoSchedule", "PreferNoSchedule", "NoExecute"][..],
            ),
        ] {
            if let Some(field) = props
                .get_mut(name)
                .and_then(serde_json::Value::as_object_mut)
            {
                field.insert("enum".into(), allowed.into());
            }
        }
    }
    items.insert(
        "description".into(),
        "A taint the VM tolerates, matched as for Pods.".into(),
    );
    items.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([
            {
                "rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "message": "must be Exists when key is empty",
                "fieldPath": ".operator",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "message": "must be empty when operator is Exists",
                "fieldPath": ".value",
                "reason": "FieldValueInvalid",
            },
        ]),
    );
    schema
}

/// The tenant a VM belongs to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// Tenant name, a DNS label: the namespace's tenant.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Whether the tenant's VMs share nodes with other tenants' VMs.
    #[serde(default)]
    pub node_isolation: NodeIsolation,
}

/// Node sharing between tenants.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NodeIsolation {
    /// The VMs may run on nodes that also run other tenants' VMs (unless those tenants
    /// are Exclusive).
    #[default]
    Shared,
    /// The VMs run only on nodes that run no other tenant's VMs, and no VM of another
    /// tenant is placed beside them. Only in a namespace its administrator labelled
    /// `runv.dev/allow-exclusive: "true"`; elsewhere the VM is not placed
    /// (`Scheduled=False`, reason `ExclusiveNotAllowed`).
    Exclusive,
}

fn default_grace_period() -> i64 {
    30
}

/// Most disks a MicroVM may have (`spec.disks`). The node agent checks at
/// compile time that these limits fit the VMM's virtio-mmio slots and vCPU count.
pub const MAX_DISKS: usize = 12;
/// Most network interfaces a MicroVM may have (`spec.interfaces`).
pub const MAX_INTERFACES: usize = 4;
/// Most vCPUs a MicroVM may have (`spec.resources.vcpus`).
pub const MAX_VCPUS: u32 = 32;

/// vCPUs and memory of the guest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Number of virtual CPUs, 1 to 32.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,

    /// Guest memory as a Kubernetes quantity (`256Mi`, `1Gi`), from 16Mi to 64Gi.
    #[serde(default = "default_memory")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self)")
            .message("must be a quantity such as 256Mi or 1Gi")
            .reason(Reason::FieldValueInvalid),
        validation = Rule::new("!isQuantity(self) || (quantity(self).compareTo(quantity('16Mi')) >= 0 && quantity(self).compareTo(quantity('64Gi')) <= 0)")
            .message("must be between 16Mi and 64Gi")
            .reason(Reason::FieldValueInvalid),
    )]
    pub memory: String,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> String {
    "128Mi".into()
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            vcpus: default_vcpus(),
            memory: default_memory(),
        }
    }
}

/// What the guest boots.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Boot {
    /// Absolute path on the node of the guest kernel: an ELF `vmlinux` (booted through its
    /// PVH entry when it has one) or a `bzImage`. Required unless the VM has a
    /// `container` (which boots the node's guest kit without it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("must be an absolute path on the node")
        .reason(Reason::FieldValueInvalid))]
    pub kernel: String,

    /// Absolute path on the node of an initrd or initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("must be an absolute path on the node")
        .reason(Reason::FieldValueInvalid))]
    pub initrd: Option<String>,

    /// Kernel command line. The agent appends what the VMM needs to describe devices.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 2048))]
    pub cmdline: String,
}

/// One block device. Exactly one source (`file` or `empty`) is set; an OCI image source
/// will be a third.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.file), has(self.empty)].filter(x, x).size() == 1")
        .message("exactly one of file or empty must be set")
        .reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.empty) || !self.readOnly")
        .message("cannot be true for an empty disk: nothing could ever be written to it")
        .field_path(".readOnly")
        .reason(Reason::FieldValueInvalid),
)]
pub struct Disk {
    /// Name of the disk, a DNS label unique within the MicroVM.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Attach the disk read-only.
    #[serde(default)]
    pub read_only: bool,

    /// A raw disk image file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileDisk>,

    /// A new, zero-filled (sparse) disk of the given size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty: Option<EmptyDisk>,
}

/// A raw disk image on the node. A writable disk gets a private sparse copy, made once
/// when the MicroVM first starts and kept until it is deleted; a read-only one is
/// attached directly.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileDisk {
    /// Absolute path of the image file on the node.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("must be an absolute path on the node")
        .reason(Reason::FieldValueInvalid))]
    pub path: String,
}

/// A new empty disk.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDisk {
    /// Size as a quantity (`1Gi`), from 1Mi to 2Ti.
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1Mi')) >= 0 && quantity(self).compareTo(quantity('2Ti')) <= 0")
            .message("must be a quantity between 1Mi and 2Ti")
            .reason(Reason::FieldValueInvalid),
    )]
    pub size: String,
}

/// One network interface.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type != 'Tap' || has(self.tapDevice)")
        .message("must name an existing tap device when type is Tap")
        .field_path(".tapDevice")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.type == 'Tap' || !has(self.tapDevice)")
        .message("only allowed when type is Tap")
        .field_path(".tapDevice")
        .reason(Reason::FieldValueForbidden),
)]
pub struct Interface {
    /// Name of the interface, a DNS label unique within the MicroVM.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// How the interface reaches the outside.
    #[serde(rename = "type")]
    pub kind: InterfaceType,

    /// The existing tap device on the node, for type Tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub tap_device: Option<String>,

    /// Guest MAC address (unicast, `02:00:00:00:00:01`). The agent picks a stable
    /// locally administered one when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 17),
        regex(pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
    )]
    #[x_kube(validation = Rule::new("!self.matches('^.[13579bdfBDF]')")
        .message("must be a unicast address: the first octet must be even")
        .reason(Reason::FieldValueInvalid))]
    pub mac: Option<String>,
}

/// How an interface is connected on the node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceType {
    /// A tap on the node's runv bridge, NAT to the node's uplink, the address from the
    /// agent's node-local IPAM.
    Nat,
    /// An existing tap device, named by `tapDevice`, that the user manages.
    Tap,
}

/// The virtio-vsock device.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Vsock {
    /// Attach a vsock device. The agent assigns the guest CID and reports it in
    /// `status.vsockCid`.
    #[serde(default)]
    pub enabled: bool,
}

/// What happens when the VM exits on its own. Semantics follow KubeVirt's `runStrategy`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunPolicy {
    /// Keep the VM running: restart it, with backoff, after every exit.
    Always,
    /// Restart it after a failure; a clean guest power-off ends it (`Succeeded`).
    RerunOnFailure,
    /// Run it once; never restart it (`Succeeded` or `Failed`).
    #[default]
    Once,
    /// Start and stop it only when `powerState` changes; never restart it on its own.
    Manual,
    /// Never run it, whatever `powerState` says.
    Halted,
}

/// The power state the user wants.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PowerState {
    /// The VM runs (subject to `runPolicy`).
    #[default]
    Running,
    /// The VM is shut down: the guest is asked to power off, then the VMM is killed after
    /// `terminationGracePeriodSeconds`.
    Stopped,
    /// The vCPUs are paused; memory and devices are kept.
    Paused,
}

/// How the VMM process is confined. The agent enforces these.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Isolation {
    /// Seccomp filters on every VMM thread. `Disabled` runs only on nodes whose agent
    /// allows it (`--allow-seccomp-disabled`); elsewhere the VM does not start
    /// (`Ready=False`, reason `SandboxNotAllowed`).
    #[serde(default)]
    pub seccomp: Toggle,

    /// Run the VMM in a jail: once it has opened its files and devices, and before the
    /// guest runs, the VMM enters new mount, network and IPC namespaces, chroots into the
    /// VM's state directory and becomes an unprivileged user and group of the VM's own
    /// (given by the node agent), with no capabilities and no_new_privs. There is no PID
    /// namespace: the VMM starts no processes. Needs the agent to run as root. `Disabled`
    /// runs only on nodes whose agent allows it (`--allow-jail-disabled`); elsewhere the
    /// VM does not start (`Ready=False`, reason `SandboxNotAllowed`).
    #[serde(default)]
    pub jail: Toggle,

    /// Limits for the VMM process's cgroup. Unset means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<VmmLimits>,
}

/// On or off.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Toggle {
    /// On.
    #[default]
    Enabled,
    /// Off.
    Disabled,
}

/// cgroup limits for the whole VMM process, guest memory included.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmmLimits {
    /// CPU limit as a quantity (`500m`, `2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))")
        .message("must be a positive quantity such as 500m or 2")
        .reason(Reason::FieldValueInvalid))]
    pub cpu: Option<String>,

    /// Memory limit as a quantity; at least `spec.resources.memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self)")
        .message("must be a quantity such as 512Mi")
        .reason(Reason::FieldValueInvalid))]
    pub memory: Option<String>,
}

/// What the node agent observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMStatus {
    /// A one-word summary of the lifecycle, for people and printer columns. Tools should
    /// read `conditions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The node the VM is placed on (written by the operator, or copied from
    /// `spec.nodeName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// The tenant the VM belongs to and its node isolation, as the operator resolved
    /// them at placement from the namespace's `runv.dev/tenant` label and the
    /// administrator's policy (written by the operator). The agent keeps VMs of
    /// different tenants apart on the node by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Tenant>,

    /// Scheduled, VMMStarted, GuestBooted, Ready, Paused, Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// How many times the agent restarted the VM after it exited.
    #[serde(default)]
    pub restart_count: i32,

    /// How the VM last exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,

    /// When the VMM was last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_start_time: Option<Time>,

    /// Milliseconds from VMM start to the guest-booted signal, for the last boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_duration_millis: Option<i64>,

    /// Addresses of the network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub interfaces: Vec<InterfaceStatus>,

    /// The guest's vsock context ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<i64>,

    /// The container image the VM last started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerStatus>,
}

/// The container a VM runs, as a Pod's `containerStatuses[]`: its image,
/// where its process is, how its last run ended, and how often it was
/// restarted. The VM's life is the container's life: a restart of the
/// container is a new boot of the VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// The image as the spec names it.
    pub image: String,
    /// The image resolved to its manifest digest: `registry/repository@sha256:...`.
    #[serde(rename = "imageID")]
    pub image_id: String,
    /// Where the container's process is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContainerState>,
    /// How the previous run ended, once the container was restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<ContainerState>,
    /// The container's process runs (the guest reported it started).
    #[serde(default)]
    pub ready: bool,
    /// Times the container was restarted.
    #[serde(default)]
    pub restart_count: i32,
}

/// One of `waiting`, `running` or `terminated`, as a Pod's container state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    /// Not running yet: the image is being pulled, or the guest boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<ContainerStateWaiting>,
    /// Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<ContainerStateRunning>,
    /// Ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<ContainerStateTerminated>,
}

/// A container that is not running yet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateWaiting {
    /// `ContainerCreating`: the guest boots, or runv-init starts the
    /// container. (While the image is not ready no VM runs: `Ready` says
    /// why, with kubelet's image reasons.)
    pub reason: String,
    /// Details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A running container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateRunning {
    /// When its process started (the guest's clock).
    pub started_at: Time,
}

/// A container that ended.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateTerminated {
    /// The exit status; 128 + the signal when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `Completed` (exit code 0), `Error`, `OOMKilled`, `StartError` (it
    /// could not be started) or `ContainerStatusUnknown` (the VM ended
    /// without the guest reporting the container's end).
    pub reason: String,
    /// Details: why it could not start, or what ended the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it started, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    pub finished_at: Time,
}

/// Lifecycle phase of a MicroVM.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not yet placed on a node.
    Pending,
    /// Placed on a node; the agent has not started it yet.
    Scheduled,
    /// The VMM is starting and the guest booting.
    Starting,
    /// The guest is running.
    Running,
    /// The vCPUs are paused.
    Paused,
    /// Not running, by `powerState` or `runPolicy`, and may run again.
    Stopped,
    /// Exited cleanly and will not be restarted.
    Succeeded,
    /// Exited with a failure and will not be restarted.
    Failed,
    /// The node's agent stopped reporting; the VM's state is not known.
    Unknown,
}

/// How the VM last exited.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExitStatus {
    /// The VMM's exit code, when it exited rather than being killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// A CamelCase reason such as `GuestPowerOff`, `GuestReset`, `TripleFault`, `Killed`,
    /// `OOMKilled` (the VMM's cgroup memory limit was hit).
    pub reason: String,
    /// The VMM's one-line explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the exit was observed.
    pub time: Time,
}

/// Observed state of one network interface.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// Interface name from the spec.
    pub name: String,
    /// Guest IPv4 address, when the agent assigned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The host-side device (tap) of the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
}

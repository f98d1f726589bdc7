//! Every validation rule of the generated CRDs, evaluated offline on a valid and
//! an invalid manifest, with the message the user would see.

use runv_crds::validate::{FieldError, ValidateError, Validator};
use serde_json::{Value, json};

fn microvm(spec: Value) -> Value {
    json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "MicroVM",
        "metadata": { "name": "vm1", "namespace": "default" },
        "spec": spec,
    })
}

fn boot() -> Value {
    json!({ "kernel": "/var/lib/runv/kernels/vmlinux" })
}

fn workload(spec_patch: Value) -> Value {
    let mut spec = json!({
        "replicas": 3,
        "selector": { "matchLabels": { "app": "web" } },
        "template": {
            "metadata": { "labels": { "app": "web" } },
            "spec": { "boot": boot() },
        },
        "container": { "image": "registry.example/web:1.0" },
    });
    merge(&mut spec, spec_patch);
    json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "SecureWorkload",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": spec,
    })
}

/// RFC 7386 merge patch, enough to vary a fixture.
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

fn errors(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    match Validator::new().validate(obj, old) {
        Ok(()) => Vec::new(),
        Err(ValidateError::Invalid { errors, .. }) => errors,
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

#[track_caller]
fn assert_valid(obj: &Value, old: Option<&Value>) {
    let errs = errors(obj, old);
    assert!(errs.is_empty(), "expected valid, got: {errs:?}");
}

/// The object is rejected, and one error names `field` with a message containing `message`.
#[track_caller]
fn assert_rejected(obj: &Value, old: Option<&Value>, field: &str, message: &str) {
    let errs = errors(obj, old);
    assert!(
        errs.iter()
            .any(|e| e.field == field && e.message.contains(message)),
        "expected an error on {field:?} containing {message:?}, got: {errs:?}"
    );
}

#[test]
fn minimal_microvm_is_valid() {
    assert_valid(&microvm(json!({ "boot": boot() })), None);
}

#[test]
fn memory_zero_is_rejected_naming_the_field() {
    let vm = microvm(json!({ "boot": boot(), "resources": { "memory": "0" } }));
    assert_rejected(
        &vm,
        None,
        "spec.resources.memory",
        "spec.resources.memory must be between 16Mi and 64Gi",
    );
}

#[test]
fn memory_bounds() {
    for ok in ["16Mi", "256Mi", "1Gi", "64Gi", "268435456"] {
        let vm = microvm(json!({ "boot": boot(), "resources": { "memory": ok } }));
        assert_valid(&vm, None);
    }
    for bad in ["15Mi", "65Gi", "1Ti"] {
        let vm = microvm(json!({ "boot": boot(), "resources": { "memory": bad } }));
        assert_rejected(&vm, None, "spec.resources.memory", "between 16Mi and 64Gi");
    }
    let vm = microvm(json!({ "boot": boot(), "resources": { "memory": "lots" } }));
    assert_rejected(
        &vm,
        None,
        "spec.resources.memory",
        "must be a quantity such as 256Mi",
    );
}

#[test]
fn vcpus_are_bounded_by_the_schema() {
    let vm = microvm(json!({ "boot": boot(), "resources": { "vcpus": 0 } }));
    assert_rejected(&vm, None, "spec.resources.vcpus", "minimum of 1");
    let vm = microvm(json!({ "boot": boot(), "resources": { "vcpus": 33 } }));
    assert_rejected(&vm, None, "spec.resources.vcpus", "maximum of 32");
}

#[test]
fn kernel_must_be_absolute() {
    let vm = microvm(json!({ "boot": { "kernel": "vmlinux" } }));
    assert_rejected(
        &vm,
        None,
        "spec.boot.kernel",
        "spec.boot.kernel must be an absolute path on the node",
    );
    let vm = microvm(json!({ "boot": { "kernel": "/k", "initrd": "initrd.img" } }));
    assert_rejected(&vm, None, "spec.boot.initrd", "absolute path");
}

#[test]
fn kernel_is_required() {
    let vm = microvm(json!({ "boot": {} }));
    assert_rejected(&vm, None, "spec.boot", "\"kernel\" is a required property");
}

#[test]
fn duplicate_disk_names_are_rejected() {
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [
            { "name": "root", "file": { "path": "/images/root.img" } },
            { "name": "root", "empty": { "size": "1Gi" } },
        ],
    }));
    assert_rejected(
        &vm,
        None,
        "spec.disks",
        "spec.disks[].name must be unique within the MicroVM",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [
            { "name": "root", "file": { "path": "/images/root.img" }, "readOnly": true },
            { "name": "data", "empty": { "size": "1Gi" } },
        ],
    }));
    assert_valid(&vm, None);
}

#[test]
fn disk_needs_exactly_one_source() {
    let vm = microvm(json!({ "boot": boot(), "disks": [{ "name": "d" }] }));
    assert_rejected(
        &vm,
        None,
        "spec.disks[0]",
        "exactly one of file or empty must be set",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "d", "file": { "path": "/a" }, "empty": { "size": "1Gi" } }],
    }));
    assert_rejected(&vm, None, "spec.disks[0]", "exactly one of file or empty");
}

#[test]
fn empty_disk_rules() {
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "d", "readOnly": true, "empty": { "size": "1Gi" } }],
    }));
    assert_rejected(
        &vm,
        None,
        "spec.disks[0].readOnly",
        "cannot be true for an empty disk",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "d", "empty": { "size": "3Ti" } }],
    }));
    assert_rejected(&vm, None, "spec.disks[0].empty.size", "between 1Mi and 2Ti");
}

#[test]
fn disk_name_is_a_dns_label() {
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "Root_Disk", "empty": { "size": "1Gi" } }],
    }));
    assert_rejected(&vm, None, "spec.disks[0].name", "does not match");
}

#[test]
fn tap_interface_names_its_device() {
    let vm = microvm(json!({ "boot": boot(), "interfaces": [{ "name": "eth0", "type": "Tap" }] }));
    assert_rejected(
        &vm,
        None,
        "spec.interfaces[0].tapDevice",
        "spec.interfaces[].tapDevice must name an existing tap device when type is Tap",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "interfaces": [{ "name": "eth0", "type": "Nat", "tapDevice": "tap0" }],
    }));
    assert_rejected(
        &vm,
        None,
        "spec.interfaces[0].tapDevice",
        "only allowed when type is Tap",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "interfaces": [
            { "name": "eth0", "type": "Tap", "tapDevice": "tap0" },
            { "name": "eth1", "type": "Nat", "mac": "02:00:00:00:00:01" },
        ],
    }));
    assert_valid(&vm, None);
}

#[test]
fn interface_type_is_an_enum() {
    let vm =
        microvm(json!({ "boot": boot(), "interfaces": [{ "name": "eth0", "type": "Bridge" }] }));
    assert_rejected(&vm, None, "spec.interfaces[0].type", "is not one of");
}

#[test]
fn duplicate_interface_names_are_rejected() {
    let vm = microvm(json!({
        "boot": boot(),
        "interfaces": [{ "name": "eth0", "type": "Nat" }, { "name": "eth0", "type": "Nat" }],
    }));
    assert_rejected(&vm, None, "spec.interfaces", "name must be unique");
}

#[test]
fn mac_must_be_unicast() {
    let vm = microvm(json!({
        "boot": boot(),
        "interfaces": [{ "name": "eth0", "type": "Nat", "mac": "03:00:00:00:00:01" }],
    }));
    assert_rejected(
        &vm,
        None,
        "spec.interfaces[0].mac",
        "must be a unicast address",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "interfaces": [{ "name": "eth0", "type": "Nat", "mac": "02:00:00:00:00" }],
    }));
    assert_rejected(&vm, None, "spec.interfaces[0].mac", "does not match");
}

#[test]
fn pinned_node_name_is_immutable_once_set() {
    let old = microvm(json!({ "boot": boot(), "nodeName": "node-a" }));
    let moved = microvm(json!({ "boot": boot(), "nodeName": "node-b" }));
    assert_rejected(
        &moved,
        Some(&old),
        "spec.nodeName",
        "spec.nodeName is immutable once set",
    );
    let unpinned = microvm(json!({ "boot": boot() }));
    assert_rejected(&unpinned, Some(&old), "spec.nodeName", "immutable once set");
    // Unchanged, or set for the first time: accepted.
    assert_valid(&old, Some(&old));
    assert_valid(&old, Some(&unpinned));
    // A create carries no old object, so the rule does not apply.
    assert_valid(&moved, None);
}

#[test]
fn vmm_memory_limit_covers_guest_memory() {
    let vm = microvm(json!({
        "boot": boot(),
        "resources": { "memory": "1Gi" },
        "isolation": { "limits": { "memory": "512Mi" } },
    }));
    assert_rejected(
        &vm,
        None,
        "spec.isolation.limits.memory",
        "must be at least spec.resources.memory",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "resources": { "memory": "1Gi" },
        "isolation": { "seccomp": "Disabled", "jail": "Enabled", "limits": { "memory": "1088Mi", "cpu": "500m" } },
    }));
    assert_valid(&vm, None);
    let vm = microvm(json!({ "boot": boot(), "isolation": { "limits": { "cpu": "0" } } }));
    assert_rejected(&vm, None, "spec.isolation.limits.cpu", "positive quantity");
}

#[test]
fn run_policy_and_power_state_are_enums() {
    for policy in ["Always", "RerunOnFailure", "Once", "Manual", "Halted"] {
        assert_valid(
            &microvm(json!({ "boot": boot(), "runPolicy": policy })),
            None,
        );
    }
    assert_rejected(
        &microvm(json!({ "boot": boot(), "runPolicy": "Sometimes" })),
        None,
        "spec.runPolicy",
        "is not one of",
    );
    assert_rejected(
        &microvm(json!({ "boot": boot(), "powerState": "Off" })),
        None,
        "spec.powerState",
        "is not one of",
    );
}

#[test]
fn unknown_fields_are_refused_like_strict_field_validation() {
    let vm = microvm(json!({ "boot": boot(), "cpus": 2 }));
    assert_rejected(
        &vm,
        None,
        "spec",
        "Additional properties are not allowed ('cpus'",
    );
}

#[test]
fn metadata_name_is_checked() {
    let mut vm = microvm(json!({ "boot": boot() }));
    vm["metadata"]["name"] = json!("Bad_Name");
    assert_rejected(&vm, None, "metadata.name", "RFC 1123 subdomain");
}

#[test]
fn unknown_kind_is_reported() {
    let obj = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" } });
    let err = Validator::new().validate(&obj, None).unwrap_err();
    assert!(
        err.to_string().contains("v1 Pod is not a runv kind"),
        "{err}"
    );
}

#[test]
fn minimal_workload_is_valid() {
    assert_valid(&workload(json!({})), None);
}

#[test]
fn workload_selector_must_match_template_labels() {
    let swl = workload(json!({ "selector": { "matchLabels": { "app": "api" } } }));
    assert_rejected(
        &swl,
        None,
        "spec.selector",
        "spec.selector.matchLabels must match spec.template.metadata.labels",
    );
}

#[test]
fn workload_selector_must_not_be_empty() {
    let swl = workload(json!({ "selector": { "matchLabels": null } }));
    assert_rejected(&swl, None, "spec.selector", "must not be empty");
}

#[test]
fn workload_selector_is_immutable() {
    let old = workload(json!({}));
    let new = workload(json!({
        "selector": { "matchLabels": { "app": "web", "tier": "front" } },
        "template": { "metadata": { "labels": { "app": "web", "tier": "front" } } },
    }));
    assert_valid(&new, None);
    assert_rejected(
        &new,
        Some(&old),
        "spec.selector",
        "spec.selector is immutable",
    );
    // Scaling leaves it alone.
    let scaled = workload(json!({ "replicas": 10 }));
    assert_valid(&scaled, Some(&old));
}

#[test]
fn selector_expression_values() {
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": "app", "operator": "In" }] },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector.matchExpressions[0].values",
        "must be non-empty for In and NotIn",
    );
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": "app", "operator": "Exists" }] },
    }));
    assert_valid(&swl, None);
}

#[test]
fn workload_template_cannot_pin_a_node() {
    let swl = workload(json!({ "template": { "spec": { "nodeName": "node-a" } } }));
    assert_rejected(
        &swl,
        None,
        "spec.template.spec.nodeName",
        "cannot be set: the operator places each replica",
    );
}

#[test]
fn workload_template_spec_rules_apply() {
    let swl = workload(json!({ "template": { "spec": { "resources": { "memory": "0" } } } }));
    assert_rejected(
        &swl,
        None,
        "spec.template.spec.resources.memory",
        "between 16Mi and 64Gi",
    );
}

#[test]
fn replicas_are_bounded() {
    assert_rejected(
        &workload(json!({ "replicas": -1 })),
        None,
        "spec.replicas",
        "minimum of 0",
    );
    assert_valid(&workload(json!({ "replicas": 0 })), None);
}

#[test]
fn rolling_update_bounds() {
    let swl = workload(json!({
        "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": 0, "maxUnavailable": "0%" } },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.strategy.rollingUpdate",
        "maxSurge and maxUnavailable cannot both be 0",
    );
    let swl = workload(json!({
        "strategy": { "rollingUpdate": { "maxSurge": 1, "maxUnavailable": "150%" } },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.strategy.rollingUpdate.maxUnavailable",
        "percentage up to 100%",
    );
    let swl = workload(json!({
        "strategy": { "rollingUpdate": { "maxSurge": "-1" } },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.strategy.rollingUpdate.maxSurge",
        "non-negative count or a percentage",
    );
    let swl = workload(json!({
        "strategy": { "rollingUpdate": { "maxSurge": 2, "maxUnavailable": 0 } },
    }));
    assert_valid(&swl, None);
}

#[test]
fn recreate_has_no_rolling_update() {
    let swl = workload(json!({
        "strategy": { "type": "Recreate", "rollingUpdate": { "maxSurge": 1 } },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.strategy.rollingUpdate",
        "only allowed when spec.strategy.type is RollingUpdate",
    );
    assert_valid(
        &workload(json!({ "strategy": { "type": "Recreate" } })),
        None,
    );
}

#[test]
fn container_rules() {
    let swl = workload(json!({
        "container": { "image": "x", "env": [{ "name": "A", "value": "1" }, { "name": "A", "value": "2" }] },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.container.env",
        "spec.container.env[].name must be unique",
    );
    let swl = workload(json!({ "container": { "image": "x", "workingDir": "app" } }));
    assert_rejected(&swl, None, "spec.container.workingDir", "absolute path");
    let swl = workload(json!({ "container": { "image": "" } }));
    assert_rejected(
        &swl,
        None,
        "spec.container.image",
        "shorter than 1 character",
    );
}

#[test]
fn tenant_is_immutable_and_set_on_the_workload() {
    let old = microvm(json!({ "boot": boot(), "tenant": { "name": "blue" } }));
    let new = microvm(json!({ "boot": boot(), "tenant": { "name": "green" } }));
    assert_valid(&old, None);
    assert_rejected(&new, Some(&old), "spec.tenant", "spec.tenant is immutable");
    let none = microvm(json!({ "boot": boot() }));
    assert_rejected(&none, Some(&old), "spec.tenant", "spec.tenant is immutable");
    assert_valid(&old, Some(&old));

    let swl = workload(json!({ "template": { "spec": { "tenant": { "name": "blue" } } } }));
    assert_rejected(
        &swl,
        None,
        "spec.template.spec.tenant",
        "set spec.tenant, which the operator copies to each replica",
    );
    let swl = workload(json!({ "tenant": { "name": "blue", "nodeIsolation": "Exclusive" } }));
    assert_valid(&swl, None);
}

//! Every validation rule of the generated CRDs, evaluated offline on a valid and
//! an invalid manifest, with the message the user would see.

use runv_crds::validate::{FieldError, RULES_NOT_CHECKED, ValidateError, Validator};
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
        "must be between 16Mi and 64Gi",
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
        "must be an absolute path on the node",
    );
    let vm = microvm(json!({ "boot": { "kernel": "/k", "initrd": "initrd.img" } }));
    assert_rejected(&vm, None, "spec.boot.initrd", "absolute path");
}

#[test]
fn kernel_is_required_unless_the_vm_runs_a_container() {
    for spec in [json!({ "boot": {} }), json!({})] {
        assert_rejected(
            &microvm(spec),
            None,
            "spec.boot.kernel",
            "a MicroVM without spec.container names the kernel it boots",
        );
    }
    let container = microvm(json!({ "container": { "image": "app:1" } }));
    assert!(
        errors(&container, None).is_empty(),
        "{:?}",
        errors(&container, None)
    );
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
        "names must be unique within the MicroVM",
    );
    // The list is keyed by name, so the API server reports the second item itself.
    assert_rejected(
        &vm,
        None,
        "spec.disks[1]",
        r#"Duplicate value: map[string]interface {}{"name":"root"}"#,
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
fn disk_file_path_must_be_absolute() {
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "root", "file": { "path": "images/root.img" } }],
    }));
    assert_rejected(
        &vm,
        None,
        "spec.disks[0].file.path",
        "must be an absolute path on the node",
    );
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [{ "name": "root", "file": { "path": "/images/root.img" } }],
    }));
    assert_valid(&vm, None);
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
        "must name an existing tap device when type is Tap",
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
    assert_rejected(&vm, None, "spec.interfaces", "names must be unique");
    assert_rejected(
        &vm,
        None,
        "spec.interfaces[1]",
        r#"Duplicate value: map[string]interface {}{"name":"eth0"}"#,
    );
}

/// Only the second of each run of equal keys is reported, as by the API server.
#[test]
fn each_duplicate_key_is_reported_once() {
    let disk = |name: &str| json!({ "name": name, "empty": { "size": "1Gi" } });
    let vm = microvm(json!({
        "boot": boot(),
        "disks": [disk("a"), disk("b"), disk("a"), disk("a"), disk("b")],
    }));
    let dups: Vec<String> = errors(&vm, None)
        .into_iter()
        .filter(|e| e.message.starts_with("Duplicate value"))
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        dups,
        [
            r#"spec.disks[2]: Duplicate value: map[string]interface {}{"name":"a"}"#,
            r#"spec.disks[4]: Duplicate value: map[string]interface {}{"name":"b"}"#,
        ]
    );
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

/// A pattern error does not stop the CEL rules on the API server, so the MAC rule must
/// hold up on any string, however short: the pattern error is then the only error.
#[test]
fn mac_rule_is_safe_on_values_failing_the_pattern() {
    for bad in ["", "0", "z", "zz:00:00:00:00:00"] {
        let vm = microvm(json!({
            "boot": boot(),
            "interfaces": [{ "name": "eth0", "type": "Nat", "mac": bad }],
        }));
        let errs = errors(&vm, None);
        assert_eq!(errs.len(), 1, "{bad:?}: {errs:?}");
        assert_eq!(errs[0].field, "spec.interfaces[0].mac");
        assert!(errs[0].message.contains("does not match"), "{errs:?}");
    }
    for odd in [
        "01:00:00:00:00:01",
        "0B:00:00:00:00:01",
        "ff:ff:ff:ff:ff:ff",
    ] {
        let vm = microvm(json!({
            "boot": boot(),
            "interfaces": [{ "name": "eth0", "type": "Nat", "mac": odd }],
        }));
        assert_rejected(
            &vm,
            None,
            "spec.interfaces[0].mac",
            "must be a unicast address",
        );
    }
    for even in [
        "02:00:00:00:00:01",
        "0E:00:00:00:00:01",
        "aa:00:00:00:00:01",
    ] {
        let vm = microvm(json!({
            "boot": boot(),
            "interfaces": [{ "name": "eth0", "type": "Nat", "mac": even }],
        }));
        assert_valid(&vm, None);
    }
}

/// As on the API server, pattern, minimum and maximum errors leave the CEL rules
/// running, so every broken rule is reported at once.
#[test]
fn non_blocking_schema_errors_still_run_the_rules() {
    let vm = microvm(json!({
        "boot": boot(),
        "resources": { "vcpus": 99, "memory": "0" },
        "disks": [{ "name": "Root", "file": { "path": "root.img" } }],
    }));
    assert_rejected(&vm, None, "spec.resources.vcpus", "maximum of 32");
    assert_rejected(&vm, None, "spec.disks[0].name", "does not match");
    assert_rejected(
        &vm,
        None,
        "spec.resources.memory",
        "must be between 16Mi and 64Gi",
    );
    assert_rejected(
        &vm,
        None,
        "spec.disks[0].file.path",
        "must be an absolute path",
    );
    assert!(
        !errors(&vm, None)
            .iter()
            .any(|e| e.message == RULES_NOT_CHECKED)
    );
}

/// A wrong type, a missing required field, a too-long value, an unknown enum value or
/// too many items block the rules, as on the API server, which says so.
#[test]
fn blocking_schema_errors_skip_the_rules() {
    let too_many_interfaces: Vec<Value> = ["a", "b", "c", "d", "e"]
        .map(|n| json!({ "name": n, "type": "Nat" }))
        .into();
    let cases = [
        (
            "spec.resources.vcpus",
            json!({ "resources": { "vcpus": "two" } }),
        ),
        (
            "spec.boot.kernel",
            json!({ "boot": { "kernel": 7, "initrd": "/i" } }),
        ),
        (
            "spec.boot.cmdline",
            json!({ "boot": { "cmdline": "x".repeat(2049) } }),
        ),
        ("spec.powerState", json!({ "powerState": "Off" })),
        (
            "spec.interfaces",
            json!({ "interfaces": too_many_interfaces }),
        ),
    ];
    for (field, patch) in cases {
        let mut spec = json!({ "boot": boot(), "resources": { "memory": "0" } });
        merge(&mut spec, patch);
        let errs = errors(&microvm(spec), None);
        assert!(errs.iter().any(|e| e.field == field), "{field}: {errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.field.is_empty() && e.message == RULES_NOT_CHECKED),
            "{field}: {errs:?}"
        );
        assert!(
            !errs
                .iter()
                .any(|e| e.message.contains("between 16Mi and 64Gi")),
            "{field}: rules ran: {errs:?}"
        );
    }
}

#[test]
fn pinned_node_name_is_immutable_once_set() {
    let old = microvm(json!({ "boot": boot(), "nodeName": "node-a" }));
    let moved = microvm(json!({ "boot": boot(), "nodeName": "node-b" }));
    assert_rejected(
        &moved,
        Some(&old),
        "spec.nodeName",
        "field is immutable once set",
    );
    let unpinned = microvm(json!({ "boot": boot() }));
    assert_rejected(&unpinned, Some(&old), "spec.nodeName", "immutable once set");
    // Unchanged, or set for the first time: accepted.
    assert_valid(&old, Some(&old));
    assert_valid(&old, Some(&unpinned));
    // A create carries no old object, so the rule does not apply.
    assert_valid(&moved, None);
}

/// A node's name is a DNS subdomain, so a pin to anything else could never be placed.
#[test]
fn pinned_node_name_is_a_dns_subdomain() {
    for bad in ["Node-1", "node_1", "node-1.", "-node"] {
        let vm = microvm(json!({ "boot": boot(), "nodeName": bad }));
        assert_rejected(&vm, None, "spec.nodeName", "does not match");
    }
    let vm = microvm(json!({ "boot": boot(), "nodeName": "node-1.zone-a.example" }));
    assert_valid(&vm, None);
}

/// Tolerations are checked as the API server checks a Pod's, with the operators and
/// effects placement understands.
#[test]
fn tolerations_are_checked_as_for_pods() {
    let tolerating = |t: Value| microvm(json!({ "boot": boot(), "tolerations": [t] }));
    assert_rejected(
        &tolerating(json!({ "key": "k", "operator": "Matches" })),
        None,
        "spec.tolerations[0].operator",
        "is not one of",
    );
    assert_rejected(
        &tolerating(json!({ "key": "k", "effect": "NoRun" })),
        None,
        "spec.tolerations[0].effect",
        "is not one of",
    );
    assert_rejected(
        &tolerating(json!({ "operator": "Equal", "value": "v" })),
        None,
        "spec.tolerations[0].operator",
        "must be Exists when key is empty",
    );
    assert_rejected(
        &tolerating(json!({ "value": "v" })),
        None,
        "spec.tolerations[0].operator",
        "must be Exists when key is empty",
    );
    assert_rejected(
        &tolerating(json!({ "key": "k", "operator": "Exists", "value": "v" })),
        None,
        "spec.tolerations[0].value",
        "must be empty when operator is Exists",
    );
    for ok in [
        json!({ "operator": "Exists" }),
        json!({ "key": "k", "operator": "Exists", "effect": "NoSchedule" }),
        json!({ "key": "k", "value": "v", "effect": "" }),
        json!({ "key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 60 }),
    ] {
        assert_valid(&tolerating(ok), None);
    }
}

/// Label values that replicas get, or that select nodes or replicas, have the shape
/// Kubernetes requires of a label value.
#[test]
fn label_values_are_checked() {
    for bad in ["-v", "v-", "a b", "v/1"] {
        let swl = workload(json!({
            "template": { "metadata": { "labels": { "tier": bad } } },
        }));
        assert_rejected(
            &swl,
            None,
            "spec.template.metadata.labels.tier",
            "does not match",
        );
        let swl = workload(json!({
            "selector": { "matchLabels": { "tier": bad } },
            "template": { "metadata": { "labels": { "tier": bad } } },
        }));
        assert_rejected(
            &swl,
            None,
            "spec.selector.matchLabels.tier",
            "does not match",
        );
        let swl = workload(json!({
            "selector": { "matchExpressions": [{ "key": "tier", "operator": "NotIn", "values": [bad] }] },
        }));
        assert_rejected(
            &swl,
            None,
            "spec.selector.matchExpressions[0].values[0]",
            "does not match",
        );
        let vm = microvm(json!({ "boot": boot(), "nodeSelector": { "zone": bad } }));
        assert_rejected(&vm, None, "spec.nodeSelector.zone", "does not match");
    }
    let vm = microvm(json!({ "boot": boot(), "nodeSelector": { "zone": "", "pool": "A_1.b-2" } }));
    assert_valid(&vm, None);
}

/// Label keys that are bounded strings (not map keys) are checked as label keys.
#[test]
fn label_keys_are_checked_where_they_are_strings() {
    let long_name = "k".repeat(64);
    for bad in [
        "bad key",
        "-tier",
        "a/b/c",
        "Example.com/tier",
        long_name.as_str(),
    ] {
        let swl = workload(json!({
            "selector": { "matchExpressions": [{ "key": bad, "operator": "DoesNotExist" }] },
        }));
        assert_rejected(
            &swl,
            None,
            "spec.selector.matchExpressions[0].key",
            "does not match",
        );
        let vm = microvm(
            json!({ "boot": boot(), "tolerations": [{ "key": bad, "operator": "Exists" }] }),
        );
        assert_rejected(&vm, None, "spec.tolerations[0].key", "does not match");
    }
    let ok = format!("runv.dev/{}", "k".repeat(63));
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": ok, "operator": "DoesNotExist" }] },
    }));
    assert_valid(&swl, None);
    let vm = microvm(json!({ "boot": boot(), "tolerations": [
        { "key": ok, "operator": "Exists" },
        { "key": "", "operator": "Exists" },
        { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute" },
    ] }));
    assert_valid(&vm, None);
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
        "must be at least resources.memory",
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
fn vmm_memory_limit_must_be_a_quantity() {
    let vm = microvm(json!({ "boot": boot(), "isolation": { "limits": { "memory": "plenty" } } }));
    assert_rejected(
        &vm,
        None,
        "spec.isolation.limits.memory",
        "must be a quantity such as 512Mi",
    );
    // Not a quantity, so the comparison with resources.memory does not apply.
    assert!(
        !errors(&vm, None)
            .iter()
            .any(|e| e.message.contains("must be at least")),
    );
    let vm = microvm(json!({ "boot": boot(), "isolation": { "limits": { "memory": "512Mi" } } }));
    assert_valid(&vm, None);
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
    assert_rejected(&vm, None, "spec.cpus", "unknown field \"spec.cpus\"");
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
        "matchLabels must match template.metadata.labels",
    );
}

/// Replicas get the template's labels, so a selector that the template's labels
/// do not satisfy would release every replica the operator creates.
#[test]
fn workload_selector_expressions_must_match_template_labels() {
    let selecting = |exprs: Value| workload(json!({ "selector": { "matchExpressions": exprs } }));
    for refused in [
        json!([{ "key": "app", "operator": "In", "values": ["api"] }]),
        json!([{ "key": "tier", "operator": "In", "values": ["front"] }]),
        json!([{ "key": "app", "operator": "NotIn", "values": ["web"] }]),
        json!([{ "key": "tier", "operator": "Exists" }]),
        json!([{ "key": "app", "operator": "DoesNotExist" }]),
    ] {
        assert_rejected(
            &selecting(refused),
            None,
            "spec.selector",
            "matchExpressions must match template.metadata.labels",
        );
    }
    let swl = workload(json!({
        "selector": { "matchLabels": null, "matchExpressions": [{ "key": "app", "operator": "Exists" }] },
        "template": { "metadata": null },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector",
        "matchExpressions must match template.metadata.labels",
    );
    // A requirement missing its values is named once, by its own rule.
    let errs = errors(
        &selecting(json!([{ "key": "tier", "operator": "In" }])),
        None,
    );
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.selector.matchExpressions[0].values"]);
    assert_valid(
        &selecting(json!([
            { "key": "app", "operator": "In", "values": ["api", "web"] },
            { "key": "app", "operator": "NotIn", "values": ["api"] },
            { "key": "tier", "operator": "NotIn", "values": ["front"] },
            { "key": "app", "operator": "Exists" },
            { "key": "tier", "operator": "DoesNotExist" },
        ])),
        None,
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
    assert_rejected(&new, Some(&old), "spec.selector", "field is immutable");
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
        "selector": { "matchExpressions": [{ "key": "app", "operator": "Exists", "values": ["web"] }] },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector.matchExpressions[0].values",
        "must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
    );
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": "app", "operator": "DoesNotExist", "values": ["web"] }] },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector.matchExpressions[0].values",
        "empty for Exists and DoesNotExist",
    );
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": "app", "operator": "Exists" }] },
    }));
    assert_valid(&swl, None);
    let swl = workload(json!({
        "selector": { "matchExpressions": [
            { "key": "app", "operator": "In", "values": ["web", "api"] },
            { "key": "tier", "operator": "NotIn", "values": ["batch"] },
            { "key": "canary", "operator": "DoesNotExist" },
        ] },
    }));
    assert_valid(&swl, None);
}

/// Label values are bounded as Kubernetes bounds them (63 characters), which also
/// bounds the cost of the rules that compare them.
#[test]
fn label_values_are_bounded() {
    let long = "a".repeat(64);
    let swl = workload(json!({
        "selector": { "matchLabels": { "app": long } },
        "template": { "metadata": { "labels": { "app": long } } },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector.matchLabels.app",
        "longer than 63 characters",
    );
    assert_rejected(
        &swl,
        None,
        "spec.template.metadata.labels.app",
        "longer than 63 characters",
    );
    let swl = workload(json!({
        "selector": { "matchExpressions": [{ "key": "app", "operator": "In", "values": [long] }] },
    }));
    assert_rejected(
        &swl,
        None,
        "spec.selector.matchExpressions[0].values[0]",
        "longer than 63 characters",
    );
    let vm = microvm(json!({ "boot": boot(), "nodeSelector": { "zone": long } }));
    assert_rejected(
        &vm,
        None,
        "spec.nodeSelector.zone",
        "longer than 63 characters",
    );
    let ok = "a".repeat(63);
    let swl = workload(json!({
        "selector": { "matchLabels": { "app": ok } },
        "template": { "metadata": { "labels": { "app": ok }, "annotations": { "note": "x".repeat(4096) } } },
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
        "must be between 16Mi and 64Gi",
    );
}

/// The MicroVM spec's rules are reused in the workload's template, so their messages
/// are worded relative to the field the error names, and no message names a MicroVM
/// path that is wrong in the template.
#[test]
fn template_errors_name_the_template_fields() {
    let swl = workload(json!({ "template": { "spec": {
        "boot": { "kernel": "vmlinux" },
        "resources": { "memory": "1Gi" },
        "disks": [{ "name": "d", "readOnly": true, "empty": { "size": "1Gi" } }],
        "interfaces": [{ "name": "eth0", "type": "Tap" }],
        "isolation": { "limits": { "memory": "512Mi" } },
    } } }));
    let errs = errors(&swl, None);
    for (field, message) in [
        (
            "spec.template.spec.boot.kernel",
            "must be an absolute path on the node",
        ),
        (
            "spec.template.spec.disks[0].readOnly",
            "cannot be true for an empty disk",
        ),
        (
            "spec.template.spec.interfaces[0].tapDevice",
            "must name an existing tap device",
        ),
        (
            "spec.template.spec.isolation.limits.memory",
            "must be at least resources.memory",
        ),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message.starts_with(message)),
            "expected {field}: {message}, got {errs:?}"
        );
    }
    assert!(
        !errs.iter().any(|e| e.message.contains("spec.")),
        "a message names a path: {errs:?}"
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
        "only allowed when type is RollingUpdate",
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
    assert_rejected(&swl, None, "spec.container.env", "names must be unique");
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
    assert_rejected(&new, Some(&old), "spec.tenant", "field is immutable");
    let none = microvm(json!({ "boot": boot() }));
    assert_rejected(&none, Some(&old), "spec.tenant", "field is immutable");
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

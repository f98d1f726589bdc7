//! The MicroVMs a SecureWorkload owns: their names, labels, template hash and
//! how the planner sees them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use runv_crds::conditions as cond;
use runv_crds::microvm::Phase;
use runv_crds::secureworkload::{LabelSelector, SelectorOperator};
use runv_crds::{MicroVM, SecureWorkload};
use sha2::{Digest, Sha256};

use super::plan::Replica;

/// Label holding the hash of the template a replica was made from.
pub const HASH_LABEL: &str = "runv.dev/template-hash";
/// Label naming the owning SecureWorkload (for `kubectl get mvm -l`).
pub const WORKLOAD_LABEL: &str = "runv.dev/secureworkload";

/// A stable hash of everything a replica is made from: the MicroVM template,
/// the container and the tenant. Ten hex digits of SHA-256 over their JSON,
/// whose key order serde_json keeps fixed.
pub fn template_hash(swl: &SecureWorkload) -> String {
    let input = serde_json::json!({
        "template": swl.spec.template,
        "container": swl.spec.container,
        "tenant": swl.spec.tenant,
    });
    let digest = Sha256::digest(input.to_string().as_bytes());
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// The selector in the string form of `kubectl get -l` and the scale subresource.
pub fn selector_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for r in &sel.match_expressions {
        let values = r.values.join(",");
        parts.push(match r.operator {
            SelectorOperator::In => format!("{} in ({values})", r.key),
            SelectorOperator::NotIn => format!("{} notin ({values})", r.key),
            SelectorOperator::Exists => r.key.clone(),
            SelectorOperator::DoesNotExist => format!("!{}", r.key),
        });
    }
    parts.join(",")
}

/// Whether `sel` selects an object with `labels`, as a Kubernetes label selector
/// does: every `matchLabels` pair is present and every requirement holds. An
/// empty selector selects everything (the schema forbids one).
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                SelectorOperator::Exists => value.is_some(),
                SelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

/// The ownerReference that makes `swl` a replica's controller: `controller` and
/// `blockOwnerDeletion` true. None while `swl` has no uid.
pub fn controller_ref(swl: &SecureWorkload) -> Option<OwnerReference> {
    swl.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(true);
        o
    })
}

/// The controller ownerReference of `vm`, if it has one.
pub fn controller_of(vm: &MicroVM) -> Option<&OwnerReference> {
    vm.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
}

/// The name of replica `ordinal` of template `hash`.
pub fn replica_name(swl: &SecureWorkload, hash: &str, ordinal: usize) -> String {
    format!("{}-{hash}-{ordinal}", swl.name_any())
}

/// The `count` lowest free replica names of template `hash`.
pub fn free_names(swl: &SecureWorkload, hash: &str, taken: &[&str], count: usize) -> Vec<String> {
    (0..)
        .map(|i| replica_name(swl, hash, i))
        .filter(|n| !taken.contains(&n.as_str()))
        .take(count)
        .collect()
}

/// A new replica MicroVM.
pub fn replica(swl: &SecureWorkload, hash: &str, name: String) -> MicroVM {
    let mut labels: BTreeMap<String, String> = swl.spec.template.metadata.labels.clone();
    labels.insert(HASH_LABEL.into(), hash.into());
    labels.insert(WORKLOAD_LABEL.into(), swl.name_any());
    let annotations = swl.spec.template.metadata.annotations.clone();
    let mut spec = swl.spec.template.spec.clone();
    spec.tenant.clone_from(&swl.spec.tenant);
    spec.container = Some(swl.spec.container.clone());
    MicroVM {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: swl.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: controller_ref(swl).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// The SecureWorkload that controls `vm`, as a controller trigger names it.
pub fn workload_of(vm: &MicroVM) -> Option<ObjectRef<SecureWorkload>> {
    let owner = controller_of(vm)?;
    let ours = owner.kind == SecureWorkload::kind(&())
        && owner.api_version == SecureWorkload::api_version(&());
    let ns = vm.namespace()?;
    ours.then(|| ObjectRef::new(&owner.name).within(&ns))
}

/// Whether `vm` is controlled by `swl`.
pub fn owned_by(vm: &MicroVM, swl: &SecureWorkload) -> bool {
    let Some(uid) = swl.uid() else { return false };
    vm.namespace() == swl.namespace() && controller_of(vm).is_some_and(|o| o.uid == uid)
}

/// A replica with a container is available only while the guest reports
/// its container running; one without is when its VM runs.
fn container_running(vm: &MicroVM) -> bool {
    vm.spec.container.is_none()
        || vm
            .status
            .as_ref()
            .and_then(|s| s.container.as_ref())
            .is_some_and(|c| c.ready)
}

/// How the planner sees a replica.
pub fn view(vm: &MicroVM) -> Replica {
    let status = vm.status.as_ref();
    let ready = status.is_some_and(|s| cond::is_true(&s.conditions, cond::READY));
    Replica {
        name: vm.name_any(),
        hash: vm.labels().get(HASH_LABEL).cloned().unwrap_or_default(),
        scheduled: status.is_some_and(|s| s.node_name.is_some()),
        ready,
        available: ready
            && status.and_then(|s| s.phase) == Some(Phase::Running)
            && container_running(vm),
        terminating: vm.metadata.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_crds::secureworkload::LabelSelectorRequirement;

    fn workload() -> SecureWorkload {
        let mut swl: SecureWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "runv.dev/v1alpha1",
            "kind": "SecureWorkload",
            "metadata": { "name": "web", "namespace": "prod", "uid": "u-1" },
            "spec": {
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "boot": { "kernel": "/k" } }
                },
                "container": { "image": "web:1" },
                "tenant": { "name": "blue" }
            }
        }))
        .unwrap();
        swl.metadata.labels =
            Some([("argocd.argoproj.io/instance".to_owned(), "x".to_owned())].into());
        swl
    }

    #[test]
    fn a_container_replica_is_available_only_while_its_container_runs() {
        let swl = workload();
        let mut vm = replica(&swl, "abc", "web-abc-0".into());
        let mut status = runv_crds::MicroVMStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        };
        cond::Row::new(
            cond::READY,
            cond::Status::True,
            runv_crds::contract::Reason::Running,
        )
        .set(
            &mut status.conditions,
            Some(1),
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        );
        vm.status = Some(status.clone());
        assert!(!view(&vm).available, "no container status yet");
        let mut container = runv_crds::microvm::ContainerStatus {
            image: "web:1".into(),
            image_id: "r/web@sha256:00".into(),
            state: None,
            last_state: None,
            ready: false,
            restart_count: 0,
        };
        status.container = Some(container.clone());
        vm.status = Some(status.clone());
        assert!(!view(&vm).available, "the guest boots");
        container.ready = true;
        status.container = Some(container);
        vm.status = Some(status);
        assert!(view(&vm).available);
        assert!(view(&vm).ready);
    }

    #[test]
    fn hash_changes_with_template_and_container_only() {
        let a = workload();
        let mut b = workload();
        b.spec.replicas = 9;
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
        b.spec.container.image = "web:2".into();
        assert_ne!(template_hash(&a), template_hash(&b));
        let mut c = workload();
        c.spec.template.spec.resources.vcpus = 2;
        assert_ne!(template_hash(&a), template_hash(&c));
    }

    #[test]
    fn replica_carries_template_labels_owner_and_tenant_but_not_workload_labels() {
        let swl = workload();
        let vm = replica(&swl, "abc", "web-abc-0".into());
        assert_eq!(vm.namespace().as_deref(), Some("prod"));
        let labels = vm.labels();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get(HASH_LABEL).map(String::as_str), Some("abc"));
        assert!(!labels.contains_key("argocd.argoproj.io/instance"));
        let owner = &vm.owner_references()[0];
        assert_eq!(
            (
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("u-1", Some(true), Some(true))
        );
        assert_eq!(
            vm.spec.tenant.as_ref().map(|t| t.name.as_str()),
            Some("blue")
        );
        assert_eq!(
            vm.spec.container.as_ref().map(|c| c.image.as_str()),
            Some(swl.spec.container.image.as_str())
        );
        assert!(vm.annotations().is_empty(), "{:?}", vm.annotations());
        assert!(owned_by(&vm, &swl));
    }

    #[test]
    fn a_replica_names_its_workload_and_nothing_else_does() {
        let swl = workload();
        let vm = replica(&swl, "abc", "web-abc-0".into());
        assert_eq!(workload_of(&vm), Some(ObjectRef::new("web").within("prod")));
        let mut other_kind = vm.clone();
        other_kind.metadata.owner_references.as_mut().unwrap()[0].kind = "ReplicaSet".into();
        assert_eq!(workload_of(&other_kind), None);
        let mut not_controller = vm.clone();
        not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert_eq!(workload_of(&not_controller), None);
        let mut orphan = vm;
        orphan.metadata.owner_references = None;
        assert_eq!(workload_of(&orphan), None);
    }

    #[test]
    fn free_names_fill_gaps() {
        let swl = workload();
        let taken = ["web-h-0", "web-h-2"];
        assert_eq!(free_names(&swl, "h", &taken, 2), ["web-h-1", "web-h-3"]);
    }

    #[test]
    fn selector_strings() {
        let sel = LabelSelector {
            match_labels: [("app".to_owned(), "web".to_owned())].into(),
            match_expressions: vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::In,
                    values: vec!["a".into(), "b".into()],
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: SelectorOperator::DoesNotExist,
                    values: vec![],
                },
            ],
        };
        assert_eq!(selector_string(&sel), "app=web,tier in (a,b),!canary");
    }

    #[test]
    fn selector_matching_follows_kubernetes() {
        let req = |key: &str, operator, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let sel = LabelSelector {
            match_labels: [("app".to_owned(), "web".to_owned())].into(),
            match_expressions: vec![
                req("tier", SelectorOperator::In, &["a", "b"]),
                req("env", SelectorOperator::NotIn, &["dev"]),
                req("canary", SelectorOperator::DoesNotExist, &[]),
            ],
        };
        assert!(selects(&sel, &labels(&[("app", "web"), ("tier", "a")])));
        assert!(selects(
            &sel,
            &labels(&[("app", "web"), ("tier", "b"), ("env", "prod"), ("x", "y")])
        ));
        assert!(
            !selects(&sel, &labels(&[("tier", "a")])),
            "matchLabels key missing"
        );
        assert!(!selects(&sel, &labels(&[("app", "api"), ("tier", "a")])));
        assert!(
            !selects(&sel, &labels(&[("app", "web")])),
            "In needs the label"
        );
        assert!(!selects(&sel, &labels(&[("app", "web"), ("tier", "c")])));
        assert!(!selects(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("env", "dev")])
        ));
        assert!(!selects(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "")])
        ));
        let exists = LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![req("canary", SelectorOperator::Exists, &[])],
        };
        assert!(selects(&exists, &labels(&[("canary", "")])));
        assert!(!selects(&exists, &labels(&[("app", "web")])));
    }
}

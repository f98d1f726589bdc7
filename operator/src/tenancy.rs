//! Who a MicroVM belongs to and what it may ask of placement, from its
//! Namespace: the administrator's word, never the VM's own.
//!
//! The tenant is the namespace's `runv.dev/tenant` label, else the namespace's
//! name; `spec.tenant.name` may only repeat it. `spec.nodeName` and
//! `spec.tenant.nodeIsolation: Exclusive` are honoured only in a namespace
//! labelled `runv.dev/allow-node-name: "true"` and `runv.dev/allow-exclusive:
//! "true"`. Namespaces are cluster-scoped: whoever may only write objects in
//! a namespace cannot label it (docs/security.md). Pure: the caller passes
//! the namespace's labels.

use std::collections::BTreeMap;

use runv_crds::MicroVMSpec;
use runv_crds::contract::{
    ALLOW_EXCLUSIVE_LABEL, ALLOW_NODE_NAME_LABEL, ALLOW_VALUE, Reason, TENANT_LABEL,
};
use runv_crds::microvm::{NodeIsolation, Tenant};

/// Why a VM is not placed: what the spec asks that its namespace does not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `TenantNotAllowed`, `NodeNameNotAllowed` or `ExclusiveNotAllowed`.
    pub reason: Reason,
    /// For people: the field, the namespace and the label that decides.
    pub message: String,
}

/// The namespace's tenant: its `runv.dev/tenant` label, else its name.
pub fn namespace_tenant<'a>(namespace: &'a str, labels: &'a BTreeMap<String, String>) -> &'a str {
    labels.get(TENANT_LABEL).map_or(namespace, String::as_str)
}

fn allows(labels: &BTreeMap<String, String>, label: &str) -> bool {
    labels.get(label).is_some_and(|v| v == ALLOW_VALUE)
}

/// The tenant and node isolation a VM in `namespace` (with `labels`) gets, or
/// why its spec asks for what the namespace does not allow.
pub fn resolve(
    spec: &MicroVMSpec,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Tenant, Refusal> {
    let tenant = namespace_tenant(namespace, labels);
    let label = |l: &str| match labels.get(l) {
        Some(v) => format!("{l}={v}"),
        None => format!("no {l} label"),
    };
    if let Some(asked) = spec.tenant.as_ref().filter(|t| t.name != tenant) {
        return Err(Refusal {
            reason: Reason::TenantNotAllowed,
            message: format!(
                "spec.tenant.name is {:?}, but namespace {namespace} ({}) belongs to tenant {tenant:?}: \
                 the tenant comes from the namespace; leave spec.tenant.name unset or set it to {tenant:?}",
                asked.name,
                label(TENANT_LABEL),
            ),
        });
    }
    if let Some(node) = &spec.node_name
        && !allows(labels, ALLOW_NODE_NAME_LABEL)
    {
        return Err(Refusal {
            reason: Reason::NodeNameNotAllowed,
            message: format!(
                "spec.nodeName pins the VM to node {node}, but namespace {namespace} ({}) does not \
                 allow pinning: an administrator allows it with the namespace label \
                 {ALLOW_NODE_NAME_LABEL}={ALLOW_VALUE}",
                label(ALLOW_NODE_NAME_LABEL),
            ),
        });
    }
    let isolation = spec
        .tenant
        .as_ref()
        .map_or(NodeIsolation::Shared, |t| t.node_isolation);
    if isolation == NodeIsolation::Exclusive && !allows(labels, ALLOW_EXCLUSIVE_LABEL) {
        return Err(Refusal {
            reason: Reason::ExclusiveNotAllowed,
            message: format!(
                "spec.tenant.nodeIsolation is Exclusive, but namespace {namespace} ({}) does not \
                 allow exclusive nodes: an administrator allows them with the namespace label \
                 {ALLOW_EXCLUSIVE_LABEL}={ALLOW_VALUE}",
                label(ALLOW_EXCLUSIVE_LABEL),
            ),
        });
    }
    Ok(Tenant {
        name: tenant.to_owned(),
        node_isolation: isolation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> MicroVMSpec {
        let mut v = serde_json::json!({"boot": {"kernel": "/k"}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn tenant(name: &str, isolation: NodeIsolation) -> Tenant {
        Tenant {
            name: name.into(),
            node_isolation: isolation,
        }
    }

    #[test]
    fn the_tenant_is_the_label_else_the_namespace() {
        let none = spec(serde_json::json!({}));
        assert_eq!(
            resolve(&none, "team-a", &labels(&[])),
            Ok(tenant("team-a", NodeIsolation::Shared))
        );
        assert_eq!(
            resolve(&none, "team-a-dev", &labels(&[(TENANT_LABEL, "team-a")])),
            Ok(tenant("team-a", NodeIsolation::Shared))
        );
        // Repeating the namespace's tenant is allowed, with either isolation
        // the namespace allows.
        let same = spec(serde_json::json!({"tenant": {"name": "team-a"}}));
        assert_eq!(
            resolve(&same, "team-a-dev", &labels(&[(TENANT_LABEL, "team-a")])),
            Ok(tenant("team-a", NodeIsolation::Shared))
        );
    }

    #[test]
    fn another_tenant_name_is_refused_naming_field_namespace_and_label() {
        let other = spec(serde_json::json!({"tenant": {"name": "victim"}}));
        let r = resolve(&other, "mallory", &labels(&[])).unwrap_err();
        assert_eq!(r.reason, Reason::TenantNotAllowed);
        for part in ["spec.tenant.name", "\"victim\"", "mallory", TENANT_LABEL] {
            assert!(r.message.contains(part), "{part}: {}", r.message);
        }
        // Not even the namespace's own name, when the label says otherwise.
        let own_ns = spec(serde_json::json!({"tenant": {"name": "shared-ns"}}));
        let r = resolve(&own_ns, "shared-ns", &labels(&[(TENANT_LABEL, "blue")])).unwrap_err();
        assert_eq!(r.reason, Reason::TenantNotAllowed);
        assert!(r.message.contains("runv.dev/tenant=blue"), "{}", r.message);
    }

    #[test]
    fn pinning_needs_the_allow_label() {
        let pinned = spec(serde_json::json!({"nodeName": "n1"}));
        let r = resolve(&pinned, "ns", &labels(&[])).unwrap_err();
        assert_eq!(r.reason, Reason::NodeNameNotAllowed);
        for part in ["spec.nodeName", "n1", "ns", "runv.dev/allow-node-name=true"] {
            assert!(r.message.contains(part), "{part}: {}", r.message);
        }
        // Only "true" allows.
        let no = labels(&[(ALLOW_NODE_NAME_LABEL, "yes")]);
        assert_eq!(
            resolve(&pinned, "ns", &no).unwrap_err().reason,
            Reason::NodeNameNotAllowed
        );
        let yes = labels(&[(ALLOW_NODE_NAME_LABEL, "true")]);
        assert_eq!(
            resolve(&pinned, "ns", &yes),
            Ok(tenant("ns", NodeIsolation::Shared))
        );
    }

    #[test]
    fn exclusive_needs_the_allow_label() {
        let exclusive =
            spec(serde_json::json!({"tenant": {"name": "ns", "nodeIsolation": "Exclusive"}}));
        let r = resolve(&exclusive, "ns", &labels(&[])).unwrap_err();
        assert_eq!(r.reason, Reason::ExclusiveNotAllowed);
        for part in [
            "spec.tenant.nodeIsolation",
            "ns",
            "runv.dev/allow-exclusive=true",
        ] {
            assert!(r.message.contains(part), "{part}: {}", r.message);
        }
        let yes = labels(&[(ALLOW_EXCLUSIVE_LABEL, "true")]);
        assert_eq!(
            resolve(&exclusive, "ns", &yes),
            Ok(tenant("ns", NodeIsolation::Exclusive))
        );
        // The pin is checked whatever the isolation; the tenant before both.
        let both = spec(serde_json::json!({
            "nodeName": "n1", "tenant": {"name": "x", "nodeIsolation": "Exclusive"}
        }));
        assert_eq!(
            resolve(&both, "ns", &yes).unwrap_err().reason,
            Reason::TenantNotAllowed
        );
    }
}

//! Which MicroVMs a SecureWorkload controls, by ownerReference and selector, as a
//! ReplicaSet claims its Pods:
//!
//! - a MicroVM it controls that its selector still selects stays its replica;
//! - one it controls that its selector no longer selects is **released**: its
//!   ownerReference to the workload is removed and it lives on, unowned;
//! - an orphan (no controller ownerReference, not being deleted) in its namespace
//!   that its selector selects is **adopted**: it gets the same controller
//!   ownerReference as a replica the workload creates;
//! - a MicroVM with another controller is never touched.
//!
//! Nothing is claimed by a workload being deleted. Before its first adoption in
//! a round the workload is read afresh from the API (not the cache), and nothing
//! is adopted if it is being deleted, gone, or replaced by a namesake. Each patch
//! of `metadata.ownerReferences` carries the MicroVM's `resourceVersion` and uid,
//! so one that raced with another write (another workload adopting the same
//! orphan, a label change) fails with 409 Conflict instead of overwriting it.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use runv_crds::{MicroVM, SecureWorkload};
use serde_json::{Value, json};

use super::replica;
use crate::context::MANAGER;

/// What a workload does with one MicroVM of its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It controls the MicroVM and selects it: a replica.
    Owned,
    /// An orphan it selects: adopt it.
    Adopt,
    /// It controls the MicroVM but no longer selects it: release it.
    Release,
    /// Not its business.
    Ignore,
}

/// What `swl` does with `vm`, from their cached state.
pub fn verdict(swl: &SecureWorkload, vm: &MicroVM) -> Verdict {
    let Some(uid) = swl.uid() else {
        return Verdict::Ignore;
    };
    if vm.namespace() != swl.namespace() {
        return Verdict::Ignore;
    }
    let selected = replica::selects(&swl.spec.selector, vm.labels());
    let deleting = swl.metadata.deletion_timestamp.is_some();
    match replica::controller_of(vm) {
        Some(owner) if owner.uid != uid => Verdict::Ignore,
        Some(_) if selected => Verdict::Owned,
        Some(_) if deleting => Verdict::Ignore,
        Some(_) => Verdict::Release,
        None if deleting || !selected || vm.metadata.deletion_timestamp.is_some() => {
            Verdict::Ignore
        }
        // An empty selector would select every MicroVM; the schema forbids it.
        None if swl.spec.selector.match_labels.is_empty()
            && swl.spec.selector.match_expressions.is_empty() =>
        {
            Verdict::Ignore
        }
        None => Verdict::Adopt,
    }
}

/// The workloads among `workloads` that would adopt `vm`: none if it has a
/// controller or is being deleted, else those of its namespace whose selector
/// selects it. Meant for mapping MicroVM watch events to workloads, so that an
/// orphan created after its workload is adopted without waiting for a requeue.
pub fn adopters<'a>(
    vm: &MicroVM,
    workloads: impl IntoIterator<Item = &'a SecureWorkload>,
) -> Vec<ObjectRef<SecureWorkload>> {
    workloads
        .into_iter()
        .filter(|swl| verdict(swl, vm) == Verdict::Adopt)
        .map(ObjectRef::from_obj)
        .collect()
}

/// The preconditions of a patch to `vm`: its uid and resourceVersion as cached.
fn preconditions(vm: &MicroVM) -> serde_json::Map<String, Value> {
    let mut meta = serde_json::Map::new();
    if let Some(uid) = &vm.metadata.uid {
        meta.insert("uid".into(), json!(uid));
    }
    if let Some(rv) = &vm.metadata.resource_version {
        meta.insert("resourceVersion".into(), json!(rv));
    }
    meta
}

/// The JSON merge patch that adopts `vm`: its ownerReferences with `swl`'s
/// controller reference added (replacing any non-controller one to `swl`).
/// None while `swl` has no uid.
pub fn adopt_patch(swl: &SecureWorkload, vm: &MicroVM) -> Option<Value> {
    let ours = replica::controller_ref(swl)?;
    let mut refs: Vec<_> = vm
        .owner_references()
        .iter()
        .filter(|o| o.uid != ours.uid)
        .cloned()
        .collect();
    refs.push(ours);
    let mut meta = preconditions(vm);
    meta.insert("ownerReferences".into(), json!(refs));
    Some(json!({ "metadata": meta }))
}

/// The JSON merge patch that releases `vm`: its ownerReferences without those
/// to `swl` (the field removed if none is left).
pub fn release_patch(swl: &SecureWorkload, vm: &MicroVM) -> Value {
    let uid = swl.uid().unwrap_or_default();
    let refs: Vec<_> = vm
        .owner_references()
        .iter()
        .filter(|o| o.uid != uid)
        .collect();
    let mut meta = preconditions(vm);
    meta.insert(
        "ownerReferences".into(),
        if refs.is_empty() {
            Value::Null
        } else {
            json!(refs)
        },
    );
    json!({ "metadata": meta })
}

/// Why a claim round did not settle every MicroVM.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A patch lost a race with another write (409): try again soon, from a
    /// fresher cache.
    #[error("a MicroVM changed while it was being claimed")]
    Conflict,
    /// The fresh read shows the workload being deleted, gone or replaced:
    /// nothing was adopted and nothing more is to be done for it.
    #[error("SecureWorkload {name} {why}")]
    OwnerGone {
        /// The workload.
        name: String,
        /// What became of it.
        why: OwnerGone,
    },
    /// A request failed.
    #[error("API request failed")]
    Api(#[source] kube::Error),
}

/// What became of a workload that may not adopt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGone {
    /// A namesake with this uid replaced it.
    Replaced(String),
    /// It is being deleted.
    Deleting,
    /// It is gone.
    Deleted,
}

impl std::fmt::Display for OwnerGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OwnerGone::Replaced(uid) => write!(f, "was replaced (uid {uid} now)"),
            OwnerGone::Deleting => f.write_str("is being deleted"),
            OwnerGone::Deleted => f.write_str("is gone"),
        }
    }
}

/// The outcome of a claim round.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The workload's replicas: those it owned and selects, and those it adopted.
    pub owned: Vec<Arc<MicroVM>>,
    /// Names of the MicroVMs adopted this round.
    pub adopted: Vec<String>,
    /// Names of the MicroVMs released this round.
    pub released: Vec<String>,
    /// The first problem met, if any; every MicroVM was still tried.
    pub error: Option<ClaimError>,
}

impl Claimed {
    fn fail(&mut self, e: ClaimError) {
        // A failed request outranks a conflict, which outranks a gone owner
        // (after which only releases are tried).
        let rank = |e: &ClaimError| match e {
            ClaimError::Api(_) => 2,
            ClaimError::Conflict => 1,
            ClaimError::OwnerGone { .. } => 0,
        };
        if self.error.as_ref().is_none_or(|old| rank(&e) > rank(old)) {
            self.error = Some(e);
        }
    }
}

/// Whether adoption is allowed: the workload, read afresh, is the same object
/// and is not being deleted.
async fn can_adopt(swl: &SecureWorkload, api: &Api<SecureWorkload>) -> Result<(), ClaimError> {
    let name = swl.name_any();
    let gone = |why| {
        Err(ClaimError::OwnerGone {
            name: name.clone(),
            why,
        })
    };
    match api.get(&name).await {
        Ok(fresh) if fresh.uid() != swl.uid() => {
            gone(OwnerGone::Replaced(fresh.uid().unwrap_or_default()))
        }
        Ok(fresh) if fresh.metadata.deletion_timestamp.is_some() => gone(OwnerGone::Deleting),
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => gone(OwnerGone::Deleted),
        Err(e) => Err(ClaimError::Api(e)),
    }
}

/// Claims the MicroVMs of `candidates` (any namespace; others are ignored) for
/// `swl`: adopts and releases through `vms`, rechecking `swl` through
/// `workloads` before the first adoption.
pub async fn claim(
    swl: &SecureWorkload,
    candidates: &[Arc<MicroVM>],
    vms: &Api<MicroVM>,
    workloads: &Api<SecureWorkload>,
) -> Claimed {
    let mut out = Claimed::default();
    // None until the first adoption needs it; then whether adoption is allowed.
    let mut allowed: Option<bool> = None;
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let mut sorted: Vec<&Arc<MicroVM>> = candidates
        .iter()
        .filter(|vm| vm.namespace() == swl.namespace())
        .collect();
    sorted.sort_by_key(|vm| vm.name_any());
    for vm in sorted {
        let name = vm.name_any();
        let v = verdict(swl, vm);
        let patch = match v {
            Verdict::Ignore => continue,
            Verdict::Owned => {
                out.owned.push(vm.clone());
                continue;
            }
            Verdict::Release => release_patch(swl, vm),
            Verdict::Adopt => {
                if allowed.is_none() {
                    let check = can_adopt(swl, workloads).await;
                    allowed = Some(check.is_ok());
                    if let Err(e) = check {
                        out.fail(e);
                    }
                }
                match (allowed, adopt_patch(swl, vm)) {
                    (Some(true), Some(patch)) => patch,
                    _ => continue,
                }
            }
        };
        match vms.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(patched) if v == Verdict::Adopt => {
                tracing::info!(
                    secureworkload = %swl.name_any(),
                    namespace = %swl.namespace().unwrap_or_default(),
                    microvm = %name,
                    "adopted MicroVM"
                );
                out.adopted.push(name);
                out.owned.push(Arc::new(patched));
            }
            Ok(_) => {
                tracing::info!(
                    secureworkload = %swl.name_any(),
                    namespace = %swl.namespace().unwrap_or_default(),
                    microvm = %name,
                    "released MicroVM"
                );
                out.released.push(name);
            }
            // Deleted meanwhile: nothing to adopt or release.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(microvm = %name, message = %s.message, "ownerReferences patch conflicted");
                out.fail(ClaimError::Conflict);
            }
            Err(e) => out.fail(ClaimError::Api(e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::vm;

    fn workload() -> SecureWorkload {
        serde_json::from_value(json!({
            "apiVersion": "runv.dev/v1alpha1",
            "kind": "SecureWorkload",
            "metadata": { "name": "web", "namespace": "default", "uid": "swl-uid" },
            "spec": {
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "boot": { "kernel": "/k" } }
                },
                "container": { "image": "web:1" }
            }
        }))
        .unwrap()
    }

    #[test]
    fn verdicts() {
        let swl = workload();
        let mut other = workload();
        other.metadata.uid = Some("other".into());
        let orphan = vm("a").label("app", "web").build();
        assert_eq!(verdict(&swl, &orphan), Verdict::Adopt);
        let unselected = vm("b").label("app", "api").build();
        assert_eq!(verdict(&swl, &unselected), Verdict::Ignore);
        let deleting = vm("c").label("app", "web").deleting().build();
        assert_eq!(verdict(&swl, &deleting), Verdict::Ignore);
        let foreign = vm("d").label("app", "web").owned_by(&other).build();
        assert_eq!(verdict(&swl, &foreign), Verdict::Ignore);
        let ours = vm("e").label("app", "web").owned_by(&swl).build();
        assert_eq!(verdict(&swl, &ours), Verdict::Owned);
        let relabelled = vm("f").label("app", "debug").owned_by(&swl).build();
        assert_eq!(verdict(&swl, &relabelled), Verdict::Release);
        let mut elsewhere = orphan.clone();
        elsewhere.metadata.namespace = Some("prod".into());
        assert_eq!(verdict(&swl, &elsewhere), Verdict::Ignore);

        let mut gone = workload();
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(verdict(&gone, &orphan), Verdict::Ignore);
        assert_eq!(verdict(&gone, &relabelled), Verdict::Ignore);
        assert_eq!(verdict(&gone, &ours), Verdict::Owned);
    }

    #[test]
    fn adopters_are_the_selecting_workloads_of_an_orphan() {
        let web = workload();
        let mut api = workload();
        api.metadata.name = Some("api".into());
        api.metadata.uid = Some("api-uid".into());
        api.spec.selector.match_labels = [("app".to_owned(), "api".to_owned())].into();
        let orphan = vm("a").label("app", "web").build();
        let names = |refs: Vec<ObjectRef<SecureWorkload>>| -> Vec<String> {
            refs.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(names(adopters(&orphan, [&web, &api])), ["web"]);
        let owned = vm("b").label("app", "web").owned_by(&api).build();
        assert!(adopters(&owned, [&web, &api]).is_empty());
    }

    #[test]
    fn adoption_keeps_other_non_controller_owners() {
        let swl = workload();
        let mut other = workload();
        other.metadata.uid = Some("other".into());
        let mut orphan = vm("a").label("app", "web").owned_by(&other).build();
        orphan.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        let patch = adopt_patch(&swl, &orphan).unwrap();
        let refs = patch["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0]["uid"], "other");
        assert_eq!(refs[1]["uid"], "swl-uid");
        assert_eq!(refs[1]["controller"], true);
        assert_eq!(patch["metadata"]["uid"], "uid-a");
        assert_eq!(patch["metadata"]["resourceVersion"], "1");
        // Released again, only the other reference is left.
        let mut adopted = orphan.clone();
        adopted.metadata.owner_references = Some(serde_json::from_value(json!(refs)).unwrap());
        let release = release_patch(&swl, &adopted);
        assert_eq!(
            release["metadata"]["ownerReferences"],
            json!([refs[0].clone()])
        );
    }
}

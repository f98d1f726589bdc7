//! Who writes which MicroVM status field: one writer at any moment.
//!
//! Both the operator and the agent write `status` by server-side apply, each
//! under its own field manager, so a field belongs to whoever applied it last
//! and each writer's apply body must name exactly the fields it owns in the
//! VM's current [`Binding`]:
//!
//! | field | unbound | on a live node | on a lost node |
//! |---|---|---|---|
//! | `nodeName`, `tenant`, condition `Scheduled` | operator | operator | operator |
//! | `phase`, `observedGeneration`, conditions `VMMStarted`, `GuestBooted`, `Ready`, `Paused`, `Reconciling`, `Stalled` | operator | agent | operator |
//! | `restartCount`, `lastExit`, `bootStartTime`, `bootDurationMillis`, `interfaces`, `vsockCid`, `container` | — | agent | — |
//!
//! The handoffs: the operator's bind (taken while the VM is unbound) writes
//! the lifecycle fields one last time ("waiting for the agent"); the agent's
//! first apply on its node takes them over. When the node's agent is lost the
//! operator takes them back (phase `Unknown`); when the agent returns, its
//! next apply takes them again. The run record is the agent's alone: nobody
//! else writes it, so a node loss or a move never resets `restartCount`.

use std::collections::BTreeSet;

use crate::conditions as cond;

/// A component that writes MicroVM status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// `runv-operator`.
    Operator,
    /// The `runv-agent` of the node the VM is bound to.
    Agent,
}

/// Where the VM is, as far as the handoff between writers goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// No `status.nodeName`.
    Unbound,
    /// Bound to a node whose agent renews its Lease.
    OnLiveNode,
    /// Bound to a node whose agent's Lease expired or is missing, or whose
    /// Node is gone. (On a fenced node whose agent is alive the agent still
    /// writes: it reports the VM stopped, reason `NodeFenced`.)
    OnLostNode,
}

impl Binding {
    /// Every binding.
    pub const ALL: [Binding; 3] = [Binding::Unbound, Binding::OnLiveNode, Binding::OnLostNode];
}

/// One field of MicroVM status, as server-side apply tracks ownership.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusField {
    /// `nodeName`.
    NodeName,
    /// `tenant`, resolved with the placement.
    Tenant,
    /// `phase`.
    Phase,
    /// `observedGeneration`.
    ObservedGeneration,
    /// One entry of `conditions`, keyed by type.
    Condition(String),
    /// `restartCount`, `lastExit`, `bootStartTime`, `bootDurationMillis`,
    /// `interfaces`, `vsockCid` or `container`, by its wire name.
    RunRecord(&'static str),
}

/// The wire names of the run record.
pub const RUN_RECORD: [&str; 7] = [
    "restartCount",
    "lastExit",
    "bootStartTime",
    "bootDurationMillis",
    "interfaces",
    "vsockCid",
    "container",
];

/// The condition types of a VM's lifecycle (every one but `Scheduled`).
pub const LIFECYCLE_CONDITIONS: [&str; 6] = [
    cond::VMM_STARTED,
    cond::GUEST_BOOTED,
    cond::READY,
    cond::PAUSED,
    cond::RECONCILING,
    cond::STALLED,
];

/// Who may write `field` while the VM is in `binding`; `None`: nobody.
pub fn writer(field: &StatusField, binding: Binding) -> Option<Writer> {
    let lifecycle = match binding {
        Binding::Unbound | Binding::OnLostNode => Writer::Operator,
        Binding::OnLiveNode => Writer::Agent,
    };
    match field {
        StatusField::NodeName | StatusField::Tenant => Some(Writer::Operator),
        StatusField::Condition(t) if t == cond::SCHEDULED => Some(Writer::Operator),
        StatusField::Phase | StatusField::ObservedGeneration | StatusField::Condition(_) => {
            Some(lifecycle)
        }
        StatusField::RunRecord(_) => (binding == Binding::OnLiveNode).then_some(Writer::Agent),
    }
}

/// Why a status body breaks the ownership contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    /// The body is not a JSON object.
    #[error("a status body must be an object")]
    NotAnObject,
    /// The body names a field this module does not know.
    #[error("status.{0} is not a MicroVM status field")]
    Unknown(String),
    /// A condition without a string `type`.
    #[error("a condition has no type")]
    UntypedCondition,
    /// The writer does not own the field in this binding.
    #[error("{writer:?} may not write {field:?} while the VM is {binding:?}")]
    NotOwner {
        /// Who tried.
        writer: Writer,
        /// The field.
        field: StatusField,
        /// The VM's binding.
        binding: Binding,
    },
}

/// The fields a status apply body (the value of `status`) names.
pub fn fields_of(status: &serde_json::Value) -> Result<BTreeSet<StatusField>, OwnershipError> {
    let obj = status.as_object().ok_or(OwnershipError::NotAnObject)?;
    let mut out = BTreeSet::new();
    for (key, value) in obj {
        match key.as_str() {
            "nodeName" => out.insert(StatusField::NodeName),
            "tenant" => out.insert(StatusField::Tenant),
            "phase" => out.insert(StatusField::Phase),
            "observedGeneration" => out.insert(StatusField::ObservedGeneration),
            "conditions" => {
                for c in value.as_array().into_iter().flatten() {
                    let t = c["type"].as_str().ok_or(OwnershipError::UntypedCondition)?;
                    out.insert(StatusField::Condition(t.to_owned()));
                }
                continue;
            }
            other => match RUN_RECORD.iter().find(|r| **r == other) {
                Some(r) => out.insert(StatusField::RunRecord(r)),
                None => return Err(OwnershipError::Unknown(other.to_owned())),
            },
        };
    }
    Ok(out)
}

/// Checks that `writer` owns every field of its apply body in `binding`.
pub fn check(
    writer_: Writer,
    binding: Binding,
    status: &serde_json::Value,
) -> Result<BTreeSet<StatusField>, OwnershipError> {
    let fields = fields_of(status)?;
    for field in &fields {
        if writer(field, binding) != Some(writer_) {
            return Err(OwnershipError::NotOwner {
                writer: writer_,
                field: field.clone(),
                binding,
            });
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn every_field() -> Vec<StatusField> {
        let mut all = vec![
            StatusField::NodeName,
            StatusField::Tenant,
            StatusField::Phase,
            StatusField::ObservedGeneration,
        ];
        all.extend(
            cond::MICROVM_CONDITIONS
                .iter()
                .map(|c| StatusField::Condition((*c).to_owned())),
        );
        all.extend(RUN_RECORD.iter().map(|r| StatusField::RunRecord(r)));
        all
    }

    #[test]
    fn every_field_has_at_most_one_writer_per_binding() {
        // `writer` is a function, so "at most one" is by construction; what
        // this checks is the table above: placement is always the operator's,
        // the lifecycle changes hands, the run record only ever the agent's.
        for b in Binding::ALL {
            for f in every_field() {
                let w = writer(&f, b);
                match &f {
                    StatusField::NodeName | StatusField::Tenant => {
                        assert_eq!(w, Some(Writer::Operator))
                    }
                    StatusField::Condition(t) if t == cond::SCHEDULED => {
                        assert_eq!(w, Some(Writer::Operator))
                    }
                    StatusField::RunRecord(_) => {
                        assert_eq!(w, (b == Binding::OnLiveNode).then_some(Writer::Agent))
                    }
                    _ => assert_eq!(
                        w,
                        Some(if b == Binding::OnLiveNode {
                            Writer::Agent
                        } else {
                            Writer::Operator
                        })
                    ),
                }
            }
        }
    }

    #[test]
    fn a_body_is_read_as_ssa_tracks_it() {
        let body = json!({
            "phase": "Running", "restartCount": 0,
            "conditions": [{"type": "Ready"}, {"type": "Scheduled"}],
        });
        let f = fields_of(&body).unwrap();
        assert!(f.contains(&StatusField::RunRecord("restartCount")));
        assert!(f.contains(&StatusField::Condition("Ready".into())));
        assert_eq!(f.len(), 4);
        assert_eq!(
            fields_of(&json!({"bogus": 1})),
            Err(OwnershipError::Unknown("bogus".into()))
        );
        assert_eq!(
            check(Writer::Agent, Binding::OnLiveNode, &body),
            Err(OwnershipError::NotOwner {
                writer: Writer::Agent,
                field: StatusField::Condition("Scheduled".into()),
                binding: Binding::OnLiveNode
            })
        );
        // The operator may not reset the agent's run record, even on node loss.
        assert!(
            check(
                Writer::Operator,
                Binding::OnLostNode,
                &json!({"restartCount": 0})
            )
            .is_err()
        );
    }

    #[test]
    fn every_status_field_of_the_type_is_known() {
        let full = serde_json::to_value(crate::MicroVMStatus {
            phase: Some(crate::microvm::Phase::Running),
            node_name: Some("n".into()),
            observed_generation: Some(1),
            last_exit: None,
            boot_start_time: None,
            boot_duration_millis: Some(1),
            vsock_cid: Some(3),
            ..Default::default()
        })
        .unwrap();
        fields_of(&full).unwrap();
        let schema = serde_json::to_value(schemars::schema_for!(crate::MicroVMStatus)).unwrap();
        for key in schema["properties"].as_object().unwrap().keys() {
            let probe = json!({ key.as_str(): null });
            if key != "conditions" {
                assert!(fields_of(&probe).is_ok(), "status.{key} has no owner");
            }
        }
    }
}

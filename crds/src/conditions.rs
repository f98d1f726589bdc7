//! The condition vocabulary of runv resources and the one way to update a
//! `metav1.Condition` list.
//!
//! Condition types and reasons are constants here so the operator, the agent
//! and tests agree on spelling. [`set_condition`] keeps `lastTransitionTime`
//! unless the status flips, as the Kubernetes API conventions require.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The MicroVM has a node (`status.nodeName`).
pub const SCHEDULED: &str = "Scheduled";
/// The VMM process runs on the node.
pub const VMM_STARTED: &str = "VMMStarted";
/// The guest signalled that it booted.
pub const GUEST_BOOTED: &str = "GuestBooted";
/// The resource is reconciled to its spec (a VM stopped on purpose is Ready).
pub const READY: &str = "Ready";
/// The VM's vCPUs are paused.
pub const PAUSED: &str = "Paused";
/// kstatus: work toward the spec is in progress (abnormal-true).
pub const RECONCILING: &str = "Reconciling";
/// kstatus: progress needs someone to act (abnormal-true).
pub const STALLED: &str = "Stalled";
/// SecureWorkload: at least the minimum number of replicas are available.
pub const AVAILABLE: &str = "Available";
/// SecureWorkload: a rollout or scale is progressing.
pub const PROGRESSING: &str = "Progressing";
/// SecureWorkload: a replica could not be created or deleted.
pub const REPLICA_FAILURE: &str = "ReplicaFailure";

/// Every condition type a MicroVM carries, set on its first status write.
pub const MICROVM_CONDITIONS: [&str; 7] = [
    SCHEDULED,
    VMM_STARTED,
    GUEST_BOOTED,
    READY,
    PAUSED,
    RECONCILING,
    STALLED,
];

/// Every condition type a SecureWorkload carries.
pub const SECUREWORKLOAD_CONDITIONS: [&str; 5] = [
    AVAILABLE,
    PROGRESSING,
    REPLICA_FAILURE,
    RECONCILING,
    STALLED,
];

/// `status` of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

impl Status {
    /// The string Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// A condition to record: everything but the transition time, which
/// [`set_condition`] derives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update<'a> {
    /// Condition type.
    pub type_: &'a str,
    /// Condition status.
    pub status: Status,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Message for people.
    pub message: &'a str,
    /// The generation this condition describes.
    pub observed_generation: Option<i64>,
}

/// One condition a writer sets: typed, so reasons come from
/// [`crate::contract::Reason`] and never from free strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Condition type.
    pub type_: &'static str,
    /// Condition status.
    pub status: Status,
    /// Reason.
    pub reason: crate::contract::Reason,
    /// Message for people (may be empty).
    pub message: String,
}

impl Row {
    /// A row with an empty message.
    pub fn new(type_: &'static str, status: Status, reason: crate::contract::Reason) -> Self {
        Self {
            type_,
            status,
            reason,
            message: String::new(),
        }
    }

    /// The same row with a message.
    #[must_use]
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Sets this row in `conditions` (see [`set_condition`]); returns whether
    /// anything changed.
    pub fn set(&self, conditions: &mut Vec<Condition>, generation: Option<i64>, now: Time) -> bool {
        set_condition(
            conditions,
            Update {
                type_: self.type_,
                status: self.status,
                reason: self.reason.as_str(),
                message: &self.message,
                observed_generation: generation,
            },
            now,
        )
    }
}

/// Sets a condition in `conditions`, keyed by type. `lastTransitionTime` is `now`
/// when the condition is new or its status changes, and kept otherwise. Returns
/// whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, update: Update<'_>, now: Time) -> bool {
    let status = update.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            let flipped = existing.status != status;
            let changed = flipped
                || existing.reason != update.reason
                || existing.message != update.message
                || existing.observed_generation != update.observed_generation;
            if flipped {
                existing.last_transition_time = now;
            }
            existing.status = status.to_owned();
            existing.reason = update.reason.to_owned();
            existing.message = update.message.to_owned();
            existing.observed_generation = update.observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_owned(),
                status: status.to_owned(),
                reason: update.reason.to_owned(),
                message: update.message.to_owned(),
                observed_generation: update.observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of this type, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of this type is present with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ready(status: Status, reason: &str) -> Update<'_> {
        Update {
            type_: READY,
            status,
            reason,
            message: "",
            observed_generation: Some(1),
        }
    }

    #[test]
    fn new_condition_is_added_with_now() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            ready(Status::False, "Booting"),
            at(10)
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds[0].last_transition_time, at(10));
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_reason() {
        let mut conds = Vec::new();
        set_condition(&mut conds, ready(Status::False, "Booting"), at(10));
        assert!(set_condition(
            &mut conds,
            ready(Status::False, "Scheduling"),
            at(20)
        ));
        assert_eq!(conds[0].reason, "Scheduling");
        assert_eq!(conds[0].last_transition_time, at(10));
    }

    #[test]
    fn flip_moves_transition_time() {
        let mut conds = Vec::new();
        set_condition(&mut conds, ready(Status::False, "Booting"), at(10));
        set_condition(&mut conds, ready(Status::True, "Running"), at(30));
        assert_eq!(conds[0].last_transition_time, at(30));
        assert!(is_true(&conds, READY));
    }

    #[test]
    fn identical_update_reports_no_change() {
        let mut conds = Vec::new();
        set_condition(&mut conds, ready(Status::True, "Running"), at(10));
        assert!(!set_condition(
            &mut conds,
            ready(Status::True, "Running"),
            at(40)
        ));
        assert_eq!(conds[0].last_transition_time, at(10));
    }

    #[test]
    fn conditions_are_keyed_by_type() {
        let mut conds = Vec::new();
        set_condition(&mut conds, ready(Status::True, "Running"), at(10));
        let paused = Update {
            type_: PAUSED,
            status: Status::False,
            reason: "NotPaused",
            message: "",
            observed_generation: Some(1),
        };
        set_condition(&mut conds, paused, at(10));
        assert_eq!(conds.len(), 2);
        assert!(!is_true(&conds, PAUSED));
        assert!(find(&conds, "Missing").is_none());
    }
}

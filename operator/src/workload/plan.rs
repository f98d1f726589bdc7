//! The replica arithmetic of a SecureWorkload, as pure functions: how many
//! replicas to create and which to delete for a scale, a rolling update or a
//! Recreate, and the status counts. Follows the Deployment controller's rules
//! for maxSurge and maxUnavailable.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// One owned MicroVM, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Its name.
    pub name: String,
    /// Its template hash label.
    pub hash: String,
    /// It has a node.
    pub scheduled: bool,
    /// Its Ready condition is True.
    pub ready: bool,
    /// Ready and its guest is running.
    pub available: bool,
    /// It has a deletionTimestamp.
    pub terminating: bool,
}

/// The update strategy with its bounds resolved to counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Delete all old replicas before creating new ones.
    Recreate,
    /// Replace a few at a time.
    Rolling {
        /// Replicas allowed above `desired`.
        max_surge: u32,
        /// Replicas allowed below `desired` among the available.
        max_unavailable: u32,
    },
}

/// A bound that is not a count or a percentage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {value:?} is not a count or a percentage")]
pub struct BoundError {
    field: &'static str,
    value: String,
}

/// Resolves a count-or-percentage against `total`, rounding up or down.
pub fn resolve(
    field: &'static str,
    v: &IntOrString,
    total: u32,
    round_up: bool,
) -> Result<u32, BoundError> {
    let err = || BoundError {
        field,
        value: match v {
            IntOrString::Int(i) => i.to_string(),
            IntOrString::String(s) => s.clone(),
        },
    };
    match v {
        IntOrString::Int(i) => u32::try_from(*i).map_err(|_| err()),
        IntOrString::String(s) => {
            let pct: u64 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(err)?;
            let scaled = pct * u64::from(total);
            let n = if round_up {
                scaled.div_ceil(100)
            } else {
                scaled / 100
            };
            u32::try_from(n).map_err(|_| err())
        }
    }
}

/// Resolves a rolling update's bounds; both 0 would never progress, so
/// maxUnavailable becomes 1 then, as the Deployment controller does.
pub fn rolling(
    max_surge: &IntOrString,
    max_unavailable: &IntOrString,
    desired: u32,
) -> Result<Strategy, BoundError> {
    let surge = resolve(
        "spec.strategy.rollingUpdate.maxSurge",
        max_surge,
        desired,
        true,
    )?;
    let mut unavailable = resolve(
        "spec.strategy.rollingUpdate.maxUnavailable",
        max_unavailable,
        desired,
        false,
    )?;
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Ok(Strategy::Rolling {
        max_surge: surge,
        max_unavailable: unavailable.min(desired),
    })
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New replicas (current hash) to create.
    pub create: u32,
    /// Replicas to delete, by name.
    pub delete: Vec<String>,
}

/// Deletion order: unscheduled first, then not ready, then not available, then by
/// name, newest-looking (highest) first.
fn deletion_order(mut rs: Vec<&Replica>) -> Vec<&Replica> {
    rs.sort_by(|a, b| {
        (a.scheduled, a.ready, a.available)
            .cmp(&(b.scheduled, b.ready, b.available))
            .then_with(|| b.name.cmp(&a.name))
    });
    rs
}

/// Plans one step toward `desired` replicas of template `hash`.
pub fn plan(desired: u32, strategy: Strategy, hash: &str, replicas: &[Replica]) -> Plan {
    let active: Vec<&Replica> = replicas.iter().filter(|r| !r.terminating).collect();
    let (new, old): (Vec<&Replica>, Vec<&Replica>) = active.iter().partition(|r| r.hash == hash);
    let count = |v: &[&Replica]| u32::try_from(v.len()).unwrap_or(u32::MAX);
    let available = |v: &[&Replica]| {
        count(
            &v.iter()
                .copied()
                .filter(|r| r.available)
                .collect::<Vec<_>>(),
        )
    };
    let mut out = Plan::default();

    let scale_new = |out: &mut Plan| {
        let n = count(&new);
        if n < desired {
            out.create = desired - n;
        } else {
            let extra = (n - desired) as usize;
            out.delete.extend(
                deletion_order(new.clone())
                    .into_iter()
                    .take(extra)
                    .map(|r| r.name.clone()),
            );
        }
    };

    if old.is_empty() {
        // A Recreate waits for old replicas to be gone before creating new ones.
        let old_terminating = replicas.iter().any(|r| r.terminating && r.hash != hash);
        if !(strategy == Strategy::Recreate && old_terminating) {
            scale_new(&mut out);
        }
        return out;
    }

    match strategy {
        Strategy::Recreate => {
            out.delete = old.iter().map(|r| r.name.clone()).collect();
        }
        Strategy::Rolling {
            max_surge,
            max_unavailable,
        } => {
            let (n_new, n_old) = (count(&new), count(&old));
            let total = n_new + n_old;
            // Scale up the new replicas within desired + maxSurge.
            let max_total = desired + max_surge;
            if n_new < desired && total < max_total {
                out.create = (desired - n_new).min(max_total - total);
            }
            if n_new > desired {
                let extra = (n_new - desired) as usize;
                out.delete.extend(
                    deletion_order(new.clone())
                        .into_iter()
                        .take(extra)
                        .map(|r| r.name.clone()),
                );
            }
            // Scale down old replicas while keeping desired - maxUnavailable available.
            let min_available = desired.saturating_sub(max_unavailable);
            let new_unavailable = n_new - available(&new);
            let mut budget = total.saturating_sub(min_available + new_unavailable);
            let ordered = deletion_order(old.clone());
            // Unavailable old replicas cost no availability.
            let mut rest = Vec::new();
            for r in ordered {
                if !r.available && budget > 0 {
                    out.delete.push(r.name.clone());
                    budget -= 1;
                } else if r.available {
                    rest.push(r);
                }
            }
            let avail_total = available(&new) + available(&old);
            let can_drop = avail_total.saturating_sub(min_available).min(budget);
            out.delete.extend(
                rest.into_iter()
                    .take(can_drop as usize)
                    .map(|r| r.name.clone()),
            );
        }
    }
    out
}

/// Status counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Active replicas.
    pub replicas: u32,
    /// Ready ones.
    pub ready: u32,
    /// Available ones.
    pub available: u32,
    /// Active replicas of the current template.
    pub updated: u32,
    /// Any replica (old or terminating) that is not of the current template.
    pub old: u32,
}

/// Counts replicas for the status.
pub fn counts(hash: &str, replicas: &[Replica]) -> Counts {
    let mut c = Counts::default();
    for r in replicas {
        if r.hash != hash {
            c.old += 1;
        }
        if r.terminating {
            continue;
        }
        c.replicas += 1;
        c.ready += u32::from(r.ready);
        c.available += u32::from(r.available);
        c.updated += u32::from(r.hash == hash);
    }
    c
}

/// Whether the rollout is complete: exactly `desired` replicas of the current
/// template, all available, nothing else left.
pub fn complete(desired: u32, c: &Counts, replicas: &[Replica]) -> bool {
    c.updated == desired
        && c.available == desired
        && c.old == 0
        && replicas.iter().all(|r| !r.terminating)
}

#[cfg(test)]
mod tests;

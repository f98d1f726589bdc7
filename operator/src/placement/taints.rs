//! Taints and tolerations, with the Kubernetes scheduler's matching rules.

use k8s_openapi::api::core::v1::{Taint, Toleration};

/// Whether `toleration` tolerates `taint`: the effect matches (an empty effect
/// matches every effect), the key matches (an empty key with `Exists` matches every
/// key), and with `Equal` (the default operator) the values are equal.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = match toleration.effect.as_deref() {
        None | Some("") => true,
        Some(e) => e == taint.effect,
    };
    if !effect_ok {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// The first taint that forbids placement (NoSchedule or NoExecute) and that no
/// toleration tolerates.
pub fn untolerated<'t>(taints: &'t [Taint], tolerations: &[Toleration]) -> Option<&'t Taint> {
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
            ..Taint::default()
        }
    }

    fn tol(
        key: Option<&str>,
        op: Option<&str>,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Toleration::default()
        }
    }

    #[test]
    fn matching_table() {
        let t = taint("dedicated", Some("gpu"), "NoSchedule");
        let cases = [
            (tol(Some("dedicated"), None, Some("gpu"), None), true),
            (
                tol(
                    Some("dedicated"),
                    Some("Equal"),
                    Some("gpu"),
                    Some("NoSchedule"),
                ),
                true,
            ),
            (
                tol(Some("dedicated"), Some("Equal"), Some("cpu"), None),
                false,
            ),
            (tol(Some("dedicated"), Some("Exists"), None, None), true),
            (
                tol(Some("dedicated"), Some("Exists"), None, Some("NoExecute")),
                false,
            ),
            (tol(None, Some("Exists"), None, None), true),
            (tol(Some("other"), Some("Exists"), None, None), false),
            (
                tol(Some("dedicated"), Some("Bogus"), Some("gpu"), None),
                false,
            ),
        ];
        for (i, (toleration, want)) in cases.iter().enumerate() {
            assert_eq!(tolerates(toleration, &t), *want, "case {i}: {toleration:?}");
        }
    }

    #[test]
    fn prefer_no_schedule_does_not_block() {
        let taints = [taint("soft", None, "PreferNoSchedule")];
        assert!(untolerated(&taints, &[]).is_none());
        let taints = [taint("hard", None, "NoExecute")];
        assert_eq!(
            untolerated(&taints, &[]).map(|t| t.key.as_str()),
            Some("hard")
        );
        let tols = [tol(Some("hard"), Some("Exists"), None, None)];
        assert!(untolerated(&taints, &tols).is_none());
    }
}

//! Kubernetes quantities (`256Mi`, `1Gi`, `500m`) as the numbers the operator
//! and agent compute with. Parsing is kube_quantity's; this module only turns
//! results into bytes and millicores with errors that name the field.

use kube_quantity::ParsedQuantity;

use crate::microvm::Resources;

/// A quantity that is not a valid Kubernetes quantity, or is out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {value:?} is not a valid {what}")]
pub struct QuantityError {
    /// The field holding it.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What was expected.
    pub what: &'static str,
}

/// Parses a byte quantity (`256Mi`, `1G`, `1048576`), rounding fractions of a byte up.
pub fn bytes(field: &'static str, value: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        field,
        value: value.to_owned(),
        what: "non-negative byte quantity such as 256Mi",
    };
    let q = ParsedQuantity::try_from(value).map_err(|_| err())?;
    let f = q.to_bytes_f64().ok_or_else(err)?;
    if !(0.0..=u64::MAX as f64).contains(&f) {
        return Err(err());
    }
    // Exact for every size below 2^53 bytes (8 PiB), far beyond any bound in the API.
    Ok(f.ceil() as u64)
}

/// Parses a CPU quantity (`500m`, `2`) as millicores, rounding up.
pub fn millicores(field: &'static str, value: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        field,
        value: value.to_owned(),
        what: "non-negative CPU quantity such as 500m or 2",
    };
    let q = ParsedQuantity::try_from(value).map_err(|_| err())?;
    let cores = q.to_bytes_f64().ok_or_else(err)?;
    if !(0.0..=1e15).contains(&cores) {
        return Err(err());
    }
    Ok((cores * 1000.0).ceil() as u64)
}

impl Resources {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> Result<u64, QuantityError> {
        bytes("spec.resources.memory", &self.memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_quantities() {
        assert_eq!(bytes("f", "256Mi"), Ok(256 << 20));
        assert_eq!(bytes("f", "1Gi"), Ok(1 << 30));
        assert_eq!(bytes("f", "1G"), Ok(1_000_000_000));
        assert_eq!(bytes("f", "1048576"), Ok(1 << 20));
        assert_eq!(bytes("f", "1.5Ki"), Ok(1536));
        assert_eq!(bytes("f", "1500m"), Ok(2));
        assert!(bytes("f", "lots").is_err());
        assert!(bytes("f", "-1Mi").is_err());
        let e = bytes("spec.resources.memory", "x").unwrap_err();
        assert!(
            e.to_string().starts_with("spec.resources.memory: \"x\""),
            "{e}"
        );
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(millicores("f", "500m"), Ok(500));
        assert_eq!(millicores("f", "2"), Ok(2000));
        assert_eq!(millicores("f", "0.25"), Ok(250));
        assert!(millicores("f", "two").is_err());
    }

    #[test]
    fn resources_memory() {
        let r = Resources {
            vcpus: 1,
            memory: "64Mi".into(),
        };
        assert_eq!(r.memory_bytes(), Ok(64 << 20));
    }
}

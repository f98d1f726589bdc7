//! Named monotonic counters (vCPU exits, device bytes and errors).
//!
//! Devices get an `Arc<AtomicU64>` by name at setup and bump it lock-free; the
//! control socket snapshots all of them. Owns nothing else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A registry of counters.
#[derive(Debug, Default)]
pub struct Counters {
    all: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Counters {
    /// The counter called `name`, created at zero if new.
    pub fn get(&self, name: &str) -> Arc<AtomicU64> {
        let mut all = crate::devices::lock(&self.all);
        if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::new(AtomicU64::new(0));
        all.push((name.to_owned(), c.clone()));
        c
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        crate::devices::lock(&self.all)
            .iter()
            .map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_counter() {
        let c = Counters::default();
        c.get("a").fetch_add(2, Ordering::Relaxed);
        c.get("a").fetch_add(3, Ordering::Relaxed);
        c.get("b");
        let s = c.snapshot();
        assert_eq!(s["a"], 5);
        assert_eq!(s["b"], 0);
    }
}

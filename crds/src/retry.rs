//! The one retry policy of every runv controller (the operator's MicroVM and
//! SecureWorkload controllers, the node agent's MicroVM controller): after a
//! failed reconcile an object is retried after an exponential backoff of its
//! own, and a successful reconcile forgets its failures.
//!
//! kube-runtime leaves this to the caller: a controller's `error_policy` is
//! handed the object and the error and returns the [`Action`] to take, and it
//! keeps no count of failures. A change to the object still triggers a
//! reconcile at once; the backoff only delays the retry that nothing else
//! triggers. The numbers follow client-go's per-item exponential rate limiter
//! (base doubled per failure in a row, up to a cap), with a base of 1 s and a
//! cap of 5 min.
//!
//! [`Action`]: https://docs.rs/kube/latest/kube/runtime/controller/struct.Action.html
//!
//! This module only computes delays and counts; logging and metrics are the
//! controller's.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Exponential backoff: `base · 2^(n−1)` after the `n`-th failure in a row, at
/// most `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Backoff {
    /// The backoff of every runv controller: 1 s doubling to 5 min.
    pub const CONTROLLER: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(300),
    };

    /// The wait after the `failures`-th failure in a row (0 counts as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1);
        // 2^doublings overflows a u32 from 32 on; the cap is reached long before.
        1u32.checked_shl(doublings)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |d| d.min(self.cap))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::CONTROLLER
    }
}

/// Failures in a row per object, and the backoff they earn. Shared by a
/// controller's reconcile (which calls [`Retry::succeeded`]) and its error
/// policy (which calls [`Retry::failed`]), possibly on several threads.
pub struct Retry<K> {
    backoff: Backoff,
    failures: Mutex<HashMap<K, u32>>,
}

impl<K> fmt::Debug for Retry<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq> Default for Retry<K> {
    fn default() -> Self {
        Self::new(Backoff::CONTROLLER)
    }
}

impl<K: Hash + Eq> Retry<K> {
    /// No failures yet.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more failure of `key` and returns how long to wait before
    /// retrying it.
    pub fn failed(&self, key: K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        self.backoff.delay(*n)
    }

    /// Forgets the failures of `key`: its reconcile succeeded (or it is gone).
    pub fn succeeded(&self, key: &K) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Failures of `key` in a row so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// An error and each of its sources, `outer: inner: root`, for the log line
/// an error policy writes (the error types print only their own level).
#[derive(Clone, Copy, Debug)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// One row of the backoff table: after `failures` in a row, wait `want`.
    struct Row {
        backoff: Backoff,
        failures: u32,
        want: Duration,
    }

    fn row(backoff: Backoff, failures: u32, want: Duration) -> Row {
        Row {
            backoff,
            failures,
            want,
        }
    }

    #[test]
    fn backoff_doubles_from_base_to_cap() {
        let c = Backoff::CONTROLLER;
        // client-go's per-item limiter: 5 ms doubling to 1000 s.
        let go = Backoff {
            base: Duration::from_millis(5),
            cap: S(1000),
        };
        let ms = Duration::from_millis;
        let rows = [
            row(c, 0, S(1)),
            row(c, 1, S(1)),
            row(c, 2, S(2)),
            row(c, 3, S(4)),
            row(c, 9, S(256)),
            // 512 s is over the cap.
            row(c, 10, S(300)),
            row(c, 32, S(300)),
            // 2^32 does not fit the factor.
            row(c, 33, S(300)),
            row(c, u32::MAX, S(300)),
            row(go, 1, ms(5)),
            row(go, 11, ms(5120)),
            row(go, 19, S(1000)),
            // A base past the cap waits the cap.
            row(
                Backoff {
                    base: S(10),
                    cap: S(3),
                },
                1,
                S(3),
            ),
            // Duration::MAX doubled overflows: the cap.
            row(
                Backoff {
                    base: Duration::MAX,
                    cap: S(7),
                },
                2,
                S(7),
            ),
        ];
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(
                r.backoff.delay(r.failures),
                r.want,
                "row {i}: {:?} after {} failures",
                r.backoff,
                r.failures
            );
        }
    }

    #[test]
    fn failures_count_per_object_and_reset_on_success() {
        let retry = Retry::<&str>::default();
        assert_eq!(retry.failed("a"), S(1));
        assert_eq!(retry.failed("a"), S(2));
        assert_eq!(retry.failed("a"), S(4));
        // Another object starts from the base.
        assert_eq!(retry.failed("b"), S(1));
        assert_eq!((retry.failures(&"a"), retry.failures(&"b")), (3, 1));
        retry.succeeded(&"a");
        assert_eq!(retry.failures(&"a"), 0);
        assert_eq!(retry.failed("a"), S(1), "starts over after a success");
        assert_eq!(retry.failures(&"b"), 1, "untouched by a's success");
        // Forgetting an object that never failed is harmless.
        retry.succeeded(&"c");
        assert_eq!(retry.failures(&"c"), 0);
    }

    #[test]
    fn failures_from_many_threads_are_all_counted() {
        let retry = Retry::<u32>::default();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        retry.failed(7);
                    }
                });
            }
        });
        assert_eq!(retry.failures(&7), 800);
        assert_eq!(retry.failed(7), S(300));
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn chain_prints_every_source_once() {
        let e = Layer(
            "API request failed",
            Some(Box::new(Layer(
                "connection reset",
                Some(Box::new(Layer("os error 104", None))),
            ))),
        );
        assert_eq!(
            Chain(&e).to_string(),
            "API request failed: connection reset: os error 104"
        );
        assert_eq!(Chain(&Layer("alone", None)).to_string(), "alone");
    }
}

//! Prometheus metrics of the operator, named `runv_operator_*`.
//!
//! Reconcile counts, errors by reason and a duration histogram per controller
//! (as controller-runtime exports them), the placement queue depth and
//! placement outcomes. Per-object names never become labels.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Labels of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `microvm` or `secureworkload`.
    pub controller: String,
}

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The controller.
    pub controller: String,
    /// `success` or `error`.
    pub result: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller.
    pub controller: String,
    /// A short, bounded error reason.
    pub reason: String,
}

/// Labels of placement outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `placed` or `unschedulable`.
    pub outcome: String,
}

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    /// MicroVMs waiting for a node.
    pub placement_queue_depth: Gauge,
    placements: Family<OutcomeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("runv_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconcile", "Reconciles run, by result", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors, by reason",
            errors.clone(),
        );
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconcile",
            Unit::Seconds,
            duration.clone(),
        );
        let placement_queue_depth = Gauge::default();
        registry.register(
            "placement_queue_depth",
            "MicroVMs that want to run and have no node yet",
            placement_queue_depth.clone(),
        );
        let placements = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "placements",
            "Placement decisions, by outcome",
            placements.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            errors,
            duration,
            placement_queue_depth,
            placements,
        }
    }

    /// Starts timing a reconcile of `controller`; the guard records it when dropped.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            controller,
            start: Instant::now(),
        }
    }

    /// Runs one reconcile of `controller`, recording its duration and success.
    pub async fn timed<T, E>(
        &self,
        controller: &'static str,
        reconcile: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let timer = self.reconcile(controller);
        let result = reconcile.await;
        if result.is_ok() {
            timer.success();
        }
        result
    }

    /// Counts a failed reconcile.
    pub fn error(&self, controller: &'static str, reason: &str) {
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.into(),
                result: "error".into(),
            })
            .inc();
        self.errors
            .get_or_create(&ErrorLabels {
                controller: controller.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a placement decision.
    pub fn placement(&self, placed: bool) {
        let outcome = if placed { "placed" } else { "unschedulable" };
        self.placements
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records one reconcile's duration and success when dropped; call
/// [`Metrics::error`] for failures.
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: Metrics,
    controller: &'static str,
    start: Instant,
}

impl ReconcileTimer {
    /// Marks the reconcile successful.
    pub fn success(self) {
        self.metrics
            .reconciles
            .get_or_create(&ResultLabels {
                controller: self.controller.into(),
                result: "success".into(),
            })
            .inc();
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&ControllerLabels {
                controller: self.controller.into(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.reconcile("microvm").success();
        m.error("microvm", "Api");
        m.placement(true);
        m.placement_queue_depth.set(3);
        let text = m.encode();
        for needle in [
            "runv_operator_reconcile_total{controller=\"microvm\",result=\"success\"} 1",
            "runv_operator_reconcile_total{controller=\"microvm\",result=\"error\"} 1",
            "runv_operator_reconcile_errors_total{controller=\"microvm\",reason=\"Api\"} 1",
            "runv_operator_reconcile_duration_seconds_count{controller=\"microvm\"} 1",
            "runv_operator_placement_queue_depth 3",
            "runv_operator_placements_total{outcome=\"placed\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }
}

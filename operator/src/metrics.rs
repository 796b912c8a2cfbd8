//! Prometheus metrics of the controllers: reconciles, failures and durations
//! per kind, served as text on `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub error: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    durations: Family<KindLabel, Histogram, fn() -> Histogram>,
    watch_errors: Family<KindLabel, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("starling_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let durations: Family<KindLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let watch_errors = Family::<KindLabel, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciliations",
            "Reconciliations started, by kind",
            reconciles.clone(),
        );
        registry.register(
            "reconciliation_errors",
            "Reconciliations that failed, by kind and error class",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation, by kind",
            durations.clone(),
        );
        registry.register(
            "watch_errors",
            "Errors from a controller's watches (list/watch refused, e.g. RBAC 403; objects that do not decode), by controller kind",
            watch_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            durations,
            watch_errors,
            leader,
        }
    }
}

/// Measures one reconciliation from creation to drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&KindLabel {
                kind: self.kind.into(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconciliation of `kind` and times it until the guard drops.
    pub fn reconcile(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    pub fn failure(&self, kind: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    /// Counts an error from one of the watches of the `kind` controller.
    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_times() {
        let m = Metrics::default();
        drop(m.reconcile("broker"));
        m.failure("broker", "kube");
        m.set_leader(true);
        m.watch_error("token");
        m.watch_error("token");
        let text = m.encode();
        assert!(
            text.contains(r#"starling_operator_watch_errors_total{kind="token"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"starling_operator_reconciliations_total{kind="broker"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"starling_operator_reconciliation_errors_total{kind="broker",error="kube"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"starling_operator_reconcile_duration_seconds_count{kind="broker"} 1"#),
            "{text}"
        );
        assert!(text.contains("starling_operator_leader 1"), "{text}");
    }
}

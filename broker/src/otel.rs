//! Broker metrics over OTLP: one observable instrument per family of
//! [`FAMILIES`], whose callback reads the same atomics `/metrics` reads at
//! each export. Nothing is counted twice and the hot path is unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

use crate::metrics::{FAMILIES, Family, Kind, Live};
use crate::server::Shared;

/// Whether each connection gets an `mqtt connection` span: only when spans
/// are exported. A span lives as long as its connection, and its record in
/// the subscriber costs every idle connection memory for nothing when no
/// one collects it.
static CONNECTION_SPANS: AtomicBool = AtomicBool::new(false);

pub fn set_connection_spans(on: bool) {
    CONNECTION_SPANS.store(on, Ordering::Relaxed);
}

pub fn connection_spans() -> bool {
    CONNECTION_SPANS.load(Ordering::Relaxed)
}

/// Registers every counter and gauge on `meter`; the exporter calls back at
/// its interval for as long as its provider lives.
pub fn register(meter: &Meter, shared: Arc<Shared>) {
    for family in FAMILIES {
        let shared = shared.clone();
        match family.kind {
            Kind::Counter => {
                meter
                    .u64_observable_counter(family.base_name())
                    .with_description(family.help)
                    .with_callback(move |o| observe(family, &shared, &mut |v, a| o.observe(v, a)))
                    .build();
            }
            Kind::Gauge => {
                meter
                    .u64_observable_gauge(family.base_name())
                    .with_description(family.help)
                    .with_callback(move |o| observe(family, &shared, &mut |v, a| o.observe(v, a)))
                    .build();
            }
        }
    }
}

fn observe(family: &Family, shared: &Shared, record: &mut dyn FnMut(u64, &[KeyValue])) {
    // The live gauges lock every session; only the families that need them
    // pay for it.
    let live = if family.live {
        shared.live_metrics()
    } else {
        Live::default()
    };
    family.read(&shared.metrics, &live, &mut |labels, v| {
        let attrs: Vec<KeyValue> = labels
            .iter()
            .map(|(k, v)| KeyValue::new(*k, v.to_string()))
            .collect();
        record(v, &attrs);
    });
}

//! Broker metrics over OTLP: one observable instrument per family of
//! [`FAMILIES`], whose callback reads the same atomics `/metrics` reads at
//! each export. Nothing is counted twice and the hot path is unchanged.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

use crate::metrics::{FAMILIES, Family, Kind, Live};
use crate::server::Shared;

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

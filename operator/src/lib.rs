//! Starling operator: turns `Broker`, `Token` and `ACL` custom resources into
//! running, secured Starling MQTT brokers.
//!
//! Layout: `crd/` the three kinds; `build/` pure functions from spec to
//! desired objects; `tls/` certificate material; `reconcile/` one controller
//! per kind (read → validate → build → apply → status); `server` and
//! `leader` the process around them (logs, traces and metrics export come
//! from the shared `starling-telemetry` crate).

pub mod app;
pub mod build;
pub mod controllers;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod shutdown;
pub mod tls;

/// `service.name` of exported spans unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` say otherwise.
pub const SERVICE_NAME: &str = "starling-operator";
/// The log filter when `RUST_LOG` is unset (it also decides which spans are
/// exported: reconcile spans are at INFO).
pub const DEFAULT_LOG_FILTER: &str = "info,kube_runtime=warn,kube_client=warn";

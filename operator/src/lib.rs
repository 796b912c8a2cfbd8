//! Starling operator: turns `Broker`, `Token` and `ACL` custom resources into
//! running, secured Starling MQTT brokers.
//!
//! Layout: `crd/` the three kinds; `build/` pure functions from spec to
//! desired objects; `tls/` certificate material; `reconcile/` one controller
//! per kind (read → validate → build → apply → status); `telemetry`,
//! `server` and `leader` the process around them.

pub mod app;
pub mod build;
pub mod controllers;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

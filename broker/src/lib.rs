//! Starling broker library: everything the `starling-broker` binary runs,
//! exposed so integration tests and the operator's contract test can use the
//! same types.
//!
//! A packet travels codec → `session` (per-connection state machine) →
//! `router` (topic index, retained store, delivery into subscriber queues) →
//! the subscriber's `session` → codec, whatever listener it came in on
//! (`listen`: TCP, TLS, WebSocket).

pub mod admin;
pub mod apiserver;
pub mod auth;
pub mod banner;
pub mod file_stamp;
pub mod http;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod router;
pub mod server;
pub mod session;
pub mod settings;
pub mod store;
pub mod tls;
pub mod tokens;

pub use server::{Broker, BrokerHandle};

//! Listeners: accept loops that hand each connection to a session, plus the
//! HTTP server that carries MQTT over WebSocket (and, later, `/broker/` and
//! native WebSocket topic streams) and the admin endpoints.

pub mod accept;
pub mod admin;
pub mod http;
pub mod slots;
pub mod tcp;
pub mod transport;
pub mod ws;

use std::sync::Arc;

use crate::server::Shared;

/// Shared state every accept loop needs.
pub type SharedRef = Arc<Shared>;

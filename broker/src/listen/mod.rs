//! Listeners: accept loops that hand each connection to a session, plus the
//! HTTP server that carries MQTT over WebSocket (and, later, `/broker/` and
//! native WebSocket topic streams) and the admin endpoints.

pub mod accept;
pub mod admin;
pub mod http;
pub mod tcp;
pub mod transport;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics;
use crate::server::Shared;

/// Takes a connection slot, or refuses when the broker is at its limit.
/// The slot is counted by the session itself; this only checks.
pub fn admit(shared: &Shared, peer: SocketAddr) -> bool {
    let current = shared
        .metrics
        .connections_current
        .load(std::sync::atomic::Ordering::Relaxed);
    if current as usize >= shared.config.limits.max_connections {
        metrics::inc(&shared.metrics.connections_refused);
        tracing::warn!(%peer, "connection limit reached; refusing");
        return false;
    }
    true
}

/// Shared state every accept loop needs.
pub type SharedRef = Arc<Shared>;

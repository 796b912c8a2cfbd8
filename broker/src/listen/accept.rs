//! The accept loop every listener shares: stop on shutdown, back off on
//! accept errors, enforce the connection limit, TCP_NODELAY, and a TLS
//! handshake under a timeout inside the connection's own task.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::SharedRef;
use crate::metrics;
use crate::server::Shared;

/// Accepts until shutdown and passes each admitted connection to `handle`
/// (which spawns its own task, so nothing a client does can stall the loop).
/// `limit` applies the broker's connection limit.
pub async fn run(
    shared: SharedRef,
    listener: TcpListener,
    limit: bool,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if limit && !admit(&shared, peer) {
            continue;
        }
        let _ = stream.set_nodelay(true);
        handle(stream, peer);
    }
}

/// Completes a TLS handshake within `timeout`; failures are logged at
/// debug level (they are the client's problem, not the broker's).
pub async fn tls_handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Takes a connection slot, or refuses when the broker is at its limit.
/// The slot is counted by the session itself; this only checks.
fn admit(shared: &Shared, peer: SocketAddr) -> bool {
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

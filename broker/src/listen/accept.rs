//! The accept loop every listener shares: stop on shutdown, back off on
//! accept errors, enforce the connection limit, TCP_NODELAY, and a TLS
//! handshake under a timeout inside the connection's own task.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::SharedRef;
use super::slots::{self, Refused, Slot};
use crate::metrics;
use crate::server::Shared;

/// Accepts until shutdown and passes each admitted connection to `handle`
/// (which spawns its own task, so nothing a client does can stall the loop).
/// `limit` makes each socket take a connection slot (see [`slots`]), handed
/// to `handle` to keep for the socket's life; the admin listener takes none.
pub async fn run(
    shared: SharedRef,
    listener: TcpListener,
    limit: bool,
    mut handle: impl FnMut(TcpStream, SocketAddr, Option<Slot>),
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
        let slot = if limit {
            match slots::take(&shared, peer.ip()) {
                Ok(s) => Some(s),
                Err(why) => {
                    metrics::inc(&shared.metrics.connections_refused);
                    refused_log(&shared, peer, why);
                    continue;
                }
            }
        } else {
            None
        };
        let _ = stream.set_nodelay(true);
        handle(stream, peer, slot);
    }
}

fn refused_log(shared: &Shared, peer: SocketAddr, why: Refused) {
    if let Some(suppressed) = shared.refusal_log.take(std::time::Instant::now()) {
        match why {
            Refused::Total => {
                tracing::warn!(%peer, suppressed, "connection limit reached; refusing")
            }
            Refused::PerAddress => {
                tracing::warn!(%peer, suppressed, "too many connections from this address; refusing")
            }
        }
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

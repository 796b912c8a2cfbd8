//! MQTT over TCP and over TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{SharedRef, admit};
use crate::listen::transport::{StreamTransport, TcpTransport};
use crate::session::connection;

/// Accepts until shutdown. TLS handshakes run in the connection's own task
/// under a timeout, so a client that stalls mid-handshake never holds up
/// the accept loop.
pub async fn accept_loop(
    shared: SharedRef,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let acceptor = tls.map(TlsAcceptor::from);
    let handshake_timeout = Duration::from_secs(shared.config.limits.connect_timeout);
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
        if !admit(&shared, peer) {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => connection::serve(shared, TcpTransport(stream), peer).await,
                Some(acc) => {
                    match tokio::time::timeout(handshake_timeout, acc.accept(stream)).await {
                        Ok(Ok(tls)) => connection::serve(shared, StreamTransport(tls), peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

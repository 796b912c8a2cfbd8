//! The HTTP listener (plain or TLS): MQTT over WebSocket at `/mqtt`, health
//! endpoints, and the place later issues hang `/broker/` and native
//! WebSocket topic streams on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{SharedRef, admit};
use crate::listen::ws::WsTransport;
use crate::session::connection;

/// The client's address, attached to each HTTP connection's requests.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub fn router(shared: SharedRef) -> Router {
    Router::new()
        .route("/mqtt", get(mqtt_ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(shared)
}

async fn mqtt_ws(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let max = shared.config.limits.max_packet_size as usize;
    ws.protocols(["mqtt", "mqttv3.1"])
        .max_message_size(max.saturating_add(16))
        .max_frame_size(max.saturating_add(16))
        .on_upgrade(move |socket| connection::serve(shared, WsTransport(socket), peer))
}

/// Serves `app` on `listener` until shutdown; with `tls`, each connection
/// first completes a TLS handshake (under the connect timeout, in its own
/// task).
pub async fn serve(
    shared: SharedRef,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limit: bool,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let acceptor = tls.map(TlsAcceptor::from);
    let timeout = Duration::from_secs(shared.config.limits.connect_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
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
        let svc = TowerToHyperService::new(app.clone().layer(Extension(Peer(peer))));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new()).header_read_timeout(timeout);
                b
            };
            let result = match acceptor {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await
                }
                Some(acc) => match tokio::time::timeout(timeout, acc.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        builder
                            .serve_connection(TokioIo::new(tls), svc)
                            .with_upgrades()
                            .await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

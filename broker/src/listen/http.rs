//! The HTTP listener (plain or TLS): MQTT over WebSocket at `/mqtt`, health
//! endpoints, and the HTTP interface (`crate::http`: `/broker/` and native
//! WebSocket topic streams). Over TLS it speaks HTTP/2 as well (ALPN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::slots::SlotCell;
use super::{SharedRef, accept};
use crate::listen::ws::WsTransport;
use crate::metrics::Listener;
use crate::session::connection;

/// The client's address, attached to each HTTP connection's requests.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub fn router(shared: SharedRef) -> Router {
    let app = Router::new()
        .route("/mqtt", get(mqtt_ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .merge(crate::http::routes(shared.clone()));
    crate::http::with_metrics(app, shared)
}

async fn mqtt_ws(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    Extension(cell): Extension<SlotCell>,
    Extension(listener): Extension<Listener>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let max = shared.limits().max_packet_size as usize;
    // The socket's slot moves with it into the WebSocket task.
    let slot = cell.take();
    ws.protocols(["mqtt", "mqttv3.1"])
        // tungstenite zero-fills its read buffer on every poll; 128 KiB by
        // default, which costs more than the MQTT packets it reads.
        .read_buffer_size(16 * 1024)
        .max_message_size(max.saturating_add(16))
        .max_frame_size(max.saturating_add(16))
        .on_upgrade(move |socket| {
            connection::serve(shared, WsTransport(socket), peer, listener, slot)
        })
}

/// Concurrent requests one HTTP/2 connection may have open: each is a
/// task, so one client cannot open an unbounded number (hyper's default is
/// 200 too, but set here so it is a decision, not an accident).
const H2_STREAMS: u32 = 200;

/// Serves `app` on `listener` until shutdown; with `tls`, each connection
/// first completes a TLS handshake. `limit` applies the connection limit
/// (the MQTT-carrying listeners, not admin).
pub async fn serve(
    shared: SharedRef,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limit: bool,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let kind = if acceptor.is_some() {
        Listener::Https
    } else {
        Listener::Http
    };
    let timeout = Duration::from_secs(shared.limits().connect_timeout);
    accept::run(shared, listener, limit, move |stream, peer, slot| {
        let svc = TowerToHyperService::new(
            app.clone()
                .layer(Extension(Peer(peer)))
                .layer(Extension(kind))
                .layer(Extension(SlotCell::new(slot))),
        );
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout);
                    let io = TokioIo::new(stream);
                    builder
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                        .map_err(|e| e.to_string())
                }
                Some(acc) => {
                    let Some(tls) = accept::tls_handshake(&acc, stream, peer, timeout).await else {
                        return;
                    };
                    // HTTP/1.1 or HTTP/2, as ALPN agreed.
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout);
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(H2_STREAMS);
                    let io = TokioIo::new(tls);
                    builder
                        .serve_connection_with_upgrades(io, svc)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    })
    .await;
}

//! MQTT over TCP and over TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{SharedRef, accept};
use crate::listen::transport::{StreamTransport, TcpTransport};
use crate::metrics::Listener;
use crate::session::connection;

pub async fn accept_loop(
    shared: SharedRef,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let timeout = Duration::from_secs(shared.limits().connect_timeout);
    let s = shared.clone();
    accept::run(shared, listener, true, move |stream, peer, slot| {
        let shared = s.clone();
        // Two separate task types: a plain connection's task must not be
        // sized for the TLS state it will never have.
        match &acceptor {
            None => {
                tokio::spawn(connection::serve(
                    shared,
                    TcpTransport::new(stream),
                    peer,
                    Listener::Mqtt,
                    slot,
                ));
            }
            Some(acc) => {
                let acc = acc.clone();
                tokio::spawn(async move {
                    if let Some(tls) = accept::tls_handshake(&acc, stream, peer, timeout).await {
                        let t = StreamTransport(tls);
                        connection::serve(shared, t, peer, Listener::Mqtts, slot).await;
                    }
                });
            }
        }
    })
    .await;
}

//! MQTT over WebSocket: binary frames carry the MQTT byte stream.

use std::io;

use axum::extract::ws::{Message, WebSocket};
use bytes::{Bytes, BytesMut};

use super::transport::{CLOSE_DEADLINE, Transport};

pub struct WsTransport(pub WebSocket);

impl Transport for WsTransport {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.recv().await {
                Some(Ok(Message::Binary(b))) => {
                    if b.is_empty() {
                        continue;
                    }
                    buf.extend_from_slice(&b);
                    return Ok(b.len());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(_))) => {
                    // MQTT-6.0.0-1: MQTT must travel in binary frames.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    ));
                }
                Some(Ok(Message::Close(_))) | None => return Ok(0),
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.0
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self, linger: bool) {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
            if self.0.send(Message::Close(None)).await.is_err() || !linger {
                return;
            }
            // Until the client's Close (or the deadline): the WebSocket
            // closing handshake, and any frames it still had in flight.
            while let Some(Ok(m)) = self.0.recv().await {
                if matches!(m, Message::Close(_)) {
                    return;
                }
            }
        })
        .await;
    }
}

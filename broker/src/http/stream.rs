//! Native WebSocket topic streams (EVRYTHNG style): upgrading any path other
//! than `/mqtt` and `/broker/…` subscribes the socket to the topic filter
//! the path names. Every matching message becomes one frame; frames the
//! client sends are published to the path's topic.
//!
//! Everything that can refuse a stream is decided before the upgrade, so a
//! bad token or a forbidden filter is a plain 403 the browser can see,
//! never a 101 followed by a close. After the upgrade the stream is a
//! subscriber like any other: the same queue caps and backpressure, the
//! same live ACL changes (a revoked token's streams close within the
//! bundle's reload time), plus pings so dead peers are noticed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, close_code};
use axum::extract::{Extension, State, WebSocketUpgrade};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use starling_codec::{ByteString, QoS};
use starling_model::acl::Principal;
use tokio::time::{Instant, MissedTickBehavior};

use super::credentials;
use super::error::ApiError;
use super::request::{self, Envelope, Params, STREAM_OPTIONS, TopicKind};
use super::subscriber::{WebSubscriber, await_room};
use crate::listen::SharedRef;
use crate::listen::http::Peer;
use crate::listen::slots::SlotCell;
use crate::logging::Shown;
use crate::metrics;
use crate::router::{Delivery, Message};
use crate::server::Shared;

/// Read buffer of a stream's socket: clients send little on a stream.
const STREAM_READ_BUFFER: usize = 4 * 1024;
/// Deliveries turned into frames per wake-up before the socket is flushed.
const FRAME_BATCH: usize = 64;
/// ... or this many payload bytes: the most that waits in the socket's
/// write buffer (beyond the queue's own caps).
const BATCH_BYTES: usize = 64 * 1024;
/// A client that takes longer than this to accept one batch is stalled.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// The fallback route: a WebSocket upgrade becomes a topic stream, anything
/// else is a 404.
pub async fn fallback(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    Extension(cell): Extension<SlotCell>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return ApiError::NotFound.into_response();
    };
    if method != Method::GET {
        return ApiError::NotFound.into_response();
    }
    match admit(&shared, peer, &uri, &headers) {
        Ok((filter, params, principal)) => {
            let slot = cell.take();
            let max = shared.config.web.max_body_bytes;
            // Subscribed before the 101 goes out: a message published the
            // moment the client sees the socket open is not missed. If the
            // upgrade fails, dropping the closure unsubscribes.
            let grant = principal.grant_subscribe(&filter);
            let sub = WebSubscriber::open(&shared, &principal, &filter, grant, params.pub_states);
            sub.send_initial();
            ws.max_message_size(max)
                .max_frame_size(max)
                // tungstenite zero-fills its read buffer on every poll of
                // the socket: at the 128 KiB default that memset was half of
                // a stream's CPU per delivery (BENCHMARKS.md, g-ws-fanout).
                .read_buffer_size(STREAM_READ_BUFFER)
                .on_upgrade(move |socket| async move {
                    let _slot = slot;
                    run(shared, socket, sub, filter, params, principal, peer).await;
                })
        }
        // Every refusal of a stream is a 403 (EVRYTHNG: "the Platform
        // responds to the initial GET request with 403 Forbidden"), except
        // malformed requests and rate limiting.
        Err(e @ (ApiError::BadRequest { .. } | ApiError::RateLimited)) => e.into_response(),
        Err(ApiError::Unauthorized(m)) => ApiError::Forbidden(m).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Everything decided before the upgrade: the filter, the options and the
/// principal, which must be allowed to subscribe to the filter.
fn admit(
    shared: &Shared,
    peer: std::net::SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Params, Arc<Principal>), ApiError> {
    let web = &shared.config.web;
    let tail = uri.path().strip_prefix('/').unwrap_or_default();
    let filter = request::topic_from_path(tail)?;
    request::check_topic(
        &filter,
        TopicKind::Filter,
        &shared.web_policy,
        shared.limits().max_topic_levels,
    )?;
    shared
        .check_filter(&filter, &shared.limits())
        .map_err(|e| ApiError::bad("topic_policy", format!("{e}.")))?;
    let params = request::parse_params(
        uri.query(),
        STREAM_OPTIONS,
        Duration::from_secs(web.max_wait),
    )?;
    let creds = credentials::from_request(headers, params.access_token.as_deref())?;
    let principal = credentials::authenticate(shared, &creds, peer)?;
    if !principal.may_subscribe(&filter) {
        metrics::inc(&shared.metrics.acl_refusals);
        tracing::debug!(%peer, token = ?principal.name(), filter = %Shown(&filter), "topic stream refused by ACL");
        return Err(ApiError::Forbidden(
            "the token may not subscribe to this topic.".into(),
        ));
    }
    Ok((filter, params, principal))
}

#[derive(Serialize)]
struct JsonFrame<'a> {
    topic: &'a str,
    payload: String,
    /// `utf8` or `base64`: how `payload` carries the bytes.
    encoding: &'static str,
    qos: u8,
    retain: bool,
}

/// One delivery as one frame.
fn frame(d: &Delivery, envelope: Envelope) -> WsMessage {
    let payload = &d.msg.payload;
    match envelope {
        // One UTF-8 check, and no copy either way.
        Envelope::Raw => match Utf8Bytes::try_from(payload.clone()) {
            Ok(t) => WsMessage::Text(t),
            Err(_) => WsMessage::Binary(payload.clone()),
        },
        Envelope::Json => {
            let (payload, encoding) = match std::str::from_utf8(payload) {
                Ok(s) => (s.to_owned(), "utf8"),
                Err(_) => (
                    base64::engine::general_purpose::STANDARD.encode(payload),
                    "base64",
                ),
            };
            let f = JsonFrame {
                topic: &d.msg.topic,
                payload,
                encoding,
                qos: d.msg.qos as u8,
                retain: d.retain,
            };
            WsMessage::Text(serde_json::to_string(&f).unwrap_or_default().into())
        }
    }
}

/// Why a stream ended, as the close frame tells the client.
fn close(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

async fn run(
    shared: SharedRef,
    socket: WebSocket,
    mut sub: WebSubscriber,
    filter: String,
    params: Params,
    mut principal: Arc<Principal>,
    peer: std::net::SocketAddr,
) {
    metrics::inc(&shared.metrics.ws_streams);
    let (mut tx, mut rx) = socket.split();
    let mut shutdown = shared.shutdown.subscribe();
    let ping_every = Duration::from_secs(shared.config.web.ping_interval);
    let mut ping = tokio::time::interval_at(
        Instant::now() + ping_every.max(Duration::from_secs(1)),
        ping_every.max(Duration::from_secs(1)),
    );
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered = 0u8;
    // A wildcard path can be read but not written to.
    let plain = !filter.contains(['+', '#']);
    let mut may_publish: Option<bool> = None;
    let mut batch = Vec::with_capacity(FRAME_BATCH);
    let link = sub.link.clone();
    let end: Option<WsMessage> = loop {
        let notified = link.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        sub.drain(&mut batch, FRAME_BATCH, BATCH_BYTES);
        if !batch.is_empty() {
            let send = async {
                for d in batch.drain(..) {
                    tx.feed(frame(&d, params.envelope)).await?;
                }
                tx.flush().await
            };
            match tokio::time::timeout(WRITE_STALL, send).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => break None,
                Err(_) => break Some(close(close_code::POLICY, "stalled: frames were not read")),
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Some(close(close_code::AWAY, "server shutting down")),
            _ = &mut notified => {
                if link.take_recheck() {
                    match shared.auth.current().refresh(&principal, std::time::SystemTime::now()) {
                        Ok(p) => {
                            if !sub.regrant(&p) {
                                break Some(close(close_code::POLICY, "no longer allowed to read this topic"));
                            }
                            principal = p;
                            may_publish = None;
                        }
                        Err(_) => break Some(close(close_code::POLICY, "token revoked")),
                    }
                }
            }
            _ = ping.tick(), if !ping_every.is_zero() => {
                if unanswered >= 2 {
                    break None;
                }
                unanswered += 1;
                if tx.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
            m = rx.next() => {
                unanswered = 0;
                let payload = match m {
                    Some(Ok(WsMessage::Text(t))) => Bytes::from(t),
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(WsMessage::Close(_))) | None => break None,
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "topic stream read failed");
                        break Some(close(close_code::SIZE, "frame too large or malformed"));
                    }
                };
                let allowed = *may_publish.get_or_insert_with(|| plain && principal.may_publish(&filter));
                if !allowed {
                    metrics::inc(&shared.metrics.acl_refusals);
                    break Some(close(
                        close_code::POLICY,
                        if plain { "the token may not publish to this topic" } else { "cannot publish to a wildcard topic" },
                    ));
                }
                metrics::inc(&shared.metrics.messages_in[params.qos as usize]);
                let msg = Message {
                    topic: ByteString::from(filter.as_str()),
                    payload,
                    qos: params.qos,
                    retain: false,
                    properties: None,
                    expires_at: None,
                    origin: sub.key(),
                };
                let mut scratch = Vec::new();
                let routed = shared.router.publish(msg, &mut scratch);
                if params.qos != QoS::AtMostOnce {
                    await_room(&routed).await;
                }
            }
        }
    };
    drop(sub);
    if let Some(c) = end {
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(c)).await;
    }
    metrics::dec(&shared.metrics.ws_streams);
}

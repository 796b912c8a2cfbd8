//! `POST /broker/<topic>`: the body is published as one message.
//!
//! Checks run cheapest first and before the body is read — path, query,
//! credentials, ACL — so a refused client never makes the broker buffer its
//! upload. The body is then read under the size cap and a deadline. The
//! response comes after the router has queued the message for every
//! matching subscriber (and, at QoS 1/2, after a congested subscriber made
//! room or a second passed), which is what makes one client's messages
//! arrive in order when it waits for each response.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use starling_codec::ByteString;

use super::credentials;
use super::error::ApiError;
use super::request::{self, POST_OPTIONS, Params, TopicKind};
use super::subscriber::await_room;
use crate::listen::SharedRef;
use crate::listen::http::Peer;
use crate::logging::Shown;
use crate::metrics::{self, DropReason};
use crate::router::Message;
use crate::server::Shared;

pub async fn publish(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let web = &shared.config.web;
    let (max, secs) = (web.max_body_bytes, web.body_timeout);
    let outcome = match admit(&shared, peer, &uri, &headers) {
        Ok(ok) => ok,
        // Refused before the body was read: read it anyway (within the same
        // caps) so the connection stays usable for the client's next
        // request; if that fails, say the connection ends here.
        Err(e) => {
            let keep = read_body(&headers, body, max, secs).await.is_ok();
            return with_close(e.into_response(), !keep);
        }
    };
    let (topic, params) = outcome;
    let payload = match read_body(&headers, body, max, secs).await {
        Ok(p) => p,
        // The rest of an oversized, stalled or broken upload is not read:
        // the connection cannot be reused.
        Err(e) => return with_close(e.into_response(), true),
    };
    route(&shared, topic, params, payload)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Marks a response as the connection's last (RFC 9112 section 9.6) when
/// the request body was left unread.
fn with_close(mut resp: Response, close: bool) -> Response {
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Everything decided before the body is read: the topic, the options and
/// the principal's right to publish there.
fn admit(
    shared: &Shared,
    peer: std::net::SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Params), ApiError> {
    let web = &shared.config.web;
    let tail = uri.path().strip_prefix("/broker").unwrap_or_default();
    let tail = tail.strip_prefix('/').unwrap_or(tail);
    let topic = request::topic_from_path(tail)?;
    request::check_topic(
        &topic,
        TopicKind::Name,
        &shared.web_policy,
        shared.limits().max_topic_levels,
    )?;
    shared
        .check_topic(&topic, &shared.limits())
        .map_err(|e| ApiError::bad("topic_policy", format!("{e}.")))?;
    let params =
        request::parse_params(uri.query(), POST_OPTIONS, Duration::from_secs(web.max_wait))?;
    let creds = credentials::from_request(headers, params.access_token.as_deref())?;
    let principal = credentials::authenticate(shared, &creds, peer)?;
    if !principal.may_publish(&topic) {
        metrics::inc(&shared.metrics.acl_refusals);
        tracing::debug!(%peer, token = ?principal.name(), topic = %Shown(&topic), "HTTP publish refused by ACL");
        return Err(ApiError::Forbidden(
            "the token may not publish to this topic.".into(),
        ));
    }
    Ok((topic, params))
}

async fn route(
    shared: &Shared,
    topic: String,
    params: Params,
    payload: Bytes,
) -> Result<Response, ApiError> {
    metrics::inc(&shared.metrics.messages_in[params.qos as usize]);
    let msg = Message {
        topic: ByteString::from(topic),
        payload,
        qos: params.qos,
        retain: params.retained,
        properties: None,
        expires_at: None,
        origin: 0,
    };
    let mut scratch = Vec::new();
    let routed = shared.router.publish(msg, &mut scratch);
    if routed.retained_full {
        shared
            .metrics
            .dropped(params.qos as usize, DropReason::RetainedFull);
        return Err(ApiError::Unavailable(
            "the retained message store is full; the message was not published.".into(),
        ));
    }
    if params.qos != starling_codec::QoS::AtMostOnce {
        await_room(&routed).await;
    }
    // A 200 for a QoS 1/2 or retained publish means what a PUBACK means:
    // stored under the configured durability.
    if (params.qos != starling_codec::QoS::AtMostOnce || params.retained)
        && !routed.span.is_empty()
        && shared.router.store.durable(routed.span).await.is_err()
    {
        metrics::inc(&shared.metrics.store_refusals);
        return Err(ApiError::Unavailable(
            "the broker could not store the message because its disk is full or failing.".into(),
        ));
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"matched\":{}}}", routed.matched),
    )
        .into_response())
}

/// Reads the whole body, refusing it (413) as soon as it is known to be
/// larger than `max` — from `Content-Length` before a byte is read, or
/// while streaming a chunked upload — and (408) if it takes longer than
/// `timeout_secs`. Memory held is at most `max` plus one chunk.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    timeout_secs: u64,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::TooLarge { max });
    }
    let read = async {
        let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| ApiError::BodyFailed)?;
            if buf.len() + chunk.len() > max {
                return Err(ApiError::TooLarge { max });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(Duration::from_secs(timeout_secs), read)
        .await
        .map_err(|_| ApiError::BodyTimeout { secs: timeout_secs })?
}

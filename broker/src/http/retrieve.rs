//! `GET /broker/<topic-or-filter>`: the latest message on a matching topic,
//! from the last-value cache (or, with `?retained=true`, the retained
//! store). When nothing is known yet the request waits for the next
//! matching message, up to `?wait=` seconds, then answers 204.
//!
//! The read check is the one every subscription gets: a filter must be
//! granted, and a filtered grant (a deny rule overlaps it) withholds the
//! denied topics from the answer as it would from an MQTT subscriber.

use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use starling_model::acl::Grant;
use tokio::time::Instant;

use super::credentials;
use super::error::ApiError;
use super::request::{self, GET_OPTIONS, TopicKind};
use super::subscriber::WebSubscriber;
use crate::listen::SharedRef;
use crate::listen::http::Peer;
use crate::logging::Shown;
use crate::metrics;
use crate::router::Message;

/// Response headers that describe the message (the body is its payload).
pub const TOPIC_HEADER: &str = "mqtt-topic";
pub const QOS_HEADER: &str = "mqtt-qos";
pub const RETAIN_HEADER: &str = "mqtt-retain";

/// Header values must be visible ASCII: other topic characters (possible
/// from MQTT publishers) are percent-encoded, as are `%` itself and space.
const HEADER_UNSAFE: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(0x7f);

pub async fn retrieve(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let web = &shared.config.web;
    let tail = uri.path().strip_prefix("/broker").unwrap_or_default();
    let tail = tail.strip_prefix('/').unwrap_or(tail);
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
    let params =
        request::parse_params(uri.query(), GET_OPTIONS, Duration::from_secs(web.max_wait))?;
    let creds = credentials::from_request(&headers, params.access_token.as_deref())?;
    let principal = credentials::authenticate(&shared, &creds, peer)?;
    let grant = principal.grant_subscribe(&filter);
    if !grant.allowed() {
        metrics::inc(&shared.metrics.acl_refusals);
        tracing::debug!(%peer, token = ?principal.name(), filter = %Shown(&filter), "HTTP retrieve refused by ACL");
        return Err(ApiError::Forbidden(
            "the token may not read this topic.".into(),
        ));
    }
    let readable = |t: &str| grant == Grant::Whole || principal.may_receive(t);
    let wait = params
        .wait
        .unwrap_or(Duration::from_millis(web.default_wait_ms));
    // Subscribed before looking, so a message published in between is not
    // missed; only when there is a wait to do.
    let waiting =
        (!wait.is_zero()).then(|| WebSubscriber::open(&shared, &principal, &filter, grant, false));
    if let Some(m) = shared.router.latest(&filter, params.retained, readable) {
        return Ok(message_response(&m));
    }
    let Some(mut sub) = waiting else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let link = sub.link.clone();
    loop {
        let notified = link.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if sub.link.kicked().is_some() {
            // Shutting down.
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        if sub.link.take_recheck() {
            // The bundle changed while waiting: answer under the new rules.
            let refreshed = shared
                .auth
                .current()
                .refresh(&principal, std::time::SystemTime::now());
            let Ok(p) = refreshed else {
                return Err(ApiError::Unauthorized(
                    "the token was revoked while the request waited.".into(),
                ));
            };
            if !sub.regrant(&p) {
                return Err(ApiError::Forbidden(
                    "the token may no longer read this topic.".into(),
                ));
            }
        }
        sub.drain(&mut got, usize::MAX, usize::MAX);
        if let Some(d) = got.iter().find(|d| !params.retained || d.msg.retain) {
            return Ok(message_response(&d.msg));
        }
        got.clear();
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// 200 with the payload as body and the message described in headers.
pub fn message_response(m: &Message) -> Response {
    let mut resp = (StatusCode::OK, m.payload.clone()).into_response();
    let h = resp.headers_mut();
    let topic = utf8_percent_encode(&m.topic, HEADER_UNSAFE).to_string();
    if let Ok(v) = HeaderValue::from_str(&topic) {
        h.insert(HeaderName::from_static(TOPIC_HEADER), v);
    }
    h.insert(
        HeaderName::from_static(QOS_HEADER),
        HeaderValue::from(u16::from(m.qos as u8)),
    );
    h.insert(
        HeaderName::from_static(RETAIN_HEADER),
        HeaderValue::from_static(if m.retain { "true" } else { "false" }),
    );
    let ct = m
        .properties
        .as_ref()
        .and_then(|p| p.content_type.as_ref())
        .and_then(|ct| HeaderValue::from_str(ct).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_TYPE, ct);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

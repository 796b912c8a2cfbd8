//! EMQX v4's REST API under `/api/v4`: every answer is `{"code": 0,
//! "data": …}` (lists add `"meta": {page, limit, count, hasnext}`), errors
//! are `{"code", "message"}` with EMQX's return codes (107 missing
//! parameter, 108 parameter error, 109 not JSON, 112 client offline, 115
//! illegal topic) and HTTP 400/404/500. Client and subscription data come
//! from [`views`], the one source every API style maps from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use starling_codec::{ByteString, QoS};
use utoipa::ToSchema;

use super::views::{self, ClientView, SubscriptionView};
use crate::listen::SharedRef;
use crate::metrics::{self, Limit};
use crate::router::{Message, SubOptions};
use crate::server::Shared;
use crate::session::Session;
use crate::store::TicketSpan;

/// EMQX's return codes used here.
pub mod code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 102;
    /// A token or ACL does not exist (EMQX: "user does not exist").
    pub const NOT_FOUND: u32 = 105;
    pub const MISSING_PARAMETER: u32 = 107;
    pub const PARAMETER_ERROR: u32 = 108;
    pub const NOT_JSON: u32 = 109;
    /// The bundle cannot be written on this broker (EMQX: "plugin is
    /// closed", the nearest of its codes): operator-managed or none.
    pub const READ_ONLY: u32 = 111;
    pub const CLIENT_OFFLINE: u32 = 112;
    /// A token or ACL by that name exists (EMQX: "user already exists").
    pub const EXISTS: u32 = 113;
    pub const ILLEGAL_TOPIC: u32 = 115;
}

/// `_limit` when none is given, and the most one page holds (EMQX's own).
pub const DEFAULT_LIMIT: u64 = 10_000;

static STARTED: OnceLock<(Instant, SystemTime)> = OnceLock::new();

/// Notes the start time `/brokers` reports the uptime from.
pub fn mark_started() {
    STARTED.get_or_init(|| (Instant::now(), SystemTime::now()));
}

// ---------------------------------------------------------------- shapes

/// An error: EMQX's return code and one sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorReply {
    pub code: u32,
    pub message: String,
}

/// Success without data.
#[derive(Debug, Serialize, ToSchema)]
pub struct OkReply {
    pub code: u32,
}

/// Paging of a list answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Meta {
    pub page: u64,
    pub limit: u64,
    /// Items matching the filters, over all pages.
    pub count: u64,
    pub hasnext: bool,
}

/// One client in EMQX's field names.
#[derive(Debug, Serialize, ToSchema)]
pub struct Client {
    pub node: String,
    pub clientid: String,
    pub username: Option<String>,
    pub proto_name: String,
    /// 4 (MQTT 3.1.1) or 5.
    pub proto_ver: u8,
    pub ip_address: Option<String>,
    pub port: Option<u16>,
    pub is_bridge: bool,
    pub connected: bool,
    /// `YYYY-MM-DD HH:MM:SS` (UTC).
    pub connected_at: Option<String>,
    pub zone: String,
    pub keepalive: u16,
    pub clean_start: bool,
    /// Session expiry interval, seconds.
    pub expiry_interval: u64,
    pub subscriptions_cnt: u64,
    pub max_subscriptions: u64,
    pub inflight: u64,
    pub mqueue_len: u64,
    pub max_mqueue: u64,
    /// PUBLISH packets received from the client.
    pub recv_msg: u64,
    /// PUBLISH packets sent to the client.
    pub send_msg: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientsReply {
    pub code: u32,
    pub data: Vec<Client>,
    pub meta: Meta,
}

/// One client (`data` holds it alone, as EMQX answers).
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientReply {
    pub code: u32,
    pub data: Vec<Client>,
}

/// One subscription in EMQX's field names.
#[derive(Debug, Serialize, ToSchema)]
pub struct Subscription {
    pub node: String,
    pub clientid: String,
    /// As the client sent it, `$share/<group>/` included.
    pub topic: String,
    pub qos: u8,
    /// No Local (0 or 1).
    pub nl: u8,
    /// Retain as Published (0 or 1).
    pub rap: u8,
    /// Retain Handling (0, 1 or 2).
    pub rh: u8,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionsReply {
    pub code: u32,
    pub data: Vec<Subscription>,
    pub meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientSubscriptionsReply {
    pub code: u32,
    pub data: Vec<Subscription>,
}

/// A topic filter in use by at least one subscriber.
#[derive(Debug, Serialize, ToSchema)]
pub struct Route {
    pub topic: String,
    pub node: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoutesReply {
    pub code: u32,
    pub data: Vec<Route>,
    pub meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Broker {
    /// Now, `YYYY-MM-DD HH:MM:SS` (UTC).
    pub datetime: String,
    pub node: String,
    pub node_status: String,
    pub otp_release: String,
    pub sysdescr: String,
    pub uptime: String,
    pub version: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BrokersReply {
    pub code: u32,
    pub data: Vec<Broker>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeStats {
    pub node: String,
    /// `connections.count`, `sessions.count`, `subscriptions.count`, …
    pub stats: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatsReply {
    pub code: u32,
    pub data: Vec<NodeStats>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeMetrics {
    pub node: String,
    /// `messages.received`, `messages.sent`, `client.connected`, …
    pub metrics: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetricsReply {
    pub code: u32,
    pub data: Vec<NodeMetrics>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigsReply {
    pub code: u32,
    /// The configuration as NanoMQ's req 11 shows it: NanoMQ's names where
    /// one exists, ours under `starling`; secrets never.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// The outcome of one item of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub topic: Option<String>,
    pub clientid: Option<String>,
    pub code: u32,
    pub message: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchReply {
    pub code: u32,
    pub data: Vec<BatchItem>,
}

/// `POST /mqtt/publish`: `topic` or `topics` (comma-separated) is required.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(default)]
pub struct PublishRequest {
    pub topic: Option<String>,
    /// Several topics, comma-separated.
    pub topics: Option<String>,
    /// The publisher's client id (informational).
    pub clientid: Option<String>,
    pub payload: Option<String>,
    /// `plain` (default) or `base64`.
    pub encoding: Option<String>,
    /// 0 (default), 1 or 2.
    pub qos: Option<u8>,
    pub retain: Option<bool>,
}

/// `POST /mqtt/subscribe` and `/mqtt/unsubscribe`: on behalf of the
/// connected client `clientid`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(default)]
pub struct SubscribeRequest {
    pub topic: Option<String>,
    /// Several filters, comma-separated (subscribe only).
    pub topics: Option<String>,
    pub clientid: Option<String>,
    /// 0 (default), 1 or 2 (subscribe only).
    pub qos: Option<u8>,
}

// ---------------------------------------------------------------- helpers

pub fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorReply {
            code,
            message: message.into(),
        }),
    )
        .into_response()
}

/// A refusal: EMQX's return code and one sentence.
pub(super) type Refusal = (u32, String);

/// The answer to a refusal, with the HTTP status its code goes with.
pub(super) fn refuse((c, m): Refusal) -> Response {
    error(status_of(c), c, m)
}

fn bad(code: u32, message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, code, message)
}

fn offline(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        code::CLIENT_OFFLINE,
        format!("client {id:?} is not connected."),
    )
}

pub(super) fn ok<T: Serialize>(body: T) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

fn node(shared: &Shared) -> String {
    let host = shared
        .config
        .mqtt
        .bind
        .rsplit_once(':')
        .map_or("127.0.0.1", |(h, _)| h)
        .trim_matches(['[', ']']);
    let host = if host.is_empty() || host == "0.0.0.0" || host == "::" {
        "127.0.0.1"
    } else {
        host
    };
    format!("starling@{host}")
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the Unix epoch.
pub fn datetime(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn sum(c: &[std::sync::atomic::AtomicU64; 3]) -> u64 {
    c.iter().map(load).sum()
}

/// The query string's pairs (later duplicates win).
pub(super) fn query(q: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

pub(super) struct Page {
    page: u64,
    limit: u64,
}

pub(super) fn paging(q: &BTreeMap<String, String>) -> Result<Page, Refusal> {
    let num = |name: &str, default: u64| -> Result<u64, Refusal> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err((
                    code::PARAMETER_ERROR,
                    format!("{name} must be a whole number of at least 1."),
                )),
            },
        }
    };
    Ok(Page {
        page: num("_page", 1)?,
        limit: num("_limit", DEFAULT_LIMIT)?.min(DEFAULT_LIMIT),
    })
}

/// One page of `items` and its `meta`.
pub(super) fn page_of<T>(items: Vec<T>, p: &Page) -> (Vec<T>, Meta) {
    let count = items.len() as u64;
    let skip = (p.page - 1).saturating_mul(p.limit);
    let data: Vec<T> = items
        .into_iter()
        .skip(usize::try_from(skip).unwrap_or(usize::MAX))
        .take(p.limit as usize)
        .collect();
    let meta = Meta {
        page: p.page,
        limit: p.limit,
        count,
        hasnext: skip.saturating_add(p.limit) < count,
    };
    (data, meta)
}

fn client_of(shared: &Shared, node: &str, c: ClientView) -> Client {
    let addr = c
        .peer
        .as_deref()
        .and_then(|p| p.parse::<std::net::SocketAddr>().ok());
    let limits = shared.limits();
    Client {
        node: node.to_owned(),
        clientid: c.client_id,
        username: c.username,
        proto_name: "MQTT".into(),
        proto_ver: c.protocol,
        ip_address: addr.map(|a| a.ip().to_string()),
        port: addr.map(|a| a.port()),
        is_bridge: false,
        connected: c.connected,
        connected_at: c.connected_at.map(datetime),
        zone: "default".into(),
        keepalive: c.keepalive,
        clean_start: c.clean_start,
        expiry_interval: c.session_expiry,
        subscriptions_cnt: c.subscriptions as u64,
        max_subscriptions: limits.max_subscriptions_per_session as u64,
        inflight: c.inflight as u64,
        mqueue_len: c.queued as u64,
        max_mqueue: limits.max_queued_messages as u64,
        recv_msg: c.messages_received,
        send_msg: c.messages_sent,
    }
}

fn subscription_of(node: &str, v: SubscriptionView) -> Subscription {
    Subscription {
        node: node.to_owned(),
        clientid: v.client_id,
        topic: v.topic,
        qos: v.qos,
        nl: u8::from(v.no_local),
        rap: u8::from(v.retain_as_published),
        rh: v.retain_handling,
    }
}

fn client_path(p: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    p.map(|Path(id)| id).map_err(|e| {
        (
            code::PARAMETER_ERROR,
            format!("the client id in the path cannot be read: {e}."),
        )
    })
}

/// The body as JSON: 109 when it is not.
pub(super) fn json_body(body: &Bytes) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|_| {
        (
            code::NOT_JSON,
            "the request body is not valid JSON.".to_owned(),
        )
    })
}

fn parse<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, Refusal> {
    if !v.is_object() {
        return Err((
            code::PARAMETER_ERROR,
            "the request body must be a JSON object.".into(),
        ));
    }
    serde_json::from_value(v).map_err(|e| {
        (
            code::PARAMETER_ERROR,
            format!("the request body has a field of the wrong type: {e}."),
        )
    })
}

fn qos_of(q: Option<u8>) -> Result<QoS, Refusal> {
    match q.unwrap_or(0) {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        n => Err((
            code::PARAMETER_ERROR,
            format!("qos must be 0, 1 or 2, not {n}."),
        )),
    }
}

/// `topic` and/or the comma-separated `topics`; 107 when neither is given.
fn topics_of(topic: Option<String>, topics: Option<String>) -> Result<Vec<String>, Refusal> {
    let mut all: Vec<String> = topic.into_iter().collect();
    if let Some(t) = topics {
        all.extend(t.split(',').map(|s| s.trim().to_owned()));
    }
    all.retain(|t| !t.is_empty());
    if all.is_empty() {
        return Err((
            code::MISSING_PARAMETER,
            "topic (or topics) is missing.".into(),
        ));
    }
    Ok(all)
}

fn batch_items(body: &Bytes) -> Result<Vec<Value>, Refusal> {
    match json_body(body)? {
        Value::Array(items) if !items.is_empty() => Ok(items),
        Value::Array(_) => Err((code::MISSING_PARAMETER, "the batch is empty.".to_owned())),
        _ => Err((
            code::PARAMETER_ERROR,
            "the request body must be a JSON array of requests.".to_owned(),
        )),
    }
}

// ---------------------------------------------------------------- handlers

/// The broker node.
#[utoipa::path(get, path = "/api/v4/brokers", tag = "emqx",
    responses((status = 200, description = "This node", body = BrokersReply)))]
pub async fn brokers(State(shared): State<SharedRef>) -> Response {
    mark_started();
    let uptime = STARTED.get().map_or(0, |(i, _)| i.elapsed().as_secs());
    ok(BrokersReply {
        code: code::OK,
        data: vec![Broker {
            datetime: datetime(now_secs()),
            node: node(&shared),
            node_status: "Running".into(),
            otp_release: "n/a (Rust)".into(),
            sysdescr: "Starling MQTT broker".into(),
            uptime: uptime_text(uptime),
            version: env!("CARGO_PKG_VERSION").into(),
        }],
    })
}

fn uptime_text(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let mut parts = Vec::new();
    for (n, unit) in [(d, "days"), (h, "hours"), (m, "minutes")] {
        if n > 0 || !parts.is_empty() {
            parts.push(format!("{n} {unit}"));
        }
    }
    parts.push(format!("{s} seconds"));
    parts.join(", ")
}

/// Counts of connections, sessions, subscriptions, routes, retained.
#[utoipa::path(get, path = "/api/v4/stats", tag = "emqx",
    responses((status = 200, description = "This node's counts", body = StatsReply)))]
pub async fn stats(State(shared): State<SharedRef>) -> Response {
    let m = &shared.metrics;
    let sessions = shared.registry.all();
    let mut subs = 0u64;
    let mut shared_subs = 0u64;
    for s in &sessions {
        for v in views::subscriptions(s) {
            subs += 1;
            if v.topic.starts_with("$share/") {
                shared_subs += 1;
            }
        }
    }
    let routes = routes_in_use(&shared).len() as u64;
    let limits = shared.limits();
    let stats: BTreeMap<String, u64> = [
        ("connections.count", load(&m.connections_current)),
        ("connections.total", load(&m.connections_total)),
        ("sessions.count", sessions.len() as u64),
        (
            "sessions.persistent.limit",
            limits.max_persistent_sessions as u64,
        ),
        ("connections.limit", limits.max_connections as u64),
        ("subscriptions.count", subs),
        ("subscriptions.shared.count", shared_subs),
        ("subscribers.count", subs),
        ("topics.count", routes),
        ("routes.count", routes),
        ("retained.count", load(&m.retained)),
        ("retained.limit", limits.max_retained_messages as u64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    ok(StatsReply {
        code: code::OK,
        data: vec![NodeStats {
            node: node(&shared),
            stats,
        }],
    })
}

/// Counters under EMQX's names, from the broker's metrics.
#[utoipa::path(get, path = "/api/v4/metrics", tag = "emqx",
    responses((status = 200, description = "This node's counters", body = MetricsReply)))]
pub async fn metrics_view(State(shared): State<SharedRef>) -> Response {
    let m = &shared.metrics;
    let mut out: BTreeMap<String, u64> = [
        ("bytes.received", load(&m.bytes_in)),
        ("bytes.sent", load(&m.bytes_out)),
        ("messages.received", sum(&m.messages_in)),
        ("messages.sent", sum(&m.messages_out)),
        ("messages.dropped", sum(&m.messages_dropped)),
        ("messages.retained", load(&m.retained)),
        ("client.connected", load(&m.connections_total)),
        ("client.connack.refused", load(&m.connections_refused)),
        ("client.auth.failure", load(&m.auth_failures)),
        ("client.acl.deny", load(&m.acl_refusals)),
        ("client.keepalive.timeout", load(&m.keepalive_timeouts)),
        ("packets.malformed", load(&m.protocol_errors)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for q in 0..3 {
        out.insert(format!("messages.qos{q}.received"), load(&m.messages_in[q]));
        out.insert(format!("messages.qos{q}.sent"), load(&m.messages_out[q]));
        out.insert(
            format!("messages.qos{q}.dropped"),
            load(&m.messages_dropped[q]),
        );
    }
    ok(MetricsReply {
        code: code::OK,
        data: vec![NodeMetrics {
            node: node(&shared),
            metrics: out,
        }],
    })
}

/// Every client (online, and offline with a kept session), paged.
#[utoipa::path(get, path = "/api/v4/clients", tag = "emqx",
    params(
        ("_page" = Option<u64>, Query, description = "Page, from 1"),
        ("_limit" = Option<u64>, Query, description = "Items per page (default and most: 10000)"),
        ("clientid" = Option<String>, Query, description = "Only this client id"),
        ("username" = Option<String>, Query, description = "Only this username"),
        ("_like_clientid" = Option<String>, Query, description = "Client ids containing this"),
        ("_like_username" = Option<String>, Query, description = "Usernames containing this"),
    ),
    responses(
        (status = 200, description = "One page of clients", body = ClientsReply),
        (status = 400, description = "A paging parameter is not a whole number of at least 1", body = ErrorReply),
    ))]
pub async fn clients(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let q = query(q.as_deref());
    let p = match paging(&q) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let node = node(&shared);
    // Filtered on what the filters need, then only the requested page is
    // turned into client views: a page of 1,000 out of 10,000 clients does
    // a tenth of the work.
    let filtered = q.contains_key("username") || q.contains_key("_like_username");
    let matching: Vec<Arc<Session>> = views::sessions(&shared)
        .into_iter()
        .filter(|s| {
            let id = views::client_id(s);
            let user = if filtered { s.info().username } else { None };
            let user = user.as_deref().unwrap_or_default();
            q.get("clientid").is_none_or(|w| *w == id)
                && q.get("username").is_none_or(|w| w == user)
                && q.get("_like_clientid")
                    .is_none_or(|w| id.contains(w.as_str()))
                && q.get("_like_username")
                    .is_none_or(|w| user.contains(w.as_str()))
        })
        .collect();
    let (page, meta) = page_of(matching, &p);
    let data: Vec<Client> = page
        .iter()
        .map(|s| client_of(&shared, &node, views::client(s)))
        .collect();
    ok(ClientsReply {
        code: code::OK,
        data,
        meta,
    })
}

/// One client.
#[utoipa::path(get, path = "/api/v4/clients/{clientid}", tag = "emqx",
    params(("clientid" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The client", body = ClientReply),
        (status = 400, description = "The path cannot be read", body = ErrorReply),
        (status = 404, description = "No such client (112)", body = ErrorReply),
    ))]
pub async fn client(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return refuse(e),
    };
    let Some(s) = views::find(&shared, &id) else {
        return error(
            StatusCode::NOT_FOUND,
            code::CLIENT_OFFLINE,
            format!("no client {id:?} is known."),
        );
    };
    let node = node(&shared);
    ok(ClientReply {
        code: code::OK,
        data: vec![client_of(&shared, &node, views::client(&s))],
    })
}

/// Closes a client's connection with DISCONNECT reason 0x98
/// (administrative action).
#[utoipa::path(delete, path = "/api/v4/clients/{clientid}", tag = "emqx",
    params(("clientid" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The client is being disconnected", body = OkReply),
        (status = 400, description = "The path cannot be read", body = ErrorReply),
        (status = 404, description = "The client is not connected (112)", body = ErrorReply),
    ))]
pub async fn kick(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return refuse(e),
    };
    match views::find(&shared, &id).and_then(|s| views::link(&s)) {
        Some(link) => {
            tracing::info!(client = %id, "admin API disconnects a client");
            link.kick(starling_codec::reason::ADMINISTRATIVE_ACTION);
            ok(OkReply { code: code::OK })
        }
        None => offline(&id),
    }
}

/// Every subscription, paged.
#[utoipa::path(get, path = "/api/v4/subscriptions", tag = "emqx",
    params(
        ("_page" = Option<u64>, Query, description = "Page, from 1"),
        ("_limit" = Option<u64>, Query, description = "Items per page (default and most: 10000)"),
        ("clientid" = Option<String>, Query, description = "Only this client's"),
        ("topic" = Option<String>, Query, description = "Only this filter"),
        ("qos" = Option<u8>, Query, description = "Only this QoS"),
    ),
    responses(
        (status = 200, description = "One page of subscriptions", body = SubscriptionsReply),
        (status = 400, description = "A parameter is malformed", body = ErrorReply),
    ))]
pub async fn subscriptions(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let q = query(q.as_deref());
    let p = match paging(&q) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let qos = match q.get("qos").map(|v| v.parse::<u8>()) {
        None => None,
        Some(Ok(n)) if n <= 2 => Some(n),
        Some(_) => return bad(code::PARAMETER_ERROR, "qos must be 0, 1 or 2."),
    };
    let node = node(&shared);
    let items: Vec<Subscription> = views::sessions(&shared)
        .iter()
        .flat_map(|s| views::subscriptions(s))
        .filter(|v| {
            q.get("clientid").is_none_or(|w| *w == v.client_id)
                && q.get("topic").is_none_or(|w| *w == v.topic)
                && qos.is_none_or(|n| n == v.qos)
        })
        .map(|v| subscription_of(&node, v))
        .collect();
    let (data, meta) = page_of(items, &p);
    ok(SubscriptionsReply {
        code: code::OK,
        data,
        meta,
    })
}

/// One client's subscriptions (empty for an unknown client, as EMQX).
#[utoipa::path(get, path = "/api/v4/subscriptions/{clientid}", tag = "emqx",
    params(("clientid" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The client's subscriptions", body = ClientSubscriptionsReply),
        (status = 400, description = "The path cannot be read", body = ErrorReply),
    ))]
pub async fn client_subscriptions(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return refuse(e),
    };
    let node = node(&shared);
    let data = views::find(&shared, &id)
        .map(|s| {
            views::subscriptions(&s)
                .into_iter()
                .map(|v| subscription_of(&node, v))
                .collect()
        })
        .unwrap_or_default();
    ok(ClientSubscriptionsReply {
        code: code::OK,
        data,
    })
}

/// The topic filters in use (without `$share/<group>/`), each once.
fn routes_in_use(shared: &Shared) -> BTreeSet<String> {
    shared
        .registry
        .all()
        .iter()
        .flat_map(|s| views::subscriptions(s))
        .map(
            |v| match starling_model::topic::parse_subscription(&v.topic) {
                Ok(f) => f.filter.to_owned(),
                Err(_) => v.topic,
            },
        )
        .collect()
}

/// The topic filters subscribers use, paged.
#[utoipa::path(get, path = "/api/v4/routes", tag = "emqx",
    params(
        ("_page" = Option<u64>, Query, description = "Page, from 1"),
        ("_limit" = Option<u64>, Query, description = "Items per page (default and most: 10000)"),
    ),
    responses(
        (status = 200, description = "One page of routes", body = RoutesReply),
        (status = 400, description = "A paging parameter is malformed", body = ErrorReply),
    ))]
pub async fn routes(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let q = query(q.as_deref());
    let p = match paging(&q) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    let node = node(&shared);
    let items: Vec<Route> = routes_in_use(&shared)
        .into_iter()
        .map(|topic| Route {
            topic,
            node: node.clone(),
        })
        .collect();
    let (data, meta) = page_of(items, &p);
    ok(RoutesReply {
        code: code::OK,
        data,
        meta,
    })
}

/// The configuration, secret-free (the view of NanoMQ's req 11).
#[utoipa::path(get, path = "/api/v4/configs", tag = "emqx",
    responses((status = 200, description = "The configuration", body = ConfigsReply)))]
pub async fn configs(State(shared): State<SharedRef>) -> Response {
    ok(ConfigsReply {
        code: code::OK,
        data: super::nanomq::get_config(&shared),
    })
}

/// `PUT /api/v4/configs`: what the change did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigChangeData {
    /// Fields now in force.
    pub applied: Vec<String>,
    /// Fields that differ from the running value and need a restart.
    pub restart_required: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigChangeReply {
    pub code: u32,
    pub data: ConfigChangeData,
}

/// Sets configuration fields, named as `GET /api/v4/configs` shows them
/// (the same decision as NanoMQ's req 12): what can change live is
/// applied, the rest is listed as needing a restart, and an unknown field
/// refuses the whole request.
#[utoipa::path(put, path = "/api/v4/configs", tag = "emqx",
    request_body(content = Object, description = "Fields to set, shaped as GET /api/v4/configs answers"),
    responses(
        (status = 200, description = "What was applied and what needs a restart", body = ConfigChangeReply),
        (status = 400, description = "108 unknown field or not an object, 109 not JSON", body = ErrorReply),
    ))]
pub async fn set_configs(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let data = match json_body(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return bad(
                code::PARAMETER_ERROR,
                "the request body must be a JSON object.",
            );
        }
        Err(e) => return refuse(e),
    };
    match super::configs::change(&shared, &data) {
        Ok(c) => ok(ConfigChangeReply {
            code: code::OK,
            data: ConfigChangeData {
                applied: c.applied,
                restart_required: c.restart_required,
            },
        }),
        Err(e) => bad(code::PARAMETER_ERROR, format!("{e}.")),
    }
}

/// Publishes one request; `Err((code, sentence))` refuses it. The span is
/// what the store must write before the publish is acknowledged.
fn publish_one(shared: &Shared, v: Value) -> Result<TicketSpan, Refusal> {
    let r: PublishRequest = parse(v)?;
    let topics = topics_of(r.topic, r.topics)?;
    let qos = qos_of(r.qos)?;
    let text = r.payload.unwrap_or_default();
    let payload = match r.encoding.as_deref().unwrap_or("plain") {
        "plain" => Bytes::from(text),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map(Bytes::from)
            .map_err(|_| {
                (
                    code::PARAMETER_ERROR,
                    "payload is not valid base64.".to_owned(),
                )
            })?,
        other => {
            return Err((
                code::PARAMETER_ERROR,
                format!("encoding must be plain or base64, not {other:?}."),
            ));
        }
    };
    for t in &topics {
        if let Err(e) = starling_model::topic::validate_name(t)
            .and_then(|_| shared.check_topic(t, &shared.limits()))
        {
            return Err((
                code::ILLEGAL_TOPIC,
                format!("the topic {t:?} cannot be published to: {e}."),
            ));
        }
    }
    let retain = r.retain.unwrap_or(false);
    let mut span = TicketSpan::default();
    for t in &topics {
        metrics::inc(&shared.metrics.messages_in[qos as usize]);
        let msg = Message {
            topic: ByteString::from(t.as_str()),
            payload: payload.clone(),
            qos,
            retain,
            properties: None,
            expires_at: None,
            origin: 0,
        };
        let mut scratch = Vec::new();
        let routed = shared.router.publish(msg, &mut scratch);
        span.join(routed.span);
        if routed.retained_full {
            shared
                .metrics
                .dropped(qos as usize, metrics::DropReason::RetainedFull);
            return Err((
                code::UNKNOWN,
                "the retained message store is full; the message was not published.".into(),
            ));
        }
    }
    Ok(span)
}

/// As for a PUBACK: the answer waits until what the publish stored is durable.
async fn stored(shared: &Shared, span: TicketSpan) -> Result<(), Refusal> {
    if shared.router.store.durable(span).await.is_err() {
        metrics::inc(&shared.metrics.store_refusals);
        return Err((
            code::UNKNOWN,
            "the broker could not store the message because its disk is full or failing.".into(),
        ));
    }
    Ok(())
}

fn status_of(code: u32) -> StatusCode {
    match code {
        code::CLIENT_OFFLINE => StatusCode::NOT_FOUND,
        code::UNKNOWN => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Publishes a message as the broker (no ACL: the admin may publish anywhere).
#[utoipa::path(post, path = "/api/v4/mqtt/publish", tag = "emqx",
    request_body = PublishRequest,
    responses(
        (status = 200, description = "Published", body = OkReply),
        (status = 400, description = "107 missing topic, 108 bad parameter, 109 not JSON, 115 illegal topic", body = ErrorReply),
        (status = 500, description = "The retained store is full (102)", body = ErrorReply),
    ))]
pub async fn publish(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let v = match json_body(&body) {
        Ok(v) => v,
        Err(e) => return refuse(e),
    };
    let outcome = match publish_one(&shared, v) {
        Ok(span) => stored(&shared, span).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => ok(OkReply { code: code::OK }),
        Err((c, m)) => error(status_of(c), c, m),
    }
}

/// Several publishes; each item's outcome in `data`.
#[utoipa::path(post, path = "/api/v4/mqtt/publish_batch", tag = "emqx",
    request_body = Vec<PublishRequest>,
    responses(
        (status = 200, description = "Each item's outcome", body = BatchReply),
        (status = 400, description = "Not a non-empty JSON array (107, 108, 109)", body = ErrorReply),
    ))]
pub async fn publish_batch(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let items = match batch_items(&body) {
        Ok(i) => i,
        Err(e) => return refuse(e),
    };
    let mut all = TicketSpan::default();
    let mut data: Vec<BatchItem> = items
        .into_iter()
        .map(|v| {
            let topic = v.get("topic").and_then(Value::as_str).map(str::to_owned);
            let clientid = v.get("clientid").and_then(Value::as_str).map(str::to_owned);
            let (code, message) = match publish_one(&shared, v) {
                Ok(span) => {
                    all.join(span);
                    (code::OK, None)
                }
                Err((c, m)) => (c, Some(m)),
            };
            BatchItem {
                topic,
                clientid,
                code,
                message,
            }
        })
        .collect();
    // One wait for the whole batch; if the store failed, no item is
    // reported as published (they share the batch's writes).
    if let Err((c, m)) = stored(&shared, all).await {
        for item in data.iter_mut().filter(|i| i.code == code::OK) {
            item.code = c;
            item.message = Some(m.clone());
        }
    }
    ok(BatchReply {
        code: code::OK,
        data,
    })
}

/// Why a subscription on a client's behalf was not made.
#[derive(Debug, PartialEq, Eq)]
pub enum OnBehalf {
    Offline,
    Invalid(String),
    Quota(String),
}

impl OnBehalf {
    fn code(self, id: &str) -> Refusal {
        match self {
            OnBehalf::Offline => (
                code::CLIENT_OFFLINE,
                format!("client {id:?} is not connected."),
            ),
            OnBehalf::Invalid(m) => (code::ILLEGAL_TOPIC, m),
            OnBehalf::Quota(m) => (code::PARAMETER_ERROR, m),
        }
    }
}

/// Adds a subscription to a connected client's session and the router, as
/// its own SUBSCRIBE would (retain handling 0: the retained messages, or
/// with `?pubStates=1` the last values, are queued for it). Each message is
/// checked against the client's own read rights (`check_read`), so the
/// admin cannot make a client receive what its token may not read.
pub fn subscribe_for(
    shared: &Shared,
    s: &Arc<Session>,
    raw: &str,
    qos: QoS,
) -> Result<(), OnBehalf> {
    let (parsed, topic_opts) = starling_model::topic::parse_with_options(raw)
        .map_err(|e| OnBehalf::Invalid(format!("the topic filter {raw:?} is invalid: {e}.")))?;
    shared
        .check_filter(parsed.filter, &shared.limits())
        .map_err(|e| OnBehalf::Invalid(format!("the topic filter {raw:?} is invalid: {e}.")))?;
    let key = &raw[..raw.find('?').unwrap_or(raw.len())];
    let opts = SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        sub_id: 0,
        check_read: true,
        pub_states: topic_opts.pub_states,
    };
    let mut st = s.lock();
    if st.link.is_none() {
        return Err(OnBehalf::Offline);
    }
    if !st.subscriptions.contains_key(key)
        && st.subscriptions.len() >= shared.limits().max_subscriptions_per_session
    {
        drop(st);
        shared.metrics.limit_hit(Limit::Subscriptions);
        return Err(OnBehalf::Quota(
            "the client holds max_subscriptions_per_session subscriptions already.".into(),
        ));
    }
    if shared
        .router
        .subscribe(s, parsed.filter, parsed.share_group, opts)
        .is_err()
    {
        return Err(OnBehalf::Quota(
            "the broker holds max_shared_groups share groups already.".into(),
        ));
    }
    st.subscriptions.insert(ByteString::from(key), opts);
    drop(st);
    s.store_subscription(key, &opts);
    if parsed.share_group.is_none() {
        let mut span = crate::store::TicketSpan::default();
        if opts.pub_states {
            shared
                .router
                .deliver_last_values(s, parsed.filter, &opts, &mut span);
        } else {
            shared
                .router
                .deliver_retained(s, parsed.filter, &opts, &mut span);
        }
    }
    Ok(())
}

/// Removes a subscription from a client's session and the router; false if
/// it had none by that filter.
pub fn unsubscribe_for(s: &Session, shared: &Shared, raw: &str) -> bool {
    let key = &raw[..raw.find('?').unwrap_or(raw.len())];
    let Ok(parsed) = starling_model::topic::parse_subscription(key) else {
        return false;
    };
    let mut st = s.lock();
    let had = st.subscriptions.remove(key).is_some();
    if had {
        shared
            .router
            .unsubscribe(s.key, parsed.filter, parsed.share_group);
    }
    drop(st);
    if had {
        s.unstore_subscription(key);
    }
    had
}

fn session_for(
    shared: &Shared,
    clientid: Option<String>,
) -> Result<(String, Arc<Session>), Refusal> {
    let Some(id) = clientid.filter(|c| !c.is_empty()) else {
        return Err((code::MISSING_PARAMETER, "clientid is missing.".into()));
    };
    match views::find(shared, &id) {
        Some(s) if views::link(&s).is_some() => Ok((id, s)),
        _ => Err(OnBehalf::Offline.code(&id)),
    }
}

fn subscribe_one(shared: &Shared, v: Value) -> Result<(), Refusal> {
    let r: SubscribeRequest = parse(v)?;
    let topics = topics_of(r.topic, r.topics)?;
    let qos = qos_of(r.qos)?;
    let (id, s) = session_for(shared, r.clientid)?;
    for t in &topics {
        subscribe_for(shared, &s, t, qos).map_err(|e| e.code(&id))?;
    }
    Ok(())
}

fn unsubscribe_one(shared: &Shared, v: Value) -> Result<(), Refusal> {
    let r: SubscribeRequest = parse(v)?;
    let topics = topics_of(r.topic, r.topics)?;
    let (_, s) = session_for(shared, r.clientid)?;
    for t in &topics {
        unsubscribe_for(&s, shared, t);
    }
    Ok(())
}

fn single(shared: &Shared, body: &Bytes, f: fn(&Shared, Value) -> Result<(), Refusal>) -> Response {
    let v = match json_body(body) {
        Ok(v) => v,
        Err(e) => return refuse(e),
    };
    match f(shared, v) {
        Ok(()) => ok(OkReply { code: code::OK }),
        Err((c, m)) => error(status_of(c), c, m),
    }
}

fn batch(shared: &Shared, body: &Bytes, f: fn(&Shared, Value) -> Result<(), Refusal>) -> Response {
    let items = match batch_items(body) {
        Ok(i) => i,
        Err(e) => return refuse(e),
    };
    let data = items
        .into_iter()
        .map(|v| {
            let topic = v.get("topic").and_then(Value::as_str).map(str::to_owned);
            let clientid = v.get("clientid").and_then(Value::as_str).map(str::to_owned);
            let (code, message) = match f(shared, v) {
                Ok(()) => (code::OK, None),
                Err((c, m)) => (c, Some(m)),
            };
            BatchItem {
                topic,
                clientid,
                code,
                message,
            }
        })
        .collect();
    ok(BatchReply {
        code: code::OK,
        data,
    })
}

/// Subscribes a connected client, as its own SUBSCRIBE would.
#[utoipa::path(post, path = "/api/v4/mqtt/subscribe", tag = "emqx",
    request_body = SubscribeRequest,
    responses(
        (status = 200, description = "Subscribed", body = OkReply),
        (status = 400, description = "107 missing parameter, 108 bad parameter or quota, 109 not JSON, 115 illegal filter", body = ErrorReply),
        (status = 404, description = "The client is not connected (112)", body = ErrorReply),
    ))]
pub async fn subscribe(State(shared): State<SharedRef>, body: Bytes) -> Response {
    single(&shared, &body, subscribe_one)
}

/// Several subscriptions; each item's outcome in `data`.
#[utoipa::path(post, path = "/api/v4/mqtt/subscribe_batch", tag = "emqx",
    request_body = Vec<SubscribeRequest>,
    responses(
        (status = 200, description = "Each item's outcome", body = BatchReply),
        (status = 400, description = "Not a non-empty JSON array (107, 108, 109)", body = ErrorReply),
    ))]
pub async fn subscribe_batch(State(shared): State<SharedRef>, body: Bytes) -> Response {
    batch(&shared, &body, subscribe_one)
}

/// Removes a connected client's subscription.
#[utoipa::path(post, path = "/api/v4/mqtt/unsubscribe", tag = "emqx",
    request_body = SubscribeRequest,
    responses(
        (status = 200, description = "Unsubscribed (or had no such subscription)", body = OkReply),
        (status = 400, description = "107 missing parameter, 108 bad parameter, 109 not JSON", body = ErrorReply),
        (status = 404, description = "The client is not connected (112)", body = ErrorReply),
    ))]
pub async fn unsubscribe(State(shared): State<SharedRef>, body: Bytes) -> Response {
    single(&shared, &body, unsubscribe_one)
}

/// Several unsubscriptions; each item's outcome in `data`.
#[utoipa::path(post, path = "/api/v4/mqtt/unsubscribe_batch", tag = "emqx",
    request_body = Vec<SubscribeRequest>,
    responses(
        (status = 200, description = "Each item's outcome", body = BatchReply),
        (status = 400, description = "Not a non-empty JSON array (107, 108, 109)", body = ErrorReply),
    ))]
pub async fn unsubscribe_batch(State(shared): State<SharedRef>, body: Bytes) -> Response {
    batch(&shared, &body, unsubscribe_one)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(datetime(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn paging_meta() {
        let p = Page { page: 2, limit: 2 };
        let (d, m) = page_of(vec![1, 2, 3, 4, 5], &p);
        assert_eq!(d, vec![3, 4]);
        assert_eq!((m.count, m.hasnext), (5, true));
        let p = Page { page: 3, limit: 2 };
        let (d, m) = page_of(vec![1, 2, 3, 4, 5], &p);
        assert_eq!((d, m.hasnext), (vec![5], false));
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime_text(5), "5 seconds");
        assert_eq!(uptime_text(3725), "1 hours, 2 minutes, 5 seconds");
    }
}

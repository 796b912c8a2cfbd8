//! NanoMQ's admin API: `POST /api/v1` with `{"req": N, "seq": S}`, answered
//! `{"code", "seq", "rep", "data"}` with NanoMQ's return codes and HTTP
//! statuses (../shared/reference/001_…: 0 success, 107 missing parameter,
//! 108 parameter error, 109 not JSON; 200 and 400). NanoMQ itself stopped
//! serving this API in 0.25; scripts written for it work here unchanged.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::views;
use crate::listen::SharedRef;
use crate::server::Shared;

/// NanoMQ's return codes used here.
pub mod code {
    pub const OK: u32 = 0;
    pub const WRONG_CREDENTIALS: u32 = 103;
    pub const EMPTY_CREDENTIALS: u32 = 104;
    pub const MISSING_PARAMETER: u32 = 107;
    pub const PARAMETER_ERROR: u32 = 108;
    pub const NOT_JSON: u32 = 109;
}

/// A NanoMQ-shaped reply.
pub fn reply(
    status: StatusCode,
    code: u32,
    seq: Option<&Value>,
    rep: Option<u64>,
    data: Option<Value>,
) -> Response {
    let mut body = Map::new();
    body.insert("code".into(), json!(code));
    if let Some(seq) = seq {
        body.insert("seq".into(), seq.clone());
    }
    if let Some(rep) = rep {
        body.insert("rep".into(), json!(rep));
    }
    if let Some(data) = data {
        body.insert("data".into(), data);
    }
    (status, Json(Value::Object(body))).into_response()
}

/// A refusal: NanoMQ's code and HTTP 400, plus a `message` sentence (an
/// addition NanoMQ clients ignore).
fn bad(code: u32, seq: Option<&Value>, message: &str) -> Response {
    let mut body = Map::new();
    body.insert("code".into(), json!(code));
    if let Some(seq) = seq {
        body.insert("seq".into(), seq.clone());
    }
    body.insert("message".into(), json!(message));
    (StatusCode::BAD_REQUEST, Json(Value::Object(body))).into_response()
}

pub async fn api_v1(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad(code::NOT_JSON, None, "the request body is not JSON");
    };
    let seq = req.get("seq").filter(|s| s.is_u64() || s.is_i64());
    let Some(n) = req.get("req").and_then(Value::as_u64) else {
        return bad(
            code::MISSING_PARAMETER,
            seq,
            "req is missing or not a number",
        );
    };
    let Some(seq) = seq else {
        return bad(
            code::MISSING_PARAMETER,
            None,
            "seq is missing or not a number",
        );
    };
    let ok = |data: Value| reply(StatusCode::OK, code::OK, Some(seq), Some(n), Some(data));
    match n {
        2 => ok(broker_info(&shared)),
        4 => ok(subscriptions(&shared)),
        5 => ok(clients(&shared)),
        11 => ok(get_config(&shared)),
        12 => match req.get("data") {
            Some(Value::Object(data)) => set_config(&shared, data, seq, n),
            _ => bad(
                code::MISSING_PARAMETER,
                Some(seq),
                "data (an object) is missing",
            ),
        },
        _ => bad(
            code::PARAMETER_ERROR,
            Some(seq),
            "unknown req; this API answers 2, 4, 5, 11 and 12",
        ),
    }
}

fn sum(c: &[std::sync::atomic::AtomicU64; 3]) -> u64 {
    c.iter()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

/// req 2. `client_size` counts connected clients.
pub fn broker_info(shared: &Shared) -> Value {
    let m = &shared.metrics;
    json!({
        "client_size": m.connections_current.load(std::sync::atomic::Ordering::Relaxed),
        "message_in": sum(&m.messages_in),
        "message_out": sum(&m.messages_out),
        "message_drop": sum(&m.messages_dropped),
    })
}

/// req 4: each client with subscriptions, and its filters with their QoS.
pub fn subscriptions(shared: &Shared) -> Value {
    let items: Vec<Value> = views::sessions(shared)
        .iter()
        .filter_map(|s| {
            let subs = views::subscriptions(s);
            (!subs.is_empty()).then(|| {
                json!({
                    "client_id": views::client_id(s),
                    "subscriptions": subs.iter().map(|v| json!({"topic": v.topic, "qos": v.qos})).collect::<Vec<_>>(),
                })
            })
        })
        .collect();
    Value::Array(items)
}

/// req 5: every client, connected or not.
pub fn clients(shared: &Shared) -> Value {
    let items: Vec<Value> = views::sessions(shared)
        .iter()
        .map(|s| {
            let c = views::client(s);
            json!({
                "client_id": c.client_id,
                "username": c.username.unwrap_or_default(),
                "keepalive": c.keepalive,
                "protocol": c.protocol,
                "connect_status": u8::from(c.connected),
                "message_receive": c.messages_received,
            })
        })
        .collect();
    Value::Array(items)
}

/// req 11: the configuration, under NanoMQ's names where one exists and our
/// own (`starling`) for the rest. Secrets are never returned.
pub fn get_config(shared: &Shared) -> Value {
    // The limits in force, which the admin API may have changed.
    let mut live = shared.config.clone();
    live.limits = (*shared.limits()).clone();
    let c = &live;
    let on =
        |l: &starling_model::config::ListenerConfig, tls: bool| l.runs(tls, c.has_certificate());
    let admin_port = c
        .admin
        .bind
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let mut ours = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(api) = ours.get_mut("api").and_then(Value::as_object_mut) {
        api.remove("password");
    }
    json!({
        "url": format!("mqtt-tcp://{}", c.mqtt.bind),
        "allow_anonymous": c.auth.anonymous != starling_model::config::Anonymous::Deny,
        "property_size": starling_codec::MAX_USER_PROPERTIES,
        "msq_len": c.limits.max_queued_messages,
        "max_packet_size": c.limits.max_packet_size,
        "tls": {
            "enable": on(&c.mqtts, true),
            "url": format!("tls+mqtt-tcp://{}", c.mqtts.bind),
            "verify_peer": false,
            "fail_if_no_peer_cert": false,
        },
        "websocket": {
            "enable": on(&c.http, false),
            "url": format!("mqtt-ws://{}/mqtt", c.http.bind),
            "tls_url": format!("mqtt-wss://{}/mqtt", c.https.bind),
        },
        "http_server": {
            "enable": on(&c.admin, false),
            "port": admin_port,
            "username": super::credentials::expected(&c.api).map(|(u, _)| u).unwrap_or_default(),
        },
        "starling": ours,
    })
}

/// req 12: the decision is [`super::configs::change`], shared with EMQX's
/// `PUT /api/v4/configs`; a refusal is NanoMQ's 108.
fn set_config(shared: &Shared, data: &Map<String, Value>, seq: &Value, rep: u64) -> Response {
    match super::configs::change(shared, data) {
        Ok(c) => reply(
            StatusCode::OK,
            code::OK,
            Some(seq),
            Some(rep),
            Some(json!({"applied": c.applied, "restart_required": c.restart_required})),
        ),
        Err(e) => bad(code::PARAMETER_ERROR, Some(seq), &e.to_string()),
    }
}

//! HiveMQ's REST API for MQTT clients under `/api/v1/mqtt/clients`: the
//! list with cursor paging (`{"items": [{"id"}], "_links": {"next"}}`), one
//! client's details, its connection state, its subscriptions, and
//! disconnecting it. Errors are HiveMQ's `{"errors": [{"title",
//! "detail"}]}`. Data from [`views`], like every other API style.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use utoipa::ToSchema;

use super::views::{self, ClientView, SubscriptionView};
use crate::listen::SharedRef;

/// Items per page when no `limit` is given, and the most (HiveMQ's).
pub const MAX_LIMIT: usize = 2500;
const LIST_PATH: &str = "/api/v1/mqtt/clients";

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub title: String,
    pub detail: String,
}

/// HiveMQ's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Errors {
    pub errors: Vec<ApiError>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientItem {
    pub id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Links {
    /// The next page (absent on the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientList {
    pub items: Vec<ClientItem>,
    #[serde(rename = "_links", skip_serializing_if = "Option::is_none")]
    pub links: Option<Links>,
}

/// The connection of a connected client.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDetails {
    pub keep_alive: u16,
    /// `MQTTv3_1_1` or `MQTTv5`.
    pub mqtt_version: String,
    pub connected_listener_id: String,
    pub connected_node_id: String,
    pub source_ip: Option<String>,
    pub source_port: Option<u16>,
    pub username: Option<String>,
    pub clean_start: bool,
    /// RFC 3339, UTC.
    pub connected_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientRestrictions {
    pub max_queue_size: u64,
    pub max_message_size: u64,
    pub queued_message_strategy: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientDetails {
    pub id: String,
    pub connected: bool,
    /// Seconds.
    pub session_expiry_interval: u64,
    pub message_queue_size: u64,
    pub will_present: bool,
    pub restrictions: ClientRestrictions,
    /// Present while the client is connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionDetails>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientDetailsReply {
    pub client: ClientDetails,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionState {
    pub connected: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionReply {
    pub connection: ConnectionState,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSubscription {
    pub topic_filter: String,
    /// `AT_MOST_ONCE`, `AT_LEAST_ONCE` or `EXACTLY_ONCE`.
    pub qos: String,
    /// `SEND`, `SEND_IF_NEW_SUBSCRIPTION` or `DO_NOT_SEND`.
    pub retain_handling: String,
    pub retain_as_published: bool,
    pub no_local: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    pub items: Vec<ClientSubscription>,
}

fn error(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    (
        status,
        Json(Errors {
            errors: vec![ApiError {
                title: title.into(),
                detail: detail.into(),
            }],
        }),
    )
        .into_response()
}

fn invalid_query(detail: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "Query parameter is invalid",
        detail,
    )
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Resource not found",
        format!("Client with id '{id}' not found."),
    )
}

fn client_path(p: Result<Path<String>, PathRejection>) -> Result<String, String> {
    p.map(|Path(id)| id)
        .map_err(|e| format!("The client id in the path cannot be read: {e}."))
}

fn bad_path(detail: String) -> Response {
    error(StatusCode::BAD_REQUEST, "Path parameter is invalid", detail)
}

fn encode_cursor(last_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
}

fn decode_cursor(c: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    String::from_utf8(raw).ok()
}

/// Every client with a session, ordered by id, `limit` per page; `next`
/// carries an opaque cursor (the last id of this page).
#[utoipa::path(get, path = "/api/v1/mqtt/clients", tag = "hivemq",
    params(
        ("limit" = Option<u64>, Query, description = "Items per page, 1 to 2500 (default 2500)"),
        ("cursor" = Option<String>, Query, description = "From a previous page's _links.next"),
    ),
    responses(
        (status = 200, description = "One page of clients", body = ClientList),
        (status = 400, description = "limit or cursor is invalid", body = Errors),
    ))]
pub async fn list(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let q: BTreeMap<String, String> = form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let limit = match q.get("limit").map(|v| v.parse::<usize>()) {
        None => MAX_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return invalid_query(format!(
                "limit must be a whole number from 1 to {MAX_LIMIT}."
            ));
        }
    };
    let after = match q.get("cursor") {
        None => None,
        Some(c) => match decode_cursor(c) {
            Some(id) => Some(id),
            None => return invalid_query("cursor is not one this API gave out."),
        },
    };
    let mut ids: Vec<String> = views::sessions(&shared)
        .iter()
        .map(|s| views::client_id(s))
        .collect();
    ids.sort();
    let start = match &after {
        Some(a) => ids.partition_point(|id| id <= a),
        None => 0,
    };
    let rest = &ids[start.min(ids.len())..];
    let page: Vec<ClientItem> = rest
        .iter()
        .take(limit)
        .map(|id| ClientItem { id: id.clone() })
        .collect();
    let links = (rest.len() > limit)
        .then(|| page.last())
        .flatten()
        .map(|last| Links {
            next: Some(format!(
                "{LIST_PATH}?cursor={}&limit={limit}",
                encode_cursor(&last.id)
            )),
        });
    (StatusCode::OK, Json(ClientList { items: page, links })).into_response()
}

fn rfc3339(secs: u64) -> String {
    let dt = super::emqx::datetime(secs);
    format!("{}Z", dt.replacen(' ', "T", 1))
}

fn details(shared: &crate::server::Shared, c: ClientView) -> ClientDetails {
    let addr = c
        .peer
        .as_deref()
        .and_then(|p| p.parse::<std::net::SocketAddr>().ok());
    let limits = shared.limits();
    let connection = c.connected.then(|| ConnectionDetails {
        keep_alive: c.keepalive,
        mqtt_version: if c.protocol == 5 {
            "MQTTv5"
        } else {
            "MQTTv3_1_1"
        }
        .into(),
        connected_listener_id: "mqtt".into(),
        connected_node_id: "starling".into(),
        source_ip: addr.map(|a| a.ip().to_string()),
        source_port: addr.map(|a| a.port()),
        username: c.username.clone(),
        clean_start: c.clean_start,
        connected_at: c.connected_at.map(rfc3339),
    });
    ClientDetails {
        id: c.client_id,
        connected: c.connected,
        session_expiry_interval: c.session_expiry,
        message_queue_size: c.queued as u64,
        will_present: false,
        restrictions: ClientRestrictions {
            max_queue_size: limits.max_queued_messages as u64,
            max_message_size: u64::from(limits.max_packet_size),
            queued_message_strategy: "DISCARD".into(),
        },
        connection,
    }
}

/// One client's session and, while connected, its connection.
#[utoipa::path(get, path = "/api/v1/mqtt/clients/{clientId}", tag = "hivemq",
    params(("clientId" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The client", body = ClientDetailsReply),
        (status = 400, description = "The path cannot be read", body = Errors),
        (status = 404, description = "No such client", body = Errors),
    ))]
pub async fn client(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return bad_path(e),
    };
    match views::find(&shared, &id) {
        Some(s) => (
            StatusCode::OK,
            Json(ClientDetailsReply {
                client: details(&shared, views::client(&s)),
            }),
        )
            .into_response(),
        None => not_found(&id),
    }
}

/// Whether the client is connected.
#[utoipa::path(get, path = "/api/v1/mqtt/clients/{clientId}/connection", tag = "hivemq",
    params(("clientId" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The connection state", body = ConnectionReply),
        (status = 400, description = "The path cannot be read", body = Errors),
        (status = 404, description = "No such client", body = Errors),
    ))]
pub async fn connection(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return bad_path(e),
    };
    match views::find(&shared, &id) {
        Some(s) => (
            StatusCode::OK,
            Json(ConnectionReply {
                connection: ConnectionState {
                    connected: views::link(&s).is_some(),
                },
            }),
        )
            .into_response(),
        None => not_found(&id),
    }
}

fn subscription_of(v: SubscriptionView) -> ClientSubscription {
    ClientSubscription {
        topic_filter: v.topic,
        qos: match v.qos {
            0 => "AT_MOST_ONCE",
            1 => "AT_LEAST_ONCE",
            _ => "EXACTLY_ONCE",
        }
        .into(),
        retain_handling: match v.retain_handling {
            0 => "SEND",
            1 => "SEND_IF_NEW_SUBSCRIPTION",
            _ => "DO_NOT_SEND",
        }
        .into(),
        retain_as_published: v.retain_as_published,
        no_local: v.no_local,
    }
}

/// The client's subscriptions.
#[utoipa::path(get, path = "/api/v1/mqtt/clients/{clientId}/subscriptions", tag = "hivemq",
    params(("clientId" = String, Path, description = "The client id")),
    responses(
        (status = 200, description = "The subscriptions", body = SubscriptionList),
        (status = 400, description = "The path cannot be read", body = Errors),
        (status = 404, description = "No such client", body = Errors),
    ))]
pub async fn subscriptions(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return bad_path(e),
    };
    match views::find(&shared, &id) {
        Some(s) => (
            StatusCode::OK,
            Json(SubscriptionList {
                items: views::subscriptions(&s)
                    .into_iter()
                    .map(subscription_of)
                    .collect(),
            }),
        )
            .into_response(),
        None => not_found(&id),
    }
}

/// Disconnects the client (v5 DISCONNECT reason 0x98, administrative
/// action). The session stays as its expiry interval says.
#[utoipa::path(delete, path = "/api/v1/mqtt/clients/{clientId}", tag = "hivemq",
    params(
        ("clientId" = String, Path, description = "The client id"),
        ("preventWillMessage" = Option<bool>, Query, description = "Accepted for compatibility; the will is handled as for any server-side disconnect"),
    ),
    responses(
        (status = 204, description = "The client is being disconnected"),
        (status = 400, description = "The path cannot be read", body = Errors),
        (status = 404, description = "No such connected client", body = Errors),
    ))]
pub async fn disconnect(
    State(shared): State<SharedRef>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match client_path(id) {
        Ok(id) => id,
        Err(e) => return bad_path(e),
    };
    match views::find(&shared, &id).and_then(|s| views::link(&s)) {
        Some(link) => {
            tracing::info!(client = %id, "admin API disconnects a client");
            link.kick(starling_codec::reason::ADMINISTRATIVE_ACTION);
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "Resource not found",
            format!("Client with id '{id}' is not connected."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        for id in ["a", "client/with/slash", "ünï", ""] {
            assert_eq!(decode_cursor(&encode_cursor(id)).as_deref(), Some(id));
        }
        assert_eq!(decode_cursor("!!"), None);
    }
}

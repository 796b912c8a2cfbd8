//! The HTTP interface of the http/https listeners, beside MQTT over
//! WebSocket at `/mqtt`: publish and retrieve under `/broker/` (shiftr.io's
//! interface) and native WebSocket topic streams on every other path
//! (EVRYTHNG's). Both go through the one router MQTT uses, with the same
//! authentication, ACLs and caps, so a message crosses protocols unchanged.

pub mod credentials;
pub mod error;
mod publish;
pub mod request;
mod retrieve;
mod stream;
mod subscriber;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument as _;

pub use retrieve::{QOS_HEADER, RETAIN_HEADER, TOPIC_HEADER};

use crate::listen::SharedRef;
use crate::metrics::HttpRoute;
use error::ApiError;

/// `/broker/…` and the stream fallback, with CORS when configured and
/// request metrics.
pub fn routes(shared: SharedRef) -> Router<SharedRef> {
    // `/broker/` itself is a request with an empty topic: a 400 that says
    // so, not a 404.
    let api = Router::new()
        .route(
            "/broker/{*topic}",
            get(retrieve::retrieve).post(publish::publish),
        )
        .route("/broker/", get(retrieve::retrieve).post(publish::publish))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    let api = match cors(&shared) {
        Some(layer) => api.layer(layer),
        None => api,
    };
    api.fallback(stream::fallback)
}

/// The CORS policy for `/broker/`: off unless `[web] cors_origins` is set.
fn cors(shared: &SharedRef) -> Option<CorsLayer> {
    let origins = shared.config.web.cors()?;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                HeaderName::from_static(TOPIC_HEADER),
                HeaderName::from_static(QOS_HEADER),
                HeaderName::from_static(RETAIN_HEADER),
            ]),
    )
}

/// Counts every request of the http/https listeners by route and status,
/// with its duration (for upgrades: until the 101). `/broker/` publishes and
/// retrieves are also one span each; upgrades are not (an MQTT-over-WebSocket
/// client gets its connection span instead).
pub async fn track(State(shared): State<SharedRef>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let broker = matches!(path, Some("/broker/{*topic}" | "/broker/"));
    let route = match path {
        _ if req.method() == Method::OPTIONS => HttpRoute::Preflight,
        _ if broker && req.method() == Method::POST => HttpRoute::Publish,
        _ if broker => HttpRoute::Retrieve,
        Some("/mqtt") => HttpRoute::MqttWs,
        Some("/healthz" | "/readyz") => HttpRoute::Health,
        _ => HttpRoute::Stream,
    };
    let start = Instant::now();
    let template: Option<&'static str> = match path {
        Some("/broker/{*topic}") => Some("/broker/{*topic}"),
        Some("/broker/") => Some("/broker/"),
        _ => None,
    };
    let resp = if let Some(template) = template
        && matches!(route, HttpRoute::Publish | HttpRoute::Retrieve)
    {
        let method = req.method().clone();
        let span = tracing::info_span!(
            "http request",
            otel.name = %format_args!("{method} {template}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = template,
            http.response.status_code = tracing::field::Empty,
        );
        let resp = next.run(req).instrument(span.clone()).await;
        span.record("http.response.status_code", resp.status().as_u16());
        resp
    } else {
        next.run(req).await
    };
    shared
        .metrics
        .http
        .observe(route, resp.status().as_u16(), start.elapsed());
    resp
}

/// Wraps the listener's router with [`track`].
pub fn with_metrics(app: Router<SharedRef>, shared: SharedRef) -> Router {
    app.layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

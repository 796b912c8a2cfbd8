//! The admin API on the admin listener: NanoMQ's `POST /api/v1`, EMQX v4's
//! REST API under `/api/v4`, HiveMQ's `/api/v1/mqtt/clients…` and the
//! OpenAPI document of all of them, behind HTTP Basic. Health and `/metrics` stay open on
//! the same listener for probes and scrapers; everything under `/api/`
//! needs the admin credentials.

pub mod auth_manage;
pub mod configs;
pub mod credentials;
pub mod emqx;
pub mod hivemq;
pub mod nanomq;
pub mod openapi;
pub mod views;

use axum::Router;
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, delete, get, post, put};

use tracing::Instrument as _;

use crate::listen::SharedRef;
use crate::listen::http::Peer;
use crate::metrics;

/// Every `/api/` route: the one list the router is built from and the
/// OpenAPI document is checked against (`openapi` tests).
pub fn table() -> Vec<(Method, &'static str, MethodRouter<SharedRef>)> {
    vec![
        (Method::POST, "/api/v1", post(nanomq::api_v1)),
        (Method::GET, "/api/v1", get(nanomq::api_v1)),
        (
            Method::GET,
            "/api/v1/openapi.json",
            get(openapi::document_v1),
        ),
        (
            Method::GET,
            "/api/v4/openapi.json",
            get(openapi::document_v4),
        ),
        (Method::GET, "/api/v4/brokers", get(emqx::brokers)),
        (Method::GET, "/api/v4/stats", get(emqx::stats)),
        (Method::GET, "/api/v4/metrics", get(emqx::metrics_view)),
        (Method::GET, "/api/v4/clients", get(emqx::clients)),
        (Method::GET, "/api/v4/clients/{clientid}", get(emqx::client)),
        (
            Method::DELETE,
            "/api/v4/clients/{clientid}",
            delete(emqx::kick),
        ),
        (
            Method::GET,
            "/api/v4/subscriptions",
            get(emqx::subscriptions),
        ),
        (
            Method::GET,
            "/api/v4/subscriptions/{clientid}",
            get(emqx::client_subscriptions),
        ),
        (Method::GET, "/api/v4/routes", get(emqx::routes)),
        (Method::GET, "/api/v4/configs", get(emqx::configs)),
        (Method::PUT, "/api/v4/configs", put(emqx::set_configs)),
        (
            Method::GET,
            "/api/v4/auth_username",
            get(auth_manage::list_tokens),
        ),
        (
            Method::POST,
            "/api/v4/auth_username",
            post(auth_manage::create_token),
        ),
        (
            Method::GET,
            "/api/v4/auth_username/{username}",
            get(auth_manage::get_token),
        ),
        (
            Method::PUT,
            "/api/v4/auth_username/{username}",
            put(auth_manage::update_token),
        ),
        (
            Method::DELETE,
            "/api/v4/auth_username/{username}",
            delete(auth_manage::delete_token),
        ),
        (Method::GET, "/api/v4/acl", get(auth_manage::list_acls)),
        (Method::POST, "/api/v4/acl", post(auth_manage::create_acl)),
        (Method::GET, "/api/v4/acl/{name}", get(auth_manage::get_acl)),
        (
            Method::DELETE,
            "/api/v4/acl/{name}",
            delete(auth_manage::delete_acl),
        ),
        (Method::POST, "/api/v4/mqtt/publish", post(emqx::publish)),
        (
            Method::POST,
            "/api/v4/mqtt/publish_batch",
            post(emqx::publish_batch),
        ),
        (
            Method::POST,
            "/api/v4/mqtt/subscribe",
            post(emqx::subscribe),
        ),
        (
            Method::POST,
            "/api/v4/mqtt/subscribe_batch",
            post(emqx::subscribe_batch),
        ),
        (
            Method::POST,
            "/api/v4/mqtt/unsubscribe",
            post(emqx::unsubscribe),
        ),
        (
            Method::POST,
            "/api/v4/mqtt/unsubscribe_batch",
            post(emqx::unsubscribe_batch),
        ),
        (Method::GET, "/api/v1/mqtt/clients", get(hivemq::list)),
        (
            Method::GET,
            "/api/v1/mqtt/clients/{clientId}",
            get(hivemq::client),
        ),
        (
            Method::DELETE,
            "/api/v1/mqtt/clients/{clientId}",
            delete(hivemq::disconnect),
        ),
        (
            Method::GET,
            "/api/v1/mqtt/clients/{clientId}/connection",
            get(hivemq::connection),
        ),
        (
            Method::GET,
            "/api/v1/mqtt/clients/{clientId}/subscriptions",
            get(hivemq::subscriptions),
        ),
    ]
}

/// The `/api/` routes, each behind [`require_admin`].
pub fn routes(shared: SharedRef) -> Router<SharedRef> {
    emqx::mark_started();
    table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .layer(middleware::from_fn_with_state(shared, require_admin))
}

/// The route templates of the admin listener, as `'static` label values.
fn templates() -> &'static [&'static str] {
    static T: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t: Vec<&'static str> = ["/healthz", "/readyz", "/metrics"]
            .into_iter()
            .chain(table().into_iter().map(|(_, path, _)| path))
            .collect();
        t.dedup();
        t
    })
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts and times every request of the admin listener by route template,
/// method and status; admin API requests (`/api/`) are also one span each
/// (health probes and scrapes are not: they would drown the traces).
pub async fn observe(State(shared): State<SharedRef>, req: Request, next: Next) -> Response {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let route = matched
        .and_then(|p| templates().iter().copied().find(|t| *t == p))
        .unwrap_or(metrics::UNMATCHED_ROUTE);
    let method = method_label(req.method());
    let start = std::time::Instant::now();
    let resp = if req.uri().path().starts_with("/api/") {
        let span = tracing::info_span!(
            "admin request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = route,
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
        .admin
        .observe(route, method, resp.status().as_u16(), start.elapsed());
    resp
}

/// HTTP Basic against the admin credentials; failures are counted and
/// rate-limited per source address like token failures.
async fn require_admin(
    State(shared): State<SharedRef>,
    Extension(Peer(peer)): Extension<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let now = std::time::Instant::now();
    let limiter = shared.auth.limiter();
    let refuse = |code: u32| {
        let mut r = nanomq::reply(StatusCode::UNAUTHORIZED, code, None, None, None);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"starling-admin\""),
        );
        r
    };
    if limiter.is_blocked(peer.ip(), Some("admin-api"), now) {
        return refuse(nanomq::code::WRONG_CREDENTIALS);
    }
    let want = match credentials::expected(&shared.config.api) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "admin credentials cannot be read; refusing admin API requests");
            return nanomq::reply(StatusCode::INTERNAL_SERVER_ERROR, 102, None, None, None);
        }
    };
    let jwt = &shared.config.api.jwt_secret;
    let checked = if !jwt.is_empty() && credentials::is_bearer(req.headers()) {
        credentials::check_jwt(req.headers(), jwt)
    } else {
        credentials::check(req.headers(), &want)
    };
    match checked {
        Ok(_) => next.run(req).await,
        Err(d) => {
            metrics::inc(&shared.metrics.auth_failures);
            limiter.record_failure(peer.ip(), Some("admin-api"), now);
            if let Some(suppressed) = shared.refusal_log.take(now) {
                tracing::info!(%peer, suppressed, "admin API authentication failed");
            }
            match d {
                credentials::Denied::Missing => refuse(nanomq::code::EMPTY_CREDENTIALS),
                credentials::Denied::Wrong => refuse(nanomq::code::WRONG_CREDENTIALS),
            }
        }
    }
}

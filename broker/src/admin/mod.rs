//! The admin API on the admin listener: NanoMQ's `POST /api/v1` (more
//! styles join here), behind HTTP Basic. Health and `/metrics` stay open on
//! the same listener for probes and scrapers; everything under `/api/`
//! needs the admin credentials.

pub mod credentials;
pub mod nanomq;
pub mod views;

use axum::Router;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;

use crate::listen::SharedRef;
use crate::listen::http::Peer;
use crate::metrics;

/// The `/api/` routes, each behind [`require_admin`].
pub fn routes(shared: SharedRef) -> Router<SharedRef> {
    Router::new()
        .route("/api/v1", post(nanomq::api_v1).get(nanomq::api_v1))
        .layer(middleware::from_fn_with_state(shared, require_admin))
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
    let refuse = |code: u32, message: &str| {
        let mut r = nanomq::reply(StatusCode::UNAUTHORIZED, code, None, None, None);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"starling-admin\""),
        );
        let _ = message;
        r
    };
    if limiter.is_blocked(peer.ip(), Some("admin-api"), now) {
        return refuse(nanomq::code::WRONG_CREDENTIALS, "rate limited");
    }
    let want = match credentials::expected(&shared.config.api) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "admin credentials cannot be read; refusing admin API requests");
            return nanomq::reply(StatusCode::INTERNAL_SERVER_ERROR, 102, None, None, None);
        }
    };
    match credentials::check(req.headers(), &want) {
        Ok(_) => next.run(req).await,
        Err(d) => {
            metrics::inc(&shared.metrics.auth_failures);
            limiter.record_failure(peer.ip(), Some("admin-api"), now);
            if let Some(suppressed) = shared.refusal_log.take(now) {
                tracing::info!(%peer, suppressed, "admin API authentication failed");
            }
            match d {
                credentials::Denied::Missing => refuse(nanomq::code::EMPTY_CREDENTIALS, "missing"),
                credentials::Denied::Wrong => refuse(nanomq::code::WRONG_CREDENTIALS, "wrong"),
            }
        }
    }
}

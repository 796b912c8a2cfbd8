//! Admin listener: health, readiness and Prometheus metrics, open; the admin
//! REST API (`crate::admin`) behind the admin credentials. Every request is
//! counted and timed by route template (`crate::admin::observe`).

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;

use super::SharedRef;

pub fn router(shared: SharedRef) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes(shared.clone()))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            crate::admin::observe,
        ))
        .with_state(shared)
}

async fn metrics(State(shared): State<SharedRef>) -> impl IntoResponse {
    let live = shared.live_metrics();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        shared.metrics.render(live.lvc, live.state),
    )
}

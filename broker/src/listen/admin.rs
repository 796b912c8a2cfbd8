//! Admin listener: health, readiness and Prometheus metrics, open; the admin
//! REST API (`crate::admin`) behind the admin credentials.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::SharedRef;

pub fn router(shared: SharedRef) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes(shared.clone()))
        .with_state(shared)
}

async fn metrics(State(shared): State<SharedRef>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared
            .metrics
            .render(shared.router.lvc.stats(), state_gauges(&shared)),
    )
}

fn state_gauges(shared: &crate::server::Shared) -> crate::metrics::StateGauges {
    let mut g = crate::metrics::StateGauges::default();
    for s in shared.registry.all() {
        let st = s.lock();
        g.sessions += 1;
        g.queued_messages += st.queue.len() as u64;
        g.queued_bytes += st.queued_bytes as u64;
        g.inflight += st.inflight.len() as u64;
    }
    g
}

//! OTLP trace export end to end: a fake collector on 127.0.0.1 receives the
//! spans that the operator's own subscriber (`telemetry::subscriber`, what
//! `telemetry::init` installs) exports over OTLP/HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message as _;
use starling_operator::telemetry::{self, OtlpConfig};
use tracing_subscriber::EnvFilter;

/// What the fake collector got: (content-type, body) per POST /v1/traces.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

async fn collect(State(received): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Ok(mut r) = received.lock() {
        r.push((content_type, body));
    }
    StatusCode::OK
}

/// A collector accepting POST /v1/traces; returns its base URL.
async fn fake_collector() -> anyhow::Result<(String, Received)> {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the fake collector")?;
    let addr = listener.local_addr().context("collector address")?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), received))
}

fn config(vars: &[(&str, &str)]) -> Option<OtlpConfig> {
    let vars: HashMap<&str, &str> = vars.iter().copied().collect();
    OtlpConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string()))
}

fn string(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<&str, &str> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.as_str(), string(&kv.value)?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_spans_are_exported_over_otlp_http() -> anyhow::Result<()> {
    let (base, received) = fake_collector().await?;
    let cfg = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]).context("export is on")?;
    let (subscriber, telemetry) = telemetry::subscriber(EnvFilter::new("info"), Some(&cfg))?;
    assert!(telemetry.is_exporting());

    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "reconcile",
            kind = "Broker",
            name = "home",
            namespace = "iot"
        );
        let _entered = span.enter();
        tracing::info!("reconciling");
    });
    telemetry.force_flush().await?;

    // The flush returns once the export request was answered; allow a little
    // slack anyway, then fail if nothing arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let bodies = loop {
        let got = received.lock().map(|r| r.clone()).unwrap_or_default();
        if !got.is_empty() || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!bodies.is_empty(), "the collector received no export");

    let mut spans = Vec::new();
    for (content_type, body) in &bodies {
        assert_eq!(content_type, "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(body.as_ref())
            .context("decoding ExportTraceServiceRequest")?;
        for rs in &request.resource_spans {
            let resource = rs.resource.as_ref().context("resource")?;
            assert_eq!(
                attrs(&resource.attributes).get("service.name"),
                Some(&"starling-operator")
            );
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let span = spans
        .iter()
        .find(|s| s.name == "reconcile")
        .with_context(|| format!("no reconcile span among {spans:?}"))?;
    let a = attrs(&span.attributes);
    assert_eq!(a.get("kind"), Some(&"Broker"));
    assert_eq!(a.get("name"), Some(&"home"));
    assert_eq!(a.get("namespace"), Some(&"iot"));
    assert!(
        span.events.iter().any(
            |e| attrs(&e.attributes).get("message") == Some(&"reconciling")
                || e.name == "reconciling"
        ),
        "the log event inside the span rides along: {:?}",
        span.events
    );

    telemetry.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn flush_fails_when_the_collector_is_unreachable() -> anyhow::Result<()> {
    // A port nothing listens on (bound, then released).
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let base = format!("http://{addr}");
    let cfg = config(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
    ])
    .context("export is on")?;
    let (subscriber, telemetry) = telemetry::subscriber(EnvFilter::new("info"), Some(&cfg))?;
    tracing::subscriber::with_default(subscriber, || {
        let _span = tracing::info_span!("reconcile", kind = "Token").entered();
    });
    assert!(telemetry.force_flush().await.is_err());
    telemetry.shutdown().await;
    Ok(())
}

#[test]
fn no_exporter_without_the_endpoint_variable() -> anyhow::Result<()> {
    // No runtime here: without an endpoint, none is needed either.
    assert_eq!(config(&[("OTEL_SERVICE_NAME", "x")]), None);
    let (_subscriber, telemetry) = telemetry::subscriber(EnvFilter::new("info"), None)?;
    assert!(!telemetry.is_exporting());
    Ok(())
}

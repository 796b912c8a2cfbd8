//! OTLP export end to end: a fake collector on 127.0.0.1 receives the spans
//! and metrics that the binaries' subscriber (`subscriber`, what `init`
//! installs) exports over OTLP/HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry::KeyValue as Attr;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use prost::Message as _;
use starling_telemetry::{self as telemetry, LogFormat, OtlpConfig};
use tracing_subscriber::EnvFilter;

/// What the fake collector got: (content-type, body) per POST.
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

/// A collector accepting POST /v1/traces and /v1/metrics; returns its base
/// URL and what each path received.
async fn fake_collector() -> anyhow::Result<(String, Received, Received)> {
    let traces = Received::default();
    let metrics = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(collect).with_state(traces.clone()))
        .route("/v1/metrics", post(collect).with_state(metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the fake collector")?;
    let addr = listener.local_addr().context("collector address")?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), traces, metrics))
}

fn config(vars: &[(&str, &str)]) -> Option<OtlpConfig> {
    let vars: HashMap<&str, &str> = vars.iter().copied().collect();
    OtlpConfig::from_lookup("starling-test", |k| vars.get(k).map(|v| v.to_string()))
}

/// Waits up to 10 s for at least one export to arrive.
async fn bodies(received: &Received) -> Vec<(String, Bytes)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = received.lock().map(|r| r.clone()).unwrap_or_default();
        if !got.is_empty() || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
async fn spans_are_exported_over_otlp_http() -> anyhow::Result<()> {
    let (base, received, _) = fake_collector().await?;
    let cfg = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]).context("export is on")?;
    let (subscriber, telemetry) = telemetry::subscriber(
        EnvFilter::new("info"),
        LogFormat::Text,
        Some(&cfg),
        "starling-test",
    )?;
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
    let bodies = bodies(&received).await;
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
                Some(&"starling-test")
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
    let (subscriber, telemetry) = telemetry::subscriber(
        EnvFilter::new("info"),
        LogFormat::Text,
        Some(&cfg),
        "starling-test",
    )?;
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
    let (_subscriber, telemetry) = telemetry::subscriber(
        EnvFilter::new("info"),
        LogFormat::Json,
        None,
        "starling-test",
    )?;
    assert!(!telemetry.is_exporting());
    Ok(())
}

/// An observable counter on the telemetry's meter reaches the collector with
/// the value its callback reads, labels as attributes, under the scope name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observable_metrics_are_exported_over_otlp_http() -> anyhow::Result<()> {
    let (base, _, received) = fake_collector().await?;
    let cfg = config(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
        ("OTEL_TRACES_EXPORTER", "none"),
    ])
    .context("export is on")?;
    assert_eq!(cfg.traces_url, None);
    let (_subscriber, telemetry) = telemetry::subscriber(
        EnvFilter::new("info"),
        LogFormat::Text,
        Some(&cfg),
        "starling-test",
    )?;
    let meter = telemetry.meter().context("metrics are exported")?;
    let _counter = meter
        .u64_observable_counter("test_requests")
        .with_description("Requests.")
        .with_callback(|o| o.observe(42, &[Attr::new("route", "/a/{id}")]))
        .build();
    telemetry.force_flush().await?;
    let bodies = bodies(&received).await;
    assert!(!bodies.is_empty(), "the collector received no metrics");
    let mut found = Vec::new();
    for (content_type, body) in &bodies {
        assert_eq!(content_type, "application/x-protobuf");
        let request = ExportMetricsServiceRequest::decode(body.as_ref())
            .context("decoding ExportMetricsServiceRequest")?;
        for rm in &request.resource_metrics {
            for sm in &rm.scope_metrics {
                let scope = sm.scope.as_ref().map(|s| s.name.as_str());
                for m in sm.metrics.iter().filter(|m| m.name == "test_requests") {
                    let Some(Data::Sum(sum)) = &m.data else {
                        anyhow::bail!("test_requests is not a sum: {m:?}");
                    };
                    assert!(sum.is_monotonic);
                    for p in &sum.data_points {
                        found.push((
                            scope.map(str::to_owned),
                            attrs(&p.attributes).get("route").map(|r| r.to_string()),
                            p.value,
                        ));
                    }
                }
            }
        }
    }
    assert!(
        found.contains(&(
            Some("starling-test".into()),
            Some("/a/{id}".into()),
            Some(number_data_point::Value::AsInt(42))
        )),
        "{found:?}"
    );
    telemetry.shutdown().await;
    Ok(())
}

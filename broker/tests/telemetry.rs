//! The real broker binary's telemetry: OTLP/HTTP export of spans and metrics
//! to a fake collector on 127.0.0.1 (decoded with opentelemetry-proto's
//! prost types), and JSON log lines.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{Broker, Client, Opts, STEP, V5, raw_connect, raw_read_to_close, raw_send};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

type Received = Arc<Mutex<Vec<Bytes>>>;

async fn collect(State(r): State<Received>, body: Bytes) -> StatusCode {
    r.lock().unwrap_or_else(|e| e.into_inner()).push(body);
    StatusCode::OK
}

/// A collector on 127.0.0.1: its base URL, then what /v1/traces and
/// /v1/metrics received.
async fn fake_collector() -> (String, Received, Received) {
    let traces = Received::default();
    let metrics = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(collect).with_state(traces.clone()))
        .route("/v1/metrics", post(collect).with_state(metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the fake collector");
    let addr = listener.local_addr().expect("collector address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), traces, metrics)
}

fn value(v: &Option<AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), value(&kv.value)?)))
        .collect()
}

fn spans(bodies: &[Bytes]) -> Vec<(HashMap<String, String>, Span)> {
    let mut out = Vec::new();
    for b in bodies {
        let req = ExportTraceServiceRequest::decode(b.as_ref()).expect("decoding spans");
        for rs in req.resource_spans {
            let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                out.extend(ss.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
    }
    out
}

/// Every data point of the sums and gauges named `name`: (attributes, value).
fn points(bodies: &[Bytes], name: &str) -> Vec<(HashMap<String, String>, i64)> {
    let mut out = Vec::new();
    for b in bodies {
        let req = ExportMetricsServiceRequest::decode(b.as_ref()).expect("decoding metrics");
        for sm in req
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
        {
            for m in sm.metrics.into_iter().filter(|m| m.name == name) {
                let dps = match m.data {
                    Some(Data::Sum(s)) => s.data_points,
                    Some(Data::Gauge(g)) => g.data_points,
                    other => panic!("{name} is neither a sum nor a gauge: {other:?}"),
                };
                for p in dps {
                    if let Some(number_data_point::Value::AsInt(v)) = p.value {
                        out.push((attrs(&p.attributes), v));
                    }
                }
            }
        }
    }
    out
}

/// One HTTP/1.0 GET with the default admin credentials; the status code.
async fn admin_get(b: &Broker, path: &str) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: test\r\nAuthorization: Basic YWRtaW46cHVibGlj\r\n\r\n"
    );
    http_status(b, "admin", &req).await
}

async fn http_status(b: &Broker, listener: &str, req: &str) -> u16 {
    let mut s = raw_connect(b.addr(listener)).await;
    raw_send(&mut s, req.as_bytes()).await;
    let (bytes, _) = raw_read_to_close(&mut s, STEP).await;
    let text = String::from_utf8_lossy(&bytes);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_collector_and_are_flushed_on_shutdown() {
    let (base, traces, metrics) = fake_collector().await;
    // Default batch delay (5 s) and export interval (60 s): whatever arrives
    // within this test was flushed by the shutdown.
    let mut b = Broker::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env("OTEL_SERVICE_NAME", "broker-under-test")
        .start();

    let mut c = Client::connect(Opts::new(V5, "otel-probe", b.mqtt())).await;
    for i in 0..3u8 {
        c.publish("otel/t", 1, false, &[i]).await;
    }
    c.disconnect().await;
    assert_eq!(admin_get(&b, "/api/v4/clients/otel-probe").await, 404);
    assert_eq!(admin_get(&b, "/api/v4/stats").await, 200);
    let post = "POST /broker/otel/h HTTP/1.0\r\nHost: test\r\nContent-Length: 1\r\n\r\nx";
    assert_eq!(http_status(&b, "http", post).await, 200);

    b.terminate();
    let status = b.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "broker exit {status:?}\n{}",
        b.log()
    );

    let traces = traces.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let spans = spans(&traces);
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let conn = spans
        .iter()
        .find(|(_, s)| s.name == "mqtt connection")
        .unwrap_or_else(|| panic!("no connection span among {names:?}\n{}", b.log()));
    assert_eq!(
        conn.0.get("service.name").map(String::as_str),
        Some("broker-under-test")
    );
    let a = attrs(&conn.1.attributes);
    assert_eq!(
        a.get("client_id").map(String::as_str),
        Some("otel-probe"),
        "{a:?}"
    );
    assert_eq!(a.get("listener").map(String::as_str), Some("mqtt"), "{a:?}");
    assert_eq!(a.get("protocol").map(String::as_str), Some("5.0"), "{a:?}");
    assert_eq!(
        a.get("reason").map(String::as_str),
        Some("client disconnected"),
        "{a:?}"
    );
    assert!(
        a.get("peer").is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{a:?}"
    );
    // One span for the whole connection, none per message.
    assert_eq!(
        names.iter().filter(|n| **n == "mqtt connection").count(),
        1,
        "{names:?}"
    );

    let admin: Vec<HashMap<String, String>> = spans
        .iter()
        .filter(|(_, s)| s.name.starts_with("GET /api/"))
        .map(|(_, s)| attrs(&s.attributes))
        .collect();
    assert!(
        admin.iter().any(|a| a.get("http.route").map(String::as_str)
            == Some("/api/v4/clients/{clientid}")
            && a.get("http.response.status_code").map(String::as_str) == Some("404")),
        "{admin:?} among {names:?}"
    );
    assert!(
        admin
            .iter()
            .any(|a| a.get("http.route").map(String::as_str) == Some("/api/v4/stats")),
        "{admin:?}"
    );

    let broker: Vec<HashMap<String, String>> = spans
        .iter()
        .filter(|(_, s)| s.name == "POST /broker/{*topic}")
        .map(|(_, s)| attrs(&s.attributes))
        .collect();
    assert_eq!(broker.len(), 1, "{names:?}");
    assert_eq!(
        broker[0]
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );

    let metrics = metrics.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!metrics.is_empty(), "no metrics export\n{}", b.log());
    let received = points(&metrics, "starling_messages_received");
    assert!(
        received
            .iter()
            .any(|(a, v)| a.get("qos").map(String::as_str) == Some("1") && *v == 3),
        "{received:?}"
    );
    let connects = points(&metrics, "starling_mqtt_connects");
    assert!(
        connects.iter().any(
            |(a, v)| a.get("listener").map(String::as_str) == Some("mqtt")
                && a.get("protocol").map(String::as_str) == Some("5.0")
                && *v == 1
        ),
        "{connects:?}"
    );
    let requests = points(&metrics, "starling_admin_requests");
    assert!(
        requests
            .iter()
            .any(
                |(a, v)| a.get("route").map(String::as_str) == Some("/api/v4/clients/{clientid}")
                    && a.get("status").map(String::as_str) == Some("404")
                    && *v == 1
            ),
        "{requests:?}"
    );
    // A gauge read at export time: the client is gone by then.
    let open = points(&metrics, "starling_connections");
    assert!(
        open.iter().all(|(_, v)| *v == 0) && !open.is_empty(),
        "{open:?}"
    );
}

#[tokio::test]
async fn json_log_lines_parse_one_object_each() {
    let mut b = Broker::builder().env("STARLING_LOG_FORMAT", "json").start();
    let c = Client::connect(Opts::new(V5, "json-logs", b.mqtt())).await;
    c.disconnect().await;
    b.terminate();
    assert!(
        b.wait_exit(Duration::from_secs(15)).await.is_some(),
        "{}",
        b.log()
    );

    let log = b.log();
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("[err] "))
        .collect();
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(
            v.get("timestamp").is_some() && v.get("level").is_some(),
            "{line}"
        );
        if let Some(m) = v.pointer("/fields/message").and_then(|m| m.as_str()) {
            messages.push(m.to_owned());
        }
    }
    // The broker's own debug lines about this client, and its shutdown.
    assert!(messages.iter().any(|m| m == "connected"), "{messages:?}");
    assert!(
        messages.iter().any(|m| m == "shutting down"),
        "{messages:?}"
    );
}

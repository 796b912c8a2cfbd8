//! Logs and traces.
//!
//! Logs always go to stderr, filtered by `RUST_LOG`. Traces are exported over
//! OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; otherwise no exporter, no
//! OpenTelemetry layer and no background thread exist.
//!
//! Spans are batched by the SDK's batch span processor; each export is one
//! HTTP request made with hyper (rustls with ring for `https://` endpoints) on
//! the operator's tokio runtime. The [`Telemetry`] guard flushes and shuts the
//! exporter down on a graceful stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::runtime::Handle;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` says otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "starling-operator";
/// The log filter when `RUST_LOG` is unset (it also decides which spans are
/// exported: reconcile spans are at INFO).
pub const DEFAULT_FILTER: &str = "info,kube_runtime=warn,kube_client=warn";
/// Per-export HTTP timeout unless `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` (ms)
/// says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read (they are a few bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// OTLP trace export settings, read from the standard OpenTelemetry
/// environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Full URL spans are POSTed to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as
    /// is, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`.
    pub traces_url: String,
    /// `OTEL_SERVICE_NAME`, else `service.name` from
    /// `OTEL_RESOURCE_ATTRIBUTES`, else [`DEFAULT_SERVICE_NAME`].
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` when it asks for something other than
    /// `http/protobuf` (which is all this build speaks); logged at start.
    pub unsupported_protocol: Option<String>,
}

impl OtlpConfig {
    /// From the process environment; `None` means "do not export".
    pub fn from_env() -> Option<OtlpConfig> {
        OtlpConfig::from_lookup(|key| std::env::var(key).ok())
    }

    /// From any variable source (tests); `None` unless an OTLP endpoint is
    /// set, or when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<OtlpConfig> {
        let var = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        let traces_url = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(url) => url,
            None => format!(
                "{}/v1/traces",
                var("OTEL_EXPORTER_OTLP_ENDPOINT")?.trim_end_matches('/')
            ),
        };
        let service_name = var("OTEL_SERVICE_NAME")
            .or_else(|| {
                var("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
                    attrs.split(',').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        (k.trim() == "service.name" && !v.trim().is_empty())
                            .then(|| v.trim().to_owned())
                    })
                })
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        let timeout = var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        let unsupported_protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .filter(|p| p != "http/protobuf");
        Some(OtlpConfig {
            traces_url,
            service_name,
            timeout,
            unsupported_protocol,
        })
    }
}

/// Owns the trace pipeline; flush it with [`Telemetry::shutdown`] before the
/// process exits.
#[must_use = "call shutdown() so the last spans are exported"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now.
    pub async fn force_flush(&self) -> anyhow::Result<()> {
        let Some(provider) = self.provider.clone() else {
            return Ok(());
        };
        // The SDK blocks until the batch thread has exported, and that export
        // needs this runtime: block elsewhere.
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .context("span flush task")?
            .context("exporting spans to the OTLP endpoint")
    }

    /// Exports what is left and stops the exporter. Failures are logged: the
    /// process is stopping anyway.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "OTLP exporter shutdown"),
            Err(e) => tracing::warn!(error = %e, "OTLP exporter shutdown task"),
        }
    }
}

/// Installs the process-wide subscriber: logs per `RUST_LOG`, and OTLP trace
/// export when the environment asks for it. Call inside the tokio runtime.
pub fn init() -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let otlp = OtlpConfig::from_env();
    let (subscriber, telemetry) = subscriber(filter, otlp.as_ref())?;
    subscriber
        .try_init()
        .context("installing the tracing subscriber")?;
    if let Some(cfg) = &otlp {
        tracing::info!(url = %cfg.traces_url, service = %cfg.service_name, "exporting traces over OTLP/HTTP");
        if let Some(p) = &cfg.unsupported_protocol {
            tracing::warn!(protocol = %p, "only OTLP http/protobuf is supported; using it");
        }
    }
    Ok(telemetry)
}

/// The subscriber [`init`] installs, without installing it: `filter` applies
/// to logs and spans alike; with `otlp`, spans also go to its endpoint.
/// Call inside the tokio runtime when `otlp` is set.
pub fn subscriber(
    filter: EnvFilter,
    otlp: Option<&OtlpConfig>,
) -> anyhow::Result<(impl tracing::Subscriber + Send + Sync + 'static, Telemetry)> {
    let provider = otlp.map(tracer_provider).transpose()?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("starling-operator")));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel);
    Ok((subscriber, Telemetry { provider }))
}

/// The OTLP/HTTP exporter behind a batch span processor.
fn tracer_provider(cfg: &OtlpConfig) -> anyhow::Result<SdkTracerProvider> {
    let runtime = Handle::try_current()
        .context("OTLP export needs a tokio runtime (telemetry set up outside of it)")?;
    let https = cfg.traces_url.starts_with("https://");
    let client = HyperOnRuntime {
        client: Client::builder(TokioExecutor::new()).build(connector(https)?),
        timeout: cfg.timeout,
        runtime,
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(cfg.traces_url.clone())
        .with_timeout(cfg.timeout)
        .build()
        .with_context(|| format!("OTLP span exporter for {}", cfg.traces_url))?;
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// HTTP, and HTTPS with the system's CA certificates (loaded only for an
/// `https://` endpoint, so a plain-HTTP collector works in a distroless
/// image without any).
fn connector(https: bool) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = HttpsConnectorBuilder::new();
    let builder = if https {
        builder
            .with_provider_and_native_roots(provider)
            .context("loading the system CA certificates for the https OTLP endpoint")?
    } else {
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS settings for the OTLP client")?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(tls)
    };
    Ok(builder.https_or_http().enable_http1().build())
}

/// The exporter's HTTP client: hyper, each request run on the operator's
/// tokio runtime (the SDK's batch processor exports from its own thread,
/// where hyper would find no reactor).
#[derive(Debug)]
struct HyperOnRuntime {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    runtime: Handle,
}

#[async_trait::async_trait]
impl HttpClient for HyperOnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let exchange = async move {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            // The exporter judges the status code.
            let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .map_err(|_| format!("OTLP export: no answer within {timeout:?}"))?
            })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Option<OtlpConfig> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(config(&[]), None);
        assert_eq!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), None);
        assert_eq!(config(&[("OTEL_SERVICE_NAME", "x")]), None);
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        assert!(config(&on).is_some());
        let disabled = [on[0], ("OTEL_SDK_DISABLED", "true")];
        assert_eq!(config(&disabled), None);
        let none = [on[0], ("OTEL_TRACES_EXPORTER", "none")];
        assert_eq!(config(&none), None);
    }

    #[test]
    fn standard_variables() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(
            c,
            OtlpConfig {
                traces_url: "http://collector:4318/v1/traces".into(),
                service_name: DEFAULT_SERVICE_NAME.into(),
                timeout: DEFAULT_TIMEOUT,
                unsupported_protocol: None,
            }
        );
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://t.example/otlp",
            ),
            ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=from-attrs"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(c.traces_url, "https://t.example/otlp");
        assert_eq!(c.service_name, "from-attrs");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.unsupported_protocol.as_deref(), Some("grpc"));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t/v1/traces"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "ops"),
        ])
        .unwrap();
        assert_eq!(c.service_name, "ops");
    }

    /// The real reconciler's span (not a hand-made one) reaches a collector.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_reconcile_is_one_exported_span() {
        use axum::body::Bytes as Body;
        use axum::extract::State;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use prost::Message as _;
        use tracing::instrument::WithSubscriber as _;

        use crate::crd::{Acl, BrokerRef};
        use crate::metrics::Metrics;
        use crate::reconcile::fake::FakeApi;
        use crate::reconcile::{Context, acl};

        type Got = Arc<std::sync::Mutex<Vec<Body>>>;
        let got = Got::default();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(|State(got): State<Got>, body: Body| async move {
                    got.lock().unwrap().push(body);
                }),
            )
            .with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let cfg = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]).unwrap();
        let (subscriber, telemetry) =
            subscriber(EnvFilter::new(DEFAULT_FILTER), Some(&cfg)).unwrap();
        let fake = FakeApi::new();
        let ctx = Arc::new(Context::new(fake.client(), Arc::new(Metrics::default())));
        let mut object = Acl::new(
            "sensors",
            crate::crd::acl::AclSpec {
                anonymous: false,
                broker_ref: BrokerRef {
                    name: "missing".into(),
                },
                ..Default::default()
            },
        );
        object.metadata.namespace = Some("iot".into());
        let object = fake.put(&object);
        acl::reconcile(Arc::new(object), ctx)
            .with_subscriber(subscriber)
            .await
            .unwrap();
        telemetry.force_flush().await.unwrap();
        telemetry.shutdown().await;

        let bodies = got.lock().unwrap().clone();
        let spans: Vec<_> = bodies
            .iter()
            .map(|b| ExportTraceServiceRequest::decode(b.as_ref()).unwrap())
            .flat_map(|r| r.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect();
        let reconciles: Vec<_> = spans.iter().filter(|s| s.name == "reconcile").collect();
        assert_eq!(reconciles.len(), 1, "{spans:?}");
        let attrs: HashMap<&str, &str> = reconciles[0]
            .attributes
            .iter()
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(v) => Some((kv.key.as_str(), v.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(attrs.get("kind"), Some(&"ACL"));
        assert_eq!(attrs.get("name"), Some(&"sensors"));
        assert_eq!(attrs.get("namespace"), Some(&"iot"));
    }

    #[test]
    fn no_exporter_without_config() {
        let (_subscriber, telemetry) = subscriber(EnvFilter::new("info"), None).unwrap();
        assert!(!telemetry.is_exporting());
    }
}

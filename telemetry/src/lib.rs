//! Logs, traces and metrics for the Starling binaries, set up one way.
//!
//! Logs always go to stderr, filtered by `RUST_LOG`, as text or as one JSON
//! object per line ([`LogFormat`]). Traces and metrics are exported over
//! OTLP/HTTP (protobuf) only when the standard OpenTelemetry variables ask
//! for it ([`OtlpConfig`]); otherwise no exporter, no OpenTelemetry layer
//! and no background thread exist.
//!
//! Spans are batched by the SDK's batch span processor and metrics read by
//! its periodic reader (`OTEL_METRIC_EXPORT_INTERVAL`, default 60 s); each
//! export is one HTTP request made with hyper (rustls with ring for
//! `https://` endpoints) on the caller's tokio runtime. The [`Telemetry`]
//! guard flushes and shuts the exporters down on a graceful stop.

mod client;

use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{
    MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::runtime::Handle;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Per-export HTTP timeout unless `OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_TIMEOUT`
/// (milliseconds) says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP export needs a tokio runtime, and telemetry was set up outside of one")]
    NoRuntime,
    #[error("cannot load the system CA certificates for the https OTLP endpoint: {0}")]
    CaCertificates(#[source] std::io::Error),
    #[error("cannot configure TLS for the OTLP client: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot set up the OTLP {signal} exporter for {url}: {source}")]
    Exporter {
        signal: &'static str,
        url: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a tracing subscriber is already installed in this process")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
    #[error("exporting to the OTLP endpoint failed: {0}")]
    Export(String),
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What differs between the binaries.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
    /// say otherwise; also the instrumentation scope of spans and metrics.
    pub service_name: &'static str,
    /// The filter when `RUST_LOG` is unset (it also decides which spans are
    /// exported).
    pub default_filter: &'static str,
    pub log_format: LogFormat,
    /// Whether this binary has metrics to export over OTLP; without any,
    /// no metrics pipeline (and no reader thread) is set up whatever the
    /// environment says.
    pub metrics: bool,
}

/// OTLP export settings, read from the standard OpenTelemetry environment
/// variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Where spans are POSTed: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is,
    /// else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; `None` without
    /// either, or with `OTEL_TRACES_EXPORTER=none`.
    pub traces_url: Option<String>,
    /// The same for metrics: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/metrics`;
    /// `OTEL_METRICS_EXPORTER=none` turns it off.
    pub metrics_url: Option<String>,
    /// `OTEL_SERVICE_NAME`, else `service.name` from
    /// `OTEL_RESOURCE_ATTRIBUTES`, else [`Options::service_name`].
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub traces_timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_METRICS_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub metrics_timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (or a per-signal one) when it asks for
    /// something other than `http/protobuf`, which is all this build speaks;
    /// logged at start.
    pub unsupported_protocol: Option<String>,
}

impl OtlpConfig {
    /// From the process environment; `None` means "do not export".
    pub fn from_env(default_service_name: &str) -> Option<OtlpConfig> {
        OtlpConfig::from_lookup(default_service_name, |key| std::env::var(key).ok())
    }

    /// From any variable source (tests); `None` unless an OTLP endpoint is
    /// set for a signal that is not turned off, or when
    /// `OTEL_SDK_DISABLED=true`.
    pub fn from_lookup(
        default_service_name: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Option<OtlpConfig> {
        let var = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let base = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        let url = |signal_var: &str, exporter_var: &str, path: &str| {
            if var(exporter_var).is_some_and(|v| v.eq_ignore_ascii_case("none")) {
                return None;
            }
            var(signal_var).or_else(|| {
                base.as_ref()
                    .map(|b| format!("{}/{path}", b.trim_end_matches('/')))
            })
        };
        let traces_url = url(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_TRACES_EXPORTER",
            "v1/traces",
        );
        let metrics_url = url(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_METRICS_EXPORTER",
            "v1/metrics",
        );
        if traces_url.is_none() && metrics_url.is_none() {
            return None;
        }
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
            .unwrap_or_else(|| default_service_name.to_owned());
        let timeout = |signal_var: &str| {
            var(signal_var)
                .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
        };
        let unsupported_protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"))
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .filter(|p| p != "http/protobuf");
        Some(OtlpConfig {
            traces_url,
            metrics_url,
            service_name,
            traces_timeout: timeout("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
            metrics_timeout: timeout("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"),
            unsupported_protocol,
        })
    }
}

/// Owns the export pipelines; flush them with [`Telemetry::shutdown`] before
/// the process exits.
#[must_use = "call shutdown() so the last spans and metrics are exported"]
#[derive(Debug)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    scope: &'static str,
}

impl Telemetry {
    /// True when spans or metrics are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.tracer.is_some() || self.meter.is_some()
    }

    /// True when spans are exported over OTLP.
    pub fn is_tracing(&self) -> bool {
        self.tracer.is_some()
    }

    /// A meter whose instruments are exported over OTLP, when metrics are.
    pub fn meter(&self) -> Option<Meter> {
        self.meter.as_ref().map(|p| p.meter(self.scope))
    }

    /// Exports every finished span and the current metric values now.
    pub async fn force_flush(&self) -> Result<(), Error> {
        let tracer = self.tracer.clone();
        let meter = self.meter.clone();
        // The SDK blocks until its export thread is done, and that export
        // needs this runtime: block elsewhere.
        tokio::task::spawn_blocking(move || {
            if let Some(t) = tracer {
                t.force_flush().map_err(|e| Error::Export(e.to_string()))?;
            }
            if let Some(m) = meter {
                m.force_flush().map_err(|e| Error::Export(e.to_string()))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Export(format!("the flush task failed: {e}")))?
    }

    /// Exports what is left and stops the exporters. Failures are logged:
    /// the process is stopping anyway.
    pub async fn shutdown(self) {
        let Telemetry { tracer, meter, .. } = self;
        if tracer.is_none() && meter.is_none() {
            return;
        }
        let done = tokio::task::spawn_blocking(move || {
            let t = tracer.map(|t| t.shutdown()).transpose();
            let m = meter.map(|m| m.shutdown()).transpose();
            (t, m)
        })
        .await;
        match done {
            Ok((t, m)) => {
                if let Err(e) = t {
                    tracing::warn!(error = %e, "OTLP span exporter shutdown");
                }
                if let Err(e) = m {
                    tracing::warn!(error = %e, "OTLP metric exporter shutdown");
                }
            }
            Err(e) => tracing::warn!(error = %e, "OTLP exporter shutdown task"),
        }
    }
}

/// The filter from `RUST_LOG`, else `default`.
pub fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// Installs the process-wide subscriber: logs per `RUST_LOG` in
/// `opts.log_format`, and OTLP export when the environment asks for it.
/// Call inside the tokio runtime.
pub fn init(opts: Options) -> Result<Telemetry, Error> {
    let otlp = OtlpConfig::from_env(opts.service_name).and_then(|mut cfg| {
        if !opts.metrics {
            cfg.metrics_url = None;
        }
        (cfg.traces_url.is_some() || cfg.metrics_url.is_some()).then_some(cfg)
    });
    let (subscriber, telemetry) = subscriber(
        env_filter(opts.default_filter),
        opts.log_format,
        otlp.as_ref(),
        opts.service_name,
    )?;
    subscriber.try_init().map_err(Error::AlreadyInstalled)?;
    if let Some(cfg) = &otlp {
        tracing::info!(
            traces = cfg.traces_url.as_deref().unwrap_or("off"),
            metrics = cfg.metrics_url.as_deref().unwrap_or("off"),
            service = %cfg.service_name,
            "exporting over OTLP/HTTP"
        );
        if let Some(p) = &cfg.unsupported_protocol {
            tracing::warn!(protocol = %p, "only OTLP http/protobuf is supported; using it");
        }
    }
    Ok(telemetry)
}

/// The subscriber [`init`] installs, without installing it: `filter` applies
/// to logs and spans alike; with `otlp`, spans and metrics also go to its
/// endpoints, under the instrumentation scope `scope`. Call inside the
/// tokio runtime when `otlp` is set.
pub fn subscriber(
    filter: EnvFilter,
    format: LogFormat,
    otlp: Option<&OtlpConfig>,
    scope: &'static str,
) -> Result<(impl tracing::Subscriber + Send + Sync + 'static, Telemetry), Error> {
    let resource = otlp.map(|cfg| {
        Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build()
    });
    let tracer = match (otlp, &resource) {
        (Some(cfg), Some(res)) => cfg
            .traces_url
            .as_deref()
            .map(|url| tracer_provider(url, cfg.traces_timeout, res.clone()))
            .transpose()?,
        _ => None,
    };
    let meter = match (otlp, &resource) {
        (Some(cfg), Some(res)) => cfg
            .metrics_url
            .as_deref()
            .map(|url| meter_provider(url, cfg.metrics_timeout, res.clone()))
            .transpose()?,
        _ => None,
    };
    let otel = tracer.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(scope))
            // Busy/idle times are not wanted, and tracking them costs two
            // clock reads on every poll of an instrumented future.
            .with_tracked_inactivity(false)
    });
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel);
    Ok((
        subscriber,
        Telemetry {
            tracer,
            meter,
            scope,
        },
    ))
}

fn runtime() -> Result<Handle, Error> {
    Handle::try_current().map_err(|_| Error::NoRuntime)
}

/// The OTLP/HTTP span exporter behind a batch span processor.
fn tracer_provider(
    url: &str,
    timeout: Duration,
    resource: Resource,
) -> Result<SdkTracerProvider, Error> {
    let client = client::HyperOnRuntime::new(url, timeout, runtime()?)?;
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(timeout)
        .build()
        .map_err(|source| Error::Exporter {
            signal: "trace",
            url: url.to_owned(),
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// The OTLP/HTTP metric exporter behind a periodic reader (interval from
/// `OTEL_METRIC_EXPORT_INTERVAL`, read by the SDK).
fn meter_provider(
    url: &str,
    timeout: Duration,
    resource: Resource,
) -> Result<SdkMeterProvider, Error> {
    let client = client::HyperOnRuntime::new(url, timeout, runtime()?)?;
    let exporter = MetricExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(timeout)
        .build()
        .map_err(|source| Error::Exporter {
            signal: "metric",
            url: url.to_owned(),
            source,
        })?;
    Ok(SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(PeriodicReader::builder(exporter).build())
        .build())
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
        OtlpConfig::from_lookup("svc", |k| vars.get(k).cloned())
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
        let none = [
            on[0],
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ];
        assert_eq!(config(&none), None);
    }

    #[test]
    fn standard_variables() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(
            c,
            OtlpConfig {
                traces_url: Some("http://collector:4318/v1/traces".into()),
                metrics_url: Some("http://collector:4318/v1/metrics".into()),
                service_name: "svc".into(),
                traces_timeout: DEFAULT_TIMEOUT,
                metrics_timeout: DEFAULT_TIMEOUT,
                unsupported_protocol: None,
            }
        );
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://t.example/otlp",
            ),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=from-attrs"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "700"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(c.traces_url.as_deref(), Some("https://t.example/otlp"));
        assert_eq!(c.metrics_url, None);
        assert_eq!(c.service_name, "from-attrs");
        assert_eq!(c.traces_timeout, Duration::from_millis(2500));
        assert_eq!(c.metrics_timeout, Duration::from_millis(700));
        assert_eq!(c.unsupported_protocol.as_deref(), Some("grpc"));
        // A per-signal endpoint alone turns on that signal only.
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m/v1/metrics"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "ops"),
        ])
        .unwrap();
        assert_eq!(c.traces_url, None);
        assert_eq!(c.metrics_url.as_deref(), Some("http://m/v1/metrics"));
        assert_eq!(c.service_name, "ops");
    }

    #[test]
    fn no_exporter_and_no_runtime_needed_without_config() {
        let (_subscriber, telemetry) =
            subscriber(EnvFilter::new("info"), LogFormat::Json, None, "svc").unwrap();
        assert!(!telemetry.is_exporting());
        assert!(telemetry.meter().is_none());
    }

    #[test]
    fn exporting_needs_a_runtime() {
        let cfg = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")]).unwrap();
        let r = subscriber(EnvFilter::new("info"), LogFormat::Text, Some(&cfg), "svc");
        assert!(matches!(r, Err(Error::NoRuntime)), "{:?}", r.err());
    }
}

//! `starling-broker`: run the broker (local default with no arguments).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use starling_broker::Broker;
use starling_broker::settings::{self, Overrides};
use starling_telemetry::LogFormat;

/// Starling MQTT broker.
///
/// With no arguments it runs the local default: MQTT on 127.0.0.1:1883,
/// HTTP (MQTT over WebSocket at /mqtt, the HTTP API under /broker/, topic
/// streams) on 127.0.0.1:1884, admin on
/// 127.0.0.1:8081, anonymous access from loopback only.
///
/// Every config key can also be set in the environment as
/// STARLING_<SECTION>_<KEY>, e.g. STARLING_MQTT_BIND=0.0.0.0:1883 or
/// STARLING_LIMITS_MAX_CONNECTIONS=5000. Flags win over the environment,
/// the environment over the file.
///
/// Logs go to stderr (RUST_LOG filters them). With OTEL_EXPORTER_OTLP_ENDPOINT
/// set, traces and metrics are also exported over OTLP/HTTP.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (sections: broker, mqtt, mqtts, http, https, admin,
    /// tls, limits, topics, auth, storage).
    #[arg(long, env = "STARLING_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for persistent state (sessions, retained messages, queued
    /// QoS 1/2 messages, last values). Without it the broker is memory-only.
    #[arg(long, env = "STARLING_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Start even though the store in the data directory is damaged: keep
    /// what is consistent and move the damaged store aside.
    #[arg(long)]
    recover_store: bool,
    /// Auth bundle (tokens and ACLs), watched for changes.
    #[arg(long, env = "STARLING_AUTH_BUNDLE", value_name = "FILE")]
    auth_bundle: Option<PathBuf>,
    /// Serve the TLS listeners with a generated certificate (development).
    #[arg(long)]
    self_signed: bool,
    /// Log line format on stderr.
    #[arg(long, env = "STARLING_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective configuration (after file, environment and flags) as TOML.
    Config,
    /// Manage tokens in an auth bundle (standalone use; in Kubernetes the
    /// operator does this).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token. Prints its secret once. With --bundle, adds the token
    /// to that bundle file (created if missing); without, prints a new
    /// bundle holding just this token.
    New {
        /// Token name (also usable as MQTT username).
        #[arg(long)]
        name: String,
        /// Broker name for a new bundle.
        #[arg(long, default_value = "starling")]
        broker: String,
        /// Auth bundle file to add the token to.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Token(TokenCommand::New {
        name,
        broker,
        bundle,
        expires_at,
        json,
    })) = &cli.command
    {
        return starling_broker::tokens::new_token(
            name,
            broker,
            bundle.as_deref(),
            expires_at.as_deref(),
            *json,
        );
    }
    let overrides = Overrides {
        config: cli.config.clone(),
        data_dir: cli.data_dir.clone(),
        recover_store: cli.recover_store,
        auth_bundle: cli.auth_bundle.clone(),
        self_signed: cli.self_signed,
    };
    let config = settings::load(&overrides, std::env::vars())?;
    if let Some(Command::Config) = cli.command {
        print!(
            "{}",
            toml::to_string(&config).context("rendering the configuration")?
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(config, cli.log_format))
}

async fn run(
    config: starling_model::config::BrokerConfig,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let telemetry = starling_telemetry::init(starling_telemetry::Options {
        service_name: "starling-broker",
        default_filter: "info",
        log_format,
        metrics: true,
    })
    .context("setting up logs and OTLP export")?;
    let result = serve(config, &telemetry).await;
    // After the last connection closed: export the last spans and values.
    telemetry.shutdown().await;
    result
}

async fn serve(
    config: starling_model::config::BrokerConfig,
    telemetry: &starling_telemetry::Telemetry,
) -> anyhow::Result<()> {
    starling_broker::otel::set_connection_spans(telemetry.is_tracing());
    let handle = Broker::start(config).await?;
    if let Some(meter) = telemetry.meter() {
        starling_broker::otel::register(&meter, handle.shared.clone());
    }
    print!(
        "{}",
        starling_broker::banner::render(&handle.shared.config, &handle.listeners)
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_for_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

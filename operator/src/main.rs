//! `starling-operator`: run the controllers (default), or `crdgen` to print
//! the CustomResourceDefinitions.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use starling_operator::shutdown::Shutdown;
use starling_operator::{app, crd};
use starling_telemetry::LogFormat;

/// Kubernetes operator for Starling MQTT brokers: turns Broker, Token and ACL
/// resources into running, secured brokers.
#[derive(Parser)]
#[command(name = "starling-operator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run,
    /// Print all CustomResourceDefinitions as YAML (a multi-document stream),
    /// or write one file per CRD into --out-dir (what `crds/` holds).
    Crdgen {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Global, so they may follow `run` too (`starling-operator run --namespace x`)
/// as well as come before it or stand alone.
#[derive(Args)]
struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(
        long,
        global = true,
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, global = true, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Run without leader election (a single replica only).
    #[arg(long, global = true)]
    no_leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, global = true, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, global = true, default_value = "starling-operator")]
    lease_name: String,
    /// Identity in the Lease (default: the pod name, else the host name).
    #[arg(long, global = true, env = "POD_NAME")]
    identity: Option<String>,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        env = "STARLING_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen { out_dir }) => crdgen(out_dir),
        Some(Command::Run) | None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(run(cli.run))
        }
    }
}

fn crdgen(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    for (file, crd) in crd::all() {
        let yaml = crd::to_yaml(&crd)?;
        match &out_dir {
            Some(dir) => std::fs::write(dir.join(file), yaml)
                .with_context(|| format!("writing {}", dir.join(file).display()))?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let telemetry = starling_telemetry::init(starling_telemetry::Options {
        service_name: starling_operator::SERVICE_NAME,
        default_filter: starling_operator::DEFAULT_LOG_FILTER,
        log_format: args.log_format,
        // Its metrics are scraped from /metrics only.
        metrics: false,
    })
    .context("setting up logs and OTLP export")?;
    let result = operate(args).await;
    // After the controllers stopped: export the last spans.
    telemetry.shutdown().await;
    result
}

async fn operate(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::default();
    shutdown.on_signals();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("starling-operator-{}", std::process::id()));
    let opts = app::Options {
        metrics_addr: args.metrics_addr,
        namespace: args.namespace,
        leader_election: !args.no_leader_election,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
    };
    app::run(client, opts, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags_go_before_or_after_the_subcommand() {
        for args in [
            &[
                "starling-operator",
                "run",
                "--lease-name",
                "x",
                "--namespace",
                "iot",
            ][..],
            &[
                "starling-operator",
                "--lease-name",
                "x",
                "--namespace",
                "iot",
                "run",
            ][..],
            &[
                "starling-operator",
                "--lease-name",
                "x",
                "--namespace",
                "iot",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(matches!(cli.command, Some(Command::Run) | None));
            assert_eq!(cli.run.lease_name, "x", "{args:?}");
            assert_eq!(cli.run.namespace.as_deref(), Some("iot"), "{args:?}");
        }
    }

    #[test]
    fn log_format_takes_text_or_json_before_or_after_run() {
        let cli = Cli::try_parse_from(["starling-operator", "run", "--log-format", "json"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.run.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["starling-operator", "--log-format", "text"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.run.log_format, LogFormat::Text);
        assert!(Cli::try_parse_from(["starling-operator", "--log-format", "yaml"]).is_err());
    }
}

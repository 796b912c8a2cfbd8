//! `starling-operator`: run the controllers, or `crdgen` to print the CRDs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "starling-operator",
    version,
    about = "Kubernetes operator for Starling MQTT brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print all CustomResourceDefinitions as YAML (a multi-document stream),
    /// or write one file per CRD into --out-dir (what `crds/` holds).
    Crdgen {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen { out_dir }) => crdgen(out_dir),
        None => anyhow::bail!("not implemented yet"),
    }
}

fn crdgen(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    for (file, crd) in starling_operator::crd::all() {
        let yaml = starling_operator::crd::to_yaml(&crd)?;
        match &out_dir {
            Some(dir) => std::fs::write(dir.join(file), yaml)?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

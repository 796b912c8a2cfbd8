#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need (Debian
# packages, a Python venv), builds the workspace, runs the Rust tests
# (unit + integration against the real broker binary), the Python/mosquitto
# end-to-end suite, the benchmark smoke and a 60 s soak.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

echo "== cargo build (workspace, test profile)"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace

echo "== helm chart (lint, template, schema validation, RBAC and CRD drift)"
bash scripts/chart-check.sh

echo "== cluster suite (needs KUBECONFIG; says NOT RUN without one)"
bash e2e/cluster/run.sh

echo "== python/mosquitto end-to-end"
STARLING_BIN="$PWD/target/debug/starling-broker" bash e2e/run-python.sh

if [ -f bench/run.sh ]; then
  echo "== benchmark smoke"
  STARLING_BIN="$PWD/target/debug/starling-broker" bash bench/run.sh --smoke
  echo "== soak (60 s, debug broker; see BENCHMARKS.md \"Soak\")"
  STARLING_BIN="$PWD/target/debug/starling-broker" bash bench/run.sh --soak 60
fi

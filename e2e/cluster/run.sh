#!/usr/bin/env bash
# The cluster suite: helm-installs charts/starling into a fresh namespace of
# the cluster KUBECONFIG points at and checks it with real clients (see
# e2e/cluster/README.md for kind and k3d).
#
#   KUBECONFIG=~/.kube/kind-starling e2e/cluster/run.sh
#
# Without KUBECONFIG it prints that it did not run, and why, and exits 0:
# that is not a pass, and it says so. ~/.kube/config is never used on its
# own: the suite creates and deletes things, so the cluster must be named.
#
# Tools: kubectl and helm from PATH, else from target/chart-check/bin (put
# there by scripts/chart-check.sh); mosquitto_pub/mosquitto_sub and curl
# from PATH. The WebSocket checks use e2e/.venv (websockets, paho-mqtt; made
# by e2e/run-python.sh) when it exists, and are skipped with the reason
# otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [ -z "${KUBECONFIG:-}" ]; then
  echo "e2e/cluster: NOT RUN: KUBECONFIG is not set, so there is no cluster to install into (CI here has neither a cluster nor Docker). Nothing was tested; this is not a pass. See e2e/cluster/README.md."
  exit 0
fi

PY=python3
if [ -x "$ROOT/e2e/.venv/bin/python" ] && "$ROOT/e2e/.venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  PY="$ROOT/e2e/.venv/bin/python"
fi
exec "$PY" "$ROOT/e2e/cluster/test_cluster.py" "$@"

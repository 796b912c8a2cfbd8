#!/usr/bin/env bash
# Python end-to-end suite: the real starling-broker binary driven by paho-mqtt
# (MQTT 3.1.1/5.0, TCP and WebSocket), Debian's mosquitto_pub/mosquitto_sub and
# raw sockets (bad input).
#
#   e2e/run-python.sh [pytest args...]
#
# Expects the broker to be built already (STARLING_BIN, default
# target/debug/starling-broker). Installs what it needs on a fresh Debian
# machine: mosquitto-clients and chromium (apt, only when missing) and a venv at e2e/.venv
# with the pinned e2e/python/requirements.txt. Non-interactive (CI=true, no stdin).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export STARLING_BIN="${STARLING_BIN:-$ROOT/target/debug/starling-broker}"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
    APT_UPDATED=1
  fi
  $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" </dev/null
}

if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
  echo "e2e: installing mosquitto-clients" >&2
  apt_install mosquitto-clients
fi
if ! command -v stdbuf >/dev/null 2>&1; then
  apt_install coreutils
fi
# test_browser.py: headless Chromium loads a page that uses the HTTP interface
# and topic streams (skipped without it, except under CI=true: a failure).
if ! command -v chromium >/dev/null 2>&1; then
  echo "e2e: installing chromium" >&2
  apt_install chromium
fi

VENV="$ROOT/e2e/.venv"
REQ="$ROOT/e2e/python/requirements.txt"
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$VENV"  # made by a Python that is gone
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    echo "e2e: installing python3-venv" >&2
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  echo "$want" >"$STAMP"
fi

if [ ! -x "$STARLING_BIN" ]; then
  echo "e2e: $STARLING_BIN is missing: build it first (cargo build -p starling-broker)" >&2
  exit 1
fi

exec "$VENV/bin/python" -m pytest "$ROOT/e2e/python" -q --timeout="${E2E_TEST_TIMEOUT:-60}" "$@"

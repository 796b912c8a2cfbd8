#!/usr/bin/env bash
# The one command for Starling's benchmarks (see BENCHMARKS.md).
#
#   bench/run.sh            full side-by-side comparison: Starling, mosquitto,
#                           rumqttd; installs mosquitto if missing, builds
#                           everything in release, writes
#                           bench/results/<timestamp>.jsonl and the table in
#                           BENCHMARKS.md (about 20 minutes on 2 cores)
#   bench/run.sh --smoke    a few seconds per scenario against Starling only
#                           (CI): fails if a scenario delivers nothing or loses
#                           QoS 1 messages (also across a kill -9 and restart
#                           with queued messages). Uses $BENCH_STARLING_BIN (or
#                           $STARLING_BIN) if set, otherwise builds and uses
#                           the debug broker.
#   bench/run.sh --soak [SECS]
#                           soak test (default 600 s; CI runs 60): mixed
#                           QoS 0/1/2, retained, persistent and short-lived
#                           clients while the auth bundle is rewritten; fails
#                           on QoS 1/2 loss, QoS 2 duplicates, RSS growth or
#                           leaked fds. Writes bench/results/soak-<ts>.jsonl.
#                           Uses $BENCH_STARLING_BIN (or $STARLING_BIN) if set,
#                           otherwise builds and uses the release broker.
#
# Extra arguments go to `starling-bench compare` (or `smoke`), e.g.
#   bench/run.sh --repeat 5 --only a-,c-
#   bench/run.sh --brokers mosquitto,rumqttd --secs 2
#   bench/run.sh --only f-,g-      # HTTP and WebSocket streams: Starling only,
#                                  # against their references (no peers needed)
#   bench/run.sh --only p- --repeat 3
#                                  # persistence (issue 13): Starling with its
#                                  # store, Starling memory-only, mosquitto
#   bench/run.sh --only i- --brokers starling,mosquitto
#                                  # many clients that each send little
#                                  # (issue 14): i-many-q0/q1, i-sparse-10k/50k
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD

mode=full
soak_secs=600
if [[ "${1:-}" == "--smoke" ]]; then
    mode=smoke
    shift
elif [[ "${1:-}" == "--soak" ]]; then
    mode=soak
    shift
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
        soak_secs=$1
        shift
    fi
fi

# Where cargo puts binaries (honours CARGO_TARGET_DIR and config).
target_dir() {
    cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

if [[ $mode == smoke ]]; then
    cargo build -p starling-bench
    tdir=$(target_dir)
    # STARLING_BIN is accepted too (scripts/test-all.sh passes it); the
    # harness never hands STARLING_* variables on to the broker itself.
    bin="${BENCH_STARLING_BIN:-${STARLING_BIN:-}}"
    if [[ -z "$bin" ]]; then
        cargo build -p starling-broker
        bin="$tdir/debug/starling-broker"
    fi
    BENCH_STARLING_BIN="$bin" exec "$tdir/debug/starling-bench" smoke "$@"
fi

if [[ $mode == soak ]]; then
    cargo build -p starling-bench
    tdir=$(target_dir)
    bin="${BENCH_STARLING_BIN:-${STARLING_BIN:-}}"
    if [[ -z "$bin" ]]; then
        cargo build --release -p starling-broker
        bin="$tdir/release/starling-broker"
    fi
    mkdir -p bench/results
    out="bench/results/soak-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
    BENCH_STARLING_BIN="$bin" exec "$tdir/debug/starling-bench" soak \
        --duration "$soak_secs" --out "$out" \
        --command "bench/run.sh --soak $soak_secs${*:+ $*}" "$@"
fi

# --- Starling and the generator ----------------------------------------------
echo "run.sh: building starling-broker and starling-bench (release)" >&2
cargo build --release -p starling-broker -p starling-bench
tdir=$(target_dir)

# --- peers -----------------------------------------------------------------
# Only those some selected scenario runs on (f-http and g-ws-fanout are
# Starling's alone: `--only f-,g-` needs neither peer).
needed=$("$tdir/release/starling-bench" compare --list-brokers "$@")
mosquitto_bin=mosquitto
if grep -qx mosquitto <<<"$needed"; then
    if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
        echo "run.sh: installing mosquitto (Debian package)" >&2
        sudo=""
        [[ $(id -u) -eq 0 ]] || sudo="sudo"
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q mosquitto
    fi
    mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi

# rumqttd lives in its own Cargo project (not a workspace member, not built
# by CI), with its own target directory.
rumqttd_bin="$root/bench/peers/rumqttd/target/release/starling-bench-rumqttd"
if grep -qx rumqttd <<<"$needed"; then
    echo "run.sh: building the rumqttd peer (bench/peers/rumqttd)" >&2
    env -u CARGO_TARGET_DIR cargo build --release --quiet \
        --manifest-path bench/peers/rumqttd/Cargo.toml
fi

mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="bench/results/$stamp.jsonl"

"$tdir/release/starling-bench" compare \
    --starling-bin "$tdir/release/starling-broker" \
    --mosquitto-bin "$mosquitto_bin" \
    --rumqttd-bin "$rumqttd_bin" \
    --out "$out" \
    --markdown BENCHMARKS.md \
    --command "bench/run.sh${*:+ $*}" \
    "$@"

echo "run.sh: results in $out, table in BENCHMARKS.md" >&2

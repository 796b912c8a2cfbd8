#!/usr/bin/env python3
"""Measures the time from an auth-bundle rewrite to the disconnect of the
revoked token's connection (the issue's "closing note" number).

    e2e/.venv/bin/python e2e/measure_revoke.py [--runs 20] [--json]

Starts the real broker (STARLING_BIN, default target/debug/starling-broker)
with a bundle holding one token per run plus a keeper token, connects every
token over raw MQTT 5 sockets, then revokes them one at a time: the bundle is
rewritten like the broker's CLI does it (temporary file renamed over the
original) and the clock runs until the victim's socket has the broker's
DISCONNECT (reason 0x87). A random pause between runs spreads the rewrites
over the broker's 250 ms poll interval. The keeper must stay connected and
answer a ping after every run. Prints every sample and min/median/max.
Measures, does not assert a bound (it exits 1 only if something broke).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "python"))

import mqttraw as raw  # noqa: E402
from broker import Broker  # noqa: E402

HASH_KEY = base64.b64encode(b"starling-revoke-latency-key-0001").decode()
BROKER_NAME = "measure"


def secret_hash(secret: str) -> str:
    key = base64.b64decode(HASH_KEY)
    return base64.b64encode(hmac.new(key, secret.encode(), hashlib.sha256).digest()).decode()


def write_bundle(path: str, secrets: dict[str, str]) -> float:
    doc = {
        "version": 1,
        "broker": BROKER_NAME,
        "hash_key": HASH_KEY,
        "tokens": [{"name": n, "secret_hash": secret_hash(s)} for n, s in secrets.items()],
        "acls": [{"name": "all", "selector": {"match_labels": {}}, "rules": [
            {"topics": ["m/#"], "actions": ["publish", "subscribe"], "effect": "allow"}]}],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return time.monotonic()


def connect(addr, name: str, secret: str) -> raw.RawClient:
    body = raw.mqtt_str("MQTT") + bytes([5, 0x02 | 0x80 | 0x40]) + struct.pack("!H", 60)
    body += raw.props() + raw.mqtt_str(name) + raw.mqtt_str(name) + raw.mqtt_str(secret)
    c = raw.RawClient(addr, raw.V5)
    c.send(raw.packet(raw.CONNECT, 0, body))
    ack = c.expect(raw.CONNACK)
    if ack.reason != 0:
        raise SystemExit(f"{name}: CONNACK {ack.fields}")
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="starling-revoke-") as d:
        path = os.path.join(d, "bundle.json")
        secrets = {f"victim-{i}": f"victim-secret-{i}-{os.urandom(8).hex()}" for i in range(args.runs)}
        secrets["keeper"] = f"keeper-secret-{os.urandom(8).hex()}"
        write_bundle(path, secrets)
        broker = Broker(
            {"STARLING_AUTH_BUNDLE": path, "STARLING_BROKER_NAME": BROKER_NAME, "RUST_LOG": "warn"},
            name="revoke-latency",
        ).start()
        try:
            keeper = connect(broker.mqtt, "keeper", secrets["keeper"])
            victims = {n: connect(broker.mqtt, n, s) for n, s in secrets.items() if n != "keeper"}
            samples: list[float] = []
            for name, sock in victims.items():
                time.sleep(random.uniform(0.3, 0.6))
                del secrets[name]
                t0 = write_bundle(path, secrets)
                pkts = sock.wait_closed(5.0)
                took = time.monotonic() - t0
                reasons = [p.reason for p in pkts if p.ptype == raw.DISCONNECT]
                if reasons != [0x87]:
                    print(f"{name}: expected DISCONNECT 0x87, got {[(p.ptype, p.fields) for p in pkts]}")
                    return 1
                samples.append(took)
                sock.close()
                keeper.send(raw.pingreq())
                keeper.expect(raw.PINGRESP)
            broker.check_alive()
        finally:
            broker.stop()

    ms = [s * 1000 for s in samples]
    summary = {
        "runs": len(ms),
        "min_ms": round(min(ms), 1),
        "median_ms": round(statistics.median(ms), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.mean(ms), 1),
        "samples_ms": [round(x, 1) for x in ms],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print("bundle write -> DISCONNECT of the revoked token (ms):")
        print("  " + " ".join(f"{x:.0f}" for x in ms))
        print(
            f"runs {summary['runs']}: min {summary['min_ms']} ms, median {summary['median_ms']} ms, "
            f"max {summary['max_ms']} ms, mean {summary['mean_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

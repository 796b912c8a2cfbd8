"""Randomized ACL property, across protocols: with random bundles and random
subscriptions over MQTT, WebSocket topic streams and HTTP GET, no client ever
receives a message on a topic its token may not read, and a granted
subscription receives every live message it matches and may read (filtered
subscriptions withhold exactly the denied topics, nothing more).

The reference semantics below come straight from docs/auth-bundle.md, not
from the broker: reading topic T is allowed when no subscribe-deny rule
matches T and an allow rule matches it (or the default policy allows).
Whether a filter is granted at all is the broker's decision (model tests pin
that down); this test checks what flows through whatever was granted.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import pytest

from broker import TARGET
from clients import ANY_CODE, TIMEOUT, V5, Client, uid
from conftest import shutdown
from test_auth import Bundle, start

websockets_sync = pytest.importorskip("websockets.sync.client")

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="token auth and streams are Starling's own")

TOPICS = ["a", "a/b", "a/c", "a/b/c", "a/b/d", "b", "b/c", "$SYS/a"]
FILTERS = ["#", "+", "a/#", "a/+", "a/b/#", "a/+/c", "+/b", "+/+/+", "b/#", "$SYS/#", "a", "a/b/c", "+/c"]
ROUNDS = 4


def matches(f: str, t: str) -> bool:
    """MQTT topic matching, with 4.7.2: wildcards first never match `$` topics."""
    if t.startswith("$") and f[:1] in ("+", "#"):
        return False
    fl, tl = f.split("/"), t.split("/")
    for i, level in enumerate(fl):
        if level == "#":
            return True
        if i >= len(tl):
            return False
        if level != "+" and level != tl[i]:
            return False
    return len(fl) == len(tl)


def readable(rules: list[dict], default_allow: bool, t: str) -> bool:
    subs = [r for r in rules if "subscribe" in r["actions"]]
    if any(matches(f, t) for r in subs if r["effect"] == "deny" for f in r["topics"]):
        return False
    return default_allow or any(matches(f, t) for r in subs if r["effect"] == "allow" for f in r["topics"])


def get_latest(http, secret: str, f: str):
    path = urllib.parse.quote(f.replace("#", "@"), safe="/@+$")
    req = urllib.request.Request(
        f"http://{http[0]}:{http[1]}/broker/{path}?wait=0",
        headers={"Authorization": f"Bearer {secret}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, urllib.parse.unquote(r.headers.get("MQTT-Topic", "")), r.read()
    except urllib.error.HTTPError as e:
        return e.code, None, e.read()


def test_no_protocol_delivers_a_topic_the_token_may_not_read():
    rng = random.Random(0x5EED_0009)
    totals = {"delivered": 0, "withheld": 0, "refused": 0, "granted": 0}
    for round_no in range(ROUNDS):
        with tempfile.TemporaryDirectory(prefix="starling-aclprop-") as d:
            bundle = Bundle(f"{d}/bundle.json")
            default_allow = rng.random() < 0.3
            bundle.default_policy = "allow" if default_allow else "deny"
            rules: dict[str, list[dict]] = {}
            for t in ("t0", "t1", "t2"):
                bundle.token(t)
                rules[t] = []
                for _ in range(rng.randint(1, 3)):
                    effect = "deny" if rng.random() < 0.4 else "allow"
                    topics = [rng.choice(FILTERS)]
                    bundle.rule(f"acl-{t}", [t], topics, ["subscribe"], effect)
                    rules[t].append({"topics": topics, "actions": ["subscribe"], "effect": effect})
            bundle.token("pub")
            bundle.rule("publisher", ["pub"], ["#", "$SYS/#"], ["publish"])
            b = start(bundle, name=f"aclprop{round_no}")
            opened = []
            streams = contextlib.ExitStack()
            try:
                publisher = Client(b.mqtt, V5, client_id=uid("pub"))
                publisher.c.username_pw_set("pub", bundle.secrets["pub"])
                publisher.connect()
                opened.append(publisher)
                # Retained values first: new subscriptions get them on subscribe.
                for t in TOPICS[::2]:
                    publisher.publish(t, f"r:{t}".encode(), qos=1, retain=True)
                subs = []  # (token, filter, kind, handle)
                for tok in ("t0", "t1", "t2"):
                    secret = bundle.secrets[tok]
                    for f in rng.sample(FILTERS, 3):
                        c = Client(b.mqtt, V5, client_id=uid(tok))
                        c.c.username_pw_set(tok, secret)
                        c.connect()
                        opened.append(c)
                        code = c.subscribe(f, 1, expect=ANY_CODE)
                        granted = code[0].value < 0x80
                        totals["granted" if granted else "refused"] += 1
                        if granted:
                            subs.append((tok, f, "mqtt", c))
                        q = urllib.parse.quote(f.replace("#", "@"), safe="/@+$")
                        url = f"ws://{b.http[0]}:{b.http[1]}/{q}?envelope=json&access_token={urllib.parse.quote(secret)}"
                        try:
                            ws = streams.enter_context(websockets_sync.connect(url, open_timeout=TIMEOUT))
                        except Exception as e:  # InvalidStatus: the handshake's 403
                            status = getattr(getattr(e, "response", None), "status_code", None)
                            assert status == 403, f"{tok} stream {f}: {e!r}"
                            assert not granted, f"{tok}: MQTT granted {f} but the stream was refused"
                            continue
                        assert granted, f"{tok}: MQTT refused {f} but the stream was opened"
                        subs.append((tok, f, "ws", ws))
                # Live traffic on every topic; the last publish is a marker
                # each subscriber waits for so no sleep decides the end.
                for t in TOPICS:
                    publisher.publish(t, f"l:{t}".encode(), qos=1)
                for tok, f, kind, h in subs:
                    got = _collect(kind, h)
                    for topic, payload in got:
                        assert matches(f, topic), f"{tok} {kind} {f} got {topic}"
                        assert readable(rules[tok], default_allow, topic), (
                            f"{tok} via {kind} {f} received {topic}, which its rules may not read: {rules[tok]}"
                        )
                    totals["delivered"] += len(got)
                    live = {t for t, p in got if p.startswith(b"l:")}
                    want = {t for t in TOPICS if matches(f, t) and readable(rules[tok], default_allow, t)}
                    totals["withheld"] += len({t for t in TOPICS if matches(f, t)} - want)
                    assert live == want, f"{tok} via {kind} {f}: live {sorted(live)}, expected {sorted(want)}"
                    # The HTTP GET for the same filter: the most recent readable match.
                    status, topic, _ = get_latest(b.http, bundle.secrets[tok], f)
                    assert status in (200, 204), (tok, f, status)
                    if want:
                        last = [t for t in TOPICS if t in want][-1]
                        assert (status, topic) == (200, last), f"{tok} GET {f}: {status} {topic}, want {last}"
                    elif status == 200:
                        assert readable(rules[tok], default_allow, topic), f"{tok} GET {f} returned {topic}"
            finally:
                for c in opened:
                    c.close()
                streams.close()
                shutdown(b)
    assert totals["delivered"] > 40 and totals["refused"] > 5 and totals["withheld"] > 5, totals


def _collect(kind: str, h) -> list[tuple[str, bytes]]:
    """Everything the subscriber got, until nothing more arrives briefly
    after the last live publish (which was acknowledged before we look)."""
    out = []
    if kind == "mqtt":
        for m in h.drain(grace=0.5):
            out.append((m.topic, m.payload))
        return out
    while True:
        try:
            frame = h.recv(timeout=0.5)
        except TimeoutError:
            return out
        env = json.loads(frame)
        assert env["encoding"] == "utf8"
        out.append((env["topic"], env["payload"].encode()))

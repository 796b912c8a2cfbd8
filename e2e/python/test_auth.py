"""Token authentication, ACLs and live auth-bundle updates, driven by paho-mqtt
(MQTT 3.1.1 and 5.0) and a few raw sockets where the exact wire byte matters.

Each broker here is started with `STARLING_AUTH_BUNDLE=<file>`; the bundle is
written by these tests (secret hashes computed as docs/auth-bundle.md says) and
rewritten the way the broker's own CLI does it: a temporary file renamed over
the original.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import struct
import subprocess
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone

import pytest

import mqttraw as raw
from broker import DEFAULT_BIN, TARGET
from clients import TIMEOUT, V5, V311, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="token auth is Starling's own")

BROKER_NAME = "e2e-home"
HASH_KEY = base64.b64encode(b"starling-e2e-auth-tests-key-0001").decode()
# How long the broker may take to act on a bundle change (the promise).
REVOKE_WITHIN = 2.0

NOT_AUTHORIZED_V5 = 0x87
BAD_CREDENTIALS_V5 = 0x86
RATE_LIMITED_V5 = 0x9F
NOT_AUTHORIZED_V311 = 0x05
SUBACK_FAILURE_V311 = 0x80


def secret_hash(secret: str) -> str:
    """docs/auth-bundle.md: base64(HMAC-SHA256(key=b64decode(hash_key), secret))."""
    key = base64.b64decode(HASH_KEY)
    return base64.b64encode(hmac.new(key, secret.encode(), hashlib.sha256).digest()).decode()


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Bundle:
    """An auth bundle file the test owns and rewrites atomically."""

    def __init__(self, path: str):
        self.path = path
        self.tokens: dict[str, dict] = {}
        self.secrets: dict[str, str] = {}
        self.acls: list[dict] = []
        self.default_policy: str | None = None

    def token(self, name: str, *, expires_at: float | str | None = None, disabled: bool = False) -> str:
        secret = f"{name}-{uuid.uuid4().hex}"
        entry = {"name": name, "secret_hash": secret_hash(secret)}
        if expires_at is not None:
            entry["expires_at"] = expires_at if isinstance(expires_at, str) else rfc3339(expires_at)
        if disabled:
            entry["disabled"] = True
        self.tokens[name] = entry
        self.secrets[name] = secret
        return secret

    def rule(self, acl: str, tokens: list[str], topics: list[str], actions: list[str], effect: str = "allow"):
        for a in self.acls:
            if a["name"] == acl:
                a["rules"].append({"topics": topics, "actions": actions, "effect": effect})
                return
        self.acls.append(
            {"name": acl, "tokens": tokens, "rules": [{"topics": topics, "actions": actions, "effect": effect}]}
        )

    def document(self) -> dict:
        doc = {
            "version": 1,
            "broker": BROKER_NAME,
            "hash_key": HASH_KEY,
            "tokens": list(self.tokens.values()),
            "acls": self.acls,
        }
        if self.default_policy:
            doc["default_policy"] = self.default_policy
        return json.loads(json.dumps(doc))  # a copy the caller may change

    def write(self) -> float:
        """Write beside and rename over, like `starling-broker token new`.
        Returns the monotonic time the new file was in place."""
        self.write_text(json.dumps(self.document(), indent=2))
        return time.monotonic()

    def write_text(self, text: str) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)


def standard_bundle(path: str) -> Bundle:
    """writer: publish+subscribe data/#, except data/secret/# (deny wins);
    reader: subscribe data/#; spy: subscribe # (reads everything not $);
    expired / disabled tokens for the refusal cases."""
    b = Bundle(path)
    for name in ("writer", "reader", "spy", "second", "limited", "root"):
        b.token(name)
    b.token("expired", expires_at="2001-01-01T00:00:00Z")
    b.token("disabled", disabled=True)
    b.rule("writers", ["writer", "second", "expired", "disabled"], ["data/#"], ["publish", "subscribe"])
    b.rule("writers", ["writer", "second", "expired", "disabled"], ["data/secret/#"], ["publish", "subscribe"], "deny")
    b.rule("readers", ["reader"], ["data/#"], ["subscribe"])
    b.rule("spies", ["spy"], ["#"], ["subscribe"])
    b.rule("limited", ["limited"], ["data/public/#"], ["subscribe"])
    b.rule("root", ["root"], ["#"], ["publish", "subscribe"])
    return b


def start(bundle: Bundle, env: dict[str, str] | None = None, name: str = "auth"):
    bundle.write()
    e = {"STARLING_AUTH_BUNDLE": bundle.path, "STARLING_BROKER_NAME": BROKER_NAME}
    e.update(env or {})
    return launch(e, name)


@pytest.fixture
def tmpdir_path():
    with tempfile.TemporaryDirectory(prefix="starling-auth-") as d:
        yield d


@pytest.fixture
def brokers():
    started = []

    def go(bundle: Bundle, env: dict[str, str] | None = None, name: str = "auth"):
        b = start(bundle, env, name)
        started.append(b)
        return b

    yield go
    for b in started:
        shutdown(b)


@pytest.fixture(scope="module")
def shared():
    """One broker for the read-only checks; the failure limit is off so the
    many refused CONNECTs here do not lock the test address out."""
    with tempfile.TemporaryDirectory(prefix="starling-auth-shared-") as d:
        bundle = standard_bundle(os.path.join(d, "bundle.json"))
        b = start(bundle, {"STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "0"}, name="auth-shared")
        b.bundle = bundle
        yield b
        shutdown(b)


class Clients:
    """Clients made by one test, closed at its end."""

    def __init__(self):
        self.made: list[Client] = []

    def __call__(
        self,
        broker,
        version: int,
        username: str | None = None,
        password: str | None = None,
        expect_ok: bool = True,
        **kw,
    ) -> Client:
        c = Client(broker.mqtt, version, **kw)
        if username is not None or password is not None:
            c.c.username_pw_set(username, password)
        c.acks: dict[int, object] = {}
        c.c.on_publish = lambda client, userdata, mid, rc, props, acks=c.acks: acks.__setitem__(mid, rc)
        self.made.append(c)
        c.connect(expect_ok=expect_ok)
        return c


@pytest.fixture
def mk():
    m = Clients()
    yield m
    for c in m.made:
        c.close()


def tok(broker, name: str) -> tuple[str, str]:
    """(username, password) for token `name` with the token's own name."""
    return name, broker.bundle.secrets[name]


def refused_name(version: int) -> str:
    """paho's name for a bad-credentials CONNACK: 3.1.1 return code 5 is
    reported as "Not authorized"; v5 0x86 as "Bad user name or password"."""
    return "Not authorized" if version == V311 else "Bad user name or password"


def suback_refused(version: int) -> int:
    return SUBACK_FAILURE_V311 if version == V311 else NOT_AUTHORIZED_V5


def publish_ack(c: Client, topic: str, payload: bytes, qos: int = 1):
    """Publish and return the PUBACK reason code paho reported (QoS 1)."""
    info = c.publish(topic, payload, qos=qos)
    return c.acks.get(info.mid)


def assert_nothing_before(sub: Client, sentinel: str, what: str) -> None:
    got = sub.collect_until(sentinel)
    assert not got, f"{what}: received {[(m.topic, m.payload) for m in got]}"


# ------------------------------------------------------------ raw helpers


def raw_connect_packet(version: int, client_id: str, username: str | None, password: str | None) -> bytes:
    body = raw.mqtt_str("MQTT") + bytes([version])
    flags = 0x02
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body += bytes([flags]) + struct.pack("!H", 30)
    if version == raw.V5:
        body += raw.props()
    body += raw.mqtt_str(client_id)
    if username is not None:
        body += raw.mqtt_str(username)
    if password is not None:
        body += raw.mqtt_str(password)
    return raw.packet(raw.CONNECT, 0, body)


def raw_session(broker, version: int, username: str | None, password: str | None):
    """A raw client after CONNACK: (client, connack)."""
    rv = raw.V5 if version == V5 else raw.V311
    r = raw.RawClient(broker.mqtt, rv)
    r.send(raw_connect_packet(rv, uid("raw"), username, password))
    return r, r.expect(raw.CONNACK)


def metric(broker, name: str) -> float:
    host, port = broker.listeners["admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)\s*$", text, re.M)
    assert m, f"metric {name} not in /metrics:\n{text}"
    return float(m.group(1))


# ------------------------------------------------------------ authentication

FORMS = ["broker-name", "token-name", "authorization"]
STATES = ["good", "wrong-secret", "expired", "disabled"]


def credentials(broker, form: str, state: str) -> tuple[str, str]:
    token = {"good": "writer", "wrong-secret": "writer", "expired": "expired", "disabled": "disabled"}[state]
    secret = broker.bundle.secrets[token]
    if state == "wrong-secret":
        secret = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    user = {"broker-name": BROKER_NAME, "token-name": token, "authorization": "authorization"}[form]
    return user, secret


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("form", FORMS)
def test_connect(shared, mk, version, form, state):
    user, secret = credentials(shared, form, state)
    c = mk(shared, version, user, secret, expect_ok=False)
    if state == "good":
        assert not c.connack_rc.is_failure, f"{form}/{state}: refused {c.connack_rc}"
        # And the connection is really usable under the token's rules.
        topic = f"data/{uid()}"
        c.subscribe(topic, 1)
        c.publish(topic, b"hello", qos=1)
        assert c.get().payload == b"hello"
    else:
        assert c.connack_rc.is_failure, f"{form}/{state}: accepted"
        assert c.connack_rc.getName() == refused_name(version), f"{form}/{state}: {c.connack_rc}"
        assert c.disconnected.wait(TIMEOUT), "refused connection left open"


@pytest.mark.parametrize("user", ["second", "nobody", "Authorization", ""])
def test_valid_secret_with_a_foreign_username_is_refused(shared, mk, version, user):
    """Only the broker's name, the token's own name, `authorization` (or, per
    the doc, no/empty username) go with a secret: another token's name or any
    other string is refused even though the secret is valid."""
    if user == "":
        c = mk(shared, version, "", shared.bundle.secrets["writer"], expect_ok=False)
        assert not c.connack_rc.is_failure, f"empty username: {c.connack_rc}"
        return
    c = mk(shared, version, user, shared.bundle.secrets["writer"], expect_ok=False)
    assert c.connack_rc.is_failure, f"username {user!r} with writer's secret was accepted"


@pytest.mark.parametrize("state", ["wrong-secret", "expired", "disabled"])
def test_refusal_codes_on_the_wire(shared, version, state):
    """The exact CONNACK byte, then the broker closes the connection."""
    user, secret = credentials(shared, "token-name", state)
    r, ack = raw_session(shared, version, user, secret)
    with r:
        want = NOT_AUTHORIZED_V311 if version == V311 else BAD_CREDENTIALS_V5
        assert ack.reason == want, f"{state}: CONNACK {ack.fields}"
        r.wait_closed(TIMEOUT)


def test_token_new_cli_adds_a_usable_token_live(brokers, tmpdir_path, mk, version):
    """`starling-broker token new --name N --bundle FILE --json` on the live
    bundle: the running broker picks the new token up."""
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle)
    binary = os.environ.get("STARLING_BIN") or str(DEFAULT_BIN)
    name = uid("cli")
    out = subprocess.run(
        [binary, "token", "new", "--name", name, "--bundle", bundle.path, "--json"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    created = json.loads(out.stdout)
    assert created["name"] == name
    secret = created["secret"]
    assert secret not in out.stderr.decode()
    deadline = time.monotonic() + REVOKE_WITHIN + 1
    while True:
        c = mk(b, version, name, secret, expect_ok=False)
        if not c.connack_rc.is_failure:
            break
        assert time.monotonic() < deadline, f"new token {name} still refused: {c.connack_rc}"
        time.sleep(0.1)
    # The new token has no ACL: the bundle has tokens, so default deny applies.
    c.subscribe(f"data/{uid()}", 1, expect=suback_refused(version))


# ------------------------------------------------------------ ACLs


def test_subscribe_allowed_and_refused(shared, mk, version):
    base = uid()
    refused = suback_refused(version)
    reader = mk(shared, version, *tok(shared, "reader"))
    # reader: subscribe data/#, nothing else. Allowed: filters data/# covers.
    for f in (f"data/{base}/+", f"data/{base}/#", f"data/secret/{base}", "data/+/x"):
        reader.subscribe(f, 1)
    # Refused: not covered by data/# ($-topics never are by a wildcard rule).
    for f in (f"other/{base}", "#", f"+/{base}", f"$SYS/{base}"):
        reader.subscribe(f, 1, expect=refused)
    # writer: data/# minus the denied data/secret/#. A filter inside the
    # denied part is refused; one that merely overlaps it is granted
    # (filtered: see test_filtered_subscription_withholds_denied_topics).
    writer = mk(shared, version, *tok(shared, "writer"))
    writer.subscribe(f"data/{base}/w", 1)
    writer.subscribe(f"$share/g/data/{base}/shared", 1)
    for f in (f"data/secret/{base}", f"$share/g/data/secret/{base}", f"other/{base}"):
        writer.subscribe(f, 1, expect=refused)
    # The allowed subscriptions work.
    writer.publish(f"data/{base}/w", b"x", qos=1)
    assert writer.get().payload == b"x"
    got = reader.get()
    assert (got.topic, got.payload) == (f"data/{base}/w", b"x")


def test_refused_subscriptions_receive_nothing(shared, mk, version):
    """A filter that was refused is really not subscribed: publishes on it
    by an allowed writer do not reach the refused client."""
    base = uid()
    reader = mk(shared, version, *tok(shared, "reader"))
    writer2 = mk(shared, version, *tok(shared, "second"))
    # writer2 may publish data/<base>/...; the reader may not subscribe to
    # other/# or + (no allow rule covers them) so receives nothing there.
    reader.subscribe("other/#", 1, expect=suback_refused(version))
    reader.subscribe("+/+/a", 1, expect=suback_refused(version))
    reader.subscribe(f"data/{base}/sentinel", 1)
    writer2.publish(f"data/{base}/a", b"leak", qos=1)
    writer2.publish(f"data/{base}/sentinel", b"end", qos=1)
    assert_nothing_before(reader, f"data/{base}/sentinel", "through a refused subscription")


def test_filtered_subscription_withholds_denied_topics(shared, mk, version):
    """The writer may read data/# except data/secret/#: data/# is granted,
    and what is published under data/secret/ never reaches it."""
    base = uid()
    writer = mk(shared, version, *tok(shared, "writer"))
    spy = mk(shared, version, *tok(shared, "spy"))
    other = mk(shared, version, *tok(shared, "second"))
    root = mk(shared, version, *tok(shared, "root"))
    writer.subscribe("data/#", 1)
    writer.subscribe(f"data/+/{base}", 1)
    spy.subscribe(f"data/secret/{base}", 1)
    root.publish(f"data/secret/{base}", b"secret", qos=1)
    # The spy may read it, so it was published; the writer must not get it.
    assert spy.get_topic(f"data/secret/{base}").payload == b"secret"
    other.publish(f"data/{base}/a", b"open", qos=1)
    other.publish(f"data/{base}/sentinel", b"end", qos=1)
    got = [m for m in writer.collect_until(f"data/{base}/sentinel") if base in m.topic]
    assert [(m.topic, m.payload) for m in got] == [(f"data/{base}/a", b"open")], got


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_allowed_and_refused(shared, mk, version, qos):
    base = uid()
    writer = mk(shared, version, *tok(shared, "writer"))
    spy = mk(shared, version, *tok(shared, "spy"))  # may read every topic below
    reader = mk(shared, version, *tok(shared, "reader"))
    for t in (f"data/{base}/ok", f"data/secret/{base}", f"other/{base}", f"data/{base}/end"):
        spy.subscribe(t, 1)
    ok = publish_ack(writer, f"data/{base}/ok", b"allowed", qos)
    m = spy.get()
    assert (m.topic, m.payload) == (f"data/{base}/ok", b"allowed")
    if version == V5 and qos == 1:
        assert not ok.is_failure, f"allowed publish: PUBACK {ok}"
    for topic in (f"data/secret/{base}", f"other/{base}"):
        rc = publish_ack(writer, topic, b"refused", qos)
        if version == V5 and qos == 1:
            assert rc is not None and rc.value == NOT_AUTHORIZED_V5, f"PUBACK for {topic}: {rc}"
        assert writer.c.is_connected(), f"{version}: refused publish closed the connection"
    # The reader may not publish at all.
    rc = publish_ack(reader, f"data/{base}/ok", b"from-reader", qos)
    if version == V5 and qos == 1:
        assert rc is not None and rc.value == NOT_AUTHORIZED_V5, f"reader's PUBACK: {rc}"
    writer.publish(f"data/{base}/end", b"end", qos=1)
    assert_nothing_before(spy, f"data/{base}/end", "refused publishes reached a subscriber")


@pytest.mark.parametrize("qos", [1, 2])
def test_refused_publish_codes_on_the_wire(shared, version, qos):
    """v5: PUBACK/PUBREC reason 0x87; v3.1.1: acknowledged normally (and dropped)."""
    r, ack = raw_session(shared, version, *tok(shared, "writer"))
    with r:
        assert ack.reason == 0, ack.fields
        rv = raw.V5 if version == V5 else raw.V311
        r.send(raw.publish(f"other/{uid()}", b"no", rv, qos=qos, pid=7))
        resp = r.expect(raw.PUBACK if qos == 1 else raw.PUBREC)
        assert resp.fields["pid"] == 7
        if version == V5:
            assert resp.reason == NOT_AUTHORIZED_V5, resp.fields
        else:
            assert len(resp.body) == 2, f"v3.1.1 ack carries no reason: {resp.body!r}"
        if qos == 2:
            r.send(raw.packet(raw.PUBREL, 2, struct.pack("!H", 7) + (b"\x00" if version == V5 else b"")))
            r.expect(raw.PUBCOMP)
        # Still connected and answering.
        r.send(raw.pingreq())
        r.expect(raw.PINGRESP)


def test_will_on_a_forbidden_topic_is_not_published(shared, mk, version):
    base = uid()
    spy = mk(shared, version, *tok(shared, "spy"))
    spy.subscribe(f"forbidden/{base}", 1)
    spy.subscribe(f"data/{base}/will", 1)
    user, pw = tok(shared, "writer")
    bad = mk(shared, version, user, pw, will={"topic": f"forbidden/{base}", "payload": b"bad-will", "qos": 1})
    good = mk(shared, version, user, pw, will={"topic": f"data/{base}/will", "payload": b"good-will", "qos": 1})
    bad.abort()
    good.abort()
    # The allowed will arrives (so wills work at all); the forbidden one not.
    m = spy.get()
    assert (m.topic, m.payload) == (f"data/{base}/will", b"good-will"), m
    stray = spy.drain(0.5)
    assert not stray, f"forbidden will delivered: {[(x.topic, x.payload) for x in stray]}"


def test_retained_on_a_forbidden_topic_is_not_delivered(shared, mk, version):
    """`limited` may subscribe to data/public/# only: retained messages
    elsewhere are not delivered to it, because the subscription that would
    carry them is refused; the control under data/public/ is delivered."""
    base = uid()
    writer = mk(shared, version, *tok(shared, "writer"))
    writer.publish(f"data/private-{base}/r", b"private", qos=1, retain=True)
    writer.publish(f"data/public/{base}/r", b"public", qos=1, retain=True)
    limited = mk(shared, version, *tok(shared, "limited"))
    refused = suback_refused(version)
    for f in (f"data/private-{base}/r", f"data/+/{base}/r", f"data/private-{base}/#", "data/#"):
        limited.subscribe(f, 1, expect=refused)
    limited.subscribe(f"data/public/{base}/#", 1)
    m = limited.get()
    assert (m.topic, m.payload, m.retain) == (f"data/public/{base}/r", b"public", True), m
    stray = limited.drain(0.5)
    assert not stray, f"retained messages through refused subscriptions: {[(x.topic, x.payload) for x in stray]}"


# ------------------------------------------------------------ live updates


@pytest.mark.parametrize("how", ["removed", "disabled", "expired", "secret-changed"])
def test_revoked_token_is_disconnected_and_others_keep_going(brokers, tmpdir_path, mk, version, how):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    bundle.token("victim")
    bundle.rule("victims", ["victim"], ["data/#"], ["publish", "subscribe"])
    b = brokers(bundle)
    b.bundle = bundle
    base = uid()
    victim = mk(b, version, *tok(b, "victim"))
    victim.subscribe(f"data/{base}/#", 1)
    survivor = mk(b, version, *tok(b, "second"))
    survivor.subscribe(f"data/{base}/#", 1)
    survivor.publish(f"data/{base}/before", b"before", qos=1)
    assert survivor.get().payload == b"before"
    assert victim.get().payload == b"before"

    if how == "removed":
        del bundle.tokens["victim"]
    elif how == "disabled":
        bundle.tokens["victim"]["disabled"] = True
    elif how == "expired":
        bundle.tokens["victim"]["expires_at"] = rfc3339(time.time() - 60)
    else:
        bundle.tokens["victim"]["secret_hash"] = secret_hash("a-completely-new-secret-1234")
    t0 = bundle.write()
    assert victim.disconnected.wait(REVOKE_WITHIN + 0.5), f"{how}: victim still connected"
    took = time.monotonic() - t0
    assert took <= REVOKE_WITHIN, f"{how}: disconnected after {took:.2f}s"
    if version == V5:
        assert victim.disconnect_rc.value == NOT_AUTHORIZED_V5, f"DISCONNECT reason {victim.disconnect_rc}"

    # The other token is untouched: still connected and receiving.
    assert not survivor.disconnected.is_set(), f"survivor disconnected: {survivor.disconnect_rc}"
    survivor.publish(f"data/{base}/after", b"after", qos=1)
    assert survivor.get().payload == b"after"
    # And the revoked secret no longer connects.
    again = mk(b, version, "victim", b.bundle.secrets["victim"], expect_ok=False)
    assert again.connack_rc.is_failure


def test_acl_narrowed_while_subscribed(brokers, tmpdir_path, mk, version):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    bundle.token("watcher")
    bundle.rule("watchers", ["watcher"], ["data/#"], ["subscribe"])
    b = brokers(bundle)
    b.bundle = bundle
    base = uid()
    watcher = mk(b, version, *tok(b, "watcher"))
    watcher.subscribe(f"data/{base}/#", 1)
    watcher.subscribe(f"data/{base}/keep/#", 1)
    writer = mk(b, version, *tok(b, "writer"))
    writer.publish(f"data/{base}/x", b"1", qos=1)
    assert watcher.get().payload == b"1"

    # Narrow: the watcher may now read data/<base>/keep/# only.
    for a in bundle.acls:
        if a["name"] == "watchers":
            a["rules"] = [{"topics": [f"data/{base}/keep/#"], "actions": ["subscribe"], "effect": "allow"}]
    t0 = bundle.write()
    # Messages on the no-longer-allowed part stop arriving within the bound.
    deadline = t0 + REVOKE_WITHIN
    n = 0
    while True:
        n += 1
        writer.publish(f"data/{base}/x", f"probe-{n}".encode(), qos=1)
        writer.publish(f"data/{base}/keep/y", f"keep-{n}".encode(), qos=1)
        got = watcher.collect_until(f"data/{base}/keep/y")
        if not got:
            break
        assert time.monotonic() < deadline, f"still receiving data/{base}/x {time.monotonic() - t0:.2f}s after narrowing"
        time.sleep(0.05)
    # Stable: several more rounds, nothing on the removed part.
    for i in range(3):
        writer.publish(f"data/{base}/x", b"late", qos=1)
        writer.publish(f"data/{base}/keep/y", b"keep-late", qos=1)
        assert_nothing_before(watcher, f"data/{base}/keep/y", "after narrowing")
    assert not watcher.disconnected.is_set(), "narrowing an ACL must not disconnect"
    assert watcher.c.is_connected()
    # Re-subscribing to the wide filter is refused now.
    watcher.subscribe(f"data/{base}/#", 1, expect=suback_refused(version))


@pytest.mark.parametrize("garbage", ["not-json", "typo-field", "bad-filter"])
def test_malformed_bundle_keeps_the_old_rules(brokers, tmpdir_path, mk, version, garbage):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle)
    b.bundle = bundle
    base = uid()
    writer = mk(b, version, *tok(b, "writer"))
    reader = mk(b, version, *tok(b, "reader"))
    reader.subscribe(f"data/{base}/#", 1)
    errors_before = metric(b, "starling_auth_bundle_errors_total")

    # A broken bundle that, were it applied, would revoke the writer.
    doc = bundle.document()
    doc["tokens"] = [t for t in doc["tokens"] if t["name"] != "writer"]
    if garbage == "not-json":
        text = json.dumps(doc)[:-7]
    elif garbage == "typo-field":
        doc["tokens"][0]["disabld"] = True
        text = json.dumps(doc)
    else:
        doc["acls"][0]["rules"][0]["topics"] = ["data/#/x"]
        text = json.dumps(doc)
    bundle.write_text(text)
    deadline = time.monotonic() + REVOKE_WITHIN + 1
    while metric(b, "starling_auth_bundle_errors_total") < errors_before + 1:
        assert time.monotonic() < deadline, "bundle error not counted"
        time.sleep(0.05)
    assert metric(b, "starling_auth_bundle_errors_total") >= 1
    # Old rules: the writer is still connected and its publish still flows.
    assert not writer.disconnected.is_set(), f"writer revoked by a rejected bundle: {writer.disconnect_rc}"
    writer.publish(f"data/{base}/a", b"still", qos=1)
    assert reader.get().payload == b"still"
    # And still refused what it was refused before.
    rc = publish_ack(writer, f"data/secret/{base}", b"no", 1)
    if version == V5:
        assert rc is not None and rc.value == NOT_AUTHORIZED_V5, rc
    fresh = mk(b, version, *tok(b, "writer"))
    assert not fresh.connack_rc.is_failure

    # The watcher survived the bad file: a valid change still applies.
    del bundle.tokens["writer"]
    bundle.write()
    assert writer.disconnected.wait(REVOKE_WITHIN + 0.5), "valid bundle after a bad one not applied"


@pytest.mark.parametrize("armed", ["at-startup", "by-a-reload"])
def test_token_expiry_without_file_change(brokers, tmpdir_path, mk, version, armed):
    """The token's expiry is in the bundle the broker started with, or in a
    bundle written once, 2.5 s before it: nothing changes in the file at the
    expiry, the broker's timer closes the connection then."""
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    if armed == "at-startup":
        expiry = time.time() + 4.0
        bundle.token("shortlived", expires_at=expiry)
        bundle.rule("short", ["shortlived"], ["data/#"], ["publish", "subscribe"])
        b = brokers(bundle, name="expiry")
        b.bundle = bundle
        short = mk(b, version, *tok(b, "shortlived"))
    else:
        b = brokers(bundle, name="expiry")
        b.bundle = bundle
        expiry = time.time() + 2.5
        bundle.token("shortlived", expires_at=expiry)
        bundle.rule("short", ["shortlived"], ["data/#"], ["publish", "subscribe"])
        written = bundle.write()
        while True:  # connect as soon as the reload is in force
            short = mk(b, version, *tok(b, "shortlived"), expect_ok=False)
            if not short.connack_rc.is_failure:
                break
            assert time.monotonic() - written < REVOKE_WITHIN, "new token not accepted"
            time.sleep(0.05)
    assert time.time() < expiry - 0.3, "too slow to connect before the expiry for this test"
    other = mk(b, version, *tok(b, "second"))
    topic = f"data/{uid()}"
    other.subscribe(topic, 1)
    assert short.disconnected.wait(expiry - time.time() + 1.5), "not disconnected at expiry"
    at = time.time()
    assert at >= expiry - 0.1, f"disconnected {expiry - at:.2f}s before the expiry"
    assert at <= expiry + 1.5, f"disconnected {at - expiry:.2f}s after the expiry"
    if version == V5:
        assert short.disconnect_rc.value == NOT_AUTHORIZED_V5, short.disconnect_rc
    assert not other.disconnected.is_set()
    other.publish(topic, b"still-here", qos=1)
    assert other.get().payload == b"still-here"
    again = mk(b, version, *tok(b, "shortlived"), expect_ok=False)
    assert again.connack_rc.is_failure, "expired token accepted"


def test_failed_auth_is_rate_limited_per_address_and_username(brokers, tmpdir_path, mk, version):
    """Failures count per (address, username): behind a NAT one bad client
    must not lock out the others."""
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle, {"STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "3"})
    b.bundle = bundle
    base = uid()
    good = mk(b, version, *tok(b, "writer"))
    good.subscribe(f"data/{base}", 1)
    for i in range(3):
        bad = mk(b, version, "writer", "wrong-secret-0123456789", expect_ok=False)
        assert bad.connack_rc.is_failure
        assert bad.connack_rc.getName() == refused_name(version), bad.connack_rc
    # Now even the correct secret is refused for that username from this address...
    r, ack = raw_session(b, version, *tok(b, "writer"))
    with r:
        want = RATE_LIMITED_V5 if version == V5 else NOT_AUTHORIZED_V311
        assert ack.reason == want, f"after 3 failures: CONNACK {ack.fields}"
    # ...another username from the same address still gets in...
    r, ack = raw_session(b, version, *tok(b, "reader"))
    with r:
        assert ack.reason == 0, f"another username locked out: CONNACK {ack.fields}"
    # ...and the client that connected before keeps working.
    for i in range(3):
        good.publish(f"data/{base}", f"m{i}".encode(), qos=1)
        assert good.get().payload == f"m{i}".encode()
    assert not good.disconnected.is_set()


def test_anonymous_with_a_bundle(brokers, tmpdir_path, mk, version):
    """Default `anonymous = loopback`: a client without a password connects
    from 127.0.0.1, but the bundle has tokens, so the default policy is deny
    and it may neither subscribe nor publish."""
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle)
    b.bundle = bundle
    base = uid()
    anon = mk(b, version)
    spy = mk(b, version, *tok(b, "spy"))
    spy.subscribe(f"data/{base}/#", 1)
    anon.subscribe(f"data/{base}/x", 1, expect=suback_refused(version))
    anon.subscribe("#", 1, expect=suback_refused(version))
    rc = publish_ack(anon, f"data/{base}/x", b"anon", 1)
    if version == V5:
        assert rc is not None and rc.value == NOT_AUTHORIZED_V5, rc
    writer = mk(b, version, *tok(b, "writer"))
    writer.publish(f"data/{base}/end", b"end", qos=1)
    assert_nothing_before(spy, f"data/{base}/end", "anonymous publish")
    assert not anon.drain(0.2)


def test_anonymous_denied(brokers, tmpdir_path, mk, version):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle, {"STARLING_AUTH_ANONYMOUS": "deny"})
    b.bundle = bundle
    r, ack = raw_session(b, version, None, None)
    with r:
        if version == V5:
            assert ack.reason in (NOT_AUTHORIZED_V5, BAD_CREDENTIALS_V5), ack.fields
        else:
            assert ack.reason == NOT_AUTHORIZED_V311, ack.fields
        r.wait_closed(TIMEOUT)
    anon = mk(b, version, expect_ok=False)
    assert anon.connack_rc.is_failure
    # Tokens still work.
    mk(b, version, *tok(b, "writer"))


# ------------------------------------------- sessions built under other rules
#
# Each was a broker bug found while writing these tests: a resumed or offline
# session must hold only what the connecting token may read now, and a revoked
# token publishes nothing, its will included.


def _persistent(version: int, cid: str) -> dict:
    return dict(client_id=cid, session_expiry=300) if version == V5 else dict(client_id=cid, clean=False)


def _resume(version: int, cid: str) -> dict:
    return dict(client_id=cid, session_expiry=300, clean=False) if version == V5 else dict(client_id=cid, clean=False)


def test_another_tokens_client_id_is_refused(brokers, tmpdir_path, mk, version):
    """A client id belongs to the token holding it: `limited` cannot take
    reader's session over (online or offline) and reader keeps it."""
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    b = brokers(bundle)
    b.bundle = bundle
    base, cid = uid(), uid("sess")
    want = "Client identifier not valid"  # paho names 3.1.1 rc 2 like v5 0x85
    reader = mk(b, version, *tok(b, "reader"), **_persistent(version, cid))
    reader.subscribe(f"data/{base}/#", 1)
    online = mk(b, version, *tok(b, "limited"), expect_ok=False, **_resume(version, cid))
    assert online.connack_rc.getName() == want, online.connack_rc
    writer = mk(b, version, *tok(b, "writer"))
    writer.publish(f"data/{base}/live", b"live", qos=1)
    assert reader.get().payload == b"live", "the holder was kicked"
    reader.disconnect()
    writer.publish(f"data/{base}/queued", b"queued", qos=1)
    offline = mk(b, version, *tok(b, "limited"), expect_ok=False, **_resume(version, cid))
    assert offline.connack_rc.getName() == want, offline.connack_rc
    back = mk(b, version, *tok(b, "reader"), **_resume(version, cid))
    assert back.get().payload == b"queued", "reader's session was lost"


def test_acl_narrowed_while_offline(brokers, tmpdir_path, mk, version):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    bundle.token("watcher")
    bundle.rule("watchers", ["watcher"], ["data/#"], ["subscribe"])
    b = brokers(bundle)
    b.bundle = bundle
    base, cid = uid(), uid("off")
    watcher = mk(b, version, *tok(b, "watcher"), **_persistent(version, cid))
    watcher.subscribe(f"data/{base}/#", 1)
    watcher.disconnect()
    for a in bundle.acls:
        if a["name"] == "watchers":
            a["rules"] = [{"topics": ["data/public/#"], "actions": ["subscribe"], "effect": "allow"}]
    bundle.write()
    time.sleep(1.0)  # several poll periods: the new bundle is in force
    writer = mk(b, version, *tok(b, "writer"))
    writer.publish(f"data/{base}/x", b"while-offline", qos=1)
    back = mk(b, version, *tok(b, "watcher"), **_resume(version, cid))
    writer.publish(f"data/{base}/x", b"after-reconnect", qos=1)
    got = back.drain(1.0)
    assert not got, f"received under the old rules: {[(m.topic, m.payload) for m in got]}"


def test_revoked_tokens_will_is_not_published(brokers, tmpdir_path, mk, version):
    bundle = standard_bundle(os.path.join(tmpdir_path, "bundle.json"))
    bundle.token("victim")
    bundle.rule("victims", ["victim"], ["data/#"], ["publish", "subscribe"])
    b = brokers(bundle)
    b.bundle = bundle
    base = uid()
    spy = mk(b, version, *tok(b, "spy"))
    spy.subscribe(f"data/{base}/will", 1)
    victim = mk(b, version, *tok(b, "victim"), will={"topic": f"data/{base}/will", "payload": b"w", "qos": 1})
    del bundle.tokens["victim"]
    bundle.write()
    assert victim.disconnected.wait(REVOKE_WITHIN + 0.5)
    got = spy.drain(1.0)
    assert not got, f"revoked token's will published: {[(m.topic, m.payload) for m in got]}"

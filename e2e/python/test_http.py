"""The HTTP interface under /broker/ (shiftr.io's), against the real binary.

Clients: curl for the seed document's commands (verbatim, ENDPOINT
replaced), Python's http.client and raw sockets for everything else, and
paho-mqtt on the MQTT side, so every HTTP effect is checked where it must
show: at an MQTT subscriber, in a later GET, or as nothing at all.

Brokers:
- `plain`: no auth bundle, anonymous from loopback (shiftr.io Desktop).
- `secure`: a real CA and server certificate made here, an auth bundle
  with tokens and ACLs (test_auth's Bundle), anonymous denied, the failure
  limit off (the many refusals here must not lock the test address out);
  the seed's https ENDPOINT https://NAME:SECRET@host (shiftr.io Cloud).
- `limits`: anonymous, STARLING_WEB_BODY_TIMEOUT=1, for every 4xx.
- one-off brokers for the auth rate limit, CORS and metrics counts.

Rules (README, "HTTP interface and WebSocket topic streams"): errors are
JSON {"error", "rule", "status"}; nothing is published on any error.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shlex
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest

import hostile as h
from broker import TARGET
from clients import TIMEOUT, V5, V311, Client, uid, v5_props
from conftest import launch, shutdown
from test_auth import BROKER_NAME, RATE_LIMITED_V5, Bundle, Clients, raw_session
from test_auth import start as start_with_bundle
from testcerts import make_tls_files

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the HTTP interface is Starling's own")

MAX_BODY = 65536
ALL_BYTES = bytes(range(256))
NEAR_64K = random.Random(64).randbytes(65_000)
PAYLOADS = {"all-256-bytes": ALL_BYTES, "near-64KiB": NEAR_64K}

# The seed document's commands, verbatim (000_b39e212c16adab11.txt, shiftr.io).
SEED_GET = "curl 'ENDPOINT/broker/foo/bar'"
SEED_GET_WILDCARD = "curl 'ENDPOINT/broker/foo/+'"
SEED_GET_RETAINED = "curl 'ENDPOINT/broker/foo/+?retained=true'"
SEED_POST = "curl -X POST 'ENDPOINT/broker/foo/bar' -d 'Hello World!'"
SEED_POST_RETAINED = "curl -X POST 'ENDPOINT/broker/foo/bar?retained=true' -d 'Hello World!'"
SEED_POST_QOS2 = "curl -X POST 'ENDPOINT/broker/foo/bar?qos=2' -d 'Hello World!'"


# ============================================================ HTTP helpers


class Resp:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes, elapsed: float, will_close=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed
        self.will_close = will_close

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> dict:
        try:
            return json.loads(self.body)
        except ValueError:
            raise AssertionError(f"HTTP {self.status}: body is not JSON: {self.body[:300]!r}") from None

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {dict(self.headers)} {self.body[:200]!r}>"


def tls_context(ca: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def connection(addr, ca: str | None = None, timeout: float = 10.0) -> http.client.HTTPConnection:
    if ca:
        return http.client.HTTPSConnection(addr[0], addr[1], timeout=timeout, context=tls_context(ca))
    return http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)


def send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, headers=None) -> Resp:
    t0 = time.monotonic()
    conn.request(method, path, body=body, headers=dict(headers or {}))
    r = conn.getresponse()
    data = r.read()
    return Resp(r.status, r.headers, data, time.monotonic() - t0, r.will_close)


def request(addr, method: str, path: str, body: bytes | None = None, headers=None, ca: str | None = None) -> Resp:
    """One request on a fresh connection."""
    conn = connection(addr, ca)
    try:
        return send(conn, method, path, body, headers)
    finally:
        conn.close()


def basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_error(r: Resp, status: int, rule: str) -> dict:
    """The exact status and the README's JSON error shape."""
    assert r.status == status, f"wanted {status} ({rule}), got {r!r}"
    ctype = r.header("Content-Type") or ""
    assert ctype.startswith("application/json"), f"error Content-Type {ctype!r}"
    j = r.json()
    assert set(j) == {"error", "rule", "status"}, f"error body keys: {j}"
    assert j["rule"] == rule, f"wanted rule {rule!r}, got {j}"
    assert j["status"] == status, f"status in the body: {j}"
    assert isinstance(j["error"], str) and len(j["error"]) > 5, f"error sentence: {j}"
    return j


def assert_message(r: Resp, topic: str, payload: bytes, qos: int, retain: bool, ctype="application/octet-stream"):
    """A 200 GET answer carrying exactly this message."""
    assert r.status == 200, f"GET: {r!r}"
    assert r.body == payload, f"body differs: {len(r.body)} bytes, wanted {len(payload)}; {r.body[:64]!r}"
    assert r.header("MQTT-Topic") == topic, r.headers
    assert r.header("MQTT-QoS") == str(qos), r.headers
    assert r.header("MQTT-Retain") == ("true" if retain else "false"), r.headers
    assert r.header("Content-Type") == ctype, r.headers


def assert_matched(r: Resp, n: int) -> None:
    assert r.status == 200, f"POST: {r!r}"
    assert r.json() == {"matched": n}, r.body


def raw_http(addr, data: bytes, method: str = "POST", timeout: float = 10.0) -> Resp:
    """Hand-written request bytes (chunked uploads); the answer parsed by http.client."""
    s = socket.create_connection(addr, timeout=timeout)
    try:
        t0 = time.monotonic()
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker may refuse before reading it all; its answer is still there
        r = http.client.HTTPResponse(s, method=method)
        r.begin()
        body = r.read()
        return Resp(r.status, r.headers, body, time.monotonic() - t0)
    finally:
        s.close()


def chunked(body: bytes, size: int = 10_000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


# ============================================================ curl


class CurlResult:
    def __init__(self, argv, status: int, version: str, headers: dict[str, str], body: bytes):
        self.argv, self.status, self.version, self.headers, self.body = argv, status, version, headers, body

    def __repr__(self) -> str:
        return f"<curl {self.status} HTTP/{self.version} {self.headers} {self.body[:200]!r}>"


def curl(command: str, endpoint: str, extra: list[str] = ()) -> CurlResult:
    """Runs a seed command with ENDPOINT replaced; `extra` options (a CA,
    --http2) and our own output options come after the verbatim words."""
    argv = shlex.split(command.replace("ENDPOINT", endpoint))
    assert argv[0] == "curl"
    with tempfile.TemporaryDirectory(prefix="starling-http-curl-") as d:
        hdr, out = os.path.join(d, "headers"), os.path.join(d, "body")
        full = argv + list(extra) + [
            "--silent", "--show-error", "--max-time", "15",
            "--dump-header", hdr, "--output", out, "--write-out", "%{http_code} %{http_version}",
        ]
        p = subprocess.run(full, capture_output=True, timeout=20)
        assert p.returncode == 0, f"{full}: exit {p.returncode}: {p.stderr.decode(errors='replace')}"
        code, version = p.stdout.decode().split()
        headers = {}
        with open(hdr, "rb") as f:
            for line in f.read().decode("latin-1").splitlines()[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
        with open(out, "rb") as f:
            body = f.read()
    return CurlResult(argv, int(code), version, headers, body)


# ============================================================ MQTT helpers


@pytest.fixture
def mq():
    """MQTT clients (test_auth's maker), all closed at the end of the test."""
    m = Clients()
    yield m
    for c in m.made:
        c.close()


def subscriber(mq, b, topic: str, qos: int = 1, version: int = V5, creds: tuple[str, str] | None = None) -> Client:
    """A paho client subscribed to `topic` (SUBACK seen)."""
    c = mq(b, version, *(creds or (None, None)))
    c.subscribe(topic, qos)
    return c


def assert_nothing_delivered(watch: Client, publisher: Client, what: str, sentinel_prefix: str = "sentinel/") -> None:
    """`watch` (subscribed to '#') got nothing before a sentinel published
    after the request: had the request published, its message would be first."""
    sentinel = uid(sentinel_prefix)
    publisher.publish(sentinel, b"sentinel", qos=1)
    got = watch.collect_until(sentinel)
    assert not got, f"{what}: delivered {[(m.topic, m.payload[:40]) for m in got]}"


# ============================================================ brokers


@pytest.fixture(scope="module")
def plain():
    b = launch({}, "http-plain")
    yield b
    shutdown(b)


@pytest.fixture(scope="module")
def secure():
    """TLS with a real CA made here, tokens and ACLs, anonymous denied."""
    with tempfile.TemporaryDirectory(prefix="starling-http-secure-") as d:
        files = make_tls_files(d)
        bundle = Bundle(os.path.join(d, "bundle.json"))
        for name in ("rw", "ro", "spy", "other"):
            bundle.token(name)
        bundle.rule("rw", ["rw"], ["foo/#", "h/#"], ["publish", "subscribe"])
        bundle.rule("rw", ["rw"], ["h/secret/#"], ["publish", "subscribe"], "deny")
        bundle.rule("ro", ["ro"], ["h/#"], ["subscribe"])
        bundle.rule("spy", ["spy"], ["#"], ["subscribe"])
        bundle.rule("other", ["other"], ["o/#"], ["publish", "subscribe"])
        env = {
            "STARLING_TLS_CERT": files["cert"],
            "STARLING_TLS_KEY": files["key"],
            "STARLING_HTTPS_BIND": "127.0.0.1:0",
            "STARLING_MQTTS_BIND": "127.0.0.1:0",
            "STARLING_AUTH_ANONYMOUS": "deny",
            "STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "0",
        }
        b = start_with_bundle(bundle, env, name="http-secure")
        b.bundle = bundle
        b.ca = files["ca"]
        try:
            assert "https" in b.listeners, f"no https listener in the banner: {b.stdout_lines}"
            yield b
        finally:
            shutdown(b)


def secret(b, name: str) -> str:
    return b.bundle.secrets[name]


def creds(b, name: str) -> tuple[str, str]:
    return name, secret(b, name)


@pytest.fixture(scope="module")
def limits():
    b = launch({"STARLING_WEB_BODY_TIMEOUT": "1"}, "http-limits")
    yield b
    shutdown(b)


# ============================================== 1. the seed's curl commands


class SeedTarget:
    def __init__(self, broker, endpoint: str, extra: list[str], mqtt_creds):
        self.broker, self.endpoint, self.extra, self.mqtt_creds = broker, endpoint, extra, mqtt_creds

    def run(self, command: str) -> CurlResult:
        return curl(command, self.endpoint, self.extra)


@pytest.fixture(params=["http-desktop", "https-cloud"])
def seed(request):
    if request.param == "http-desktop":
        b = request.getfixturevalue("plain")
        host, port = b.http
        return SeedTarget(b, f"http://{host}:{port}", [], None)
    b = request.getfixturevalue("secure")
    host, port = b.listeners["https"]
    # ENDPOINT = https://INSTANCE_NAME:TOKEN_SECRET@INSTANCE_DOMAIN
    return SeedTarget(b, f"https://{BROKER_NAME}:{secret(b, 'rw')}@{host}:{port}", ["--cacert", b.ca], creds(b, "rw"))


def test_seed_commands(seed, mq):
    """Every command of the shiftr.io document, with its effect checked."""
    b = seed.broker
    sub5 = subscriber(mq, b, "foo/#", 2, V5, seed.mqtt_creds)
    sub3 = subscriber(mq, b, "foo/#", 2, V311, seed.mqtt_creds)
    pub = mq(b, V5, *(seed.mqtt_creds or (None, None)))

    # Nothing retained yet: the retained GET waits its default second, then 204.
    r = seed.run(SEED_GET_RETAINED)
    assert r.status == 204 and r.body == b"", r

    # POST publishes (QoS 0, not retained) to both subscribers.
    r = seed.run(SEED_POST)
    assert r.status == 200, r
    assert json.loads(r.body) == {"matched": 2}, r
    for s in (sub5, sub3):
        m = s.get()
        assert (m.topic, m.payload, m.qos, m.retain) == ("foo/bar", b"Hello World!", 0, False), m

    # GET answers it, on the topic and on foo/+.
    for cmd in (SEED_GET, SEED_GET_WILDCARD):
        r = seed.run(cmd)
        assert r.status == 200 and r.body == b"Hello World!", (cmd, r)
        assert r.headers.get("mqtt-topic") == "foo/bar" and r.headers.get("mqtt-retain") == "false", (cmd, r)
        assert r.headers.get("mqtt-qos") == "0", (cmd, r)

    # ?retained=true really retains: a new subscriber gets it with the retain flag...
    r = seed.run(SEED_POST_RETAINED)
    assert r.status == 200, r
    for s in (sub5, sub3):
        m = s.get()
        assert (m.topic, m.payload) == ("foo/bar", b"Hello World!"), m
    late = subscriber(mq, b, "foo/bar", 1, V311, seed.mqtt_creds)
    m = late.get()
    assert (m.topic, m.payload, m.retain) == ("foo/bar", b"Hello World!", True), m
    # ...and a later non-retained message on a sibling does not hide it from ?retained=true.
    pub.publish("foo/baz", b"not retained", qos=1)
    assert sub5.get().topic == "foo/baz" and sub3.get().topic == "foo/baz"
    r = seed.run(SEED_GET_WILDCARD)
    assert (r.status, r.body, r.headers.get("mqtt-topic")) == (200, b"not retained", "foo/baz"), r
    r = seed.run(SEED_GET_RETAINED)
    assert (r.status, r.body, r.headers.get("mqtt-topic")) == (200, b"Hello World!", "foo/bar"), r
    assert r.headers.get("mqtt-retain") == "true", r

    # ?qos=2 arrives exactly once, at QoS 2, at QoS 2 subscribers (v5 and 3.1.1).
    r = seed.run(SEED_POST_QOS2)
    assert r.status == 200 and json.loads(r.body) == {"matched": 3}, r  # sub5, sub3, late
    sentinel = "foo/sentinel"
    pub.publish(sentinel, b"end", qos=2)
    for s in (sub5, sub3):
        got = s.collect_until(sentinel)
        assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [("foo/bar", b"Hello World!", 2, False)], got
    m = late.get()
    assert (m.topic, m.payload, m.qos) == ("foo/bar", b"Hello World!", 1), f"the QoS 1 subscriber: {m}"
    assert not late.drain(0.3), "duplicate delivery to the QoS 1 subscriber"
    assert not sub5.drain(0.2) and not sub3.drain(0.2), "duplicate QoS 2 delivery"


# ============================================== 2. byte-exact round trips


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_post_binary_reaches_mqtt_subscriber(plain, mq, version, payload):
    topic = uid("bin/")
    s = subscriber(mq, plain, topic, 1, version)
    r = request(plain.http, "POST", f"/broker/{topic}?qos=1", payload)
    assert_matched(r, 1)
    m = s.get()
    assert m.topic == topic and m.qos == 1 and m.retain is False, m
    assert m.payload == payload, f"payload differs ({len(m.payload)} bytes, wanted {len(payload)})"
    # And it is the latest value for HTTP readers too.
    assert_message(request(plain.http, "GET", f"/broker/{topic}"), topic, payload, 1, False)


MQTT_TO_GET = [
    # (publisher version, qos, retain, v5 content type)
    pytest.param(V5, 1, False, "application/x-starling; v=1", id="v5-qos1-content-type"),
    pytest.param(V5, 0, False, None, id="v5-qos0-no-content-type"),
    pytest.param(V311, 2, True, None, id="v311-qos2-retained"),
    pytest.param(V311, 1, False, None, id="v311-qos1"),
]


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
@pytest.mark.parametrize("pver,qos,retain,ctype", MQTT_TO_GET)
def test_mqtt_publish_read_by_get(plain, mq, pver, qos, retain, ctype, payload):
    topic = uid("m2h/")
    pub = mq(plain, pver)
    props = v5_props(ContentType=ctype) if ctype else None
    pub.publish(topic, payload, qos=qos, retain=retain, properties=props)
    # A QoS 0 publish has no acknowledgement to wait for: the GET may come
    # first, so it waits for the value (answering as soon as it is there).
    r = request(plain.http, "GET", f"/broker/{topic}?wait=5")
    assert_message(r, topic, payload, qos, retain, ctype or "application/octet-stream")
    if retain:
        assert_message(request(plain.http, "GET", f"/broker/{topic}?retained=true&wait=0"), topic, payload, qos, True)
    else:
        r = request(plain.http, "GET", f"/broker/{topic}?retained=true&wait=0")
        assert r.status == 204 and r.body == b"", f"?retained=true on a never-retained topic: {r!r}"


def test_topic_header_is_percent_encoded_for_non_ascii(plain, mq):
    """An MQTT publisher may use any UTF-8; the header stays printable ASCII."""
    base = uid("enc/")
    pub = mq(plain, V5)
    pub.publish(f"{base}/café au lait", b"x", qos=1)
    r = request(plain.http, "GET", f"/broker/{base}/+?wait=0")
    assert_message(r, f"{base}/caf%C3%A9%20au%20lait", b"x", 1, False)


def test_wildcard_get_returns_most_recent_match(plain, mq):
    w = uid("w")
    pub = mq(plain, V5)
    for t, p in [("foo/a", b"A"), ("foo/b", b"B"), ("foo/b/c", b"BC"), ("other", b"O")]:
        pub.publish(f"{w}/{t}", p, qos=1)
    cases = {
        f"{w}/foo/+": ("foo/b", b"B"),
        f"{w}/foo/*": ("foo/b", b"B"),  # '*' means '+'
        f"{w}/foo/%2A": ("foo/b", b"B"),
        f"{w}/*/b": ("foo/b", b"B"),
        f"{w}/foo/@": ("foo/b/c", b"BC"),  # '@' means '#'
        f"{w}/foo/%40": ("foo/b/c", b"BC"),
        f"{w}/%40": ("other", b"O"),
        f"{w}/foo/a": ("foo/a", b"A"),
    }
    for path, (t, p) in cases.items():
        r = request(plain.http, "GET", f"/broker/{path}?wait=0")
        assert r.status == 200, (path, r)
        assert (r.header("MQTT-Topic"), r.body) == (f"{w}/{t}", p), f"GET {path}: {r!r}"


def test_get_wait_zero_with_nothing_is_204_at_once(plain):
    r = request(plain.http, "GET", f"/broker/{uid('none/')}/@?wait=0")
    assert r.status == 204 and r.body == b"", r
    assert r.elapsed < 0.5, f"wait=0 took {r.elapsed:.2f}s"


def test_get_wait_receives_a_message_published_later(plain, mq):
    topic = uid("later/")
    pub = mq(plain, V5)
    errors = []

    def publish_later():
        try:
            pub.publish(topic, b"arrived while waiting", qos=1)
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Timer(0.5, publish_later)  # only schedules the publish; the GET waits for it
    t.start()
    try:
        r = request(plain.http, "GET", f"/broker/{topic}?wait=2")
    finally:
        t.join(TIMEOUT)
    assert not errors, errors
    assert_message(r, topic, b"arrived while waiting", 1, False)
    assert 0.4 <= r.elapsed < 2.0, f"answered after {r.elapsed:.2f}s (publish at 0.5 s, wait 2 s)"


def test_get_wait_one_with_nothing_is_204(plain):
    r = request(plain.http, "GET", f"/broker/{uid('never/')}?wait=1")
    assert r.status == 204 and r.body == b"", r
    assert 0.9 <= r.elapsed < 3.0, f"wait=1 answered after {r.elapsed:.2f}s"


# ============================================== 3. ordering


@pytest.mark.parametrize("qos", [0, 1])
def test_thousand_sequential_posts_arrive_in_order(plain, mq, qos):
    topic = uid("order/")
    s = subscriber(mq, plain, topic, 1, V5)
    conn = connection(plain.http)
    try:
        conn.connect()
        sock = conn.sock
        port = sock.getsockname()[1]
        for i in range(1000):
            r = send(conn, "POST", f"/broker/{topic}?qos={qos}", str(i).encode())
            assert r.status == 200 and r.json() == {"matched": 1}, f"POST #{i}: {r!r}"
            assert conn.sock is sock, f"POST #{i} needed a new connection"
        assert sock.getsockname()[1] == port
    finally:
        conn.close()
    got = []
    for _ in range(1000):
        m = s.get()
        assert m.qos == qos, m
        got.append(int(m.payload))
    assert got == list(range(1000)), f"out of order or missing: first bad index {next(i for i, v in enumerate(got) if v != i)}"
    assert not s.drain(0.2)


# ============================================== 4. limits and errors


def drained(w: Client, p: Client, prefix: str = "sentinel/") -> tuple[Client, Client]:
    """Reads retained messages of earlier tests off the '#' subscriber `w`:
    everything before a first sentinel from `p`."""
    start = uid(prefix + "start")
    p.publish(start, b"start", qos=1)
    w.collect_until(start)
    return w, p


@pytest.fixture
def watch(limits, mq):
    """(a '#' subscriber, a publisher for sentinels) on the limits broker."""
    return drained(subscriber(mq, limits, "#", 1, V5), mq(limits, V5))


def probe_empty(b, prefix: str, headers=None) -> None:
    """Nothing is known under `prefix`: GET prefix/# answers 204 at once."""
    r = request(b.http, "GET", f"/broker/{prefix}/@?wait=0", headers=headers)
    assert r.status == 204, f"GET {prefix}/# after the refusal: {r!r}"


def test_topic_length_128_ok_129_refused(limits, watch):
    w, p = watch
    prefix = uid("len")
    ok = prefix + "/" + "a" * (128 - len(prefix) - 1)
    too_long = ok + "b"
    assert len(ok) == 128 and len(too_long) == 129
    assert_error(request(limits.http, "POST", f"/broker/{too_long}", b"x"), 400, "max_topic_length")
    assert_error(request(limits.http, "GET", f"/broker/{too_long}?wait=0"), 400, "max_topic_length")
    assert_nothing_delivered(w, p, "129-character topic")
    probe_empty(limits, prefix)
    r = request(limits.http, "POST", f"/broker/{ok}", b"128 is fine")
    assert_matched(r, 1)
    m = w.get()
    assert (m.topic, m.payload) == (ok, b"128 is fine"), m
    assert_message(request(limits.http, "GET", f"/broker/{ok}?wait=0"), ok, b"128 is fine", 0, False)


# (method, path under /broker/ after the prefix P, rule); "{P}" is a unique prefix.
BAD_REQUESTS = [
    pytest.param("POST", "{P}/a%20b", "allowed_chars", id="post-space"),
    pytest.param("POST", "{P}/caf%C3%A9", "allowed_chars", id="post-e-acute"),
    pytest.param("POST", "{P}/a%22b", "allowed_chars", id="post-quote"),
    pytest.param("GET", "{P}/caf%C3%A9?wait=0", "allowed_chars", id="get-e-acute"),
    pytest.param("GET", "{P}/a%20b?wait=0", "allowed_chars", id="get-space"),
    pytest.param("POST", "{P}/%FF", "topic_encoding", id="post-not-utf8"),
    pytest.param("POST", "{P}/+", "wildcard", id="post-plus"),
    pytest.param("POST", "{P}/*", "wildcard", id="post-star"),
    pytest.param("POST", "{P}/@", "wildcard", id="post-at"),
    pytest.param("POST", "{P}/%40", "wildcard", id="post-pct40"),
    pytest.param("POST", "{P}/%23", "wildcard", id="post-pct23"),
    pytest.param("POST", "{P}/a/+/b", "wildcard", id="post-inner-plus"),
    pytest.param("POST", "", "topic_empty", id="post-empty-topic"),
    pytest.param("GET", "", "topic_empty", id="get-empty-topic"),
    pytest.param("POST", "{P}/x?retain=true", "query", id="post-typo-retain"),
    pytest.param("POST", "{P}/x?wait=1", "query", id="post-wait-option"),
    pytest.param("POST", "{P}/x?retained=yes", "query", id="post-retained-yes"),
    pytest.param("GET", "{P}/x?qos=1&wait=0", "query", id="get-qos-option"),
    pytest.param("POST", "{P}/x?qos=3", "qos", id="post-qos3"),
    pytest.param("POST", "{P}/x?qos=-1", "qos", id="post-qos-neg"),
    pytest.param("GET", "{P}/x?wait=61", "max_wait", id="get-wait-61"),
    pytest.param("GET", "{P}/x?wait=abc", "wait", id="get-wait-abc"),
    pytest.param("GET", "{P}/a/@/b?wait=0", "topic_format", id="get-inner-hash"),
]


@pytest.mark.parametrize("method,path,rule", BAD_REQUESTS)
def test_bad_request_is_400_and_publishes_nothing(limits, watch, method, path, rule):
    w, p = watch
    prefix = uid("bad")
    r = request(limits.http, method, "/broker/" + path.format(P=prefix), b"must not appear" if method == "POST" else None)
    assert_error(r, 400, rule)
    assert r.elapsed < 1.0, f"a refused GET waited ({r.elapsed:.2f}s)"
    assert_nothing_delivered(w, p, f"{method} {path}")
    probe_empty(limits, prefix)


def test_body_limit_with_content_length(limits, watch):
    w, p = watch
    prefix = uid("big")
    r = request(limits.http, "POST", f"/broker/{prefix}/x", b"\xab" * (MAX_BODY + 1))
    assert_error(r, 413, "max_body_bytes")
    assert_nothing_delivered(w, p, "65537-byte body")
    probe_empty(limits, prefix)
    exact = random.Random(1).randbytes(MAX_BODY)
    assert_matched(request(limits.http, "POST", f"/broker/{prefix}/x", exact), 1)
    m = w.get()
    assert m.topic == f"{prefix}/x" and m.payload == exact, (m.topic, len(m.payload))


def test_body_limit_chunked(limits, watch):
    w, p = watch
    prefix = uid("chunk")
    head = f"POST /broker/{prefix}/x HTTP/1.1\r\nHost: starling\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    r = raw_http(limits.http, head.encode() + chunked(b"\xcd" * (MAX_BODY + 1)))
    assert_error(r, 413, "max_body_bytes")
    assert_nothing_delivered(w, p, "chunked 65537-byte body")
    probe_empty(limits, prefix)
    exact = random.Random(2).randbytes(MAX_BODY)
    r = raw_http(limits.http, head.encode() + chunked(exact))
    assert_matched(r, 1)
    m = w.get()
    assert m.topic == f"{prefix}/x" and m.payload == exact, (m.topic, len(m.payload))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_stalled_upload_is_408(limits, watch, framing):
    """STARLING_WEB_BODY_TIMEOUT=1: headers and part of the body, then silence."""
    w, p = watch
    prefix = uid("stall")
    if framing == "content-length":
        data = f"POST /broker/{prefix}/x HTTP/1.1\r\nHost: s\r\nContent-Length: 1000\r\n\r\n".encode() + b"partial"
    else:
        data = f"POST /broker/{prefix}/x HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"7\r\npartial\r\n"
    r = raw_http(limits.http, data, timeout=8)
    assert_error(r, 408, "body_timeout")
    assert 0.8 <= r.elapsed < 4.0, f"408 after {r.elapsed:.2f}s with body_timeout = 1"
    assert_nothing_delivered(w, p, f"stalled upload ({framing})")
    probe_empty(limits, prefix)


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/nope"), ("POST", "/nope/x"), ("GET", "/broker"), ("PUT", "/broker/x/y"), ("DELETE", "/x")],
)
def test_unknown_path_is_404(limits, watch, method, path):
    w, p = watch
    r = request(limits.http, method, path, b"body" if method in ("POST", "PUT") else None)
    if method == "PUT":
        # The path exists, the method does not: 405 with Allow and a JSON error.
        assert_error(r, 405, "method")
        assert "POST" in (r.header("Allow") or ""), r.headers
    else:
        assert_error(r, 404, "path")
    assert_nothing_delivered(w, p, f"{method} {path}")


def test_limits_broker_still_serves_after_the_errors(limits, watch):
    w, p = watch
    topic = uid("alive/")
    assert_matched(request(limits.http, "POST", f"/broker/{topic}?qos=1", b"still here"), 1)
    m = w.get()
    assert (m.topic, m.payload, m.qos) == (topic, b"still here", 1), m
    assert_message(request(limits.http, "GET", f"/broker/{topic}"), topic, b"still here", 1, False)


# ---- authentication and ACL refusals (secure broker)


@pytest.fixture
def spy(secure, mq):
    """(the spy on '#', a token client for sentinels on h/). Retained
    messages of earlier tests (the seed's foo/bar) are read off first."""
    w = subscriber(mq, secure, "#", 1, V5, creds(secure, "spy"))
    return drained(w, mq(secure, V5, *creds(secure, "rw")), "h/sentinel/")


def spy_nothing(secure, spy, what: str, prefix: str) -> None:
    assert_nothing_delivered(spy[0], spy[1], what, sentinel_prefix="h/sentinel/")
    probe_empty(secure, prefix, headers=bearer(secret(secure, "spy")))


AUTH_401 = {
    "wrong-bearer": lambda b: bearer(secret(b, "rw")[:-4] + "zzzz"),
    "wrong-basic": lambda b: basic(BROKER_NAME, "not-a-token-secret-0000"),
    "unknown-bare": lambda b: {"Authorization": "no-such-secret-0123456789"},
    "no-credentials": lambda b: {},
    "basic-empty-password": lambda b: basic(BROKER_NAME, ""),
    "malformed-basic-base64": lambda b: {"Authorization": "Basic !!!notbase64"},
    "malformed-basic-no-colon": lambda b: {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()},
    "malformed-bearer-empty": lambda b: {"Authorization": "Bearer"},
    "malformed-digest": lambda b: {"Authorization": "Digest username=x, response=y"},
}


@pytest.mark.parametrize("case", AUTH_401.keys())
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_refused_credentials_are_401(secure, spy, case, method):
    prefix = uid("h/a")
    hdrs = AUTH_401[case](secure)
    path = f"/broker/{prefix}/x" + ("?wait=0" if method == "GET" else "?qos=1")
    r = request(secure.listeners["https"], method, path, b"nope" if method == "POST" else None, hdrs, ca=secure.ca)
    assert_error(r, 401, "authentication")
    www = r.header("WWW-Authenticate") or ""
    assert "basic" in www.lower(), f"401 without a Basic challenge: {r.headers}"
    spy_nothing(secure, spy, f"{method} with {case}", prefix)


def test_no_credentials_401_on_the_plain_listener_too(secure, spy):
    prefix = uid("h/p")
    r = request(secure.http, "POST", f"/broker/{prefix}/x", b"anon")
    assert_error(r, 401, "authentication")
    assert r.header("WWW-Authenticate"), r.headers
    spy_nothing(secure, spy, "anonymous POST", prefix)


def test_acl_refusals_are_403(secure, spy, mq):
    base = uid("h/acl")
    rw = spy[1]
    # A value exists that the token `other` may not read: its GET is refused, not leaked.
    rw.publish(f"{base}/x", b"for h/ readers only", qos=1)
    assert spy[0].get_topic(f"{base}/x").payload == b"for h/ readers only"
    for path in (f"{base}/x", f"{base}/+", f"{base}/@"):
        r = request(secure.http, "GET", f"/broker/{path}?wait=0", headers=bearer(secret(secure, "other")))
        assert_error(r, 403, "acl")
        assert b"for h/ readers only" not in r.body
    # rw may not read or write h/secret/ (deny wins).
    r = request(secure.http, "GET", f"/broker/h/secret/{base}?wait=0", headers=bearer(secret(secure, "rw")))
    assert_error(r, 403, "acl")
    r = request(secure.http, "POST", f"/broker/h/secret/{base}?qos=1", b"secret", bearer(secret(secure, "rw")))
    assert_error(r, 403, "acl")
    # ro may read but not publish.
    r = request(secure.http, "POST", f"/broker/{base}/y?qos=1", b"ro writes", bearer(secret(secure, "ro")))
    assert_error(r, 403, "acl")
    r = request(secure.http, "POST", f"/broker/{base}/y", b"ro writes", basic("ro", secret(secure, "ro")))
    assert_error(r, 403, "acl")
    assert_nothing_delivered(spy[0], rw, "ACL-refused POSTs", sentinel_prefix="h/sentinel/")
    for t in (f"{base}/y", f"h/secret/{base}"):
        r = request(secure.http, "GET", f"/broker/{t}?wait=0", headers=bearer(secret(secure, "spy")))
        assert r.status == 204, f"GET {t} after refused POSTs: {r!r}"
    # ro reads what it may.
    r = request(secure.http, "GET", f"/broker/{base}/x?wait=0", headers=bearer(secret(secure, "ro")))
    assert_message(r, f"{base}/x", b"for h/ readers only", 1, False)


def test_auth_rate_limit_is_429_per_address_and_username(mq):
    """STARLING_AUTH_MAX_FAILURES_PER_MINUTE=3, keyed per (address, username)
    and shared with MQTT: three bad Basic passwords for the broker name lock
    that username out (even with the right secret, over HTTP and MQTT);
    other usernames and Bearer (no username) still get in."""
    with tempfile.TemporaryDirectory(prefix="starling-http-rate-") as d:
        bundle = Bundle(os.path.join(d, "bundle.json"))
        for name in ("rw", "spy"):
            bundle.token(name)
        bundle.rule("rw", ["rw"], ["h/#"], ["publish", "subscribe"])
        bundle.rule("spy", ["spy"], ["#"], ["subscribe"])
        b = start_with_bundle(bundle, {"STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "3"}, name="http-rate")
        b.bundle = bundle
        try:
            good = bundle.secrets["rw"]
            w = subscriber(mq, b, "#", 1, V5, ("spy", bundle.secrets["spy"]))
            p = mq(b, V5, "rw", good)
            prefix = uid("h/rate")
            for i in range(3):
                r = request(b.http, "POST", f"/broker/{prefix}/x", b"guess", basic(BROKER_NAME, f"wrong-{i}-0123456789"))
                assert_error(r, 401, "authentication")
            for method in ("POST", "GET"):
                r = request(b.http, method, f"/broker/{prefix}/x" + ("?wait=0" if method == "GET" else ""),
                            b"right secret, locked out" if method == "POST" else None, basic(BROKER_NAME, good))
                assert_error(r, 429, "auth_rate_limit")
                assert r.header("Retry-After"), r.headers
            # The same limiter as MQTT's: that username is locked out of CONNECT too.
            rc, ack = raw_session(b, V5, BROKER_NAME, good)
            with rc:
                assert ack.reason == RATE_LIMITED_V5, f"MQTT after 3 HTTP failures: CONNACK {ack.fields}"
            assert_nothing_delivered(w, p, "rate-limited POST", sentinel_prefix="h/sentinel/")
            # Other keys from the same address are not locked out.
            assert_matched(request(b.http, "POST", f"/broker/{prefix}/y?qos=1", b"token name", basic("rw", good)), 1)
            assert w.get().payload == b"token name"
            assert_matched(request(b.http, "POST", f"/broker/{prefix}/z?qos=1", b"bearer", bearer(good)), 1)
            assert w.get().payload == b"bearer"
            r = request(b.http, "GET", f"/broker/{prefix}/x?wait=0", headers=bearer(good))
            assert r.status == 204, f"the locked-out POST left a value: {r!r}"
        finally:
            shutdown(b)


# ============================================== 5. auth forms


AUTH_FORMS = {
    "basic-broker-name": lambda b, s: (basic(BROKER_NAME, s), ""),
    "basic-token-name": lambda b, s: (basic("rw", s), ""),
    "basic-authorization": lambda b, s: (basic("authorization", s), ""),
    "bearer": lambda b, s: (bearer(s), ""),
    "bare-secret": lambda b, s: ({"Authorization": s}, ""),
    "access-token": lambda b, s: ({}, f"access_token={s}"),
}


@pytest.mark.parametrize("form", AUTH_FORMS.keys())
def test_auth_form_publishes_and_reads(secure, spy, form):
    """Anonymous is denied on this broker, so each 200 is the form working."""
    topic = uid("h/form/")
    hdrs, q = AUTH_FORMS[form](secure, secret(secure, "rw"))
    sep = "&" if q else ""
    payload = f"via {form}".encode()
    r = request(secure.listeners["https"], "POST", f"/broker/{topic}?qos=1{sep}{q}", payload, hdrs, ca=secure.ca)
    assert_matched(r, 1)
    m = spy[0].get()
    assert (m.topic, m.payload, m.qos) == (topic, payload, 1), m
    r = request(secure.listeners["https"], "GET", f"/broker/{topic}?wait=0{sep}{q}", None, hdrs, ca=secure.ca)
    assert_message(r, topic, payload, 1, False)


@pytest.mark.parametrize("user", ["ro", "nobody", "Authorization", "e2e-HOME"])
def test_valid_secret_with_a_wrong_username_is_401(secure, spy, user):
    prefix = uid("h/wu")
    hdrs = basic(user, secret(secure, "rw"))
    r = request(secure.listeners["https"], "POST", f"/broker/{prefix}/x?qos=1", b"wrong user", hdrs, ca=secure.ca)
    assert_error(r, 401, "authentication")
    r = request(secure.listeners["https"], "GET", f"/broker/{prefix}/x?wait=0", None, hdrs, ca=secure.ca)
    assert_error(r, 401, "authentication")
    spy_nothing(secure, spy, f"Basic {user}:<rw secret>", prefix)


# ============================================== 6. CORS


ORIGIN = "http://example.test"


@pytest.fixture(scope="module")
def cors():
    b = launch({"STARLING_WEB_CORS_ORIGINS": ORIGIN}, "http-cors")
    yield b
    shutdown(b)


def header_list(r: Resp, name: str) -> list[str]:
    return [v.strip().lower() for v in (r.header(name) or "").split(",") if v.strip()]


def test_cors_preflight_allows_the_listed_origin(cors):
    r = request(
        cors.http, "OPTIONS", f"/broker/{uid('c/')}",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"},
    )
    assert r.status in (200, 204), r
    assert r.header("Access-Control-Allow-Origin") == ORIGIN, r.headers
    assert "post" in header_list(r, "Access-Control-Allow-Methods"), r.headers
    assert "authorization" in header_list(r, "Access-Control-Allow-Headers"), r.headers


def test_cors_get_and_post_expose_mqtt_headers(cors, mq):
    topic = uid("c/")
    s = subscriber(mq, cors, topic, 1)
    r = request(cors.http, "POST", f"/broker/{topic}", b"from a page", {"Origin": ORIGIN})
    assert_matched(r, 1)
    assert r.header("Access-Control-Allow-Origin") == ORIGIN, r.headers
    assert s.get().payload == b"from a page"
    r = request(cors.http, "GET", f"/broker/{topic}", headers={"Origin": ORIGIN})
    assert_message(r, topic, b"from a page", 0, False)
    assert r.header("Access-Control-Allow-Origin") == ORIGIN, r.headers
    exposed = header_list(r, "Access-Control-Expose-Headers")
    for name in ("mqtt-topic", "mqtt-qos", "mqtt-retain"):
        assert name in exposed, f"{name} not exposed: {r.headers}"


def test_cors_unlisted_origin_gets_no_allow_header(cors):
    topic = uid("c/")
    assert_matched(request(cors.http, "POST", f"/broker/{topic}", b"x"), 0)
    other = {"Origin": "http://evil.test"}
    r = request(cors.http, "GET", f"/broker/{topic}", headers=other)
    assert r.status == 200 and r.header("Access-Control-Allow-Origin") is None, r.headers
    r = request(cors.http, "OPTIONS", f"/broker/{topic}", headers={**other, "Access-Control-Request-Method": "POST"})
    assert r.header("Access-Control-Allow-Origin") is None, r.headers


def test_no_cors_headers_without_the_setting(plain):
    topic = uid("nc/")
    r = request(plain.http, "POST", f"/broker/{topic}", b"x", {"Origin": ORIGIN})
    assert_matched(r, 0)
    responses = [
        r,
        request(plain.http, "GET", f"/broker/{topic}", headers={"Origin": ORIGIN}),
        request(plain.http, "OPTIONS", f"/broker/{topic}",
                headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}),
    ]
    assert responses[1].status == 200, responses[1]
    for resp in responses:
        cors_headers = [k for k in resp.headers if k.lower().startswith("access-control-")]
        assert not cors_headers, f"CORS headers without cors_origins: {resp.headers}"


# ============================================== 7. keep-alive and HTTP/2


def test_keep_alive_serves_many_requests_on_one_connection(plain, mq):
    topic = uid("ka/")
    s = subscriber(mq, plain, topic, 1)
    conn = connection(plain.http)
    try:
        conn.connect()
        sock = conn.sock
        steps = [
            ("GET", f"/broker/{topic}?wait=0", None, 204),
            ("POST", f"/broker/{topic}?qos=1", b"one", 200),
            ("GET", f"/broker/{topic}", None, 200),
            ("GET", f"/broker/{topic}?qos=1", None, 400),
            ("POST", f"/broker/{topic}?qos=3", b"", 400),
            ("GET", "/healthz", None, 200),
            ("POST", f"/broker/{topic}?retained=true", b"two", 200),
            ("GET", f"/broker/{topic}?retained=true", None, 200),
        ]
        answers = []
        for method, path, body, want in steps:
            r = send(conn, method, path, body)
            assert r.status == want, (method, path, r)
            assert not r.will_close, f"{method} {path}: the broker closes the connection"
            assert conn.sock is sock, f"{method} {path}: a new connection was opened"
            answers.append(r)
        assert answers[2].body == b"one" and answers[7].body == b"two", answers
        assert answers[7].header("MQTT-Retain") == "true"
    finally:
        conn.close()
    assert [m.payload for m in (s.get(), s.get())] == [b"one", b"two"]
    assert not s.drain(0.2)


@pytest.mark.parametrize(
    "path,body,status,rule",
    [
        pytest.param("/broker/{T}/+", b"\x01" * 60_000, 400, "wildcard", id="400-wildcard-60000-byte-body"),
        pytest.param("/broker/{T}?qos=3", b"\x02" * 60_000, 400, "qos", id="400-qos-60000-byte-body"),
        pytest.param("/broker/{T}", b"\x03" * (MAX_BODY + 1), 413, "max_body_bytes", id="413-content-length"),
    ],
)
def test_refused_upload_keeps_the_connection_or_says_close(plain, path, body, status, rule):
    """A POST refused before its body is read (rules are checked first, by
    design) leaves the connection either usable for the next request or
    closed with `Connection: close` announced (RFC 9112 9.6), so a client
    that waits for each answer is never left sending into a dead socket."""
    topic = uid("kar/")
    conn = connection(plain.http)
    try:
        r = send(conn, "POST", path.format(T=topic), body)
        assert_error(r, status, rule)
        if r.will_close:
            return  # announced: the client opens a new connection
        try:
            after = send(conn, "GET", f"/broker/{topic}?wait=0")
        except (ConnectionError, http.client.HTTPException) as e:
            raise AssertionError(
                f"the {status} answer kept the connection open (no Connection: close), "
                f"but the next request on it failed: {e!r}"
            ) from None
        assert after.status == 204, after
    finally:
        conn.close()


def test_http2_over_tls(secure, spy):
    host, port = secure.listeners["https"]
    endpoint = f"https://{BROKER_NAME}:{secret(secure, 'rw')}@{host}:{port}"
    extra = ["--http2", "--cacert", secure.ca]
    topic = uid("h/h2/")
    r = curl(f"curl -X POST 'ENDPOINT/broker/{topic}?qos=1' -d 'over h2'", endpoint, extra)
    assert (r.status, r.version) == (200, "2"), r
    assert json.loads(r.body) == {"matched": 1}, r
    m = spy[0].get()
    assert (m.topic, m.payload, m.qos) == (topic, b"over h2", 1), m
    r = curl(f"curl 'ENDPOINT/broker/{topic}'", endpoint, extra)
    assert (r.status, r.version, r.body) == (200, "2", b"over h2"), r
    assert r.headers.get("mqtt-topic") == topic and r.headers.get("mqtt-qos") == "1", r
    # A refusal over h2 (a GET: curl 7.88 sometimes reports the RFC 9113 8.1
    # RST_STREAM(NO_ERROR) after an early answer to an upload as error 92).
    r = curl(f"curl 'ENDPOINT/broker/{topic}?qos=1'", endpoint, extra)
    assert (r.status, r.version) == (400, "2") and json.loads(r.body)["rule"] == "query", r
    # ALPN really offers h2 (not only curl falling back).
    with socket.create_connection((host, port), timeout=5) as raw_sock:
        with tls_context(secure.ca, ["h2", "http/1.1"]).wrap_socket(raw_sock, server_hostname="localhost") as t:
            assert t.selected_alpn_protocol() == "h2", t.selected_alpn_protocol()


# ============================================== 8. metrics


def test_request_metrics_and_lvc_entries(mq):
    b = launch({}, "http-metrics")
    try:
        s = subscriber(mq, b, "m/#", 1)
        for t in ("m/a", "m/b", "m/a"):
            assert_matched(request(b.http, "POST", f"/broker/{t}", t.encode()), 1)
            assert s.get().topic == t
        assert_error(request(b.http, "POST", "/broker/m/+", b"x"), 400, "wildcard")
        assert_error(request(b.http, "POST", "/broker/m/a?qos=3", b"x"), 400, "qos")
        assert request(b.http, "GET", "/broker/m/a").status == 200
        assert_error(request(b.http, "GET", "/broker/m/a?wait=99"), 400, "max_wait")

        want = {
            'route="publish",status="200"': 3,
            'route="publish",status="400"': 2,
            'route="retrieve",status="200"': 1,
            'route="retrieve",status="400"': 1,
        }
        # Counted when the response is written; /metrics has no event to wait on.
        deadline = time.monotonic() + TIMEOUT
        while True:
            text = h.metrics_text(b)
            got = {k: h.metric(b, "starling_http_requests_total", k) if f"starling_http_requests_total{{{k}}}" in text
                   else None for k in want}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got == want, f"starling_http_requests_total: {got}\n{text}"
        entries = h.metric(b, "starling_lvc_entries")
        assert entries == 2, f"starling_lvc_entries = {entries} (m/a and m/b were published)"
        assert h.metric(b, "starling_lvc_bytes") >= len("m/a") + len("m/b") + 6
    finally:
        shutdown(b)

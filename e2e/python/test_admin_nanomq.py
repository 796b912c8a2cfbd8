"""NanoMQ's admin API (POST /api/v1) against the real broker, with live
clients: the seed's curl commands (../shared/reference/001_…) run verbatim
with only the host and port replaced, and every documented field is checked
against what the test did — counts, not just presence. Then every error
path: 401 (103 wrong / 104 missing credentials), 109 not JSON, 107 missing
req/seq, 108 unknown req and unknown configuration fields; and the refusal
to serve the default credentials on a non-loopback address."""

from __future__ import annotations

import json
import subprocess

import pytest

from broker import TARGET
from clients import TIMEOUT, V5, V311, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the admin API is Starling's")


def curl(cmd: str, admin) -> tuple[int, dict]:
    """Runs a seed command with localhost:8081 replaced by the admin address;
    returns (HTTP status, JSON body)."""
    host, port = admin
    cmd = cmd.replace("localhost:8081", f"{host}:{port}")
    out = subprocess.run(
        ["bash", "-c", cmd + " -s -o /dev/stdout -w '\\n%{http_code}'"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    # `curl -i` prints headers first: the JSON is the last line of the body.
    text = body.strip().splitlines()[-1] if body.strip() else "{}"
    return int(status), json.loads(text)


@pytest.fixture
def live():
    b = launch(name="nanomq")
    subs = []
    try:
        a = Client(b.mqtt, V311, client_id=uid("nano-a"), keepalive=45).connect()
        a.subscribe("nano/+/x", 1)
        a.subscribe("nano/y", 0)
        c = Client(b.mqtt, V5, client_id=uid("nano-c"), keepalive=30).connect()
        subs += [a, c]
        for i in range(3):
            c.publish("nano/1/x", f"m{i}".encode(), qos=1)
        for i in range(3):
            a.get()
        yield b, a, c
    finally:
        for s in subs:
            s.close()
        shutdown(b)


def test_seed_broker_info(live):
    b, a, c = live
    status, r = curl(
        """curl -i --basic -u admin:public -X POST "http://localhost:8081/api/v1" -d '{"req": 2,"seq": 1111111}'""",
        b.listeners["admin"],
    )
    assert status == 200
    assert (r["code"], r["seq"], r["rep"]) == (0, 1111111, 2)
    d = r["data"]
    assert d["client_size"] == 2
    assert d["message_in"] == 3, d
    assert d["message_out"] == 3, d
    assert d["message_drop"] == 0, d


def test_seed_topic_info(live):
    b, a, c = live
    status, r = curl(
        """curl -i --basic -u admin:public -X POST "http://localhost:8081/api/v1" -d '{"req": 4,"seq": 1111111}'""",
        b.listeners["admin"],
    )
    assert (status, r["code"], r["rep"]) == (200, 0, 4)
    by_id = {e["client_id"]: e["subscriptions"] for e in r["data"]}
    assert by_id == {a.client_id: [{"topic": "nano/+/x", "qos": 1}, {"topic": "nano/y", "qos": 0}]}, r


def test_seed_client_info(live):
    b, a, c = live
    status, r = curl(
        """curl -i --basic -u admin:public -X POST "http://localhost:8081/api/v1" -d '{"req": 5,"seq": 1111111}'""",
        b.listeners["admin"],
    )
    assert (status, r["code"], r["rep"]) == (200, 0, 5)
    by_id = {e["client_id"]: e for e in r["data"]}
    assert by_id[a.client_id] == {
        "client_id": a.client_id,
        "username": "",
        "keepalive": 45,
        "protocol": 4,
        "connect_status": 1,
        "message_receive": 0,
    }
    assert by_id[c.client_id]["protocol"] == 5
    assert by_id[c.client_id]["keepalive"] == 30
    assert by_id[c.client_id]["message_receive"] == 3


def test_seed_get_and_set_configuration(live):
    b, _, _ = live
    # The seed's GET form with a JSON body (its example omits a comma; ours is valid).
    status, r = curl(
        """curl --location --request GET 'http://localhost:8081/api/v1' \\
--header 'Authorization: Basic YWRtaW46cHVibGlj' \\
--header 'Content-Type: application/json' \\
--data-raw '{"req": 11, "seq": 9999}'""",
        b.listeners["admin"],
    )
    assert (status, r["code"], r["seq"], r["rep"]) == (200, 0, 9999, 11)
    d = r["data"]
    assert d["allow_anonymous"] is True
    assert d["url"] == f"mqtt-tcp://{b.mqtt[0]}:0" or d["url"].startswith("mqtt-tcp://127.0.0.1:")
    assert d["http_server"]["enable"] is True and d["http_server"]["username"] == "admin"
    assert "password" not in json.dumps(d["http_server"]) and "public" not in json.dumps(d)
    assert d["starling"]["limits"]["max_queued_messages"] == d["msq_len"]
    # Set: a known field that differs needs a restart; NanoMQ-only tuning is ignored.
    status, r = curl(
        """curl --location --request POST 'http://localhost:8081/api/v1' \\
--header 'Authorization: Basic YWRtaW46cHVibGlj' \\
--header 'Content-Type: application/json' \\
--data-raw '{"req": 12, "seq": 111, "data": {"num_taskq_thread": 10, "allow_anonymous": false, "msq_len": 64}}'""",
        b.listeners["admin"],
    )
    assert (status, r["code"], r["rep"]) == (200, 0, 12)
    assert r["data"]["restart_required"] == ["allow_anonymous"]
    assert r["data"]["applied"] == ["msq_len"], "limits apply live"
    # Unknown fields refuse the whole request.
    status, r = curl(
        """curl -s -u admin:public -X POST "http://localhost:8081/api/v1" -d '{"req": 12, "seq": 5, "data": {"no_such_key": 1}}'""",
        b.listeners["admin"],
    )
    assert (status, r["code"], r["seq"]) == (400, 108, 5)
    assert "no_such_key" in r["message"]


@pytest.mark.parametrize(
    "body,status,code",
    [
        ("not json", 400, 109),
        ('{"seq": 1}', 400, 107),
        ('{"req": 2}', 400, 107),
        ('{"req": "2", "seq": 1}', 400, 107),
        ('{"req": 3, "seq": 1}', 400, 108),
        ('{"req": 12, "seq": 1}', 400, 107),
    ],
)
def test_error_codes(live, body, status, code):
    b, a, _ = live
    host, port = b.listeners["admin"]
    got, r = curl(f"""curl -u admin:public -X POST "http://{host}:{port}/api/v1" -d '{body}'""", b.listeners["admin"])
    assert (got, r["code"]) == (status, code), r
    # The broker still serves its clients.
    a.publish("nano/1/x", b"after", qos=1)
    assert a.get().payload == b"after"


@pytest.mark.parametrize("auth,code", [("-u admin:wrong", 103), ("-u nobody:public", 103), ("", 104), ("-u admin:", 104)])
def test_authentication(live, auth, code):
    b, _, _ = live
    host, port = b.listeners["admin"]
    out = subprocess.run(
        ["bash", "-c", f"""curl -s -i {auth} -X POST "http://{host}:{port}/api/v1" -d '{{"req": 2, "seq": 1}}'"""],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    head, _, body = out.stdout.partition("\n\n")  # text mode: \r\n read as \n
    assert head.startswith("HTTP/1.1 401"), out.stdout
    assert "www-authenticate: basic" in head.lower()
    assert json.loads(body)["code"] == code


def test_default_credentials_refused_off_loopback():
    from broker import BrokerFailed

    with pytest.raises(BrokerFailed) as e:
        launch({"STARLING_ADMIN_BIND": "0.0.0.0:0", "RUST_BACKTRACE": "0"}, name="admin-open")
    assert "default credentials" in str(e.value)
    # With a password of its own it starts.
    b = launch({"STARLING_ADMIN_BIND": "0.0.0.0:0", "STARLING_API_PASSWORD": "not-the-default"}, name="admin-pw")
    try:
        host, port = b.listeners["admin"]
        status, r = curl(
            f"""curl -u admin:not-the-default -X POST "http://127.0.0.1:{port}/api/v1" -d '{{"req": 2, "seq": 7}}'""",
            b.listeners["admin"],
        )
        assert (status, r["code"], r["seq"]) == (200, 0, 7)
    finally:
        shutdown(b)


def _jwt(secret: bytes, claims: dict) -> str:
    """An HS256 JWT made by hand (RFC 7519), as NanoMQ's JWT clients send."""
    import base64
    import hashlib
    import hmac

    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_jwt_bearer_when_configured():
    import time as _time

    b = launch({"STARLING_API_JWT_SECRET": "jwt-key-for-the-e2e-test"}, name="nanomq-jwt")
    try:
        host, port = b.listeners["admin"]
        url = f"http://{host}:{port}/api/v1"
        good = _jwt(b"jwt-key-for-the-e2e-test", {"sub": "ops", "exp": int(_time.time()) + 600})
        for token, want_status, want_code in [
            (good, 200, 0),
            (_jwt(b"another-key", {"exp": int(_time.time()) + 600}), 401, 103),
            (_jwt(b"jwt-key-for-the-e2e-test", {"exp": 1000}), 401, 103),  # expired
            (_jwt(b"jwt-key-for-the-e2e-test", {"sub": "ops"}), 401, 103),  # no exp
        ]:
            status, r = curl(
                f"""curl -H 'Authorization: Bearer {token}' -X POST "{url}" -d '{{"req": 2, "seq": 3}}'""",
                b.listeners["admin"],
            )
            assert (status, r["code"]) == (want_status, want_code), (token, r)
        # Basic still works beside it.
        status, r = curl(f"""curl -u admin:public -X POST "{url}" -d '{{"req": 2, "seq": 4}}'""", b.listeners["admin"])
        assert (status, r["code"], r["seq"]) == (200, 0, 4)
    finally:
        shutdown(b)

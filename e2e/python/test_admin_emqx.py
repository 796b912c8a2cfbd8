"""EMQX v4's REST API (/api/v4) against the real broker with live clients:
EMQX-style curl calls with only the host and port replaced, each value
checked against what the test did (counts, client ids, subscriptions);
kicking a client (v5 DISCONNECT 0x98); publishing over REST (plain and
base64, QoS 1, retained) and receiving over MQTT; subscribing on a client's
behalf and seeing it receive; paging and filters; every error path (400
with 107/108/109/115, 404 with 112, 401); and the OpenAPI document."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from broker import TARGET
from clients import TIMEOUT, V5, V311, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the admin API is Starling's")

AUTH = "Basic " + base64.b64encode(b"admin:public").decode()


def api(admin, method: str, path: str, body=None, auth: str | None = AUTH, raw: bytes | None = None):
    """(HTTP status, JSON body or None) of one admin API call."""
    host, port = admin
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method)
    if auth:
        req.add_header("Authorization", auth)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            text = r.read()
            return r.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text else None


def curl(cmd: str, admin) -> tuple[int, dict]:
    """Runs an EMQX-documented curl command against our admin address."""
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
    text = body.strip().splitlines()[-1] if body.strip() else "{}"
    return int(status), json.loads(text)


@pytest.fixture
def live():
    b = launch(name="emqx")
    subs = []
    try:
        pfx = uid("emqx")
        a = Client(b.mqtt, V311, client_id=f"{pfx}-a", keepalive=45).connect()
        a.subscribe(f"{pfx}/+/x", 1)
        a.subscribe(f"{pfx}/y", 0)
        c = Client(b.mqtt, V5, client_id=f"{pfx}-c", keepalive=30).connect()
        subs += [a, c]
        for i in range(3):
            c.publish(f"{pfx}/1/x", f"m{i}".encode(), qos=1)
        for _ in range(3):
            a.get()
        yield b, pfx, a, c
    finally:
        for s in subs:
            s.close()
        shutdown(b)


def test_brokers_stats_metrics(live):
    b, pfx, a, c = live
    status, r = curl("""curl -i --basic -u admin:public -X GET "http://localhost:8081/api/v4/brokers\"""", b.listeners["admin"])
    assert (status, r["code"]) == (200, 0)
    (node,) = r["data"]
    assert node["node_status"] == "Running" and node["version"] and node["node"].startswith("starling@")
    status, r = curl("""curl -i --basic -u admin:public -X GET "http://localhost:8081/api/v4/stats\"""", b.listeners["admin"])
    assert (status, r["code"]) == (200, 0)
    s = r["data"][0]["stats"]
    assert s["connections.count"] == 2
    assert s["sessions.count"] == 2
    assert s["subscriptions.count"] == 2
    assert s["routes.count"] == 2
    status, r = curl("""curl -i --basic -u admin:public -X GET "http://localhost:8081/api/v4/metrics\"""", b.listeners["admin"])
    m = r["data"][0]["metrics"]
    assert m["messages.received"] == 3 and m["messages.qos1.received"] == 3
    assert m["messages.sent"] == 3 and m["messages.dropped"] == 0
    assert m["client.connected"] == 2
    assert m["bytes.received"] > 0


def test_clients_list_and_one(live):
    b, pfx, a, c = live
    status, r = curl("""curl -i --basic -u admin:public -X GET "http://localhost:8081/api/v4/clients\"""", b.listeners["admin"])
    assert (status, r["code"]) == (200, 0)
    assert r["meta"] == {"page": 1, "limit": 10000, "count": 2, "hasnext": False}
    by_id = {e["clientid"]: e for e in r["data"]}
    assert set(by_id) == {a.client_id, c.client_id}
    ea, ec = by_id[a.client_id], by_id[c.client_id]
    assert (ea["proto_ver"], ea["keepalive"], ea["connected"], ea["subscriptions_cnt"]) == (4, 45, True, 2)
    assert (ec["proto_ver"], ec["keepalive"], ec["connected"], ec["subscriptions_cnt"]) == (5, 30, True, 0)
    assert ec["recv_msg"] == 3 and ea["send_msg"] == 3
    assert ea["ip_address"] == "127.0.0.1" and isinstance(ea["port"], int)
    assert len(ea["connected_at"]) == 19
    status, r = api(b.listeners["admin"], "GET", f"/api/v4/clients/{c.client_id}")
    assert (status, r["code"], [e["clientid"] for e in r["data"]]) == (200, 0, [c.client_id])


def test_paging_and_filters(live):
    b, pfx, a, c = live
    more = [Client(b.mqtt, V5, client_id=f"{pfx}-m{i}").connect() for i in range(3)]
    try:
        adm = b.listeners["admin"]
        seen = []
        for page in (1, 2, 3):
            status, r = api(adm, "GET", f"/api/v4/clients?_page={page}&_limit=2")
            assert status == 200
            assert r["meta"] == {"page": page, "limit": 2, "count": 5, "hasnext": page < 3}
            seen += [e["clientid"] for e in r["data"]]
        assert sorted(seen) == sorted([a.client_id, c.client_id] + [m.client_id for m in more])
        assert len(seen) == 5
        _, r = api(adm, "GET", f"/api/v4/clients?clientid={a.client_id}")
        assert [e["clientid"] for e in r["data"]] == [a.client_id]
        _, r = api(adm, "GET", f"/api/v4/clients?_like_clientid={pfx}-m")
        assert sorted(e["clientid"] for e in r["data"]) == sorted(m.client_id for m in more)
        _, r = api(adm, "GET", "/api/v4/clients?username=nobody")
        assert r["data"] == [] and r["meta"]["count"] == 0
        _, r = api(adm, "GET", "/api/v4/clients?_limit=999999")
        assert r["meta"]["limit"] == 10000
    finally:
        for m in more:
            m.close()


def test_subscriptions_and_routes(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    status, r = curl("""curl -i --basic -u admin:public -X GET "http://localhost:8081/api/v4/subscriptions\"""", adm)
    assert (status, r["code"], r["meta"]["count"]) == (200, 0, 2)
    got = sorted((e["clientid"], e["topic"], e["qos"]) for e in r["data"])
    assert got == [(a.client_id, f"{pfx}/+/x", 1), (a.client_id, f"{pfx}/y", 0)]
    _, r = api(adm, "GET", f"/api/v4/subscriptions/{a.client_id}")
    assert sorted(e["topic"] for e in r["data"]) == [f"{pfx}/+/x", f"{pfx}/y"]
    _, r = api(adm, "GET", f"/api/v4/subscriptions/{c.client_id}")
    assert r["data"] == []
    _, r = api(adm, "GET", "/api/v4/subscriptions?qos=1")
    assert [e["topic"] for e in r["data"]] == [f"{pfx}/+/x"]
    _, r = api(adm, "GET", "/api/v4/routes")
    assert sorted(e["topic"] for e in r["data"]) == [f"{pfx}/+/x", f"{pfx}/y"]
    assert r["meta"]["count"] == 2


def test_configs_without_secrets(live):
    b, *_ = live
    status, r = api(b.listeners["admin"], "GET", "/api/v4/configs")
    assert (status, r["code"]) == (200, 0)
    assert r["data"]["http_server"]["username"] == "admin"
    assert "public" not in json.dumps(r["data"])


def test_kick_disconnects_with_administrative_action(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    status, r = curl(f"""curl -i --basic -u admin:public -X DELETE "http://localhost:8081/api/v4/clients/{c.client_id}\"""", adm)
    assert (status, r) == (200, {"code": 0})
    assert c.disconnected.wait(TIMEOUT)
    assert c.disconnect_rc.value == 0x98, c.disconnect_rc
    # Offline now (its session ended with it): kicking again is 112.
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, r = api(adm, "DELETE", f"/api/v4/clients/{c.client_id}")
        if status != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (status, r["code"]) == (404, 112) and r["message"]
    _, r = api(adm, "GET", "/api/v4/clients")
    assert [e["clientid"] for e in r["data"]] == [a.client_id]
    status, r = api(adm, "DELETE", "/api/v4/clients/no-such-client")
    assert (status, r["code"]) == (404, 112)
    status, r = api(adm, "GET", "/api/v4/clients/no-such-client")
    assert (status, r["code"]) == (404, 112)


def test_publish_plain_base64_qos1_retained(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    status, r = curl(
        f"""curl -i --basic -u admin:public -X POST "http://localhost:8081/api/v4/mqtt/publish" -d '{{"topic":"{pfx}/2/x","payload":"Hello World","qos":1,"retain":false,"clientid":"example"}}'""",
        adm,
    )
    assert (status, r) == (200, {"code": 0})
    m = a.get()
    assert (m.topic, m.payload, m.qos, m.retain) == (f"{pfx}/2/x", b"Hello World", 1, False)
    raw = bytes(range(256))
    status, r = api(adm, "POST", "/api/v4/mqtt/publish",
                    {"topic": f"{pfx}/3/x", "payload": base64.b64encode(raw).decode(), "encoding": "base64", "qos": 1})
    assert (status, r["code"]) == (200, 0)
    m = a.get()
    assert (m.payload, m.qos) == (raw, 1)
    # Retained: a later subscriber gets it with the retain flag.
    status, r = api(adm, "POST", "/api/v4/mqtt/publish", {"topic": f"{pfx}/kept", "payload": "v", "retain": True, "qos": 1})
    assert status == 200
    late = Client(b.mqtt, V5).connect()
    try:
        late.subscribe(f"{pfx}/kept", 1)
        m = late.get()
        assert (m.payload, m.retain) == (b"v", True)
    finally:
        late.close()
    # Several topics at once.
    status, _ = api(adm, "POST", "/api/v4/mqtt/publish", {"topics": f"{pfx}/4/x,{pfx}/y", "payload": "two"})
    assert status == 200
    got = sorted(a.get().topic for _ in range(2))
    assert got == [f"{pfx}/4/x", f"{pfx}/y"]


def test_publish_batch(live):
    b, pfx, a, c = live
    status, r = api(b.listeners["admin"], "POST", "/api/v4/mqtt/publish_batch", [
        {"topic": f"{pfx}/5/x", "payload": "one", "qos": 1},
        {"topic": f"{pfx}/6/x", "payload": "two", "qos": 3},
        {"topic": f"{pfx}/7/x", "payload": "three"},
    ])
    assert (status, r["code"]) == (200, 0)
    assert [(e["topic"], e["code"]) for e in r["data"]] == [(f"{pfx}/5/x", 0), (f"{pfx}/6/x", 108), (f"{pfx}/7/x", 0)]
    got = sorted(a.get().payload for _ in range(2))
    assert got == [b"one", b"three"]
    assert a.drain() == []


def test_subscribe_on_behalf(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    # A retained message first: the new subscription delivers it, like SUBSCRIBE.
    a.publish(f"{pfx}/news/old", b"retained", qos=1, retain=True)
    status, r = curl(
        f"""curl -i --basic -u admin:public -X POST "http://localhost:8081/api/v4/mqtt/subscribe" -d '{{"topic":"{pfx}/news/#","qos":1,"clientid":"{c.client_id}"}}'""",
        adm,
    )
    assert (status, r) == (200, {"code": 0})
    m = c.get()
    assert (m.topic, m.payload, m.retain) == (f"{pfx}/news/old", b"retained", True)
    a.publish(f"{pfx}/news/new", b"fresh", qos=1)
    m = c.get()
    assert (m.topic, m.payload, m.qos) == (f"{pfx}/news/new", b"fresh", 1)
    _, r = api(adm, "GET", f"/api/v4/subscriptions/{c.client_id}")
    assert [(e["topic"], e["qos"]) for e in r["data"]] == [(f"{pfx}/news/#", 1)]
    # Batch subscribe, then unsubscribe: no more deliveries.
    status, r = api(adm, "POST", "/api/v4/mqtt/subscribe_batch", [
        {"topic": f"{pfx}/b1", "qos": 0, "clientid": c.client_id},
        {"topic": f"{pfx}/b2", "qos": 0, "clientid": "no-such-client"},
    ])
    assert [e["code"] for e in r["data"]] == [0, 112]
    status, r = api(adm, "POST", "/api/v4/mqtt/unsubscribe", {"topic": f"{pfx}/news/#", "clientid": c.client_id})
    assert (status, r) == (200, {"code": 0})
    status, r = api(adm, "POST", "/api/v4/mqtt/unsubscribe_batch", [{"topic": f"{pfx}/b1", "clientid": c.client_id}])
    assert (status, [e["code"] for e in r["data"]]) == (200, [0])
    a.publish(f"{pfx}/news/later", b"nope", qos=1)
    a.publish(f"{pfx}/b1", b"nope", qos=1)
    assert c.drain() == []
    _, r = api(adm, "GET", f"/api/v4/subscriptions/{c.client_id}")
    assert r["data"] == []
    _, r = api(adm, "GET", "/api/v4/stats")
    assert r["data"][0]["stats"]["subscriptions.count"] == 2


@pytest.mark.parametrize(
    "path,body,status,code",
    [
        ("/api/v4/mqtt/publish", b"not json", 400, 109),
        ("/api/v4/mqtt/publish", b'{"payload": "x"}', 400, 107),
        ("/api/v4/mqtt/publish", b'{"topic": "t", "qos": 3}', 400, 108),
        ("/api/v4/mqtt/publish", b'{"topic": "t", "qos": "1"}', 400, 108),
        ("/api/v4/mqtt/publish", b'{"topic": "t", "encoding": "hex"}', 400, 108),
        ("/api/v4/mqtt/publish", b'{"topic": "t", "encoding": "base64", "payload": "!!"}', 400, 108),
        ("/api/v4/mqtt/publish", b'{"topic": "a/+/b"}', 400, 115),
        ("/api/v4/mqtt/publish", b"[1]", 400, 108),
        ("/api/v4/mqtt/publish_batch", b'{"topic": "t"}', 400, 108),
        ("/api/v4/mqtt/publish_batch", b"[]", 400, 107),
        ("/api/v4/mqtt/subscribe", b'{"topic": "t"}', 400, 107),
        ("/api/v4/mqtt/subscribe", b'{"clientid": "x"}', 400, 107),
        ("/api/v4/mqtt/subscribe", b'{"topic": "t", "clientid": "no-such"}', 404, 112),
        ("/api/v4/mqtt/unsubscribe", b'{"topic": "t", "clientid": "no-such"}', 404, 112),
        ("/api/v4/mqtt/subscribe_batch", b"nope", 400, 109),
    ],
)
def test_error_codes(live, path, body, status, code):
    b, pfx, a, c = live
    got, r = api(b.listeners["admin"], "POST", path, raw=body)
    assert (got, r["code"]) == (status, code), r
    assert isinstance(r["message"], str) and r["message"].endswith(".")
    # The broker still serves its clients.
    c.publish(f"{pfx}/1/x", b"after", qos=1)
    assert a.get().payload == b"after"


def test_invalid_filter_on_behalf_and_paging_errors(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    got, r = api(adm, "POST", "/api/v4/mqtt/subscribe", {"topic": "a/#/b", "clientid": c.client_id})
    assert (got, r["code"]) == (400, 115)
    for q in ("_page=0", "_limit=abc", "_page=-1"):
        got, r = api(adm, "GET", f"/api/v4/clients?{q}")
        assert (got, r["code"]) == (400, 108), q
    got, r = api(adm, "GET", "/api/v4/subscriptions?qos=7")
    assert (got, r["code"]) == (400, 108)


@pytest.mark.parametrize("path", ["/api/v4/clients", "/api/v4/brokers", "/api/v4/openapi.json"])
@pytest.mark.parametrize("auth,code", [(None, 104), ("Basic " + base64.b64encode(b"admin:wrong").decode(), 103)])
def test_unauthorized(live, path, auth, code):
    b, *_ = live
    got, r = api(b.listeners["admin"], "GET", path, auth=auth)
    assert (got, r["code"]) == (401, code)


def test_openapi_document(live):
    b, *_ = live
    adm = b.listeners["admin"]
    status, doc = api(adm, "GET", "/api/v4/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    assert api(adm, "GET", "/api/v1/openapi.json")[1] == doc
    paths = doc["paths"]
    for p, m in [
        ("/api/v1", "post"),
        ("/api/v4/clients", "get"),
        ("/api/v4/clients/{clientid}", "delete"),
        ("/api/v4/mqtt/publish", "post"),
        ("/api/v4/mqtt/subscribe_batch", "post"),
        ("/api/v1/mqtt/clients", "get"),
        ("/api/v1/mqtt/clients/{clientId}/subscriptions", "get"),
    ]:
        assert m in paths[p], (p, m)
    assert doc["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert len([op for item in paths.values() for op in item]) == 35


def test_schemathesis_property_run():
    """Property-based run of schemathesis against the served document: no
    5xx, every response matching its declared schema. (The failure limiter
    is off here: schemathesis also sends requests without credentials.)
    The broker is its own, on a throwaway bundle file, so the token and ACL
    writes it fuzzes really write, and what it deletes or disables is
    nobody else's."""
    import os
    import shutil
    import sys
    import tempfile

    st = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(st):
        pytest.skip("schemathesis is not installed (e2e/python/requirements.txt)")
    bundle = os.path.join(tempfile.mkdtemp(prefix="starling-schemathesis-"), "bundle.json")
    with open(bundle, "w") as f:
        json.dump({"version": 1, "broker": "schemathesis",
                   "hash_key": base64.b64encode(b"schemathesis-throwaway-key-00001").decode()}, f)
    b = launch({"STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "0", "STARLING_AUTH_BUNDLE": bundle},
               name="schemathesis")
    c = Client(b.mqtt, V5, client_id=uid("st")).connect()
    try:
        c.subscribe("st/#", 1)
        host, port = b.listeners["admin"]
        out = subprocess.run(
            [st, "run", f"http://{host}:{port}/api/v4/openapi.json", "-a", "admin:public",
             "-c", "not_a_server_error,response_schema_conformance",
             "-n", "30", "--phases", "examples,coverage,fuzzing", "--no-color",
             "--generation-database", "none", "--request-timeout", "5", "--seed", "1", "-w", "2"],
            capture_output=True, text=True, timeout=80,
        )
        tail = out.stdout[-4000:] + out.stderr[-1000:]
        assert out.returncode == 0, tail
        assert "Authentication failed" not in out.stdout, tail
        assert " passed" in out.stdout and "failed" not in out.stdout.split("SUMMARY")[-1], tail
    finally:
        c.close()
        shutdown(b)

"""Token and ACL management over the EMQX-style admin API (/api/v4/auth_username,
/api/v4/acl) and PUT /api/v4/configs, against the real broker with paho clients:
a token made over REST connects, and deleting or disabling it closes its
connection within 2 s; an ACL added over REST lets a subscription through and
removing it refuses the next; changes survive a restart on the same bundle file;
concurrent writers lose nothing; an operator-managed broker and one without a
bundle file refuse writes with one sentence; every bad input is refused with the
EMQX error envelope, the file untouched and other clients still served; no list
ever shows a secret or hash."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest

from broker import TARGET
from clients import TIMEOUT, V5, V311, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the admin API is Starling's")

AUTH = "Basic " + base64.b64encode(b"admin:public").decode()
BROKER_NAME = "tokens-e2e"
# Any 32 bytes; the broker hashes secrets under it.
HASH_KEY = base64.b64encode(b"starling-e2e-admin-tokens-key-01").decode()
KEEPER_SECRET = "keeper-secret-0123456789abcdef"
REVOKE_WITHIN = 2.0
NOT_AUTHORIZED_V5 = 0x87


def api(admin, method: str, path: str, body=None, raw: bytes | None = None):
    """(HTTP status, JSON body) of one admin API call."""
    host, port = admin
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method)
    req.add_header("Authorization", AUTH)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def api_headers(admin, method: str, path: str, body) -> dict:
    """The response headers of one successful admin API call."""
    host, port = admin
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=json.dumps(body).encode(), method=method)
    req.add_header("Authorization", AUTH)
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return {k.lower(): v for k, v in r.headers.items()}


def initial_bundle(path: str) -> None:
    """An empty bundle; the fixture adds its tokens over the API."""
    doc = {"version": 1, "broker": BROKER_NAME, "hash_key": HASH_KEY, "tokens": [], "acls": []}
    with open(path, "w") as f:
        json.dump(doc, f)


def token_client(b, name: str, secret: str, version: int = V5, expect_ok: bool = True) -> Client:
    c = Client(b.mqtt, version, client_id=uid(name))
    c.c.username_pw_set(name, secret)
    return c.connect(expect_ok=expect_ok)


def start(bundle: str | None, extra: dict | None = None, name: str = "tokens"):
    env = {"STARLING_BROKER_NAME": BROKER_NAME, "STARLING_AUTH_MAX_FAILURES_PER_MINUTE": "0"}
    if bundle:
        env["STARLING_AUTH_BUNDLE"] = bundle
    env.update(extra or {})
    return launch(env, name=name)


def setup_standalone(name: str = "tokens"):
    """A broker on its own bundle file with the keeper token (made over the
    API) connected and subscribed to keep/#."""
    d = tempfile.mkdtemp(prefix="starling-tokens-")
    path = os.path.join(d, "bundle.json")
    initial_bundle(path)
    b = start(path, name=name)
    adm = b.listeners["admin"]
    status, r = api(adm, "POST", "/api/v4/auth_username", {"username": "keeper", "password": KEEPER_SECRET})
    assert status == 200, r
    status, r = api(
        adm,
        "POST",
        "/api/v4/acl",
        {"name": "keeper-acl", "tokens": ["keeper"],
         "rules": [{"topics": ["keep/#"], "actions": ["publish", "subscribe"], "effect": "allow"}]},
    )
    assert status == 200, r
    keeper = token_client(b, "keeper", KEEPER_SECRET)
    keeper.subscribe("keep/#", 1)
    return b, path, keeper


@pytest.fixture
def standalone():
    b, path, keeper = setup_standalone()
    try:
        yield b, path, keeper
    finally:
        keeper.close()
        shutdown(b)


def still_served(b, keeper: Client) -> None:
    """The bystander's connection is up and a message still goes round."""
    assert not keeper.disconnected.is_set(), f"keeper was disconnected: {keeper.disconnect_rc}"
    topic = f"keep/{uid('ping')}"
    keeper.publish(topic, b"ping", qos=1)
    assert keeper.get_topic(topic).payload == b"ping"


def wait_closed(c: Client, within: float) -> float:
    t0 = time.monotonic()
    assert c.disconnected.wait(within + 1.0), f"{c.client_id} not disconnected"
    return time.monotonic() - t0


def test_create_connect_list_delete_closes_within_2s(standalone):
    b, path, keeper = standalone
    adm = b.listeners["admin"]
    status, r = api(adm, "POST", "/api/v4/auth_username", {"username": "dev1", "description": "bench rig"})
    assert (status, r["code"]) == (200, 0), r
    d = r["data"]
    secret = d["password"]
    assert d["generated"] is True and d["username"] == "dev1" and d["description"] == "bench rig"
    assert len(secret) == 43, "32 random bytes as URL-safe base64"
    assert api_headers(adm, "POST", "/api/v4/auth_username", {"username": "dev1b"})["cache-control"] == "no-store"
    with open(path) as f:
        on_disk = f.read()
    assert secret not in on_disk, "the file holds only the hash"
    hashes = [t["secret_hash"] for t in json.loads(on_disk)["tokens"]]
    assert len(hashes) == 3

    c = token_client(b, "dev1", secret)
    # The secret alone identifies the token too (username = broker name).
    c2 = token_client(b, BROKER_NAME, secret, version=V311)

    status, r = api(adm, "GET", "/api/v4/auth_username")
    assert status == 200
    text = json.dumps(r)
    assert secret not in text and KEEPER_SECRET not in text
    assert not any(h in text for h in hashes) and "secret_hash" not in text and "password" not in text
    by_name = {t["username"]: t for t in r["data"]}
    assert set(by_name) == {"keeper", "dev1", "dev1b"}
    assert by_name["dev1"] == {"username": "dev1", "description": "bench rig", "disabled": False,
                               "expires_at": None, "expired": False, "labels": {}}
    assert r["meta"]["count"] == 3
    status, one = api(adm, "GET", "/api/v4/auth_username/dev1")
    assert status == 200 and one["data"] == by_name["dev1"]

    status, r = api(adm, "DELETE", "/api/v4/auth_username/dev1")
    assert (status, r) == (200, {"code": 0})
    took = wait_closed(c, REVOKE_WITHIN)
    assert took <= REVOKE_WITHIN, f"closed after {took:.2f}s"
    assert wait_closed(c2, REVOKE_WITHIN) <= REVOKE_WITHIN
    status, r = api(adm, "GET", "/api/v4/auth_username/dev1")
    assert (status, r["code"]) == (404, 105)
    again = token_client(b, "dev1", secret, expect_ok=False)
    assert again.connack_rc.is_failure
    again.close()
    assert [t["name"] for t in json.load(open(path))["tokens"]] == ["keeper", "dev1b"]
    still_served(b, keeper)


def test_disable_and_enable(standalone):
    b, path, keeper = standalone
    adm = b.listeners["admin"]
    own = "bring-your-own-secret-0001"
    status, r = api(adm, "POST", "/api/v4/auth_username", {"username": "dev2", "password": own})
    assert status == 200 and r["data"]["password"] == own and r["data"]["generated"] is False
    c = token_client(b, "dev2", own)
    status, r = api(adm, "PUT", "/api/v4/auth_username/dev2", {"disabled": True})
    assert (status, r["data"]["disabled"]) == (200, True), r
    assert wait_closed(c, REVOKE_WITHIN) <= REVOKE_WITHIN
    refused = token_client(b, "dev2", own, expect_ok=False)
    assert refused.connack_rc.is_failure
    refused.close()
    _, r = api(adm, "GET", "/api/v4/auth_username/dev2")
    assert r["data"]["disabled"] is True
    status, r = api(adm, "PUT", "/api/v4/auth_username/dev2", {"disabled": False, "description": "back"})
    assert (status, r["data"]["disabled"], r["data"]["description"]) == (200, False, "back")
    back = token_client(b, "dev2", own)
    assert not back.connack_rc.is_failure
    back.close()
    still_served(b, keeper)


def test_acl_rule_allows_and_removal_refuses(standalone):
    b, path, keeper = standalone
    adm = b.listeners["admin"]
    _, r = api(adm, "POST", "/api/v4/auth_username", {"username": "dev3"})
    c = token_client(b, "dev3", r["data"]["password"])
    try:
        # Tokens exist, so the default policy is deny.
        c.subscribe("room/1/temp", 1, expect=NOT_AUTHORIZED_V5)
        acl = {"name": "dev3-rooms", "tokens": ["dev3"],
               "rules": [{"topics": ["room/+/#"], "actions": ["subscribe"], "effect": "allow"}]}
        status, r = api(adm, "POST", "/api/v4/acl", acl)
        assert status == 200, r
        assert r["data"] == {**acl, "selector": None, "anonymous": False}
        c.subscribe("room/1/temp", 1)
        status, r = api(adm, "GET", "/api/v4/acl")
        assert status == 200 and [a["name"] for a in r["data"]] == ["keeper-acl", "dev3-rooms"]
        assert api(adm, "GET", "/api/v4/acl/dev3-rooms")[1]["data"]["rules"] == acl["rules"]
        status, r = api(adm, "DELETE", "/api/v4/acl/dev3-rooms")
        assert (status, r) == (200, {"code": 0})
        c.subscribe("room/2/temp", 1, expect=NOT_AUTHORIZED_V5)
        assert api(adm, "GET", "/api/v4/acl/dev3-rooms")[0] == 404
    finally:
        c.close()
    still_served(b, keeper)


def test_changes_survive_a_restart():
    b, path, keeper = setup_standalone("tokens-before-restart")
    adm = b.listeners["admin"]
    _, r = api(adm, "POST", "/api/v4/auth_username",
               {"username": "dev4", "expires_at": "2099-01-01T00:00:00Z", "labels": {"site": "lab"}})
    secret = r["data"]["password"]
    status, _ = api(adm, "POST", "/api/v4/acl",
                    {"name": "lab", "selector": {"match_labels": {"site": "lab"}},
                     "rules": [{"topics": ["lab/#"], "actions": ["subscribe"], "effect": "allow"}]})
    assert status == 200
    status, _ = api(adm, "PUT", "/api/v4/auth_username/keeper", {"description": "the bystander"})
    assert status == 200
    keeper.close()
    shutdown(b)

    b2 = start(path, name="tokens-restarted")
    try:
        adm2 = b2.listeners["admin"]
        _, r = api(adm2, "GET", "/api/v4/auth_username")
        by_name = {t["username"]: t for t in r["data"]}
        assert set(by_name) == {"keeper", "dev4"}
        assert by_name["dev4"]["expires_at"] == "2099-01-01T00:00:00Z"
        assert by_name["dev4"]["labels"] == {"site": "lab"}
        assert by_name["keeper"]["description"] == "the bystander"
        _, r = api(adm2, "GET", "/api/v4/acl")
        assert [a["name"] for a in r["data"]] == ["keeper-acl", "lab"]
        c = token_client(b2, "dev4", secret)
        c.subscribe("lab/x", 0)
        c.close()
    finally:
        shutdown(b2)


def test_concurrent_writers_lose_nothing(standalone):
    b, path, keeper = standalone
    adm = b.listeners["admin"]
    results = {}

    def make(i):
        results[i] = api(adm, "POST", "/api/v4/auth_username", {"username": f"par{i}"})

    threads = [threading.Thread(target=make, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(results) == list(range(12))
    assert all(s == 200 for s, _ in results.values()), results
    want = {f"par{i}" for i in range(12)} | {"keeper"}
    _, r = api(adm, "GET", "/api/v4/auth_username")
    assert {t["username"] for t in r["data"]} == want
    assert {t["name"] for t in json.load(open(path))["tokens"]} == want
    # Each secret works: none was lost or mixed up under concurrency.
    for i in (0, 11):
        c = token_client(b, f"par{i}", results[i][1]["data"]["password"])
        c.close()


BAD = [
    ("POST", "/api/v4/auth_username", b"not json", 400, 109),
    ("POST", "/api/v4/auth_username", b"[]", 400, 108),
    ("POST", "/api/v4/auth_username", b'{"password": "long-enough-secret-123"}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": "x", "bogus": 1}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": "x", "password": "short"}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": "x", "password": "has spaces in it, so no"}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": ""}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": "x", "expires_at": "soon"}', 400, 108),
    ("POST", "/api/v4/auth_username", b'{"username": "keeper"}', 409, 113),
    ("POST", "/api/v4/auth_username", b'{"username": "x", "password": "' + KEEPER_SECRET.encode() + b'"}', 400, 108),
    ("PUT", "/api/v4/auth_username/ghost", b'{"disabled": true}', 404, 105),
    ("PUT", "/api/v4/auth_username/keeper", b'{"disabled": "yes"}', 400, 108),
    ("PUT", "/api/v4/auth_username/keeper", b"{}", 400, 107),
    ("PUT", "/api/v4/auth_username/keeper", b'{"name": "other"}', 400, 108),
    ("DELETE", "/api/v4/auth_username/ghost", None, 404, 105),
    ("GET", "/api/v4/auth_username/ghost", None, 404, 105),
    ("GET", "/api/v4/auth_username?_page=0", None, 400, 108),
    ("POST", "/api/v4/acl", b'{"name": "bad", "rules": [{"topics": ["a/#/b"], "actions": ["subscribe"], "effect": "allow"}]}', 400, 115),
    ("POST", "/api/v4/acl", b'{"name": "bad", "rules": [{"topics": ["$share/g/a"], "actions": ["subscribe"], "effect": "allow"}]}', 400, 115),
    ("POST", "/api/v4/acl", b'{"name": "bad", "rules": [{"topics": ["a"], "actions": ["read"], "effect": "allow"}]}', 400, 108),
    ("POST", "/api/v4/acl", b'{"name": "bad", "rules": [{"topics": [], "actions": ["publish"], "effect": "allow"}]}', 400, 108),
    ("POST", "/api/v4/acl", b'{"name": "", "rules": []}', 400, 108),
    ("POST", "/api/v4/acl", b'{"name": "keeper-acl"}', 409, 113),
    ("POST", "/api/v4/acl", b"{", 400, 109),
    ("DELETE", "/api/v4/acl/ghost", None, 404, 105),
    ("GET", "/api/v4/acl/ghost", None, 404, 105),
    ("PUT", "/api/v4/configs", b'{"no_such_key": 1}', 400, 108),
    ("PUT", "/api/v4/configs", b"[1]", 400, 108),
    ("PUT", "/api/v4/configs", b"nope", 400, 109),
]


@pytest.mark.parametrize("method,path,body,status,code", BAD, ids=[f"{m} {p} {b!r}"[:80] for m, p, b, *_ in BAD])
def test_bad_input_is_refused_and_nothing_changes(standalone, method, path, body, status, code):
    b, bundle, keeper = standalone
    before = open(bundle, "rb").read()
    got, r = api(b.listeners["admin"], method, path, raw=body)
    assert (got, r["code"]) == (status, code), r
    assert set(r) == {"code", "message"} and r["message"].endswith("."), r
    assert open(bundle, "rb").read() == before, "the bundle file changed"
    _, tokens = api(b.listeners["admin"], "GET", "/api/v4/auth_username")
    assert [t["username"] for t in tokens["data"]] == ["keeper"]
    still_served(b, keeper)


def test_no_bundle_file_refuses_writes():
    b = start(None, name="tokens-nobundle")
    try:
        adm = b.listeners["admin"]
        assert api(adm, "GET", "/api/v4/auth_username")[1] == {
            "code": 0, "data": [], "meta": {"page": 1, "limit": 10000, "count": 0, "hasnext": False}}
        assert api(adm, "GET", "/api/v4/acl")[1]["data"] == []
        for method, path, body in [
            ("POST", "/api/v4/auth_username", {"username": "x"}),
            ("PUT", "/api/v4/auth_username/x", {"disabled": True}),
            ("DELETE", "/api/v4/auth_username/x", None),
            ("POST", "/api/v4/acl", {"name": "a"}),
            ("DELETE", "/api/v4/acl/a", None),
        ]:
            status, r = api(adm, method, path, body)
            assert (status, r["code"]) == (409, 111), (method, path, r)
            assert "start it with --auth-bundle FILE" in r["message"], r
        # Anonymous clients are still served.
        c = Client(b.mqtt, V5, client_id=uid("anon")).connect()
        c.subscribe("free/#", 0)
        c.close()
    finally:
        shutdown(b)


def test_operator_managed_bundle_is_read_only():
    """[auth] bundle_secret set: the operator owns the bundle. Without
    POD_NAMESPACE the broker serves the mounted file, which is what is
    listed; every write is refused and the file is left alone."""
    d = tempfile.mkdtemp(prefix="starling-tokens-managed-")
    path = os.path.join(d, "bundle.json")
    doc = {"version": 1, "broker": BROKER_NAME, "hash_key": HASH_KEY,
           "tokens": [{"name": "from-crd", "secret_hash": base64.b64encode(b"\x01" * 32).decode(),
                       "description": "made by the operator"}],
           "acls": [{"name": "crd-acl", "tokens": ["from-crd"],
                     "rules": [{"topics": ["x/#"], "actions": ["publish"], "effect": "allow"}]}]}
    with open(path, "w") as f:
        json.dump(doc, f)
    before = open(path, "rb").read()
    b = start(path, {"STARLING_AUTH_BUNDLE_SECRET": "demo-auth"}, name="tokens-managed")
    try:
        adm = b.listeners["admin"]
        _, r = api(adm, "GET", "/api/v4/auth_username")
        assert [(t["username"], t["description"]) for t in r["data"]] == [("from-crd", "made by the operator")]
        _, r = api(adm, "GET", "/api/v4/acl")
        assert [a["name"] for a in r["data"]] == ["crd-acl"]
        for method, p, body in [
            ("POST", "/api/v4/auth_username", {"username": "x"}),
            ("PUT", "/api/v4/auth_username/from-crd", {"disabled": True}),
            ("DELETE", "/api/v4/auth_username/from-crd", None),
            ("POST", "/api/v4/acl", {"name": "a"}),
            ("DELETE", "/api/v4/acl/crd-acl", None),
        ]:
            status, r = api(adm, method, p, body)
            assert (status, r["code"]) == (409, 111), (method, p, r)
            assert "Token and ACL resources" in r["message"] and "demo-auth" in r["message"], r
        assert open(path, "rb").read() == before
        _, r = api(adm, "GET", "/api/v4/auth_username/from-crd")
        assert r["data"]["disabled"] is False
    finally:
        shutdown(b)


def test_put_configs_matches_nanomq_req_12(standalone):
    b, _, keeper = standalone
    adm = b.listeners["admin"]
    _, cur = api(adm, "GET", "/api/v4/configs")
    change = {"msq_len": cur["data"]["msq_len"] + 1, "num_taskq_thread": 4,
              "max_packet_size": cur["data"]["max_packet_size"]}
    status, r = api(adm, "PUT", "/api/v4/configs", change)
    # A limit applies live; an equal value is no change.
    assert (status, r) == (200, {"code": 0, "data": {"applied": ["msq_len"], "restart_required": []}})
    _, now = api(adm, "GET", "/api/v4/configs")
    assert now["data"]["msq_len"] == cur["data"]["msq_len"] + 1
    assert now["data"]["starling"]["limits"]["max_queued_messages"] == cur["data"]["msq_len"] + 1
    change["msq_len"] += 1
    change["allow_anonymous"] = not cur["data"]["allow_anonymous"]
    status, n = api(adm, "POST", "/api/v1", {"req": 12, "seq": 7, "data": change})
    status2, r = api(adm, "PUT", "/api/v4/configs", {**change, "msq_len": change["msq_len"] + 1})
    assert status == status2 == 200 and n["data"] == r["data"], "one decision, two front ends"
    assert r["data"] == {"applied": ["msq_len"], "restart_required": ["allow_anonymous"]}
    _, before = api(adm, "GET", "/api/v4/configs")
    status, r = api(adm, "PUT", "/api/v4/configs", {"msq_len": 1, "tls": {"nope": True}})
    assert (status, r["code"]) == (400, 108) and "tls.nope" in r["message"]
    status, r = api(adm, "PUT", "/api/v4/configs", {"msq_len": "lots"})
    assert (status, r["code"]) == (400, 108) and "nothing was applied" in r["message"]
    status, r = api(adm, "PUT", "/api/v4/configs", {"starling": {"limits": {"max_topic_levels": 0}}})
    assert (status, r["code"]) == (400, 108), "validated like the config file"
    _, after = api(adm, "GET", "/api/v4/configs")
    assert after["data"] == before["data"], "nothing changed"
    still_served(b, keeper)


def test_a_live_queue_cap_reaches_new_sessions(standalone):
    """`msq_len` set over the API caps the queue of a session made after it."""
    b, _, keeper = standalone
    adm = b.listeners["admin"]
    _, cur = api(adm, "GET", "/api/v4/configs")
    try:
        status, r = api(adm, "PUT", "/api/v4/configs", {"msq_len": 5})
        assert status == 200 and r["data"]["applied"] == ["msq_len"]
        topic = f"keep/{uid('cap')}"
        cid = uid("capped")

        def keeper_session() -> Client:
            c = Client(b.mqtt, V5, client_id=cid, clean=False, session_expiry=600)
            c.c.username_pw_set("keeper", KEEPER_SECRET)
            return c.connect()

        s = keeper_session()
        s.subscribe(topic, qos=1)
        s.disconnect()
        p = token_client(b, "keeper", KEEPER_SECRET)
        for i in range(20):
            p.publish(topic, str(i), qos=1)
        p.disconnect()
        s = keeper_session()
        got = [s.get()] + s.drain(0.5)
        assert [m.payload for m in got] == [str(i).encode() for i in range(5)], "queued up to the new cap"
        s.disconnect()
    finally:
        api(adm, "PUT", "/api/v4/configs", {"msq_len": cur["data"]["msq_len"]})

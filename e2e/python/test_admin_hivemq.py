"""HiveMQ's REST API for MQTT clients (/api/v1/mqtt/clients…) against the
real broker with live clients: the cursor-paged list, one client's details,
its connection state and subscriptions (values checked against what the
test did), disconnecting it (v5 DISCONNECT 0x98), and the error bodies
(`{"errors": [{"title", "detail"}]}`, 400/404; 401 without credentials)."""

from __future__ import annotations

import base64
import time
import urllib.parse

import paho.mqtt.client as mqtt
import pytest

from broker import TARGET
from clients import TIMEOUT, V5, V311, Client, uid
from conftest import launch, shutdown
from test_admin_emqx import api

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the admin API is Starling's")


@pytest.fixture
def live():
    b = launch(name="hivemq")
    subs = []
    try:
        pfx = uid("hive")
        a = Client(b.mqtt, V311, client_id=f"{pfx}-a", keepalive=45).connect()
        a.subscribe(f"{pfx}/+/x", 1)
        opts = mqtt.SubscribeOptions(qos=2, noLocal=True, retainAsPublished=True, retainHandling=1)
        c = Client(b.mqtt, V5, client_id=f"{pfx}-c", keepalive=30, session_expiry=600).connect()
        c.subscribe(f"{pfx}/z", 2, options=opts)
        subs += [a, c]
        yield b, pfx, a, c
    finally:
        for s in subs:
            s.close()
        shutdown(b)


def test_list_with_cursor_paging(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    more = [Client(b.mqtt, V5, client_id=f"{pfx}-m{i}").connect() for i in range(3)]
    try:
        status, r = api(adm, "GET", "/api/v1/mqtt/clients")
        assert status == 200
        assert sorted(i["id"] for i in r["items"]) == sorted([a.client_id, c.client_id] + [m.client_id for m in more])
        assert "_links" not in r
        seen, path, pages = [], "/api/v1/mqtt/clients?limit=2", 0
        while path:
            status, r = api(adm, "GET", path)
            assert status == 200 and len(r["items"]) <= 2
            seen += [i["id"] for i in r["items"]]
            path = r.get("_links", {}).get("next")
            pages += 1
            assert pages <= 3
        assert pages == 3 and sorted(seen) == seen and len(seen) == 5
    finally:
        for m in more:
            m.close()


def test_client_details_connection_subscriptions(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    status, r = api(adm, "GET", f"/api/v1/mqtt/clients/{c.client_id}")
    assert status == 200
    d = r["client"]
    assert (d["id"], d["connected"], d["sessionExpiryInterval"]) == (c.client_id, True, 600)
    conn = d["connection"]
    assert (conn["mqttVersion"], conn["keepAlive"], conn["sourceIp"]) == ("MQTTv5", 30, "127.0.0.1")
    assert conn["connectedAt"].endswith("Z")
    _, r = api(adm, "GET", f"/api/v1/mqtt/clients/{a.client_id}")
    assert r["client"]["connection"]["mqttVersion"] == "MQTTv3_1_1"
    status, r = api(adm, "GET", f"/api/v1/mqtt/clients/{c.client_id}/connection")
    assert (status, r) == (200, {"connection": {"connected": True}})
    status, r = api(adm, "GET", f"/api/v1/mqtt/clients/{c.client_id}/subscriptions")
    assert status == 200
    assert r["items"] == [{
        "topicFilter": f"{pfx}/z",
        "qos": "EXACTLY_ONCE",
        "retainHandling": "SEND_IF_NEW_SUBSCRIPTION",
        "retainAsPublished": True,
        "noLocal": True,
    }]
    _, r = api(adm, "GET", f"/api/v1/mqtt/clients/{a.client_id}/subscriptions")
    assert [(i["topicFilter"], i["qos"]) for i in r["items"]] == [(f"{pfx}/+/x", "AT_LEAST_ONCE")]


def test_disconnect(live):
    b, pfx, a, c = live
    adm = b.listeners["admin"]
    status, r = api(adm, "DELETE", f"/api/v1/mqtt/clients/{c.client_id}")
    assert (status, r) == (204, None)
    assert c.disconnected.wait(TIMEOUT)
    assert c.disconnect_rc.value == 0x98, c.disconnect_rc
    # The session (expiry 600 s) stays, offline.
    deadline = time.monotonic() + TIMEOUT
    while True:
        _, r = api(adm, "GET", f"/api/v1/mqtt/clients/{c.client_id}/connection")
        if r == {"connection": {"connected": False}} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r == {"connection": {"connected": False}}
    _, r = api(adm, "GET", f"/api/v1/mqtt/clients/{c.client_id}")
    assert r["client"]["connected"] is False and "connection" not in r["client"]
    status, r = api(adm, "DELETE", f"/api/v1/mqtt/clients/{c.client_id}")
    assert status == 404 and r["errors"][0]["title"]


@pytest.mark.parametrize("suffix", ["", "/connection", "/subscriptions"])
def test_unknown_client_is_404(live, suffix):
    b, *_ = live
    status, r = api(b.listeners["admin"], "GET", f"/api/v1/mqtt/clients/no-such-client{suffix}")
    assert status == 404
    (e,) = r["errors"]
    assert e["title"] == "Resource not found" and "no-such-client" in e["detail"]


@pytest.mark.parametrize("query", ["limit=0", "limit=2501", "limit=x", "cursor=!!!", "cursor=" + urllib.parse.quote("%%")])
def test_invalid_query_is_400(live, query):
    b, *_ = live
    status, r = api(b.listeners["admin"], "GET", f"/api/v1/mqtt/clients?{query}")
    assert status == 400 and r["errors"][0]["title"] == "Query parameter is invalid", r


def test_client_id_with_slash(live):
    b, pfx, *_ = live
    odd = Client(b.mqtt, V5, client_id=f"{pfx}/odd id").connect()
    try:
        path = "/api/v1/mqtt/clients/" + urllib.parse.quote(odd.client_id, safe="")
        status, r = api(b.listeners["admin"], "GET", path)
        assert (status, r["client"]["id"]) == (200, odd.client_id)
    finally:
        odd.close()


@pytest.mark.parametrize("path", ["/api/v1/mqtt/clients", "/api/v1/mqtt/clients/x/connection", "/api/v1/openapi.json"])
def test_unauthorized(live, path):
    b, *_ = live
    status, r = api(b.listeners["admin"], "GET", path, auth=None)
    assert (status, r["code"]) == (401, 104)
    status, r = api(b.listeners["admin"], "GET", path, auth="Basic " + base64.b64encode(b"admin:nope").decode())
    assert (status, r["code"]) == (401, 103)

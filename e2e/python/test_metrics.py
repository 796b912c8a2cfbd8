"""/metrics read by a real OpenMetrics parser (prometheus_client's, which is
strict: it refuses a family whose samples do not fit its type, a missing
`# EOF`, ...) after known traffic: every family parses, types and help are
declared, and the values are the ones the test caused — not just present."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from broker import TARGET
from clients import V5, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="Starling's own metric names")


def scrape(b) -> dict:
    host, port = b.listeners["admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.headers.get("Content-Type", "").startswith("application/openmetrics-text; version=1.0.0"), r.headers
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families, text[:500]
    return families


def value(families, name: str, **labels) -> float:
    for fam in families.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_scrape_parses_and_counts_what_happened():
    b = launch(name="metrics")
    try:
        sub = Client(b.mqtt, V5, client_id=uid("msub")).connect()
        sub.subscribe("m/#", 1)
        pub = Client(b.mqtt, V5, client_id=uid("mpub")).connect()
        for i in range(5):
            pub.publish("m/a", f"{i}".encode(), qos=1)
        pub.publish("m/r", b"kept", qos=0, retain=True)
        for _ in range(6):
            sub.get()
        host, port = b.http
        for _ in range(3):
            req = urllib.request.Request(f"http://{host}:{port}/broker/m/http", data=b"x", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
        for _ in range(3):
            sub.get()

        f = scrape(b)
        # Types as declared (OpenMetrics names a counter family without _total).
        assert f["starling_connections"].type == "gauge"
        assert f["starling_messages_received"].type == "counter"
        assert f["starling_http_request_duration_seconds"].type == "histogram"
        assert all(fam.documentation for fam in f.values()), [n for n, fam in f.items() if not fam.documentation]

        assert value(f, "starling_connections") == 2
        assert value(f, "starling_messages_received_total", qos="1") == 5
        assert value(f, "starling_messages_received_total", qos="0") == 4  # 1 retained + 3 HTTP
        assert value(f, "starling_messages_sent_total", qos="1") == 5
        assert value(f, "starling_retained_messages") == 1
        assert value(f, "starling_subscriptions") == 1
        assert value(f, "starling_sessions") == 2
        assert value(f, "starling_lvc_entries") == 3  # m/a, m/r, m/http
        assert value(f, "starling_http_requests_total", route="publish", status="200") == 3
        # The histogram is cumulative and its count matches the requests.
        buckets = [
            s for s in f["starling_http_request_duration_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["route"] == "publish"
        ]
        counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
        assert counts == sorted(counts) and counts[-1] == 3, counts
        assert value(f, "starling_http_request_duration_seconds_count", route="publish") == 3
        sub.close()
        pub.close()
    finally:
        shutdown(b)


def admin_get(b, path: str, auth: str | None = "admin:public") -> int:
    host, port = b.listeners["admin"]
    req = urllib.request.Request(f"http://{host}:{port}{path}")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_admin_requests_by_route_template_status_and_duration():
    b = launch(name="metrics-admin")
    try:
        assert admin_get(b, "/api/v4/stats") == 200
        assert admin_get(b, "/api/v4/stats") == 200
        for cid in ("nobody-1", "nobody-2", "nobody-3"):
            assert admin_get(b, f"/api/v4/clients/{cid}") == 404
        assert admin_get(b, "/api/v4/stats", auth=None) == 401
        assert admin_get(b, "/api/v4/stats", auth="admin:wrong") == 401
        assert admin_get(b, "/api/v9/nothing") == 404

        f = scrape(b)
        assert f["starling_admin_requests"].type == "counter"
        assert f["starling_admin_request_duration_seconds"].type == "histogram"
        stats = dict(route="/api/v4/stats", method="GET")
        client = dict(route="/api/v4/clients/{clientid}", method="GET")
        assert value(f, "starling_admin_requests_total", status="200", **stats) == 2
        assert value(f, "starling_admin_requests_total", status="401", **stats) == 2
        # The route is the template: three client ids, one series.
        assert value(f, "starling_admin_requests_total", status="404", **client) == 3
        assert value(f, "starling_admin_requests_total", status="404", route="unmatched") == 1
        labels = {s.labels.get("route") for fam in f.values() for s in fam.samples}
        assert not any("nobody" in (r or "") or "v9" in (r or "") for r in labels), labels
        assert value(f, "starling_admin_request_duration_seconds_count", **stats) == 4
        assert value(f, "starling_admin_request_duration_seconds_count", **client) == 3
        buckets = [
            s for s in f["starling_admin_request_duration_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["route"] == stats["route"]
        ]
        counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
        assert counts == sorted(counts) and counts[-1] == 4, counts
        # A request is counted once answered: the second scrape sees the first.
        assert value(scrape(b), "starling_admin_requests_total", route="/metrics", method="GET", status="200") == 1
    finally:
        shutdown(b)

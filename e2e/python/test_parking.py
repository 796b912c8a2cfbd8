"""Idle plain-TCP connections are parked outside a task (issue 14): after a
second with nothing read or written, a connection's state moves to the
broker's parker and its task ends; the socket becomes readable, a message
is queued for it, it is kicked, its keep-alive lapses or the broker shuts
down, and a new task carries on.

Every test first waits until the broker reports the connections parked
(`starling_connections_parked`), then shows that each way back works, over
real sockets, and that the broker keeps serving others."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import mqttraw as raw
from broker import TARGET
from clients import uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="Starling's parking and its gauge")


def gauge(b, name: str) -> float:
    host, port = b.listeners["admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"no sample {name}")


def wait_parked(b, at_least: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    n = 0.0
    while time.monotonic() < deadline:
        n = gauge(b, "starling_connections_parked")
        if n >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"only {n} connections parked after {timeout}s, expected at least {at_least}")


def subscriber(b, topic: str, version: int = raw.V5, qos: int = 1, **connect_kw) -> raw.RawClient:
    c = raw.RawClient(b.mqtt, version)
    c.connect(uid("park"), **connect_kw)
    c.send(raw.subscribe(topic, qos, version))
    c.expect(raw.SUBACK)
    return c


def test_parked_subscribers_get_their_messages_and_can_publish(broker):
    n = 40
    subs = [subscriber(broker, f"park/{i}", raw.V5 if i % 2 else raw.V311) for i in range(n)]
    try:
        wait_parked(broker, n)
        with raw.RawClient(broker.mqtt, raw.V311) as pub:
            pub.connect(uid("parkpub"))
            pub.send(b"".join(raw.publish(f"park/{i}", f"m{i}".encode(), raw.V311, qos=1, pid=i + 1) for i in range(n)))
            for _ in range(n):
                pub.expect(raw.PUBACK)
        for i, s in enumerate(subs):
            p = s.expect(raw.PUBLISH)
            assert p.fields["topic"] == f"park/{i}".encode() and p.fields["payload"] == f"m{i}".encode()
            s.send(raw.ack(raw.PUBACK, p.fields["pid"], s.version))
        # Parked again, then the socket itself wakes them: each publishes.
        wait_parked(broker, n)
        for i, s in enumerate(subs):
            s.send(raw.publish(f"park/{i}", b"own", s.version, qos=1, pid=7))
        for s in subs:
            ack = s.expect(raw.PUBACK)
            assert ack.fields["pid"] == 7
            echo = s.expect(raw.PUBLISH)
            assert echo.fields["payload"] == b"own"
    finally:
        for s in subs:
            s.close()


def test_parked_client_gets_pingresp(broker):
    with raw.RawClient(broker.mqtt, raw.V5) as c:
        c.connect(uid("ping"))
        wait_parked(broker, 1)
        for _ in range(3):
            c.send(raw.pingreq())
            c.expect(raw.PINGRESP)
            time.sleep(1.3)


def test_keepalive_lapse_of_a_parked_client_closes_it_and_sends_its_will(broker):
    will_topic = f"park/will/{uid()}"
    watcher = subscriber(broker, will_topic)
    try:
        c = raw.RawClient(broker.mqtt, raw.V5)
        # Keep-alive 3 s: held to 4.5 s, so it is parked well before.
        c.send(raw.connect(uid("lapse"), raw.V5, keepalive=3, will_topic=will_topic, will_payload=b"gone"))
        c.expect(raw.CONNACK)
        t0 = time.monotonic()
        wait_parked(broker, 2)
        seen = c.wait_closed(timeout=10)
        took = time.monotonic() - t0
        assert [p.fields.get("reason") for p in seen if p.ptype == raw.DISCONNECT] == [0x8D], seen
        # 1.5 × 3 s, plus at most the parker's one-second scan.
        assert 4.0 <= took <= 7.5, took
        will = watcher.expect(raw.PUBLISH, timeout=5)
        assert will.fields["payload"] == b"gone"
    finally:
        watcher.close()


def test_takeover_of_a_parked_connection_tells_it_why(broker):
    cid = uid("taken")
    old = raw.RawClient(broker.mqtt, raw.V5)
    old.connect(cid)
    try:
        wait_parked(broker, 1)
        with raw.RawClient(broker.mqtt, raw.V5) as new:
            new.connect(cid)
            seen = old.wait_closed(timeout=5)
            assert [p.fields.get("reason") for p in seen if p.ptype == raw.DISCONNECT] == [0x8E], seen
            new.send(raw.pingreq())
            new.expect(raw.PINGRESP)
    finally:
        old.close()


def test_client_closing_while_parked_is_noticed(broker):
    will_topic = f"park/closed/{uid()}"
    watcher = subscriber(broker, will_topic)
    try:
        c = raw.RawClient(broker.mqtt, raw.V311)
        c.send(raw.connect(uid("closer"), raw.V311, will_topic=will_topic, will_payload=b"lost"))
        c.expect(raw.CONNACK)
        wait_parked(broker, 2)
        c.close()
        will = watcher.expect(raw.PUBLISH, timeout=5)
        assert will.fields["payload"] == b"lost"
    finally:
        watcher.close()


def test_garbage_from_a_parked_client_is_a_protocol_error_and_others_are_served(broker):
    with raw.RawClient(broker.mqtt, raw.V5) as bad, raw.RawClient(broker.mqtt, raw.V5) as good:
        bad.connect(uid("bad"))
        good.connect(uid("good"))
        wait_parked(broker, 2)
        bad.send(b"\x00\x00")  # packet type 0 is reserved
        seen = bad.wait_closed(timeout=5)
        assert any(p.ptype == raw.DISCONNECT and p.fields.get("reason", 0) >= 0x80 for p in seen), seen
        good.send(raw.pingreq())
        good.expect(raw.PINGRESP)


def test_shutdown_resumes_parked_connections_to_say_goodbye():
    b = launch(name="park-shutdown")
    clients = []
    try:
        for _ in range(20):
            c = raw.RawClient(b.mqtt, raw.V5)
            c.connect(uid("bye"))
            clients.append(c)
        wait_parked(b, 20)
        t0 = time.monotonic()
        shutdown(b)
        assert time.monotonic() - t0 < 5, "shutdown waited for parked connections"
        for c in clients:
            seen = c.wait_closed(timeout=5)
            assert [p.fields.get("reason") for p in seen if p.ptype == raw.DISCONNECT] == [0x8B], seen
    finally:
        for c in clients:
            c.close()

"""Configured limits, each on its own broker process (STARLING_LIMITS_*)."""

import time

import pytest

import mqttraw as raw
from clients import V5, V311, Client, ClientFactory, uid


@pytest.fixture
def factory():
    made = []

    def make(broker):
        f = ClientFactory(broker.mqtt)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close_all()


@pytest.mark.parametrize("asked", [60, 0])
def test_server_keepalive_cap_v5(run_broker, asked):
    """STARLING_LIMITS_MAX_KEEPALIVE=1: a v5 client asking for more (or 0) gets
    Server Keep Alive 1 in CONNACK and, idle, is closed within about 1.5 s."""
    b = run_broker({"STARLING_LIMITS_MAX_KEEPALIVE": "1"}, name="kacap")
    with raw.RawClient(b.mqtt, raw.V5) as r:
        ack = r.connect(uid("cap"), keepalive=asked)
        t0 = time.monotonic()
        ska = ack.fields["props"].get(raw.P_SERVER_KEEP_ALIVE)
        assert ska == 1, f"asked keepalive {asked}, cap 1: CONNACK Server Keep Alive = {ska}"
        pkts = r.wait_closed(5.0)
        dt = time.monotonic() - t0
        assert all(p.ptype == raw.DISCONNECT and p.reason == 0x8D for p in pkts), [p.fields for p in pkts]
        assert 0.9 <= dt <= 5.0, f"closed after {dt:.2f}s"


def test_offline_queue_is_bounded(run_broker, factory, version):
    """STARLING_LIMITS_MAX_QUEUED_MESSAGES=5: a persistent session offline while
    20 QoS 1 messages arrive gets at most 5 of them, in order (which ones
    survive is the broker's documented drop policy, not checked here)."""
    b = run_broker({"STARLING_LIMITS_MAX_QUEUED_MESSAGES": "5"}, name="queue")
    clients = factory(b)
    topic, cid = uid("q/"), uid("q")
    kw = dict(client_id=cid, session_expiry=300) if version == V5 else dict(client_id=cid, clean=False)
    first = clients(version, **kw)
    first.subscribe(topic, 1)
    first.disconnect()
    pub = clients(version)
    for i in range(20):
        pub.publish(topic, str(i).encode(), qos=1)
    again = clients(version, **({**kw, "clean": False}))
    assert again.session_present
    pub.publish(topic, b"sentinel", qos=1)
    got = []
    while True:
        m = again.get()
        if m.payload == b"sentinel":
            break
        got.append(int(m.payload))
    assert 1 <= len(got) <= 5, f"offline queue cap 5, delivered {len(got)}: {got}"
    assert got == sorted(got), f"queued messages out of order: {got}"


def test_max_connections(run_broker, factory, version):
    """STARLING_LIMITS_MAX_CONNECTIONS=3: a fourth connection is closed without
    a CONNACK while the three admitted clients keep working; once one leaves,
    a new client gets in."""
    b = run_broker({"STARLING_LIMITS_MAX_CONNECTIONS": "3"}, name="maxconn")
    clients = factory(b)
    topic = uid("mc/")
    sub = clients(version)
    sub.subscribe(topic, 1)
    pub = clients(version)
    third = clients(version)
    with raw.RawClient(b.mqtt, raw.V311) as r:
        r.send(raw.connect(uid("over"), version=raw.V311))
        pkts = r.wait_closed(5.0)
        assert not any(p.ptype == raw.CONNACK for p in pkts), f"over the limit but got {pkts}"
    pub.publish(topic, b"still-served", qos=1)
    assert sub.get().payload == b"still-served"
    third.disconnect()
    deadline = time.monotonic() + 5.0
    rv = raw.V5 if version == V5 else raw.V311
    while True:
        # The slot frees when the broker has processed the DISCONNECT. A raw
        # client learns of a refusal at once (paho would wait its whole
        # CONNACK timeout, longer than this deadline).
        r = raw.RawClient(b.mqtt, rv)
        try:
            r.connect(uid("after"))
            break
        except (AssertionError, raw.Closed, OSError):
            r.close()
            assert time.monotonic() < deadline, "no connection admitted after one left"
            time.sleep(0.05)
    r.send(raw.pingreq())
    assert r.expect(raw.PINGRESP)
    r.close()


def test_topic_policy(run_broker, factory):
    """[topics] max_length / allowed_chars (STARLING_TOPICS_*): an MQTT topic
    over the policy is refused (v5 PUBACK 0x90, SUBACK 0x8F) and not routed;
    topics within it flow."""
    b = run_broker(
        {"STARLING_TOPICS_MAX_LENGTH": "16", "STARLING_TOPICS_ALLOWED_CHARS": "/-_"},
        name="policy",
    )
    clients = factory(b)
    sub = clients(V5)
    sub.subscribe("p/#", 1)
    sub.subscribe("p/has space", 1, expect=0x8F)
    with raw.RawClient(b.mqtt, raw.V5) as r:
        r.connect(uid("pol"))
        for pid, topic in [(1, "p/" + "x" * 20), (2, "p/has space")]:
            r.send(raw.publish(topic, b"no", qos=1, pid=pid, version=raw.V5))
            ack = r.expect(raw.PUBACK)
            assert ack.reason == 0x90, f"{topic!r}: PUBACK reason {ack.reason:#x}"
        r.send(raw.publish("p/ok-topic_1", b"yes", qos=1, pid=3, version=raw.V5))
        assert r.expect(raw.PUBACK).reason in (0x00, 0x10)
    got = sub.get()
    assert (got.topic, got.payload) == ("p/ok-topic_1", b"yes")
    assert not sub.drain(0.3), "a refused publish was routed"


def test_qos1_backpressure_loses_nothing(run_broker, factory):
    """STARLING_LIMITS_MAX_QUEUED_MESSAGES=10 and a subscriber that holds its
    PUBACKs for a moment: its inflight window and queue fill up, and instead
    of dropping QoS 1 messages the broker pauses the publisher (it stops
    reading from it) until the subscriber makes room. All 300 arrive, in
    order, none twice."""
    import struct
    import threading

    b = run_broker({"STARLING_LIMITS_MAX_QUEUED_MESSAGES": "10"}, name="backpressure")
    clients = factory(b)
    topic, n = uid("bp/"), 300
    with raw.RawClient(b.mqtt, raw.V311) as sub:
        sub.connect(uid("slow"))
        sub.send(raw.subscribe(topic, 1, version=raw.V311, pid=1))
        sub.expect(raw.SUBACK)
        pub = clients(V311)
        done = threading.Event()

        def publish_all():
            for i in range(n):
                pub.publish(topic, str(i).encode(), qos=1)
            done.set()

        threading.Thread(target=publish_all, daemon=True).start()
        # Hold the acks: 64 in flight + the queue cap fill up well before 300.
        held = []
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            try:
                p = sub.read_packet(timeout=max(0.01, deadline - time.monotonic()))
            except Exception:
                break
            if p.ptype == raw.PUBLISH:
                held.append(p)
        assert len(held) < n, "the subscriber's window did not fill: test proves nothing"
        got = []

        def ack(p):
            got.append(int(p.fields["payload"]))
            sub.send(raw.packet(raw.PUBACK, 0, struct.pack("!H", p.fields["pid"])))

        for p in held:
            ack(p)
        while len(got) < n:
            p = sub.read_packet(timeout=10.0)
            if p.ptype == raw.PUBLISH:
                ack(p)
    assert done.wait(10), "publisher never finished"
    assert got == list(range(n)), f"lost or reordered: {len(got)} received, first gaps near {sorted(set(range(n)) - set(got))[:5]}"

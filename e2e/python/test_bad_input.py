"""Bad input over raw sockets. Each case must get the protocol's answer or a
closed connection, and a well-behaved paho client on the side (autouse
fixture) keeps publishing and receiving throughout and after."""

import random
import selectors
import socket
import time

import pytest

import mqttraw as raw
from clients import V5, V311, Client, SideClient, uid

MAX_PACKET = 4096
BROKER_ENV = {
    "STARLING_LIMITS_MAX_PACKET_SIZE": str(MAX_PACKET),
    "STARLING_LIMITS_CONNECT_TIMEOUT": "1",
}
CLOSE_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def side(request, broker):
    version = request.getfixturevalue("version") if "version" in request.fixturenames else V5
    s = SideClient(broker.mqtt, version)
    yield s
    s.stop()  # still connected, nothing lost, a fresh message round-trips


def rv(version):
    return raw.V5 if version == V5 else raw.V311


def assert_closed(r: raw.RawClient, what: str, v5_reasons=None, connack_fail_ok=False):
    """The broker closes the connection. Before closing it may send only:
    a v5 DISCONNECT with one of `v5_reasons`, or (connack_fail_ok) a failed CONNACK."""
    pkts = r.wait_closed(CLOSE_TIMEOUT)
    for p in pkts:
        if p.ptype == raw.DISCONNECT and r.version == raw.V5 and v5_reasons is not None:
            assert p.reason in v5_reasons, (
                f"{what}: DISCONNECT reason {p.reason:#x}, expected one of {[hex(x) for x in v5_reasons]}"
            )
        elif p.ptype == raw.CONNACK and connack_fail_ok:
            assert p.reason != 0, f"{what}: broker accepted the connection (CONNACK 0)"
        else:
            raise AssertionError(f"{what}: unexpected packet before close: type {p.ptype} {p.fields}")
    return pkts


@pytest.mark.parametrize("name", [b"MQTX", b"mqtt", b"MQIsdpX", b""])
def test_wrong_protocol_name(broker, side, version, name):
    with raw.RawClient(broker.mqtt, rv(version)) as r:
        r.send(raw.connect(uid("bad"), rv(version), proto_name=name))
        assert_closed(r, f"protocol name {name!r}", connack_fail_ok=True)
    side.check()


@pytest.mark.parametrize("level", [0, 6, 9, 255])
def test_wrong_protocol_level_v311(broker, side, level):
    """v3.1.1 [MQTT-3.1.2-2]: CONNACK return code 0x01 (unacceptable protocol level), then close."""
    with raw.RawClient(broker.mqtt, raw.V311) as r:
        r.send(raw.connect(uid("bad"), raw.V311, level=level))
        pkts = r.wait_closed(CLOSE_TIMEOUT)
        assert [(p.ptype, p.body) for p in pkts] == [(raw.CONNACK, b"\x00\x01")], (
            f"level {level}: expected CONNACK rc 1 then close, got {[(p.ptype, p.body) for p in pkts]}"
        )
    side.check()


def test_second_connect(broker, side, version):
    v = rv(version)
    with raw.RawClient(broker.mqtt, v) as r:
        r.connect(uid("two"))
        r.send(raw.connect(uid("two"), v))
        assert_closed(r, "second CONNECT", v5_reasons={0x82})
    side.check()


@pytest.mark.parametrize(
    "topic",
    [b"bad/\xff\xfe", b"bad/\xed\xa0\x80", b"bad/\xc0\xaf", b"bad/a\x00b"],
    ids=["invalid-bytes", "surrogate", "overlong", "null-char"],
)
@pytest.mark.parametrize("qos", [0, 1])
def test_invalid_utf8_topic(broker, side, version, topic, qos):
    v = rv(version)
    with raw.RawClient(broker.mqtt, v) as r:
        r.connect(uid("utf"))
        r.send(raw.publish(topic, b"x", v, qos=qos))
        assert_closed(r, f"topic {topic!r}", v5_reasons={0x81})
    side.check()


@pytest.mark.parametrize("suffix", ["+", "#", "a/+/b", "a/#", "a+", "a#b"])
def test_wildcard_in_publish_topic(broker, side, version, suffix):
    base = uid("wild")
    v = rv(version)
    watcher = Client(broker.mqtt, version)
    try:
        watcher.connect()
        watcher.subscribe(f"{base}/#", 1)
        with raw.RawClient(broker.mqtt, v) as r:
            r.connect(uid("wild"))
            r.send(raw.publish(f"{base}/{suffix}", b"wild", v, qos=1))
            assert_closed(r, f"PUBLISH to {base}/{suffix}", v5_reasons={0x90, 0x82, 0x81})
        side.cl.publish(f"{base}/ok", b"ok", qos=1)
        m = watcher.get()
        assert (m.topic, m.payload) == (f"{base}/ok", b"ok"), f"wildcard publish was routed: {m}"
    finally:
        watcher.close()
    side.check()


@pytest.mark.parametrize("phase", ["before-connect", "after-connect"])
def test_remaining_length_five_bytes(broker, side, version, phase):
    v = rv(version)
    with raw.RawClient(broker.mqtt, v) as r:
        if phase == "after-connect":
            r.connect(uid("rl"))
            r.send(b"\x30\xff\xff\xff\xff\x7f" + b"\x00" * 16)
            assert_closed(r, "5-byte remaining length", v5_reasons={0x81})
        else:
            r.send(b"\x10\xff\xff\xff\xff\x7f" + b"\x00" * 16)
            assert_closed(r, "5-byte remaining length in CONNECT", connack_fail_ok=True)
    side.check()


@pytest.mark.parametrize("what", ["connect", "publish", "subscribe", "header-only"])
def test_truncated_packet_then_close(broker, side, version, what):
    """Half a packet, then we close our side: the broker closes too and moves on."""
    v = rv(version)
    topic = uid("trunc/")
    with raw.RawClient(broker.mqtt, v) as r:
        if what == "connect":
            pkt = raw.connect(uid("tr"), v)
            r.send(pkt[: len(pkt) // 2])
        else:
            r.connect(uid("tr"))
            pkt = {
                "publish": raw.publish(topic, b"p" * 100, v, qos=1),
                "subscribe": raw.subscribe(topic, 1, v),
                "header-only": b"\x32",
            }[what]
            r.send(pkt[: max(1, len(pkt) - 7)])
        r.sock.shutdown(socket.SHUT_WR)
        pkts = r.wait_closed(CLOSE_TIMEOUT)
        assert all(p.ptype == raw.DISCONNECT for p in pkts), f"unexpected answer {[(p.ptype, p.fields) for p in pkts]}"
    side.check()


@pytest.mark.parametrize("how", ["full", "header-only", "max-remaining-length"])
def test_packet_over_max_packet_size(broker, side, version, how):
    """STARLING_LIMITS_MAX_PACKET_SIZE=4096: v5 advertises it in CONNACK and answers
    a larger packet with DISCONNECT 0x95; v3.1.1 gets the connection closed. The
    broker must not wait for (or buffer) the whole oversized body."""
    v = rv(version)
    topic = uid("big/")
    with raw.RawClient(broker.mqtt, v) as r:
        ack = r.connect(uid("big"))
        if v == raw.V5:
            assert ack.fields["props"].get(raw.P_MAX_PACKET_SIZE) == MAX_PACKET, (
                f"CONNACK Maximum Packet Size: {ack.fields['props'].get(raw.P_MAX_PACKET_SIZE)}"
            )
        if how == "full":
            r.send(raw.publish(topic, b"x" * (MAX_PACKET + 100), v, qos=1))
        elif how == "header-only":
            r.send(b"\x32" + raw.varint(10_000_000) + b"\x00\x05a/b/c\x00\x01" + b"x" * 100)
        else:
            r.send(b"\x30\xff\xff\xff\x7f" + b"x" * 100)
        pkts = assert_closed(r, f"oversized packet ({how})", v5_reasons={0x95})
        if v == raw.V5:
            assert [p.reason for p in pkts] == [0x95], "v5: DISCONNECT 0x95 (Packet too large) before close"
    # a packet just under the limit still works, on the side client's connection
    side.cl.publish(side.topic + "/under", b"y" * (MAX_PACKET - 200), qos=1)
    side.check()


@pytest.mark.parametrize("sends", [b"", b"\x10", b"\x10\x20\x00\x04MQ"], ids=["nothing", "one-byte", "partial"])
def test_connect_timeout(broker, side, sends):
    """STARLING_LIMITS_CONNECT_TIMEOUT=1: a socket without a complete CONNECT is closed."""
    if not broker.supports("connect_timeout"):
        pytest.skip(f"{broker.kind} has no configurable connect timeout")
    with raw.RawClient(broker.mqtt, raw.V311) as r:
        t0 = time.monotonic()
        if sends:
            r.send(sends)
        assert_closed(r, "no CONNECT")
        dt = time.monotonic() - t0
        assert 0.5 <= dt <= CLOSE_TIMEOUT, f"closed after {dt:.2f}s with a 1 s connect timeout"
    side.check()


def test_junk_connections(broker, side):
    """1,000 connections sending random bytes, 100 at a time. Half of them send
    junk after a valid CONNECT. Every one must be closed by the broker."""
    rng = random.Random(20240611)
    total, batch = 1000, 100
    stall_ok = broker.supports("connect_timeout")
    closed = 0
    for b in range(total // batch):
        sel = selectors.DefaultSelector()
        socks = []
        for i in range(batch):
            s = socket.create_connection(broker.mqtt, timeout=5)
            n = b * batch + i
            junk = rng.randbytes(rng.randint(1, 300))
            if n % 2:
                v = raw.V5 if n % 4 == 1 else raw.V311
                junk = raw.connect(f"junk{n}", v) + junk
            try:
                s.sendall(junk)
                # pre-CONNECT junk on every 4th socket is left open: the broker must
                # reject it or time it out on its own
                if not (stall_ok and n % 4 == 0):
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the broker already closed it (EPIPE, ECONNRESET, ENOTCONN): fine
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
        deadline = time.monotonic() + 10
        open_ = set(socks)
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except (ConnectionResetError, BlockingIOError) as e:
                    data = b"" if isinstance(e, ConnectionResetError) else None
                if data == b"":
                    sel.unregister(key.fileobj)
                    open_.discard(key.fileobj)
        closed += batch - len(open_)
        for s in socks:
            s.close()
        sel.close()
        assert not open_, f"batch {b}: {len(open_)} junk connections still open after 10 s"
        side.check(f"after junk batch {b}")
    assert closed == total
    # a brand-new client still gets through
    c = Client(broker.mqtt, V311)
    try:
        c.connect()
        t = uid("afterjunk/")
        c.subscribe(t, 1)
        c.publish(t, b"ok", qos=1)
        assert c.get().payload == b"ok"
    finally:
        c.close()

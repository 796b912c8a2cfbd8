"""Caps on what clients can make the broker hold (issue 8, defects 8 and 9),
against the real binary: each cap refuses with the protocol's code, counts
in starling_limit_refusals_total{limit}, and the broker keeps serving a side
client. The pre-fix binary has none of these caps (it refuses the unknown
configuration keys, and with defaults it accepts everything)."""

from __future__ import annotations

import socket
import time

import pytest

import mqttraw as raw
from clients import uid
from test_hardening import make_tls_files, mem, metric, mib, ping, raw_session, rv, side_for  # noqa: F401

LIMIT = "starling_limit_refusals_total"


def limit_count(b, name: str) -> float:
    return metric(b, LIMIT, f'{{limit="{name}"}}')


def admitted_again(b, why: str, within: float = 5.0) -> None:
    """A new client gets in within `within` seconds: slots are released as
    the broker sees the closes (a raw client learns of a refusal at once)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with raw_session(b.mqtt, raw.V311):
                return
        except (AssertionError, raw.Closed, OSError):
            assert time.monotonic() < deadline, why
            time.sleep(0.05)


def sub_codes(r: raw.RawClient, filters: list[str], qos: int = 0, pid: int = 1) -> list[int]:
    r.send(raw.subscribe_many(filters, qos, r.version, pid=pid))
    return r.expect(raw.SUBACK).fields["codes"]


@pytest.mark.parametrize("version", [3, 5], ids=["v311", "v5"])
def test_subscriptions_per_session(run_broker, side_for, version):
    b = run_broker({"STARLING_LIMITS_MAX_SUBSCRIPTIONS_PER_SESSION": "3"})
    side = side_for(b)
    v = rv(version)
    refused = 0x97 if v == raw.V5 else 0x80
    with raw_session(b.mqtt, v) as r:
        base = uid("subs")
        assert sub_codes(r, [f"{base}/{i}" for i in range(3)]) == [0, 0, 0]
        assert sub_codes(r, [f"{base}/3", f"{base}/0"], pid=2) == [refused, 0], "resubscribing is fine"
        ping(r, "after the refusal")
    assert limit_count(b, "max_subscriptions_per_session") == 1
    side.check("subscription cap")


def test_shared_groups(run_broker, side_for):
    b = run_broker({"STARLING_LIMITS_MAX_SHARED_GROUPS": "2"})
    side = side_for(b)
    base = uid("sg")
    with raw_session(b.mqtt, raw.V5) as r, raw_session(b.mqtt, raw.V5) as other:
        assert sub_codes(r, [f"$share/a/{base}", f"$share/b/{base}"]) == [0, 0]
        assert sub_codes(r, [f"$share/c/{base}"], pid=2) == [0x97]
        assert sub_codes(other, [f"$share/a/{base}"]) == [0], "joining an existing group is fine"
        ping(r)
    assert limit_count(b, "max_shared_groups") == 1
    side.check("share group cap")


@pytest.mark.parametrize("version", [3, 5], ids=["v311", "v5"])
def test_persistent_sessions(run_broker, side_for, version):
    b = run_broker({"STARLING_LIMITS_MAX_PERSISTENT_SESSIONS": "2", "STARLING_LIMITS_MAX_SESSION_EXPIRY": "300"})
    side = side_for(b)
    v = rv(version)
    props = [(raw.P_SESSION_EXPIRY, 300)] if v == raw.V5 else None
    held = []
    for i in range(2):
        r = raw.RawClient(b.mqtt, v)
        r.connect(uid(f"ps{i}"), clean=False, connect_props=props)
        held.append(r)
    r = raw.RawClient(b.mqtt, v)
    r.send(raw.connect(uid("ps-over"), v, clean=False, connect_props=props))
    ack = r.expect(raw.CONNACK)
    assert ack.reason == (0x97 if v == raw.V5 else 0x03), ack.fields
    # A clean session is not persistent: still welcome.
    with raw_session(b.mqtt, v):
        pass
    for h in held:
        h.close()
    assert limit_count(b, "max_persistent_sessions") == 1
    side.check("persistent session cap")


def test_retained_messages(run_broker, side_for):
    b = run_broker({"STARLING_LIMITS_MAX_RETAINED_MESSAGES": "3"})
    side = side_for(b)
    base = uid("ret")
    with raw_session(b.mqtt, raw.V5) as pub, raw_session(b.mqtt, raw.V5) as sub:
        assert sub_codes(sub, [f"{base}/#"]) == [0]
        codes = []
        for i in range(4):
            pub.send(raw.publish(f"{base}/{i}", b"r", raw.V5, qos=1, retain=True, pid=i + 1))
            codes.append(pub.expect(raw.PUBACK).reason)
        assert codes[:3] == [0, 0, 0] and codes[3] == 0x97, codes
        # Replacing a stored topic always works.
        pub.send(raw.publish(f"{base}/0", b"new", raw.V5, qos=1, retain=True, pid=9))
        assert pub.expect(raw.PUBACK).reason == 0
        got = [bytes(p.fields["topic"]).decode() for p in ping(sub)]
        assert f"{base}/3" not in got, f"the refused retained publish was delivered: {got}"
    with raw_session(b.mqtt, raw.V5) as late:
        assert sub_codes(late, [f"{base}/#"]) == [0]
        got = sorted(bytes(p.fields["topic"]).decode() for p in ping(late))
        assert got == [f"{base}/{i}" for i in range(3)], got
    assert limit_count(b, "max_retained_messages") == 1
    side.check("retained cap")


def test_connections_per_address(run_broker, side_for):
    b = run_broker({"STARLING_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "5"})
    side = side_for(b)  # holds one
    held = [raw_session(b.mqtt, raw.V311) for _ in range(4)]
    s = socket.create_connection(b.mqtt, timeout=5)
    s.settimeout(5)
    try:
        assert s.recv(1) == b"", "the sixth socket from 127.0.0.1 was not closed at accept"
    except ConnectionResetError:
        pass
    s.close()
    for h in held:
        h.close()
    admitted_again(b, "slots were not released")
    assert limit_count(b, "max_connections_per_address") >= 1
    side.check("per-address cap")


def test_tls_handshakes_count_against_max_connections(run_broker, tmp_path):
    """Sockets in the middle of a TLS handshake hold a connection slot: with
    max_connections = 3, three stalled handshakes fill the broker."""
    ca, cert, key = make_tls_files(str(tmp_path))
    b = run_broker(
        {
            "STARLING_TLS_CERT": cert,
            "STARLING_TLS_KEY": key,
            "STARLING_MQTTS_BIND": "127.0.0.1:0",
            "STARLING_LIMITS_MAX_CONNECTIONS": "3",
            "STARLING_LIMITS_CONNECT_TIMEOUT": "5",
        }
    )
    stalled = [socket.create_connection(b.listeners["mqtts"], timeout=5) for _ in range(3)]
    deadline = time.monotonic() + 5
    while limit_count(b, "max_connections") < 1:
        probe = socket.create_connection(b.mqtt, timeout=5)
        probe.settimeout(5)
        try:
            closed = probe.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
        probe.close()
        assert time.monotonic() < deadline, "a fourth socket was admitted while 3 handshakes were pending"
        if not closed:
            time.sleep(0.05)
    for s in stalled:
        s.close()
    admitted_again(b, "slots were not released after the handshakes closed")


def test_small_messages_do_not_pin_read_buffers(run_broker, side_for):
    """Defect 8: a tiny queued message used to keep the whole 64 KiB read
    buffer it arrived in alive, so max_queued_bytes bounded nothing. Each
    round fills a read buffer with a large QoS 0 publish nobody receives and
    ends it with a 1-byte QoS 1 message for an offline persistent session."""
    rounds = 1000
    b = run_broker(
        {
            "STARLING_LIMITS_MAX_QUEUED_MESSAGES": str(rounds),
            "STARLING_LIMITS_MAX_SESSION_EXPIRY": "300",
        }
    )
    side = side_for(b)
    base, cid = uid("pin"), uid("pin-sub")
    with raw.RawClient(b.mqtt, raw.V5) as sub:
        sub.connect(cid, clean=True, connect_props=[(raw.P_SESSION_EXPIRY, 300)])
        assert sub_codes(sub, [f"{base}/tiny"], qos=1) == [1]
        sub.send(raw.disconnect(raw.V5))
    before = mem(b)["VmRSS"]
    filler = raw.publish(f"{base}/nobody", b"x" * 60_000, raw.V5)
    with raw_session(b.mqtt, raw.V5) as pub:
        for i in range(rounds):
            pub.send(filler + raw.publish(f"{base}/tiny", b"t", raw.V5, qos=1, pid=1 + i % 60000))
            assert pub.expect(raw.PUBACK).reason == 0
    grown = mem(b)["VmRSS"] - before
    assert grown < 16 * 2**20, f"{rounds} queued 1-byte messages hold {mib(grown)}"
    with raw.RawClient(b.mqtt, raw.V5) as back:
        back.send(raw.connect(cid, raw.V5, clean=False, connect_props=[(raw.P_SESSION_EXPIRY, 300)]))
        assert back.expect(raw.CONNACK).fields["session_present"]
        n = 0
        while n < rounds:
            p = back.expect(raw.PUBLISH)
            back.send(raw.ack(raw.PUBACK, p.fields["pid"], raw.V5))
            n += 1
    side.check("pinned buffers")

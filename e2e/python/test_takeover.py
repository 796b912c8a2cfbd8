"""Session takeover while the old connection still has packets buffered
(issue 8, defect 5).

The old connection reads a burst: many PINGREQs that keep it busy, then
PUBACKs that open its inflight window. Meanwhile a new connection takes the
session over and resends the inflight window it finds. Before the fix, the
old connection went on processing its buffered packets and drained the next
messages into its own (dead) socket after the takeover: they sat in the
session's inflight window, never delivered, and blocked the new
connection's window for good.
Now only the connection attached to a session drains it, so the new one
receives every message the old one did not acknowledge.
"""

import time

import mqttraw as raw
from clients import uid

WINDOW = 5
MESSAGES = 200
# The first read is 2 KiB, the next up to 64 KiB: the pings and the
# trailing acks then arrive in one read and are handled in one pass.
PINGS = 30_000
ROUNDS = 12


def _props():
    return [(raw.P_SESSION_EXPIRY, 300), (raw.P_RECEIVE_MAXIMUM, WINDOW)]


def _publish_all(broker, topic: str) -> None:
    with raw.RawClient(broker.mqtt, raw.V311) as pub:
        pub.connect(uid("pub"))
        pub.send(b"".join(raw.publish(topic, str(i).encode(), raw.V311, qos=1, pid=i + 1) for i in range(MESSAGES)))
        acked = 0
        while acked < MESSAGES:
            if pub.read_packet(10).ptype == raw.PUBACK:
                acked += 1


def _round(broker) -> None:
    cid, topic = uid("tk"), f"takeover/{uid()}"
    old = raw.RawClient(broker.mqtt, raw.V5)
    old.connect(cid, clean=True, connect_props=_props())
    old.send(raw.subscribe(topic, 1, raw.V5))
    old.expect(raw.SUBACK)
    _publish_all(broker, topic)
    first = [old.expect(raw.PUBLISH) for _ in range(WINDOW)]
    acked = {int(p.fields["payload"]) for p in first}
    burst = raw.pingreq() * PINGS
    burst += b"".join(raw.ack(raw.PUBACK, p.fields["pid"], raw.V5) for p in first)
    new = raw.RawClient(broker.mqtt, raw.V5)
    old.send(burst)
    new.send(raw.connect(cid, raw.V5, clean=False, connect_props=_props()))
    ack = new.expect(raw.CONNACK)
    assert ack.reason == 0 and ack.fields["session_present"], ack.fields
    # The old connection is told why it goes (v5 0x8E), after what it owed.
    seen = old.wait_closed(10)
    disconnects = [p.fields["reason"] for p in seen if p.ptype == raw.DISCONNECT]
    assert disconnects == [0x8E], f"old connection closed with {disconnects}"
    want = set(range(MESSAGES)) - acked
    got: set[int] = set()
    deadline = time.monotonic() + 10
    while not want <= got:
        left = deadline - time.monotonic()
        assert left > 0, (
            f"the new connection got {len(want & got)} of {len(want)} messages; "
            f"missing {sorted(want - got)[:10]}…: they were put in flight on the old connection"
        )
        try:
            p = new.read_packet(left)
        except TimeoutError:
            continue
        if p.ptype == raw.PUBLISH:
            got.add(int(p.fields["payload"]))
            new.send(raw.ack(raw.PUBACK, p.fields["pid"], raw.V5))
    old.close()
    new.close()


def test_only_the_attached_connection_drains_a_taken_over_session(broker):
    for _ in range(ROUNDS):
        _round(broker)

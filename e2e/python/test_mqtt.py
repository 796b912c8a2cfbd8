"""MQTT 3.1.1 and 5.0 behaviour of the real broker, driven by paho-mqtt
(and a few raw sockets where paho cannot express the check)."""

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import mqttraw as raw
from clients import V5, V311, Client, uid, v5_props

BINARY = bytes(range(256)) + "ünïcødé ✓".encode()


# ---------------------------------------------------------------- QoS


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_qos_round_trip(clients, version, qos):
    base = uid("qos/")
    topic = f"{base}/ünï/t"
    sub = clients(version)
    pub = clients(version)
    sub.subscribe(topic, qos)
    payloads = [BINARY + bytes([i]) for i in range(5)] + [b""]
    for p in payloads:
        pub.publish(topic, p, qos=qos)
    got = [sub.get() for _ in payloads]
    assert [m.topic for m in got] == [topic] * len(payloads)
    assert [m.payload for m in got] == payloads, "payloads changed or out of order"
    assert [m.qos for m in got] == [qos] * len(payloads)
    assert not any(m.retain for m in got)
    # exactly once (QoS 2) / no spurious duplicates: nothing else arrives before a sentinel
    pub.publish(topic, b"sentinel", qos=qos)
    assert sub.get().payload == b"sentinel", "duplicate delivery"


@pytest.mark.parametrize(
    "pub_qos,sub_qos", [(p, s) for p in (0, 1, 2) for s in (0, 1, 2) if p != s], ids=lambda v: f"q{v}"
)
def test_qos_downgrade(clients, version, pub_qos, sub_qos):
    """Delivered QoS is min(publish QoS, subscription QoS) - never raised."""
    topic = uid("down/")
    sub = clients(version)
    pub = clients(version)
    sub.subscribe(topic, sub_qos)
    pub.publish(topic, b"x", qos=pub_qos)
    m = sub.get()
    assert (m.topic, m.payload) == (topic, b"x")
    assert m.qos == min(pub_qos, sub_qos), f"published at {pub_qos} to a QoS {sub_qos} subscription"


# ---------------------------------------------------------------- retained


def test_retained_set_replace_clear(clients, version):
    topic = uid("ret/")
    pub = clients(version)
    pub.publish(topic, b"one", qos=1, retain=True)
    pub.publish(topic, b"two", qos=1, retain=True)  # replaces

    s1 = clients(version)
    s1.subscribe(topic, 1)
    m = s1.get()
    assert (m.topic, m.payload, m.retain, m.qos) == (topic, b"two", True, 1), m
    pub.publish(topic, b"live", qos=1)  # sentinel: nothing else was retained
    m = s1.get()
    assert (m.payload, m.retain) == (b"live", False), f"only one retained message expected, then live: {m}"

    # an empty NON-retained publish is delivered but does not clear the retained message
    pub.publish(topic, b"", qos=1, retain=False)
    m = s1.get()
    assert (m.payload, m.retain) == (b"", False)
    s2 = clients(version)
    s2.subscribe(topic, 1)
    m = s2.get()
    assert (m.payload, m.retain) == (b"two", True), "empty non-retained publish cleared the retained message"

    # an empty retained publish clears it
    pub.publish(topic, b"", qos=1, retain=True)
    s3 = clients(version)
    s3.subscribe(topic, 1)
    pub.publish(topic, b"after-clear", qos=1)
    m = s3.get()
    assert (m.payload, m.retain) == (b"after-clear", False), f"retained message not cleared: {m}"


def test_retained_wildcard_late_subscriber(clients, version):
    base = uid("retw/")
    pub = clients(version)
    topics = {f"{base}/a": b"A", f"{base}/b/c": b"BC", f"{base}/d": b"D"}
    for t, p in topics.items():
        pub.publish(t, p, qos=1, retain=True)
    pub.publish(f"{base}/d", b"", qos=1, retain=True)  # cleared, must not show up
    sub = clients(version)
    sub.subscribe(f"{base}/#", 1)
    got = {}
    for _ in range(2):
        m = sub.get()
        assert m.retain
        got[m.topic] = m.payload
    assert got == {f"{base}/a": b"A", f"{base}/b/c": b"BC"}
    pub.publish(f"{base}/end", b"end", qos=1)
    assert sub.get().topic == f"{base}/end", "cleared retained message delivered"


# ---------------------------------------------------------------- will


def test_will_on_abrupt_close(broker, clients, version):
    topic = uid("will/")
    watcher = clients(version)
    watcher.subscribe(topic, 1)
    dying = clients(version, will=dict(topic=topic, payload=b"gone", qos=1, retain=False))
    dying.abort()  # TCP close without DISCONNECT
    m = watcher.get()
    assert (m.topic, m.payload, m.qos) == (topic, b"gone", 1)


def test_no_will_on_clean_disconnect(broker, clients, version):
    topic = uid("will/")
    watcher = clients(version)
    watcher.subscribe(topic, 1)
    polite = clients(version, will=dict(topic=topic, payload=b"gone", qos=1, retain=False))
    polite.disconnect()
    other = clients(version)
    other.publish(topic, b"sentinel", qos=1)
    m = watcher.get()
    assert m.payload == b"sentinel", f"will published after a clean DISCONNECT: {m}"
    late = watcher.drain(0.5)
    assert not late, f"will published after a clean DISCONNECT: {late}"


def test_will_on_disconnect_with_will_v5(clients):
    """v5 DISCONNECT with reason 0x04 (Disconnect with Will Message) publishes the will."""
    topic = uid("will/")
    watcher = clients(V5)
    watcher.subscribe(topic, 1)
    c = clients(V5, will=dict(topic=topic, payload=b"asked", qos=1))
    c.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
    m = watcher.get()
    assert (m.topic, m.payload) == (topic, b"asked")


def test_will_delay_v5(clients):
    """Will Delay Interval: the will is published only after the delay."""
    topic = uid("will/")
    watcher = clients(V5)
    watcher.subscribe(topic, 1)
    wp = v5_props(PacketTypes.WILLMESSAGE, WillDelayInterval=2)
    c = clients(V5, session_expiry=60, will=dict(topic=topic, payload=b"late", qos=1, properties=wp))
    t0 = time.monotonic()
    c.abort()
    m = watcher.get(timeout=8)
    dt = time.monotonic() - t0
    assert m.payload == b"late"
    assert dt >= 1.5, f"will published {dt:.2f}s after close, before its 2s delay"


def test_will_properties_v5(broker, clients):
    """Will properties that belong to the message (content type, user properties,
    ...) reach subscribers; the will-only Will Delay Interval (0x18) must not
    appear in the delivered PUBLISH (it is not a PUBLISH property)."""
    topic = uid("will/")
    with raw.RawClient(broker.mqtt, raw.V5) as watcher:
        watcher.connect(uid("ww"))
        watcher.send(raw.subscribe(topic, 1, raw.V5))
        watcher.expect(raw.SUBACK)
        wp = v5_props(PacketTypes.WILLMESSAGE, WillDelayInterval=1, ContentType="text/x-will")
        wp.UserProperty = [("why", "test")]
        c = clients(V5, session_expiry=60, will=dict(topic=topic, payload=b"bye", qos=1, properties=wp))
        c.abort()
        p = watcher.expect(raw.PUBLISH, timeout=8)
        props = p.fields["props"]
        assert (p.fields["topic"], p.fields["payload"]) == (topic.encode(), b"bye")
        assert 0x18 not in props, f"Will Delay Interval (0x18) forwarded as a PUBLISH property: {props}"
        assert props.get(0x03) == b"text/x-will", f"content type lost: {props}"
        assert props.get(0x26) == [("why", "test")], f"user property lost: {props}"


def test_will_delay_cancelled_by_reconnect_v5(clients):
    topic = uid("will/")
    cid = uid("wd")
    watcher = clients(V5)
    watcher.subscribe(topic, 1)
    wp = v5_props(PacketTypes.WILLMESSAGE, WillDelayInterval=2)
    c = clients(V5, client_id=cid, clean=False, session_expiry=60,
                will=dict(topic=topic, payload=b"late", qos=1, properties=wp))
    c.abort()
    back = clients(V5, client_id=cid, clean=False, session_expiry=60)
    assert back.session_present
    watcher.drain(0.1)
    other = clients(V5)
    # wait past the delay: the will must not come
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:
        got = watcher.drain(0.25)
        assert not got, f"will published although the client reconnected within the delay: {got}"
    other.publish(topic, b"sentinel", qos=1)
    assert watcher.get().payload == b"sentinel"


# ---------------------------------------------------------------- sessions


def _persistent(clients, version, cid, first):
    """v5: Clean Start on the first connect, resume later, session expiry 300 s.
    v3.1.1: clean_session=0 every time (a new client id has no session yet)."""
    if version == V5:
        return clients(version, client_id=cid, clean=first, session_expiry=300)
    return clients(version, client_id=cid, clean=False)


def test_persistent_session_queues_while_offline(clients, version):
    topic = uid("sess/")
    cid = uid("ps")
    first = _persistent(clients, version, cid, first=True)
    assert first.session_present is False
    first.subscribe(topic, 2)
    first.disconnect()

    pub = clients(version)
    sent = [(b"m1", 1), (b"m2", 2), (b"m3", 1), (b"m4", 2)]
    for p, q in sent:
        pub.publish(topic, p, qos=q)

    again = _persistent(clients, version, cid, first=False)
    assert again.session_present is True, "session_present not set on resumed session"
    got = [again.get() for _ in sent]
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [(topic, p, q) for p, q in sent]
    for q in (1, 2):  # order is promised per topic and QoS
        assert [m.payload for m in got if m.qos == q] == [p for p, qq in sent if qq == q], "queued order"
    # the subscription itself survived
    pub.publish(topic, b"live", qos=1)
    m = again.get()
    assert (m.payload, m.qos) == (b"live", 1)


def test_clean_session_discards_state(clients, version):
    topic = uid("sess/")
    cid = uid("cs")
    first = _persistent(clients, version, cid, first=True)
    first.subscribe(topic, 1)
    first.disconnect()
    pub = clients(version)
    pub.publish(topic, b"queued", qos=1)
    fresh = clients(version, client_id=cid, clean=True)
    assert fresh.session_present is False
    pub.publish(topic, b"after", qos=1)
    assert not fresh.drain(0.3), "clean session received messages of the discarded session"


# ---------------------------------------------------------------- takeover


def test_takeover_disconnects_first(clients, version):
    cid = uid("to")
    topic = uid("take/")
    a = clients(version, client_id=cid)
    b = clients(version, client_id=cid)
    assert a.disconnected.wait(5), "first connection not disconnected by takeover"
    if version == V5:
        assert a.disconnect_rc is not None and a.disconnect_rc.value == 0x8E, (
            f"v5 takeover should send DISCONNECT 0x8E (Session taken over), got {a.disconnect_rc}"
        )
    assert not b.disconnected.is_set()
    b.subscribe(topic, 1)
    clients(version).publish(topic, b"to-b", qos=1)
    assert b.get().payload == b"to-b"


# ---------------------------------------------------------------- topic matching


def test_wildcards(clients, version):
    base = uid("wc")
    s_plus = clients(version)
    s_plus.subscribe(f"{base}/+/temp", 1)
    s_hash = clients(version)
    s_hash.subscribe(f"{base}/#", 1)
    s_one = clients(version)
    s_one.subscribe(f"{base}/+", 1)
    pub = clients(version)
    topics = [f"{base}/a/temp", f"{base}/a/b/temp", f"{base}/x", base, f"{base}/a/hum", f"{base}//temp",
              f"other{base}/a/temp", f"{base}x/a/temp"]
    for t in topics + [f"{base}/s1/temp", f"{base}/s3"]:
        pub.publish(t, t.encode(), qos=1)
    assert [m.topic for m in s_plus.collect_until(f"{base}/s1/temp")] == [f"{base}/a/temp", f"{base}//temp"]
    assert [m.topic for m in s_hash.collect_until(f"{base}/s3")] == [
        f"{base}/a/temp", f"{base}/a/b/temp", f"{base}/x", base, f"{base}/a/hum", f"{base}//temp",
        f"{base}/s1/temp",
    ]
    assert [m.topic for m in s_one.collect_until(f"{base}/s3")] == [f"{base}/x"]


def test_dollar_topics_not_matched_by_leading_wildcards(clients, version):
    d = "$" + uid("e2e")
    normal = uid("n")
    s_hash = clients(version)
    s_hash.subscribe("#", 1)
    s_plus = clients(version)
    s_plus.subscribe("+/x", 1)
    s_dollar = clients(version)
    s_dollar.subscribe(f"{d}/#", 1)
    pub = clients(version)
    pub.publish(f"{d}/x", b"dollar", qos=1)
    pub.publish(f"{normal}/x", b"normal", qos=1)  # sentinel, matched by # and +/x
    m = s_dollar.get()
    assert (m.topic, m.payload) == (f"{d}/x", b"dollar"), "$foo/# must match $foo/x"
    for name, s in (("#", s_hash), ("+/x", s_plus)):
        before = s.collect_until(f"{normal}/x")
        after = s.drain(0.3)
        leaked = [m.topic for m in before + after if m.topic.startswith("$")]
        assert not leaked, f"'{name}' matched $-topics: {leaked}"


# ---------------------------------------------------------------- shared subscriptions


def test_shared_subscription_distribution(clients, version):
    group, topic = uid("g"), uid("shared/")
    members = [clients(version), clients(version)]
    for m in members:
        m.subscribe(f"$share/{group}/{topic}", 1)
    plain = clients(version)
    plain.subscribe(topic, 1)
    pub = clients(version)
    n = 40
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1)
    assert sorted(int(plain.get().payload) for _ in range(n)) == list(range(n)), "non-shared subscriber"
    msgs = [[], []]
    deadline = time.monotonic() + 5
    while sum(map(len, msgs)) < n and time.monotonic() < deadline:
        for i, m in enumerate(members):
            msgs[i] += m.drain(0.05)
    for i, m in enumerate(members):
        msgs[i] += m.drain(0.3)  # anything extra (duplicates) shows up here
    wrong = [x.topic for x in msgs[0] + msgs[1] if x.topic != topic]
    assert not wrong, f"shared delivery must carry the real topic, got {wrong[:3]}"
    got = [[int(x.payload) for x in ms] for ms in msgs]
    every = got[0] + got[1]
    assert sorted(every) == list(range(n)), (
        f"each message must reach exactly one member: member counts {len(got[0])}/{len(got[1])}, "
        f"duplicates {sorted(set(x for x in every if every.count(x) > 1))}, missing {sorted(set(range(n)) - set(every))}"
    )
    assert got[0] and got[1], f"one member got everything: {len(got[0])}/{len(got[1])}"


# ---------------------------------------------------------------- v5 topic aliases


def test_topic_alias_from_client_v5(clients):
    base = uid("alias")
    sub = clients(V5)
    sub.subscribe(f"{base}/#", 1)
    pub = clients(V5)
    tam = getattr(pub.connack_props, "TopicAliasMaximum", 0)
    assert tam >= 2, f"broker advertises Topic Alias Maximum {tam}; expected topic alias support"

    def send(topic, payload, alias, qos=1):
        pub.publish(topic, payload, qos=qos, properties=v5_props(TopicAlias=alias))

    send(f"{base}/one", b"1", 1)
    send("", b"2", 1)  # alias only
    send(f"{base}/two", b"3", 2, qos=0)
    send("", b"4", 2, qos=0)
    send(f"{base}/three", b"5", 1)  # remap alias 1
    send("", b"6", 1, qos=2)
    send("", b"7", 2)
    got = [(m.topic, m.payload) for m in (sub.get() for _ in range(7))]
    assert got == [
        (f"{base}/one", b"1"), (f"{base}/one", b"2"), (f"{base}/two", b"3"), (f"{base}/two", b"4"),
        (f"{base}/three", b"5"), (f"{base}/three", b"6"), (f"{base}/two", b"7"),
    ]


def test_topic_alias_to_client_v5(broker, clients):
    """A subscriber that allows 2 aliases: whatever aliases the broker uses,
    resolving them yields the right topics, and it never exceeds our maximum."""
    base = uid("oalias")
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        r.connect(uid("ra"), connect_props=[(raw.P_TOPIC_ALIAS_MAX, 2)])
        r.send(raw.subscribe(f"{base}/#", 0, raw.V5))
        assert r.expect(raw.SUBACK).fields["codes"] == [0]
        pub = clients(V5)
        sent = [f"{base}/{'abc'[i % 3]}" for i in range(12)]
        for i, t in enumerate(sent):
            pub.publish(t, str(i).encode(), qos=0)
        aliases, got = {}, []
        for i in range(len(sent)):
            p = r.expect(raw.PUBLISH)
            topic = p.fields["topic"].decode()
            alias = p.fields["props"].get(raw.P_TOPIC_ALIAS)
            if alias is not None:
                assert 1 <= alias <= 2, f"broker used topic alias {alias} above our maximum 2"
                if topic:
                    aliases[alias] = topic
                else:
                    assert alias in aliases, f"broker used unknown alias {alias}"
                    topic = aliases[alias]
            else:
                assert topic, "empty topic without a topic alias"
            got.append((topic, p.fields["payload"]))
        assert got == [(t, str(i).encode()) for i, t in enumerate(sent)]


def test_topic_alias_not_used_without_permission_v5(broker, clients):
    """Subscriber without Topic Alias Maximum (default 0): no alias ever sent."""
    base = uid("noalias")
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        r.connect(uid("rn"))
        r.send(raw.subscribe(f"{base}/#", 0, raw.V5))
        r.expect(raw.SUBACK)
        pub = clients(V5)
        for i in range(4):
            pub.publish(f"{base}/t", b"x", qos=0)
        for i in range(4):
            p = r.expect(raw.PUBLISH)
            assert p.fields["topic"] == f"{base}/t".encode()
            assert raw.P_TOPIC_ALIAS not in p.fields["props"]


# ---------------------------------------------------------------- v5 maximum packet size towards the client


def test_client_maximum_packet_size_respected_v5(broker, clients):
    base = uid("mps")
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        r.connect(uid("rm"), connect_props=[(raw.P_MAX_PACKET_SIZE, 200)])
        r.send(raw.subscribe(f"{base}/#", 1, raw.V5))
        r.expect(raw.SUBACK)
        pub = clients(V5)
        pub.publish(f"{base}/big", b"B" * 1000, qos=1)
        pub.publish(f"{base}/small", b"s", qos=1)
        p = r.expect(raw.PUBLISH)
        assert p.fields["topic"] == f"{base}/small".encode(), (
            f"broker sent a {len(p.body)}-byte PUBLISH to a client whose Maximum Packet Size is 200"
        )


# ---------------------------------------------------------------- v5 properties pass through


def test_user_properties_and_content_type_pass_through_v5(clients):
    topic = uid("props/")
    sub = clients(V5)
    sub.subscribe(topic, 1)
    pub = clients(V5)
    p = v5_props(ContentType="text/plain", ResponseTopic=topic + "/reply", CorrelationData=b"\x00\x01",
                 PayloadFormatIndicator=1)
    p.UserProperty = [("k1", "v1"), ("k1", "v2"), ("ü", "✓")]
    pub.publish(topic, b"hello", qos=1, properties=p)
    m = sub.get()
    assert m.properties.ContentType == "text/plain"
    assert m.properties.ResponseTopic == topic + "/reply"
    assert m.properties.CorrelationData == b"\x00\x01"
    assert m.properties.PayloadFormatIndicator == 1
    assert m.properties.UserProperty == [("k1", "v1"), ("k1", "v2"), ("ü", "✓")], "user properties: order and duplicates kept"


def test_no_local_v5(clients):
    topic = uid("nolocal/")
    c = clients(V5)
    c.subscribe(topic, 1, options=mqtt.SubscribeOptions(qos=1, noLocal=True))
    other = clients(V5)
    c.publish(topic, b"own", qos=1)
    other.publish(topic, b"other", qos=1)
    assert c.get().payload == b"other", "no-local subscription received its own message"


def test_retain_as_published_v5(clients):
    """Live messages carry retain=0 unless the subscription asked for
    retain-as-published; a retained message sent on subscribe always has 1."""
    topic = uid("rap/")
    plain = clients(V5)
    plain.subscribe(topic, 1)
    rap = clients(V5)
    rap.subscribe(topic, 1, options=mqtt.SubscribeOptions(qos=1, retainAsPublished=True))
    pub = clients(V5)
    pub.publish(topic, b"r", qos=1, retain=True)
    assert plain.get().retain is False, "retain flag forwarded without retain-as-published"
    assert rap.get().retain is True, "retain-as-published subscription lost the retain flag"
    late = clients(V5)
    late.subscribe(topic, 1)
    assert late.get().retain is True, "retained message on subscribe without the retain flag"
    pub.publish(topic, b"", qos=1, retain=True)


@pytest.mark.parametrize("handling", [0, 1, 2])
def test_retain_handling_v5(clients, handling):
    """0: retained messages on every subscribe; 1: only when the subscription
    is new; 2: never."""
    topic = uid("rh/")
    pub = clients(V5)
    pub.publish(topic, b"kept", qos=1, retain=True)
    c = clients(V5)
    opts = mqtt.SubscribeOptions(qos=1, retainHandling=handling)
    c.subscribe(topic, 1, options=opts)
    first = c.drain(0.5)
    c.subscribe(topic, 1, options=opts)  # the same subscription again
    second = c.drain(0.5)
    want = {0: (1, 1), 1: (1, 0), 2: (0, 0)}[handling]
    assert (len(first), len(second)) == want, (
        f"retain handling {handling}: {len(first)} then {len(second)} retained deliveries, wanted {want}"
    )
    pub.publish(topic, b"", qos=1, retain=True)


def test_assigned_client_identifier_v5(broker):
    """An empty client id on v5 gets an Assigned Client Identifier, and a
    3.1.1 clean session with an empty id is accepted too."""
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        ack = r.connect("")
        assigned = ack.fields["props"].get(0x12)
        assert assigned, f"no Assigned Client Identifier in {ack.fields}"
    with raw.RawClient(broker.mqtt, raw.V311) as r:
        assert r.connect("").reason == 0
    with raw.RawClient(broker.mqtt, raw.V311) as r:
        r.send(raw.connect("", version=raw.V311, clean=False))
        ack = r.expect(raw.CONNACK)
        assert ack.reason == 0x02, f"3.1.1 persistent session without id: CONNACK {ack.reason}"


def test_enhanced_auth_is_refused_v5(broker):
    """Enhanced authentication (AUTH exchanges) is not offered: a CONNECT
    naming an authentication method gets CONNACK 0x8C and is closed; plain
    clients are unaffected."""
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        r.send(raw.connect(uid("scram"), version=raw.V5, connect_props=[(raw.P_AUTH_METHOD, "SCRAM-SHA-1")]))
        ack = r.expect(raw.CONNACK)
        assert ack.reason == 0x8C, f"CONNACK {ack.reason:#x}"
        r.wait_closed(5.0)
    with raw.RawClient(broker.mqtt, raw.V5) as r:
        assert r.connect(uid("plain")).reason == 0


# ---------------------------------------------------------------- keepalive


def test_keepalive_timeout_closes_idle_connection(broker, version):
    v = raw.V5 if version == V5 else raw.V311
    with raw.RawClient(broker.mqtt, v) as idle, raw.RawClient(broker.mqtt, v) as busy:
        busy.connect(uid("ka"), keepalive=1)
        idle.connect(uid("ka"), keepalive=1)
        t0 = time.monotonic()
        # the busy connection pings every 0.4 s and must survive; the idle one must be closed
        closed_at = None
        while time.monotonic() - t0 < 5.0:
            busy.send(raw.pingreq())
            busy.expect(raw.PINGRESP, timeout=2)
            try:
                pkt = idle.read_packet(timeout=0.4)
                assert pkt.ptype == raw.DISCONNECT and v == raw.V5, f"unexpected packet {pkt}"
                assert pkt.reason == 0x8D, f"v5 keepalive DISCONNECT should be 0x8D, got {pkt.reason:#x}"
            except TimeoutError:
                continue
            except raw.Closed:
                closed_at = time.monotonic() - t0
                break
        assert closed_at is not None, "idle connection with keepalive=1 still open after 5 s"
        assert closed_at >= 0.9, f"closed after {closed_at:.2f}s: earlier than the keepalive allows"
        # the busy one keeps going past 1.5x keepalive
        while time.monotonic() - t0 < 2.6:
            busy.send(raw.pingreq())
            busy.expect(raw.PINGRESP, timeout=2)
            time.sleep(0.4)


# ---------------------------------------------------------------- WebSocket


def test_mqtt_over_websocket(broker, version):
    if not broker.supports("websocket") or "http" not in broker.listeners:
        pytest.skip("broker under test has no http listener")
    topic = uid("ws/")
    ws_sub = Client(broker.http, version, transport="websockets")
    ws_pub = Client(broker.http, version, transport="websockets")
    tcp_pub = Client(broker.mqtt, version)
    try:
        ws_sub.connect()
        ws_pub.connect()
        tcp_pub.connect()
        ws_sub.subscribe(topic, 2)
        for q in (0, 1, 2):
            ws_pub.publish(topic, BINARY + bytes([q]), qos=q)
            m = ws_sub.get()
            assert (m.topic, m.payload, m.qos) == (topic, BINARY + bytes([q]), q)
        tcp_pub.publish(topic, b"from-tcp", qos=1)
        m = ws_sub.get()
        assert (m.payload, m.qos) == (b"from-tcp", 1)
    finally:
        for c in (ws_sub, ws_pub, tcp_pub):
            c.close()

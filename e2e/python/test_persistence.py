"""Persistence (DESIGN.md "Persistence", issue 13): sessions, retained messages,
queued and in-flight QoS 1/2 messages and the last-value cache survive
`kill -9` of the real broker, restarted on the same data directory.

Real processes, real clients: paho for sessions and ordering, raw sockets for
the QoS 2 packet flows a library hides, curl-free HTTP for the last-value cache.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import mqttraw as raw
from broker import Broker, BrokerFailed
from clients import V5, V311, Client, uid
from conftest import launch, shutdown

CI = os.environ.get("CI") == "true"
# Crash iterations: a short CI run; the full one is documented in BENCHMARKS.md.
CRASH_ITERATIONS = int(os.environ.get("STARLING_CRASH_ITERATIONS", "6"))


def start(data, name, env=None, args=None) -> Broker:
    e = {"STARLING_DATA_DIR": str(data)}
    e.update(env or {})
    b = Broker(e, name, args=args)
    b.start()
    from conftest import _live  # noqa: PLC0415 - the suite's list of brokers to health-check

    _live.append(b)
    return b


def metric(b: Broker, name: str) -> float:
    host, port = b.listeners["admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(pred, what: str, timeout: float = 10.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def persistent(addr, version, cid, **kw) -> Client:
    if version == V5:
        return Client(addr, V5, client_id=cid, clean=False, session_expiry=3600, **kw)
    return Client(addr, V311, client_id=cid, clean=False, **kw)


@pytest.mark.parametrize("qos", [1, 2])
def test_offline_queue_survives_kill_9_in_order(tmp_path, version, qos):
    n = 300
    b = start(tmp_path, "persist-a")
    cid, topic = uid("psub"), f"{uid('p')}/x"
    sub = persistent(b.mqtt, version, cid).connect()
    sub.subscribe(topic, qos=qos)
    sub.disconnect()
    pub = Client(b.mqtt, version).connect()
    for i in range(n):
        pub.publish(topic, f"{i}", qos=qos)
    pub.disconnect()
    b.kill9()
    b2 = start(tmp_path, "persist-a2")
    assert "state restored from the store" in b2.stderr_text()
    sub = persistent(b2.mqtt, version, cid).connect()
    assert sub.session_present, "the session survived the crash"
    got = [sub.get(10) for _ in range(n)]
    assert [int(m.payload) for m in got] == list(range(n)), "all of them, in order"
    assert all(m.qos == qos for m in got)
    extra = sub.drain(0.5)
    assert extra == [], f"nothing more (QoS {qos}): {[m.payload for m in extra]}"
    # The subscription survived too: a new message still arrives.
    Client(b2.mqtt, version).connect().publish(topic, b"after", qos=qos)
    assert sub.get().payload == b"after"
    sub.disconnect()
    shutdown(b2)


def test_retained_and_last_values_survive_kill_9(tmp_path):
    b = start(tmp_path, "persist-r", env={"STARLING_STORAGE_LVC_INTERVAL": "1"})
    rt, lt = f"{uid('r')}/state", f"{uid('l')}/value"
    pub = Client(b.mqtt, V5).connect()
    pub.publish(rt, b"retained-1", qos=1, retain=True)
    pub.publish(rt, b"retained-2", qos=1, retain=True)
    cleared = f"{uid('r')}/gone"
    pub.publish(cleared, b"x", qos=1, retain=True)
    pub.publish(cleared, b"", qos=1, retain=True)
    before = metric(b, "starling_store_written_bytes_total")
    pub.publish(lt, b"last-value", qos=0)
    # The last-value cache is written every lvc_interval: wait for that write.
    wait_for(
        lambda: metric(b, "starling_store_written_bytes_total") > before,
        "the last-value cache to be written",
    )
    pub.disconnect()
    b.kill9()
    b2 = start(tmp_path, "persist-r2")
    c = Client(b2.mqtt, V5).connect()
    c.subscribe(rt, qos=1)
    m = c.get()
    assert (m.payload, m.retain) == (b"retained-2", True)
    c.subscribe(cleared, qos=1)
    assert c.drain(0.3) == [], "a cleared retained message stays cleared"
    host, port = b2.http
    with urllib.request.urlopen(f"http://{host}:{port}/broker/{lt}", timeout=5) as r:
        assert r.status == 200 and r.read() == b"last-value"
    c.disconnect()
    shutdown(b2)


def test_expired_sessions_and_messages_are_dropped_at_restart(tmp_path):
    b = start(tmp_path, "persist-e")
    short, long_ = uid("short"), uid("long")
    topic = f"{uid('e')}/x"
    s1 = Client(b.mqtt, V5, client_id=short, clean=False, session_expiry=1).connect()
    s1.subscribe(topic, qos=1)
    s1.disconnect()
    s2 = Client(b.mqtt, V5, client_id=long_, clean=False, session_expiry=3600).connect()
    s2.subscribe(topic, qos=1)
    s2.disconnect()
    pub = Client(b.mqtt, V5).connect()
    pub.publish(topic, b"expires", qos=1, properties=_expiry(1))
    pub.publish(topic, b"stays", qos=1)
    pub.disconnect()
    b.kill9()
    time.sleep(1.5)  # the expiry intervals themselves: nothing to poll for
    b2 = start(tmp_path, "persist-e2")
    s1 = Client(b2.mqtt, V5, client_id=short, clean=False, session_expiry=1).connect()
    assert not s1.session_present, "the 1 s session expired while the broker was down"
    s2 = Client(b2.mqtt, V5, client_id=long_, clean=False, session_expiry=3600).connect()
    assert s2.session_present
    assert [m.payload for m in [s2.get()] + s2.drain(0.3)] == [b"stays"], "the expired message is gone"
    s1.disconnect()
    s2.disconnect()
    shutdown(b2)


def _expiry(seconds: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    p = Properties(PacketTypes.PUBLISH)
    p.MessageExpiryInterval = seconds
    return p


def _raw_session(addr, cid, version=V5) -> raw.RawClient:
    c = raw.RawClient(addr, version)
    props = [(raw.P_SESSION_EXPIRY, 3600)] if version == V5 else None
    c.connect(cid, clean=False, connect_props=props)
    return c


@pytest.mark.parametrize("stage", ["sent", "pubrec"])
def test_outgoing_qos2_resumes_after_kill_9_without_duplicate(tmp_path, stage):
    """QoS 2 to a subscriber, interrupted by a crash: before the subscriber's
    PUBREC the message comes again with DUP and the same packet id; after it,
    only PUBREL comes (the message is not sent twice)."""
    b = start(tmp_path, f"persist-q2-{stage}")
    cid, topic = uid("q2"), f"{uid('q2')}/x"
    sub = _raw_session(b.mqtt, cid)
    sub.send(raw.subscribe(topic, 2, V5, pid=1))
    assert sub.expect(raw.SUBACK).fields["codes"] == [2]
    Client(b.mqtt, V5).connect().publish(topic, b"once", qos=2)
    p = sub.expect(raw.PUBLISH)
    pid = p.fields["pid"]
    if stage == "pubrec":
        sub.send(raw.ack(raw.PUBREC, pid, V5))
        assert sub.expect(raw.PUBREL).fields["pid"] == pid
    b.kill9()
    sub.close()
    b2 = start(tmp_path, f"persist-q2-{stage}-2")
    sub = _raw_session(b2.mqtt, cid)
    first = sub.read_packet()
    if stage == "sent":
        assert first.ptype == raw.PUBLISH, first
        assert (first.fields["pid"], first.fields["dup"], first.fields["payload"]) == (pid, True, b"once")
        sub.send(raw.ack(raw.PUBREC, pid, V5))
        assert sub.expect(raw.PUBREL).fields["pid"] == pid
    else:
        assert first.ptype == raw.PUBREL and first.fields["pid"] == pid, first
    sub.send(raw.ack(raw.PUBCOMP, pid, V5))
    with pytest.raises(TimeoutError):
        extra = sub.read_packet(0.5)
        pytest.fail(f"nothing more is sent, got {extra}")
    sub.close()
    # Completed: a restart does not bring it back.
    b2.kill9()
    b3 = start(tmp_path, f"persist-q2-{stage}-3")
    sub = _raw_session(b3.mqtt, cid)
    with pytest.raises(TimeoutError):
        extra = sub.read_packet(0.5)
        pytest.fail(f"a completed QoS 2 delivery is not resent, got {extra}")
    sub.close()
    shutdown(b3)


def test_incoming_qos2_is_not_routed_twice_across_kill_9(tmp_path):
    """A publisher's QoS 2 PUBLISH was PUBRECed, then the broker crashed: the
    publisher resends it with DUP after reconnecting; it is not delivered again."""
    b = start(tmp_path, "persist-in2")
    topic = f"{uid('in2')}/x"
    scid = uid("in2sub")
    sub = persistent(b.mqtt, V5, scid).connect()
    sub.subscribe(topic, qos=2)
    sub.disconnect()
    pcid = uid("in2pub")
    pub = _raw_session(b.mqtt, pcid)
    pub.send(raw.publish(topic, b"exactly-once", V5, qos=2, pid=7))
    assert pub.expect(raw.PUBREC).fields["pid"] == 7
    b.kill9()
    pub.close()
    b2 = start(tmp_path, "persist-in2-2")
    pub = _raw_session(b2.mqtt, pcid)
    dup = bytearray(raw.publish(topic, b"exactly-once", V5, qos=2, pid=7))
    dup[0] |= 0x08
    pub.send(bytes(dup))
    assert pub.expect(raw.PUBREC).fields["pid"] == 7
    pub.send(raw.ack(raw.PUBREL, 7, V5))
    comp = pub.expect(raw.PUBCOMP)
    assert comp.fields["pid"] == 7 and comp.fields["reason"] == 0, "the id was known: it survived"
    sub = persistent(b2.mqtt, V5, scid).connect()
    got = [sub.get()] + sub.drain(0.5)
    assert [m.payload for m in got] == [b"exactly-once"]
    pub.close()
    sub.disconnect()
    shutdown(b2)


def test_will_of_a_client_connected_at_the_crash_is_published_after_restart(tmp_path):
    b = start(tmp_path, "persist-will")
    wt = f"{uid('will')}/status"
    watcher = uid("watch")
    w = persistent(b.mqtt, V5, watcher).connect()
    w.subscribe(wt, qos=1)
    w.disconnect()
    dying = Client(
        b.mqtt, V5, client_id=uid("dying"), clean=False, session_expiry=3600,
        will={"topic": wt, "payload": b"offline", "qos": 1},
    ).connect()
    b.kill9()
    dying.abort()
    b2 = start(tmp_path, "persist-will-2")
    w = persistent(b2.mqtt, V5, watcher).connect()
    assert w.get().payload == b"offline", "the crash lost the client's connection: its will goes out"
    w.disconnect()
    shutdown(b2)


def test_fan_out_to_many_persistent_sessions_writes_the_payload_once(tmp_path):
    sessions, size = 200, 20_000
    b = start(tmp_path, "persist-fan", env={"STARLING_LIMITS_MAX_PERSISTENT_SESSIONS": "1000"})
    topic = f"{uid('fan')}/x"
    for i in range(sessions):
        c = Client(b.mqtt, V5, client_id=f"fan-{i}", clean=False, session_expiry=3600).connect()
        c.subscribe(topic, qos=1)
        c.disconnect()
    before = metric(b, "starling_store_written_bytes_total")
    Client(b.mqtt, V5).connect().publish(topic, os.urandom(size), qos=1)
    written = wait_for(
        lambda: (metric(b, "starling_store_written_bytes_total") - before) or None,
        "the publish to be written",
    )
    # One payload, plus a small queue entry per session (key + ~16 bytes).
    assert size <= written < size + sessions * 64, f"{written} bytes written for one {size}-byte message"
    shutdown(b)


def test_journal_cut_short_keeps_its_consistent_prefix(tmp_path):
    """What a crash leaves: the journal's last batch cut off. The broker starts
    with every whole batch before it."""
    b = start(tmp_path, "persist-cut")
    topic = f"{uid('cut')}/x"
    pub = Client(b.mqtt, V5).connect()
    pub.publish(topic, b"first", qos=1, retain=True)
    pub.publish(f"{topic}/2", b"second", qos=1, retain=True)
    pub.disconnect()
    b.kill9()
    (jnl,) = (tmp_path / "store").glob("*.jnl")
    data = jnl.read_bytes().rstrip(b"\0")
    # Cut into the last batch (the second retained message).
    jnl.write_bytes(data[:-3])
    b2 = start(tmp_path, "persist-cut-2")
    c = Client(b2.mqtt, V5).connect()
    c.subscribe(f"{topic}/#", qos=1)
    got = sorted(m.payload for m in [c.get()] + c.drain(0.3))
    assert got == [b"first"], got
    c.disconnect()
    shutdown(b2)


@pytest.mark.parametrize("damage", ["version", "manifest"])
def test_damaged_store_refuses_to_start_and_recover_store_starts(tmp_path, damage):
    b = start(tmp_path, f"persist-bad-{damage}")
    topic = f"{uid('bad')}/x"
    Client(b.mqtt, V5).connect().publish(topic, b"kept", qos=1, retain=True)
    shutdown(b)
    store = tmp_path / "store"
    if damage == "version":
        (store / "version").write_bytes(b"\xff\xff\xff\xff")
    else:
        for current in (store / "keyspaces").glob("*/current"):
            current.write_bytes(b"damaged")
    refused = Broker({"STARLING_DATA_DIR": str(tmp_path)}, f"persist-bad-{damage}-2")
    with pytest.raises(BrokerFailed):
        refused.start()
    text = refused.stderr_text()
    assert f"the store in {store} cannot be opened" in text, text[-2000:]
    assert "--recover-store" in text, "the error names the flag that recovers"
    assert "panicked" not in text
    b3 = start(tmp_path, f"persist-bad-{damage}-3", args=["--recover-store"])
    assert "moves the original aside" in b3.stderr_text()
    assert list(tmp_path.glob("store.damaged-*")), "the damaged store is kept for inspection"
    c = Client(b3.mqtt, V5).connect()
    c.subscribe(f"{topic}/other", qos=1)
    c.publish(f"{topic}/other", b"serving", qos=1)
    assert c.get().payload == b"serving", "the recovered broker serves"
    c.disconnect()
    shutdown(b3)


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_full_disk_refuses_qos1_with_0x97_keeps_qos0_and_recovers(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "24m"):
        msg = "NOT RUN: cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN) to fill a disk"
        print(msg)
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    b = None
    try:
        # Queue caps above the disk's size, so the disk fills before they do.
        b = start(
            mnt / "data",
            "persist-full",
            env={
                "STARLING_LIMITS_MAX_QUEUED_BYTES": str(512 * 1024 * 1024),
                "STARLING_LIMITS_MAX_QUEUED_MESSAGES": "100000",
            },
        )
        topic = f"{uid('full')}/x"
        keeper = persistent(b.mqtt, V5, uid("keeper")).connect()
        keeper.subscribe(topic, qos=1)
        keeper.disconnect()
        live = Client(b.mqtt, V5).connect()
        live.subscribe(f"{topic}/q0", qos=0)
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        pub = raw.RawClient(b.mqtt, V5)
        pub.connect(uid("fullpub"))
        big = os.urandom(256 * 1024)
        refused = None
        for i in range(1, 200):
            try:
                pub.send(raw.publish(topic, big, V5, qos=1, pid=i))
                p = pub.read_packet(10)
            except raw.Closed:
                # The batch that hit the full disk: its PUBACK is withheld and
                # the connection closed (DISCONNECT 0x97); reconnect and go on.
                pub = raw.RawClient(b.mqtt, V5)
                pub.connect(uid("fullpub"))
                continue
            if p.ptype == raw.DISCONNECT:
                assert p.reason == 0x97, p.fields
                pub.close()
                pub = raw.RawClient(b.mqtt, V5)
                pub.connect(uid("fullpub"))
                continue
            assert p.ptype == raw.PUBACK, p
            if p.reason == 0x97:
                refused = i
                break
        assert refused, "the broker never refused a QoS 1 publish on a full disk"
        assert metric(b, "starling_store_refusals_total") >= 1
        assert metric(b, "starling_store_write_errors_total") >= 1
        # The HTTP interface says so too: a QoS 1 POST that could not be stored
        # is a 503. (A reopened store may fit a few more writes into what the
        # failed batch freed: those get their 200, until the disk is full again.)
        host, port = b.http
        statuses = []
        for _ in range(100):
            req = urllib.request.Request(
                f"http://{host}:{port}/broker/{topic}?qos=1", data=b"x" * 60_000, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
                assert e.code == 503, e.code
                assert "disk is full or failing" in e.read().decode()
                break
        assert statuses[-1] == 503, f"no QoS 1 POST was refused on a full disk: {statuses}"
        # QoS 0 keeps flowing meanwhile.
        side = Client(b.mqtt, V5).connect()
        side.publish(f"{topic}/q0", b"still here", qos=0)
        assert live.get().payload == b"still here"
        # Space again: the store reopens and QoS 1 is accepted again.
        filler.unlink()
        pid = 500

        def accepted():
            nonlocal pid
            pid += 1
            pub.send(raw.publish(topic, b"small", V5, qos=1, pid=pid))
            p = pub.expect(raw.PUBACK, 10)
            return p.reason == 0

        try:
            wait_for(accepted, "QoS 1 publishes to be accepted once the disk has room", timeout=15, every=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\nbroker stderr:\n{b.stderr_tail(30)}") from None
        pub.close()
        side.disconnect()
        live.disconnect()
        b.check_alive()
    finally:
        if b is not None:
            shutdown(b)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class _Publisher:
    """Publishes sequence numbers at QoS `qos` as fast as acks come, recording
    which ones the broker acknowledged (PUBACK / PUBCOMP)."""

    def __init__(self, addr, topic, qos, start_at):
        self.acked: set[int] = set()
        self.topic, self.qos, self.next = topic, qos, start_at
        self.stop = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uid("crashpub"), protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(20)
        self.mids: dict[int, int] = {}
        self.early: set[int] = set()
        self.lock = threading.Lock()
        self.c.on_publish = self._on_publish
        self.c.connect(*addr)
        self.c.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.lock:
            seq = self.mids.pop(mid, None)
            if reason_code.is_failure:
                return
            if seq is None:
                # Acknowledged before run() recorded which message it was.
                self.early.add(mid)
            else:
                self.acked.add(seq)

    def run(self):
        while not self.stop.is_set():
            with self.lock:
                busy = len(self.mids) >= 20
            if busy:
                time.sleep(0.001)
                continue
            seq = self.next
            self.next += 1
            # Not under self.lock: paho calls on_publish holding its own lock.
            info = self.c.publish(self.topic, str(seq).encode(), qos=self.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            with self.lock:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self.acked.add(seq)
                else:
                    self.mids[info.mid] = seq

    def close(self):
        self.stop.set()
        self.c.loop_stop()


@pytest.mark.parametrize("qos", [1, 2])
def test_crash_at_random_points_loses_nothing_acknowledged(tmp_path, qos):
    rng = random.Random(int(os.environ.get("STARLING_CRASH_SEED", "1") + str(qos)))
    topic = f"{uid('crash')}/x"
    scid = uid("crashsub")
    # Queue caps out of the way: a full queue drops by design, which is not
    # what this test is about.
    env = {
        "STARLING_LIMITS_MAX_QUEUED_MESSAGES": "10000000",
        "STARLING_LIMITS_MAX_QUEUED_BYTES": str(1 << 30),
    }
    b = start(tmp_path, "persist-crash-0", env=env)
    sub = persistent(b.mqtt, V5, scid).connect()
    sub.subscribe(topic, qos=qos)
    sub.disconnect()
    acked: set[int] = set()
    nxt = 0
    for it in range(CRASH_ITERATIONS):
        p = _Publisher(b.mqtt, topic, qos, nxt)
        t = threading.Thread(target=p.run, daemon=True)
        t.start()
        # Kill at a random point once it is publishing.
        wait_for(lambda: len(p.acked) > 0, "the first acknowledgement")
        time.sleep(rng.uniform(0.0, 0.4))
        b.kill9()
        p.close()
        t.join(5)
        with p.lock:
            acked |= p.acked
            nxt = p.next
        b = start(tmp_path, f"persist-crash-{it + 1}", env=env)
    sub = persistent(b.mqtt, V5, scid).connect()
    got = []
    while True:
        try:
            got.append(int(sub.get(1.5).payload))
        except AssertionError:
            break
    received = set(got)
    lost = sorted(acked - received)
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:10]}"
    if qos == 2:
        dups = len(got) - len(received)
        assert dups == 0, f"{dups} QoS 2 duplicates"
    firsts = list(dict.fromkeys(got))
    assert firsts == sorted(firsts), "per-publisher order kept"
    print(f"crash run: {CRASH_ITERATIONS} kills, {len(acked)} acknowledged, {len(got)} delivered")
    sub.disconnect()
    shutdown(b)


def test_crash_with_the_subscriber_online_redelivers_what_was_in_flight(tmp_path):
    """The subscriber is connected and receiving when the broker dies: what
    it had not acknowledged comes again after the restart (QoS 1: at least
    once), nothing acknowledged to the publisher is lost, order is kept."""
    topic = f"{uid('online')}/x"
    scid = uid("onlinesub")
    env = {
        "STARLING_LIMITS_MAX_QUEUED_MESSAGES": "10000000",
        "STARLING_LIMITS_MAX_QUEUED_BYTES": str(1 << 30),
    }
    rng = random.Random(int(os.environ.get("STARLING_CRASH_SEED", "1")))
    b = start(tmp_path, "persist-online-0", env=env)
    sub = persistent(b.mqtt, V5, scid).connect()
    sub.subscribe(topic, qos=1)
    got: list[int] = []
    acked: set[int] = set()
    nxt = 0
    for it in range(max(2, CRASH_ITERATIONS // 2)):
        p = _Publisher(b.mqtt, topic, 1, nxt)
        t = threading.Thread(target=p.run, daemon=True)
        t.start()
        wait_for(lambda: len(p.acked) > 0, "the first acknowledgement")
        time.sleep(rng.uniform(0.05, 0.4))
        b.kill9()
        p.close()
        t.join(5)
        with p.lock:
            acked |= p.acked
            nxt = p.next
        sub.abort()
        got += [int(m.payload) for m in sub.drain(0.2)]
        b = start(tmp_path, f"persist-online-{it + 1}", env=env)
        sub = persistent(b.mqtt, V5, scid).connect()
        assert sub.session_present
    while True:
        try:
            got.append(int(sub.get(1.5).payload))
        except AssertionError:
            break
    lost = sorted(acked - set(got))
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:10]}"
    firsts = list(dict.fromkeys(got))
    assert firsts == sorted(firsts), "order kept"
    print(f"online crash run: {len(acked)} acknowledged, {len(got)} delivered ({len(got) - len(set(got))} again)")
    sub.disconnect()
    shutdown(b)

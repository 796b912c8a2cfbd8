"""Hostile clients against the real broker binary.

Each case asserts the protocol outcome of the attack itself AND that a
well-behaved client kept working meanwhile: a paho-mqtt client in its own
process (hostile.SideProbe) round-trips one QoS 1 message at a time on its own
topic during the whole test; every round trip must complete (within 5 s), the
p99 during the attack must stay under 1 s, and p50/p99/max are printed (run
with -s to see them, they are also in the failure message).

Memory and descriptor figures are read from /proc/<broker pid>.

Cases: 1 slowloris CONNECT; 2 sockets that never send CONNECT; 3 a CONNECT
length announced and never sent; 4 10,000 connect/disconnect cycles; 5 a
subscriber that never reads under a QoS 0/1 flood; 6 twenty `#` subscribers
on a busy broker; 7 repeated bad passwords (per username, per address);
8 invalid TLS handshakes; 9 PINGREQs forever without reading; 10 a QoS 0
publish flood to a topic nobody subscribes to.

Run alone: e2e/.venv/bin/python -m pytest e2e/python/test_hostile.py -s
(`e2e/run-python.sh FILE` always collects the whole e2e/python directory.)
"""

from __future__ import annotations

import os
import random
import select
import selectors
import socket
import ssl
import struct
import tempfile
import threading
import time

import pytest

import hostile as h
import mqttraw as raw
from broker import TARGET
from clients import V5, Client, uid
from conftest import launch, shutdown

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="hostile-client cases target Starling's limits")

CONNECT_TIMEOUT = 2
CT_ENV = {"STARLING_LIMITS_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT)}
# "closed at the connect timeout": after it, with slack for a loaded CI machine
AT_TIMEOUT = (CONNECT_TIMEOUT - 0.3, CONNECT_TIMEOUT + 2.0)
# "closed at once": well before the connect timeout could have done it
AT_ONCE = 1.0
# instant attacks are repeated this long so the side client is measured under them
ATTACK_SECONDS = 1.5


def log(msg: str) -> None:
    print(f"\n{msg}", flush=True)


@pytest.fixture
def probes():
    """Makes side probes (hostile.SideProbe); stops any still running at the end."""
    made: list[h.SideProbe] = []

    def make(addr, **kw) -> h.SideProbe:
        p = h.SideProbe(addr, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def raw_socket(addr, rcvbuf: int | None = None, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the start
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def connack_of(sock: socket.socket, version: int, timeout: float = 5.0) -> int:
    """Reads the CONNACK; returns its reason/return code."""
    fr = h.Frames()
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except socket.timeout:
            raise AssertionError("no CONNACK in time") from None
        if not data:
            raise AssertionError("closed before CONNACK")
        pkts = fr.feed(data)
        if pkts:
            ptype, _, body = pkts[0]
            assert ptype == raw.CONNACK, f"expected CONNACK, got type {ptype} {body!r}"
            return body[1]


# --------------------------------------------------------------- 1. slowloris


def test_slowloris_connect(run_broker, probes):
    """A CONNECT sent one byte per second is closed at the connect timeout
    (2 s), before it completes."""
    b = run_broker(CT_ENV, "slowloris")
    side = probes(b.mqtt)
    pkt = raw.connect(uid("slow"), raw.V311)
    s = raw_socket(b.mqtt)
    t0 = time.monotonic()
    sent, closed_at, how, got = 0, None, "", b""
    while sent < len(pkt):
        try:
            s.send(pkt[sent : sent + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            closed_at, how = time.monotonic(), "send failed (reset)"
            break
        r, _, _ = select.select([s], [], [], 1.0)  # one byte per second, or earlier if the broker acts
        if r:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                closed_at, how = time.monotonic(), "reset"
                break
            if not data:
                closed_at, how = time.monotonic(), "eof"
                break
            got += data
    t1 = time.monotonic()
    s.close()
    attack_end = time.monotonic()
    side.finish("slowloris", t0, attack_end, min_samples=5)
    assert closed_at is not None, (
        f"the broker let a {len(pkt)}-byte CONNECT trickle in at 1 byte/s for {t1 - t0:.1f}s "
        f"without closing (got {got!r})"
    )
    dt = closed_at - t0
    log(f"slowloris: closed ({how}) after {dt:.2f}s, {sent} of {len(pkt)} CONNECT bytes sent")
    assert got == b"", f"broker answered a partial CONNECT: {got!r}"
    assert sent < len(pkt), "the whole CONNECT was sent before the close"
    assert AT_TIMEOUT[0] <= dt <= AT_TIMEOUT[1], f"closed after {dt:.2f}s; connect timeout is {CONNECT_TIMEOUT}s"
    side.assert_ok()


# ------------------------------------------------------------- 2. no CONNECT


def test_sockets_that_never_send_connect(run_broker, probes):
    """200 sockets that connect and send nothing: every one is closed at the
    connect timeout, and the broker's descriptors go back to the baseline."""
    b = run_broker(CT_ENV, "silent")
    pid = b.proc.pid
    side = probes(b.mqtt)
    fd0 = h.fd_count(pid)
    n = 200
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    socks, opened_at, connect_times = [], {}, []
    for _ in range(n):
        t = time.monotonic()
        s = raw_socket(b.mqtt, timeout=10)
        opened_at[s] = time.monotonic()
        connect_times.append(opened_at[s] - t)
        socks.append(s)
    fd_peak = h.fd_count(pid)
    closed_at: dict[socket.socket, float] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + CONNECT_TIMEOUT + 8
    while len(closed_at) < n and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            assert data == b"", f"broker sent {data!r} to a socket that never sent CONNECT"
            closed_at[key.fileobj] = time.monotonic()
            sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    sel.close()
    attack_end = time.monotonic()
    fd1 = h.settle_fds(pid, fd0)
    side.finish("no-connect", t0, attack_end, min_samples=5)
    # each socket's life: from its TCP connect to the broker's close
    times = sorted(closed_at[s] - opened_at[s] for s in closed_at)
    log(
        f"no-connect: {len(closed_at)}/{n} closed, {times[0] if times else float('nan'):.2f}.."
        f"{times[-1] if times else float('nan'):.2f}s after their connect; broker fds {fd0} -> {fd_peak} (peak) "
        f"-> {fd1}; slowest TCP connect {max(connect_times):.3f}s"
        + (" (SYN retransmitted: the listen backlog overflowed)" if max(connect_times) > 0.9 else "")
    )
    assert len(closed_at) == n, f"{n - len(closed_at)} silent sockets still open {CONNECT_TIMEOUT + 8}s after connecting"
    assert AT_TIMEOUT[0] <= times[0] and times[-1] <= AT_TIMEOUT[1], (
        f"closed {times[0]:.2f}..{times[-1]:.2f}s after connecting; connect timeout {CONNECT_TIMEOUT}s"
    )
    assert fd1 <= fd0 + 3, f"broker fds {fd0} before, {fd1} after the silent sockets closed"
    side.assert_ok()


# ------------------------------------------------ 3. announced, never sent


V5_CONNECT_PREFIX = raw.mqtt_str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60)


def _announce_once(addr, announced: int) -> tuple[str, float, list]:
    s = raw_socket(addr)
    t0 = time.monotonic()
    try:
        s.sendall(b"\x10" + raw.varint(announced) + V5_CONNECT_PREFIX)
    except (BrokenPipeError, ConnectionResetError):
        pass
    how, seen = h.wait_eof(s, CONNECT_TIMEOUT + 6)
    dt = time.monotonic() - t0
    s.close()
    return how, dt, h.Frames().feed(seen)


@pytest.mark.parametrize(
    "announced,when",
    [
        (268_435_455, "at-once"),  # the largest remaining length: over max_packet_size (1 MiB)
        (100_000, "at-once"),  # under max_packet_size, over max_connect_packet_size (64 KiB)
        (60_000, "at-timeout"),  # a legal size that never arrives
    ],
    ids=["256MiB", "100KB", "60KB"],
)
def test_connect_length_announced_never_sent(run_broker, probes, announced, when):
    """A CONNECT fixed header announcing `announced` bytes, then the first 10
    body bytes and silence. Over the limits: closed at once (repeated for
    1.5 s); a legal size that never arrives: closed at the connect timeout."""
    b = run_broker(CT_ENV, "announce")
    pid = b.proc.pid
    side = probes(b.mqtt)
    rss0 = h.rss_kib(pid)
    t0 = time.monotonic()
    results = []
    while True:
        results.append(_announce_once(b.mqtt, announced))
        if when == "at-timeout" or time.monotonic() - t0 > ATTACK_SECONDS or results[-1][0] == "timeout":
            break
    t1 = time.monotonic()
    rss1 = h.rss_kib(pid)
    side.finish(f"announce-{announced}", t0, t1, min_samples=3)
    dts = sorted(r[1] for r in results)
    answers = sorted({str([(p[0], p[2].hex()) for p in r[2]]) for r in results})
    log(
        f"announce {announced}: {len(results)} attempt(s), outcomes {sorted({r[0] for r in results})}, "
        f"closed after {dts[0]:.3f}..{dts[-1]:.3f}s, broker sent {answers}; RSS {h.mib(rss0)} -> {h.mib(rss1)}"
    )
    for how, dt, pkts in results:
        assert how in ("eof", "reset"), f"{announced}-byte CONNECT announced: still open after {dt:.1f}s"
        # Before the close the broker may only say v5 CONNACK 0x95 (Packet too large).
        assert all(p[0] == raw.CONNACK and p[2][1:2] == b"\x95" for p in pkts), (
            f"unexpected answer before the close: {[(p[0], p[2]) for p in pkts]}"
        )
        if when == "at-once":
            assert dt < AT_ONCE, (
                f"CONNECT announcing {announced} bytes closed after {dt:.2f}s, not at once "
                f"(connect timeout {CONNECT_TIMEOUT}s)"
            )
        else:
            assert AT_TIMEOUT[0] <= dt <= AT_TIMEOUT[1], f"closed after {dt:.2f}s; connect timeout {CONNECT_TIMEOUT}s"
    side.assert_ok()


# ---------------------------------------------------- 4. connection churn


CHURN = 10_000
CHURN_WORKERS = 4
CHURN_RSS_GROWTH_MIB = 32
CHURN_FD_SLACK = 3


def _churn_worker(addr, start: int, count: int, errors: list, done: list):
    ok = 0
    for i in range(start, start + count):
        v = raw.V5 if i % 2 else raw.V311
        try:
            s = socket.create_connection(addr, timeout=5)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(raw.connect(f"churn{i}", v))
                rc = connack_of(s, v)
                if rc != 0:
                    errors.append(f"#{i}: CONNACK {rc:#x}")
                    continue
                s.sendall(raw.disconnect(v))
                how, rest = h.wait_eof(s, 5)
                if how != "eof" or rest:
                    errors.append(f"#{i}: after DISCONNECT: {how} {rest[:20]!r}")
                    continue
                ok += 1
            finally:
                s.close()
        except (OSError, AssertionError) as e:
            errors.append(f"#{i}: {e!r}")
        if len(errors) > 20:
            break
    done.append(ok)


def test_connection_churn(run_broker, probes):
    """10,000 CONNECT/CONNACK/DISCONNECT cycles, 4 at a time: all succeed, the
    broker's fd count is back to its baseline and RSS grew by < 32 MiB."""
    b = run_broker(None, "churn")
    pid = b.proc.pid
    side = probes(b.mqtt)
    fd0, rss0 = h.fd_count(pid), h.rss_kib(pid)
    conns0 = h.metric(b, "starling_connections")
    sampler = h.RssSampler(pid, 0.25)
    errors: list[str] = []
    done: list[int] = []
    per = CHURN // CHURN_WORKERS
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=_churn_worker, args=(b.mqtt, w * per, per, errors, done), daemon=True)
        for w in range(CHURN_WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(55)
    t1 = time.monotonic()
    rss_peak = sampler.stop()
    fd1 = h.settle_fds(pid, fd0)
    conns1 = h.wait_for(lambda: (lambda c: c if c <= conns0 else 0)(h.metric(b, "starling_connections")), 5)
    conns1 = conns1 or h.metric(b, "starling_connections")
    rss1 = h.rss_kib(pid)
    side.finish("churn", t0, t1)
    ok = sum(done)
    log(
        f"churn: {ok}/{CHURN} cycles in {t1 - t0:.1f}s ({ok / (t1 - t0):.0f}/s); broker fds {fd0} -> {fd1}; "
        f"connections gauge {conns0:.0f} -> {conns1:.0f}; RSS {h.mib(rss0)} -> peak {h.mib(rss_peak)} -> "
        f"after {h.mib(rss1)} (+{(rss1 - rss0) / 1024:.1f} MiB)"
    )
    assert not errors, f"{len(errors)} failed cycles, first: {errors[:5]}"
    assert ok == CHURN, f"only {ok} of {CHURN} cycles finished"
    assert abs(fd1 - fd0) <= CHURN_FD_SLACK, f"broker fds {fd0} before, {fd1} after {CHURN} closed connections"
    assert conns1 == conns0, f"starling_connections {conns0} before, {conns1} after"
    assert rss1 - rss0 < CHURN_RSS_GROWTH_MIB * 1024, (
        f"RSS grew by {(rss1 - rss0) / 1024:.1f} MiB over {CHURN} connections (bound {CHURN_RSS_GROWTH_MIB} MiB)"
    )
    side.assert_ok()


# ------------------------------------------- 5. a subscriber that never reads


FLOOD_ENV = {
    "STARLING_LIMITS_MAX_QUEUED_MESSAGES": "1000",
    "STARLING_LIMITS_MAX_QUEUED_BYTES": "1048576",
}
FLOOD_SECONDS = 5.0
FLOOD_RSS_GROWTH_MIB = 64
FLOOD_PAYLOAD = 1024
FLOOD_WINDOW = 32  # QoS 1 in flight, under the broker's Receive Maximum (64)


class Publisher:
    """Raw v5 publisher: QoS 0 and QoS 1 alternately, at most FLOOD_WINDOW
    QoS 1 in flight; a reader thread takes the PUBACKs."""

    def __init__(self, addr, topic: str):
        self.topic = topic
        self.s = raw_socket(addr, timeout=15)
        self.s.sendall(raw.connect(uid("flood"), raw.V5))
        rc = connack_of(self.s, raw.V5)
        assert rc == 0, f"publisher CONNACK {rc:#x}"
        self.window = threading.Semaphore(FLOOD_WINDOW)
        self.outstanding: set[int] = set()
        self.codes: dict[int, int] = {}
        self.acked = 0
        self.ended: str | None = None
        self.sent = {0: 0, 1: 0}
        self.max_stall = 0.0
        self.lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        fr = h.Frames()
        while True:
            try:
                data = self.s.recv(65536)
            except socket.timeout:
                continue  # the socket's timeout (15 s) is for the sender; keep reading
            except OSError as e:
                self.ended = f"read error {e!r}"
                break
            if not data:
                self.ended = self.ended or "EOF from broker"
                break
            for ptype, _, body in fr.feed(data):
                if ptype == raw.PUBACK:
                    pid = struct.unpack_from("!H", body, 0)[0]
                    code = body[2] if len(body) > 2 else 0
                    with self.lock:
                        self.codes[code] = self.codes.get(code, 0) + 1
                        self.acked += 1
                        self.outstanding.discard(pid)
                    self.window.release()
                elif ptype == raw.DISCONNECT:
                    self.ended = f"DISCONNECT {body[:1].hex()}"
                else:
                    self.ended = f"unexpected packet type {ptype}"

    def flood(self, seconds: float) -> None:
        payload = b"f" * FLOOD_PAYLOAD
        pid = 0
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and self.ended is None:
            qos = i % 2
            t = time.monotonic()
            if qos:
                if not self.window.acquire(timeout=15):
                    raise AssertionError(f"no PUBACK for 15 s with {FLOOD_WINDOW} in flight")
                pid = pid % 65535 + 1
                while pid in self.outstanding:
                    pid = pid % 65535 + 1
                with self.lock:
                    self.outstanding.add(pid)
            self.s.sendall(raw.publish(self.topic, payload, raw.V5, qos=qos, pid=pid))
            self.max_stall = max(self.max_stall, time.monotonic() - t)
            self.sent[qos] += 1
            i += 1

    def settle(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < self.sent[1] and time.monotonic() < deadline and self.ended is None:
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.s.sendall(raw.disconnect(raw.V5))
        except OSError:
            pass
        self.s.close()


def test_stalled_subscriber_flooded(run_broker, probes):
    """A v5 subscriber that never reads while a publisher floods QoS 0 and 1
    on its topic for 5 s: RSS stays within +64 MiB (queue caps 1000 messages /
    1 MiB), the publisher is never disconnected and every QoS 1 gets a
    successful PUBACK."""
    b = run_broker(FLOOD_ENV, "flood")
    pid = b.proc.pid
    side = probes(b.mqtt)
    topic = uid("flood/")
    sub = raw_socket(b.mqtt, rcvbuf=4096)
    sub.sendall(raw.connect(uid("stalled"), raw.V5))
    assert connack_of(sub, raw.V5) == 0
    sub.sendall(raw.subscribe(topic, 1, raw.V5))
    # SUBACK arrives; from now on this socket is never read
    sub.settimeout(5)
    first = sub.recv(64)
    assert first[:1] == b"\x90", f"expected SUBACK, got {first!r}"
    rss0 = h.rss_kib(pid)
    sampler = h.RssSampler(pid, 0.1)
    pub = Publisher(b.mqtt, topic)
    t0 = time.monotonic()
    pub.flood(FLOOD_SECONDS)
    t1 = time.monotonic()
    pub.settle()
    rss_peak = sampler.stop()
    dropped = {q: h.metric(b, "starling_messages_dropped_total", f'qos="{q}"') for q in (0, 1)}
    sub_state = h.TCP_STATES.get(h.tcp_state(sub), str(h.tcp_state(sub)))
    ended = pub.ended
    pub.close()
    sub.close()
    side.finish("flood", t0, t1)
    rate = (pub.sent[0] + pub.sent[1]) / (t1 - t0)
    log(
        f"flood: sent qos0={pub.sent[0]} qos1={pub.sent[1]} in {t1 - t0:.1f}s ({rate:.0f}/s, "
        f"{FLOOD_PAYLOAD} B payload); PUBACKs {pub.acked} codes {pub.codes}; longest publisher stall "
        f"{pub.max_stall:.2f}s; dropped qos0={dropped[0]:.0f} qos1={dropped[1]:.0f}; stalled subscriber "
        f"socket {sub_state}; broker RSS {h.mib(rss0)} -> peak {h.mib(rss_peak)} (+{(rss_peak - rss0) / 1024:.1f} MiB)"
    )
    assert ended is None, f"the publisher was disconnected: {ended}"
    assert pub.acked == pub.sent[1], f"{pub.sent[1] - pub.acked} of {pub.sent[1]} QoS 1 publishes never acknowledged"
    assert all(c < 0x80 for c in pub.codes), f"refused PUBACKs: {pub.codes}"
    assert rss_peak - rss0 < FLOOD_RSS_GROWTH_MIB * 1024, (
        f"broker RSS grew {(rss_peak - rss0) / 1024:.1f} MiB (bound {FLOOD_RSS_GROWTH_MIB}) behind a stalled subscriber"
    )
    assert pub.sent[0] > 2000 and pub.sent[1] > 2000, f"flood too small to fill the caps: {pub.sent}"
    side.assert_ok()


# ------------------------------------------------------ 6. '#' subscribers


WILDCARD_SUBS = 20
BUSY_RATE = 400  # messages per second
BUSY_SECONDS = 4.0


def test_hash_subscribers_on_a_busy_broker(run_broker, probes):
    """20 reading `#` subscribers while a publisher sends 400 msg/s for 4 s:
    every subscriber gets every message, in order; the side client is fine."""
    b = run_broker(None, "busy")
    side = probes(b.mqtt)
    base = uid("busy/")
    subs = []
    for i in range(WILDCARD_SUBS):
        s = raw_socket(b.mqtt)
        s.sendall(raw.connect(uid("hash"), raw.V311))
        assert connack_of(s, raw.V311) == 0
        s.sendall(raw.subscribe("#", 0, raw.V311, pid=1))
        subs.append(s)
    got: dict[int, list[int]] = {i: [] for i in range(WILDCARD_SUBS)}
    lat: list[float] = []
    subacked: set[int] = set()
    ended: dict[int, str] = {}
    stop = threading.Event()
    all_subacked = threading.Event()
    sentinel = f"{base}/end".encode()
    finished: set[int] = set()
    all_finished = threading.Event()

    def reader():
        sel = selectors.DefaultSelector()
        frames = {}
        for i, s in enumerate(subs):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
            frames[i] = h.Frames()
        prefix = f"{base}/m".encode()
        while not stop.is_set() and len(finished) < WILDCARD_SUBS:
            for key, _ in sel.select(timeout=0.2):
                i = key.data
                try:
                    data = key.fileobj.recv(262144)
                except BlockingIOError:
                    continue
                except OSError as e:
                    data, ended[i] = b"", repr(e)
                if not data:
                    ended.setdefault(i, "EOF")
                    sel.unregister(key.fileobj)
                    continue
                now = time.monotonic()
                for ptype, flags, body in frames[i].feed(data):
                    if ptype == raw.SUBACK:
                        if body[2:] != b"\x00":
                            ended[i] = f"SUBACK for # {body!r}"
                        subacked.add(i)
                        if len(subacked) == WILDCARD_SUBS:
                            all_subacked.set()
                    elif ptype == raw.PUBLISH:
                        topic, payload = h.publish_topic_payload(flags, body, raw.V311)
                        if topic == prefix:
                            seq, sent_at = payload.split(b" ")
                            got[i].append(int(seq))
                            lat.append(now - float(sent_at))
                        elif topic == sentinel:
                            finished.add(i)
                            if len(finished) == WILDCARD_SUBS:
                                all_finished.set()
        sel.close()

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    assert all_subacked.wait(10), f"SUBACK for # on {len(subacked)}/{WILDCARD_SUBS} subscribers"
    pub = Client(b.mqtt, V5)
    pub.connect()
    t0 = time.monotonic()
    n = int(BUSY_RATE * BUSY_SECONDS)
    topic = f"{base}/m"
    for i in range(n):
        due = t0 + i / BUSY_RATE
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the publisher's steady rate
        pub.c.publish(topic, f"{i} {time.monotonic():.6f}".encode(), qos=0)
    pub.publish(f"{base}/end", b"end", qos=1)
    t1 = time.monotonic()
    all_finished.wait(15)
    stop.set()
    rt.join(5)
    pub.close()
    for s in subs:
        s.close()
    side.finish("hash-subscribers", t0, t1)
    d = h.stats(lat)
    counts = sorted(len(v) for v in got.values())
    log(
        f"hash-subscribers: {n} messages at {n / (t1 - t0):.0f}/s to {WILDCARD_SUBS} '#' subscribers; "
        f"received per subscriber min {counts[0]} max {counts[-1]}; publish->'#' delivery latency {d}"
    )
    assert not ended, f"subscribers closed: {ended}"
    for i, seqs in got.items():
        assert seqs == list(range(n)), (
            f"'#' subscriber {i}: got {len(seqs)} of {n} messages"
            + (f", first missing {sorted(set(range(n)) - set(seqs))[:10]}" if len(seqs) < n else ", out of order")
        )
    assert len(finished) == WILDCARD_SUBS, f"sentinel reached {len(finished)}/{WILDCARD_SUBS} subscribers"
    side.assert_ok()


# ------------------------------------------------- 7. bad passwords (auth)


BROKER_NAME = "hostile-e2e"


def _bundle(path: str, tokens: list[str]) -> dict[str, str]:
    import base64
    import hashlib
    import hmac
    import json
    import uuid

    key = os.urandom(32)
    secrets = {}
    toks = []
    for name in tokens:
        secret = f"{name}-{uuid.uuid4().hex}"
        secrets[name] = secret
        digest = hmac.new(key, secret.encode(), hashlib.sha256).digest()
        toks.append({"name": name, "secret_hash": base64.b64encode(digest).decode()})
    doc = {
        "version": 1,
        "broker": BROKER_NAME,
        "hash_key": base64.b64encode(key).decode(),
        "tokens": toks,
        "acls": [
            {
                "name": "everyone",
                "tokens": tokens,
                "rules": [{"topics": ["side/#"], "actions": ["publish", "subscribe"], "effect": "allow"}],
            }
        ],
    }
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)
    return secrets


def _try_connect(addr, username: str, password: str) -> int:
    s = raw_socket(addr)
    try:
        s.sendall(h.connect_packet(raw.V5, uid("auth"), username, password))
        return connack_of(s, raw.V5)
    finally:
        s.close()


BAD_CREDENTIALS_V5 = 0x86
RATE_LIMITED_V5 = 0x9F


def test_bad_passwords_limit_that_username_only(run_broker, probes):
    """Contract defect 10: 10 bad CONNECTs as "mallory" from 127.0.0.1 → the
    11th mallory attempt gets 0x9F even with mallory's good secret; alice from
    the same address still connects; the side client (token "side") is fine."""
    with tempfile.TemporaryDirectory(prefix="starling-hostile-auth-") as d:
        path = os.path.join(d, "bundle.json")
        secrets = _bundle(path, ["mallory", "alice", "side"])
        b = run_broker({"STARLING_AUTH_BUNDLE": path, "STARLING_BROKER_NAME": BROKER_NAME}, "badpw")
        side = probes(b.mqtt, username="side", password=secrets["side"])
        t0 = time.monotonic()
        codes = [_try_connect(b.mqtt, "mallory", f"wrong-{i}-{os.urandom(4).hex()}") for i in range(10)]
        eleventh = _try_connect(b.mqtt, "mallory", secrets["mallory"])
        alice = _try_connect(b.mqtt, "alice", secrets["alice"])
        t1 = time.monotonic()
        side.finish("bad-passwords", t0, t1, min_samples=0)
        log(
            f"bad-passwords: mallory x10 wrong -> {[hex(c) for c in codes]}; mallory good secret -> {eleventh:#x}; "
            f"alice good secret -> {alice:#x}"
        )
        assert codes == [BAD_CREDENTIALS_V5] * 10, f"the 10 bad passwords got {[hex(c) for c in codes]}"
        assert eleventh == RATE_LIMITED_V5, f"11th mallory CONNECT (good secret) got {eleventh:#x}, want 0x9f"
        assert alice == 0, f"alice (good secret, same address) got CONNACK {alice:#x} after mallory's failures"
        side.assert_ok()


def test_bad_passwords_address_ceiling(run_broker, probes):
    """100 failures from one address with 100 different usernames → from then
    on every username from that address gets 0x9F (spec item 10, 2nd half)."""
    with tempfile.TemporaryDirectory(prefix="starling-hostile-auth-") as d:
        path = os.path.join(d, "bundle.json")
        secrets = _bundle(path, ["alice", "side"])
        b = run_broker({"STARLING_AUTH_BUNDLE": path, "STARLING_BROKER_NAME": BROKER_NAME}, "badpw-ceiling")
        side = probes(b.mqtt, username="side", password=secrets["side"])
        t0 = time.monotonic()
        codes = [_try_connect(b.mqtt, f"spray{i}", "wrong") for i in range(100)]
        alice = _try_connect(b.mqtt, "alice", secrets["alice"])
        t1 = time.monotonic()
        side.finish("bad-passwords-ceiling", t0, t1, min_samples=0)
        first_limited = next((i for i, c in enumerate(codes) if c == RATE_LIMITED_V5), None)
        log(f"address ceiling: first 0x9F at failure #{first_limited}; codes {sorted(set(hex(c) for c in codes))}; "
            f"alice afterwards -> {alice:#x}")
        assert codes == [BAD_CREDENTIALS_V5] * 100, (
            f"100 distinct usernames: first 0x9F at attempt #{first_limited} (want 100 × 0x86)"
        )
        assert alice == RATE_LIMITED_V5, f"after 100 failures from the address alice got {alice:#x}, want 0x9f"
        side.assert_ok()


# ----------------------------------------------------------------- 8. TLS


@pytest.fixture(scope="module")
def tls_broker():
    with tempfile.TemporaryDirectory(prefix="starling-hostile-tls-") as d:
        files = h.make_tls_files(d)
        env = dict(CT_ENV)
        env.update(
            {
                "STARLING_TLS_CERT": files["cert"],
                "STARLING_TLS_KEY": files["key"],
                "STARLING_MQTTS_BIND": "127.0.0.1:0",
                "STARLING_HTTPS_BIND": "127.0.0.1:0",
            }
        )
        b = launch(env, "hostile-tls")
        b.tls_files = files
        assert "mqtts" in b.listeners, f"no mqtts listener in the banner: {b.stdout_lines}"
        try:
            yield b
        finally:
            shutdown(b)


def good_tls_client(b) -> None:
    """paho with the test CA connects to mqtts and round-trips a message."""
    c = Client(b.listeners["mqtts"], V5)
    c.c.tls_set(ca_certs=b.tls_files["ca"])
    try:
        c.connect()
        t = uid("side/tls/")
        c.subscribe(t, 1)
        c.publish(t, b"tls-ok", qos=1)
        assert c.get().payload == b"tls-ok"
    finally:
        c.close()


def _alerts(seen: bytes) -> list[str]:
    out = []
    for ctype, ver, payload in h.tls_records(seen):
        if ctype == 21 and len(payload) >= 2:
            out.append(f"alert level {payload[0]} {h.TLS_ALERTS.get(payload[1], payload[1])}")
        else:
            out.append(f"record type {ctype} version {ver:#06x} ({len(payload)} B)")
    return out


TLS_CASES = ["garbage", "plaintext-mqtt", "tls10-hello", "no-sni", "half-hello-stall", "hello-then-stall"]
TLS10_OK_ALERTS = ("protocol_version", "handshake_failure")


def _tls_bad_once(addr, case: str, i: int) -> tuple[str, float, list[str], str]:
    s = raw_socket(addr)
    note = ""
    if case == "garbage":
        data = b"\x47" + random.Random(i).randbytes(511)  # first byte is no TLS content type
    elif case == "plaintext-mqtt":
        data = raw.connect(uid("plain"), raw.V5)
    else:
        data, note = h.tls10_client_hello() if i % 2 == 0 else (h.crafted_tls10_client_hello(), "hand-crafted record")
    t0 = time.monotonic()
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    how, seen = h.wait_eof(s, CONNECT_TIMEOUT + 6)
    dt = time.monotonic() - t0
    s.close()
    return how, dt, _alerts(seen), note


def _tls_no_sni_once(b) -> tuple[float, str, int]:
    # Clients that connect by IP address never send SNI; the broker serves its one certificate anyway.
    s = raw_socket(b.listeners["mqtts"])
    t0 = time.monotonic()
    ctx = ssl.create_default_context(cafile=b.tls_files["ca"])
    ctx.check_hostname = False
    tls = ctx.wrap_socket(s, server_hostname=None)
    dt = time.monotonic() - t0
    try:
        tls.sendall(raw.connect(uid("nosni"), raw.V5))
        rc = connack_of(tls, raw.V5)
        tls.sendall(raw.disconnect(raw.V5))
        return dt, f"{tls.version()} {tls.cipher()[0]}", rc
    finally:
        tls.close()


@pytest.mark.parametrize("case", TLS_CASES)
def test_invalid_tls_handshakes(tls_broker, probes, case):
    """Against the mqtts listener (handshake timeout = connect timeout, 2 s):
    garbage, plaintext MQTT and TLS 1.0-only ClientHellos are refused with a
    fatal alert and closed at once (repeated for 1.5 s); a handshake without
    SNI succeeds (IP-address clients never send one); half a ClientHello, or
    a whole one and then silence, is closed at the handshake timeout. A paho
    client with the CA connects afterwards; the side client (over TLS) is fine."""
    b = tls_broker
    addr = b.listeners["mqtts"]
    side = probes(addr, ca=b.tls_files["ca"])
    t0 = time.monotonic()
    if case in ("garbage", "plaintext-mqtt", "tls10-hello"):
        results = []
        while time.monotonic() - t0 < ATTACK_SECONDS or len(results) < 2:
            results.append(_tls_bad_once(addr, case, len(results)))
            if results[-1][0] == "timeout":
                break
        t1 = time.monotonic()
        seen = {}
        for how, dt, alerts, note in results:
            seen.setdefault((how, str(alerts), note), []).append(dt)
        log(f"tls {case}: {len(results)} attempts: " + "; ".join(
            f"{n or 'as is'}: {how} after {min(d):.3f}..{max(d):.3f}s x{len(d)}, broker sent {a}"
            for (how, a, n), d in seen.items()))
        for how, dt, alerts, note in results:
            assert how in ("eof", "reset"), f"{case}: still open after {dt:.1f}s"
            assert dt < AT_ONCE, f"{case}: closed after {dt:.2f}s, not at once (handshake timeout {CONNECT_TIMEOUT}s)"
            assert len(alerts) == 1 and alerts[0].startswith("alert level 2"), (
                f"{case}: broker sent {alerts} before closing, want one fatal alert"
            )
            if case == "tls10-hello":
                assert any(a in alerts[0] for a in TLS10_OK_ALERTS), f"TLS 1.0 ClientHello ({note}) answered with {alerts}"
    elif case == "no-sni":
        results = []
        while time.monotonic() - t0 < ATTACK_SECONDS or len(results) < 2:
            results.append(_tls_no_sni_once(b))
        t1 = time.monotonic()
        log(f"tls no-sni: {len(results)} handshakes ({results[0][1]}), {max(r[0] for r in results):.3f}s at most; "
            f"CONNACK codes {sorted({r[2] for r in results})}")
        assert all(r[2] == 0 for r in results), f"no-SNI TLS client: CONNACK codes {[r[2] for r in results]}"
    else:
        s = raw_socket(addr)
        hello = h.modern_client_hello("localhost")
        s.sendall(hello[: len(hello) // 2] if case == "half-hello-stall" else hello)
        how, seen = h.wait_eof(s, CONNECT_TIMEOUT + 6)
        dt = time.monotonic() - t0
        t1 = time.monotonic()
        s.close()
        recs = _alerts(seen)
        log(f"tls {case}: {how} after {dt:.2f}s; broker sent {recs}")
        assert how in ("eof", "reset"), f"{case}: stalled handshake still open after {dt:.1f}s"
        assert AT_TIMEOUT[0] <= dt <= AT_TIMEOUT[1], f"{case}: closed after {dt:.2f}s; handshake timeout {CONNECT_TIMEOUT}s"
        if case == "half-hello-stall":
            assert seen == b"", f"broker answered half a ClientHello: {recs}"
        else:
            assert seen[:1] == b"\x16", f"no ServerHello to a full ClientHello: {recs}"
    good_tls_client(b)
    side.finish(f"tls-{case}", t0, t1, min_samples=3)
    side.assert_ok()


# ------------------------------------------------ 9. PINGREQ, never reading


PING_SECONDS = 5.0
PING_RSS_GROWTH_MIB = 32


def test_pingreq_flood_without_reading(run_broker, probes):
    """A v5 client that sends PINGREQs as fast as it can and never reads.
    Within 5 s the broker must either disconnect it or backpressure it (its
    sends stop being accepted), and its RSS must stay within +32 MiB. (The
    documented disconnect of a client that does not read is after 30 s of
    write stall, too slow to wait for here.)"""
    b = run_broker(None, "pinger")
    pid = b.proc.pid
    side = probes(b.mqtt)
    fd0 = h.fd_count(pid)
    s = raw_socket(b.mqtt, rcvbuf=4096)
    s.sendall(raw.connect(uid("pinger"), raw.V5, keepalive=60))
    assert connack_of(s, raw.V5) == 0
    rss0 = h.rss_kib(pid)
    sampler = h.RssSampler(pid, 0.1)
    s.setblocking(False)
    chunk = raw.pingreq() * 4096
    total = 0
    progress: list[tuple[float, int]] = []
    ended = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < PING_SECONDS:
        try:
            n = s.send(chunk[total % len(chunk) :])  # a partial send goes on where it stopped
            total += n
            progress.append((time.monotonic(), total))
        except BlockingIOError:
            select.select([], [s], [], 0.05)
        except (BrokenPipeError, ConnectionResetError) as e:
            ended = f"{e.__class__.__name__} after {time.monotonic() - t0:.2f}s"
            break
    t1 = time.monotonic()
    rss_peak = sampler.stop()
    state = h.tcp_state(s)
    accepted_last_2s = total - max([v for (t, v) in progress if t <= t1 - 2.0] or [0])
    stalled_at = next((t - t0 for (t, v) in progress if v == total), None)
    s.close()  # unread PINGRESPs: the kernel resets the connection
    fd1 = h.settle_fds(pid, fd0)
    side.finish("pingreq-flood", t0, t1)
    log(
        f"pingreq flood: {total} bytes ({total // 2} PINGREQs) accepted in {t1 - t0:.1f}s; sends accepted in the "
        f"last 2 s: {accepted_last_2s} B; last progress at {stalled_at if stalled_at is None else round(stalled_at, 2)}s; "
        f"ended: {ended}; TCP state {h.TCP_STATES.get(state, state)}; broker RSS {h.mib(rss0)} -> peak "
        f"{h.mib(rss_peak)} (+{(rss_peak - rss0) / 1024:.1f} MiB); broker fds {fd0} -> {fd1} after close"
    )
    assert rss_peak - rss0 < PING_RSS_GROWTH_MIB * 1024, (
        f"broker RSS grew {(rss_peak - rss0) / 1024:.1f} MiB under a PINGREQ flood that never reads"
    )
    disconnected = ended is not None or state in (7, 8)
    assert disconnected or accepted_last_2s == 0, (
        f"neither disconnected nor backpressured: {accepted_last_2s} bytes of PINGREQ accepted in the last 2 s"
    )
    assert fd1 <= fd0 + 2, f"broker fds {fd0} before, {fd1} after the pinger closed"
    side.assert_ok()


# ------------------------------------ 10. QoS 0 flood to a topic nobody reads


QOS0_BURSTS = 4
QOS0_BURST_SECONDS = 1.25
QOS0_RSS_GROWTH_MIB = 32


def test_qos0_publish_flood_to_nobody(run_broker, probes):
    """One v5 client writes QoS 0 PUBLISHes (20-byte payload, a topic with no
    subscriber) as fast as the socket takes them, in 4 bursts of 1.25 s. The
    broker keeps serving everyone else (side client p99 < 1 s), its RSS
    stays within +32 MiB, and the flooder is not disconnected: a PINGREQ
    after each burst gets its PINGRESP once the backlog is worked through.
    (Several bursts because a starved neighbour depends on which tasks share
    the flooder's worker thread at the moment a burst starts.)"""
    b = run_broker(None, "qos0flood")
    pid = b.proc.pid
    side = probes(b.mqtt)
    s = raw_socket(b.mqtt, timeout=15)
    s.sendall(raw.connect(uid("q0flood"), raw.V5))
    assert connack_of(s, raw.V5) == 0
    one = raw.publish(uid("nobody/"), b"p" * 20, raw.V5, qos=0)
    chunk = one * 256
    rss0 = h.rss_kib(pid)
    sampler = h.RssSampler(pid, 0.1)
    total = 0
    ended = None
    bursts = []
    t0 = time.monotonic()
    for _ in range(QOS0_BURSTS):
        s.setblocking(False)
        start, sent0 = time.monotonic(), total
        while time.monotonic() - start < QOS0_BURST_SECONDS:
            try:
                total += s.send(chunk[total % len(chunk) :])
            except BlockingIOError:
                select.select([], [s], [], 0.05)
            except (BrokenPipeError, ConnectionResetError) as e:
                ended = repr(e)
                break
        if ended:
            break
        # finish the packet in progress, then ask for a PINGRESP: the broker has read everything before it
        s.settimeout(15)
        rest = (len(one) - total % len(one)) % len(one)
        try:
            s.sendall(chunk[total % len(chunk) :][:rest] + raw.pingreq())
            total += rest
            answer = h.Frames().feed(s.recv(16))
        except OSError as e:
            ended = repr(e)
            break
        bursts.append((total - sent0, time.monotonic() - start, [p[0] for p in answer]))
        if not answer or answer[0][0] != raw.PINGRESP:
            ended = f"PINGREQ after a burst answered with {answer}"
            break
    t1 = time.monotonic()
    rss_peak = sampler.stop()
    s.close()
    side.finish("qos0-flood", t0, t1)
    log(
        f"qos0 flood: {total / 1e6:.1f} MB ({total // len(one)} PUBLISHes) in {t1 - t0:.1f}s; bursts "
        f"(bytes, s until PINGRESP, answer): {[(n, round(d, 2), a) for n, d, a in bursts]}; ended: {ended}; "
        f"broker RSS {h.mib(rss0)} -> peak {h.mib(rss_peak)} (+{(rss_peak - rss0) / 1024:.1f} MiB)"
    )
    assert ended is None, f"the flooder was disconnected: {ended}"
    assert rss_peak - rss0 < QOS0_RSS_GROWTH_MIB * 1024, (
        f"broker RSS grew {(rss_peak - rss0) / 1024:.1f} MiB under a QoS 0 flood"
    )
    side.assert_ok()

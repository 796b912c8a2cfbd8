"""Debian's mosquitto_pub / mosquitto_sub (libmosquitto, a C client) against the
real broker, MQTT 3.1.1 and 5.0."""

import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from clients import V5, V311, uid

MOSQ_VERSIONS = ["mqttv311", "mqttv5"]
PAHO_OF = {"mqttv311": V311, "mqttv5": V5}
TIMEOUT = 10.0

if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
    pytest.skip(
        "mosquitto_pub/mosquitto_sub not installed (apt-get install mosquitto-clients; run-python.sh does)",
        allow_module_level=True,
    )


def hexs(b: bytes) -> str:
    return b.hex()


class MosqSub:
    """mosquitto_sub in the background; lines parsed as they come. `-d` gives
    the SUBACK line we wait for before publishing (no sleeps)."""

    def __init__(self, broker, version, topics, qos=0, extra=(), count=None, client_id=None):
        host, port = broker.mqtt
        # stdbuf: line-buffer stdout, or the SUBACK/debug lines sit in a pipe buffer
        self.cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", host, "-p", str(port), "-V", version, "-q", str(qos), "-d",
                    "-i", client_id or uid("ms"), "-F", "MSG %q %r %t %x"]
        for t in topics:
            self.cmd += ["-t", t]
        if count is not None:
            self.cmd += ["-C", str(count)]
        self.cmd += list(extra)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, deadline):
        try:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub: timed out; output so far:\n" + "\n".join(self.all)) from None
        if line is None:
            raise AssertionError(f"mosquitto_sub exited ({self.proc.wait()}):\n" + "\n".join(self.all))
        return line

    def wait_suback(self):
        deadline = time.monotonic() + TIMEOUT
        while "received SUBACK" not in self._next(deadline):
            pass

    def message(self, timeout=TIMEOUT):
        """(qos, retain, topic, payload) of the next message."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline)
            if line.startswith("MSG "):
                _, q, r, rest = line.split(" ", 3)
                topic, _, hx = rest.rpartition(" ")
                return int(q), r == "1", topic, bytes.fromhex(hx)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def mosq_pub(broker, version, topic, payload: bytes | None, qos=0, retain=False, extra=()):
    host, port = broker.mqtt
    cmd = ["mosquitto_pub", "-h", host, "-p", str(port), "-V", version, "-q", str(qos), "-t", topic,
           "-i", uid("mp")]
    if retain:
        cmd.append("-r")
    cmd += ["-s"] if payload else ["-n"]  # -n: zero-length payload
    cmd += list(extra)
    r = subprocess.run(cmd, input=payload or b"", capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: {r.stdout!r} {r.stderr!r}"


@pytest.fixture
def subs():
    made = []

    def make(*a, **kw):
        s = MosqSub(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_round_trip(broker, subs, ver, qos):
    topic = uid("mosq/") + "/ünï"
    payload = bytes(range(256)) + b"\n\x00end"
    sub = subs(broker, ver, [topic], qos=qos)
    sub.wait_suback()
    mosq_pub(broker, ver, topic, payload, qos=qos)
    assert sub.message() == (qos, False, topic, payload)


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
def test_mosquitto_qos_downgrade(broker, subs, ver):
    topic = uid("mosqd/")
    sub = subs(broker, ver, [topic], qos=1)
    sub.wait_suback()
    mosq_pub(broker, ver, topic, b"two", qos=2)
    assert sub.message() == (1, False, topic, b"two")
    mosq_pub(broker, ver, topic, b"zero", qos=0)
    assert sub.message() == (0, False, topic, b"zero")


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
def test_mosquitto_retained(broker, subs, ver):
    topic = uid("mosqr/")
    marker = uid("mosqr/")
    mosq_pub(broker, ver, topic, b"first", qos=1, retain=True)
    mosq_pub(broker, ver, topic, b"second", qos=1, retain=True)
    late = subs(broker, ver, [topic], qos=1, count=1)
    assert late.message() == (1, True, topic, b"second")
    assert late.proc.wait(TIMEOUT) == 0
    # an empty non-retained message does not clear it
    mosq_pub(broker, ver, topic, b"", qos=1)
    late2 = subs(broker, ver, [topic], qos=1, count=1)
    assert late2.message() == (1, True, topic, b"second")
    # a null retained message clears it
    mosq_pub(broker, ver, topic, None, qos=1, retain=True)
    mosq_pub(broker, ver, marker, b"marker", qos=1, retain=True)
    late3 = subs(broker, ver, [topic, marker], qos=1)
    assert late3.message() == (1, True, marker, b"marker")
    mosq_pub(broker, ver, topic, b"live", qos=1)
    assert late3.message() == (1, False, topic, b"live"), "retained message was not cleared"


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
def test_mosquitto_persistent_session(broker, subs, ver):
    topic = uid("mosqp/")
    cid = uid("mosqp")
    persist = ["-c"] + (["-x", "300"] if ver == "mqttv5" else [])
    first = subs(broker, ver, [topic], qos=1, client_id=cid, extra=persist + ["-E"])  # subscribe, then exit
    assert first.proc.wait(TIMEOUT) == 0, "\n".join(first.all)
    for i in range(3):
        mosq_pub(broker, ver, topic, f"q{i}".encode(), qos=1)
    again = subs(broker, ver, [topic], qos=1, client_id=cid, extra=persist, count=3)
    got = [again.message() for _ in range(3)]
    # (mosquitto_sub -d prints only the CONNACK code, not session-present: test_mqtt.py checks the flag)
    assert got == [(1, False, topic, f"q{i}".encode()) for i in range(3)]


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
def test_mosquitto_will_on_kill(broker, subs, ver):
    topic = uid("mosqw/")
    watcher = subs(broker, ver, [topic], qos=1)
    watcher.wait_suback()
    victim = subs(broker, ver, [uid("mosqw/")], qos=0,
                  extra=["--will-topic", topic, "--will-payload", "dead", "--will-qos", "1"])
    victim.wait_suback()
    victim.proc.send_signal(signal.SIGKILL)  # the kernel closes the socket: no DISCONNECT
    victim.proc.wait(5)
    assert watcher.message() == (1, False, topic, b"dead")


@pytest.mark.parametrize("ver", MOSQ_VERSIONS)
def test_mosquitto_wildcards_and_dollar(broker, subs, ver):
    base = uid("mosqwc")
    # non-overlapping filters, so every match is exactly one delivery
    s = subs(broker, ver, [f"{base}/+/t", f"+/{base}", f"{base}/b/#"], qos=0)
    d = subs(broker, ver, [f"${base}/#"], qos=0)
    s.wait_suback()
    d.wait_suback()
    # each mosquitto_pub waits for its PUBACK, so the broker sees them in this order
    for t in (f"{base}/b/c/t", f"${base}/{base}", f"{base}/x/y/t", f"{base}/a/t", f"z/{base}"):
        mosq_pub(broker, ver, t, t.encode(), qos=1)
    got = [s.message()[2] for _ in range(3)]
    assert got == [f"{base}/b/c/t", f"{base}/a/t", f"z/{base}"], "wildcard matching (and $-topic exclusion)"
    assert d.message()[2] == f"${base}/{base}"


def test_mosquitto_cross_version(broker, subs):
    topic = uid("mosqx/")
    s5 = subs(broker, "mqttv5", [topic], qos=2)
    s3 = subs(broker, "mqttv311", [topic], qos=2)
    s5.wait_suback()
    s3.wait_suback()
    mosq_pub(broker, "mqttv311", topic, b"from311", qos=2)
    mosq_pub(broker, "mqttv5", topic, b"from5", qos=2)
    for s in (s5, s3):
        assert [s.message(), s.message()] == [(2, False, topic, b"from311"), (2, False, topic, b"from5")]


def test_mosquitto_websockets(broker):
    helptext = subprocess.run(["mosquitto_sub", "--help"], capture_output=True, text=True).stdout
    if "websocket" not in helptext.lower():
        pytest.skip("this mosquitto_sub build has no WebSocket transport (Debian's libmosquitto is "
                    "built without it); MQTT over WebSocket is covered by paho in test_mqtt.py")
    pytest.fail("mosquitto_sub advertises WebSocket support: write this test for it")

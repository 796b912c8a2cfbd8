"""Helpers for test_hostile.py (hostile clients against the real broker).

- `SideProbe`: a well-behaved paho-mqtt client in its *own process* (so the
  attack code's threads and GIL cannot slow it down) that round-trips one
  QoS 1 message at a time on its own topic and reports every round-trip
  time. `python hostile.py side ...` is that process.
- broker process figures from /proc (RSS, open file descriptors).
- a few raw-socket helpers: an MQTT frame splitter, CONNECT with credentials.
- a throwaway CA and server certificate (the `cryptography` package).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import mqttraw as raw  # noqa: E402
from testcerts import make_tls_files  # noqa: E402,F401 (re-exported for test_hostile)

# A side round trip longer than this counts as lost (the probe moves on).
ROUND_TRIP_TIMEOUT = 5.0
# Pause between two side round trips.
SIDE_INTERVAL = 0.05
# Liveness bound asserted on every case.
SIDE_P99_LIMIT = 1.0


# ------------------------------------------------------------ broker process


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


class RssSampler:
    """Samples a process's RSS every `every` seconds in a thread; keeps the max."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid = pid
        self.every = every
        self.max_kib = rss_kib(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                v = rss_kib(self.pid)
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                return
            self.samples.append((time.monotonic(), v))
            self.max_kib = max(self.max_kib, v)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        try:
            self.max_kib = max(self.max_kib, rss_kib(self.pid))
        except (FileNotFoundError, AssertionError):
            pass
        return self.max_kib


def wait_for(pred, timeout: float, every: float = 0.05):
    """Polls `pred` until truthy (there is no event to wait on for /proc
    figures); returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(every)


def settle_fds(pid: int, baseline: int, timeout: float = 5.0) -> int:
    """The broker's fd count once it is back to `baseline` (or whatever it
    is after `timeout`): closes on the broker side are asynchronous."""
    return wait_for(lambda: (lambda c: c if c <= baseline else 0)(fd_count(pid)), timeout) or fd_count(pid)


def metrics_text(broker) -> str:
    host, port = broker.listeners["admin"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(broker, name: str, labels: str | None = None) -> float:
    text = metrics_text(broker)
    lab = r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{[^}]*\})?"
    m = re.search(rf"^{re.escape(name)}{lab}\s+([0-9.eE+-]+)\s*$", text, re.M)
    assert m, f"metric {name}{{{labels or ''}}} not in /metrics"
    return float(m.group(1))


# ------------------------------------------------------------ raw MQTT bits


def connect_packet(
    version: int,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 60,
) -> bytes:
    return raw.connect(client_id, version, keepalive, username=username, password=password)


class Frames:
    """Splits a byte stream into MQTT packets: (type, flags, body)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += data
        out = []
        while True:
            if len(self.buf) < 2:
                return out
            mult, length, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    raise AssertionError(f"malformed remaining length from broker: {bytes(self.buf[:8])!r}")
            if len(self.buf) < i + length:
                return out
            first = self.buf[0]
            out.append((first >> 4, first & 0x0F, bytes(self.buf[i : i + length])))
            del self.buf[: i + length]


def publish_topic_payload(flags: int, body: bytes, version: int) -> tuple[bytes, bytes]:
    ln = struct.unpack_from("!H", body, 0)[0]
    topic = body[2 : 2 + ln]
    off = 2 + ln
    if (flags >> 1) & 3:
        off += 2
    if version == raw.V5:
        n, mult = 0, 1
        while True:
            b = body[off]
            off += 1
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        off += n
    return topic, body[off:]


def tcp_state(sock: socket.socket) -> int:
    """Linux TCP_INFO tcpi_state: 1 ESTABLISHED, 8 CLOSE_WAIT (peer sent FIN), 7 CLOSE."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0]


TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 7: "CLOSE", 8: "CLOSE_WAIT"}


def wait_eof(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Reads until EOF/reset or timeout: ("eof"|"reset"|"timeout", bytes seen)."""
    seen = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", bytes(seen)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return "timeout", bytes(seen)
        except (ConnectionResetError, BrokenPipeError):
            return "reset", bytes(seen)
        if not chunk:
            return "eof", bytes(seen)
        seen += chunk


# ------------------------------------------------------------ certificates




def tls10_client_hello() -> tuple[bytes, str]:
    """A ClientHello offering TLS 1.0 only: made by the local OpenSSL when it
    agrees to (SECLEVEL=0), otherwise built by hand. Returns (bytes, how)."""
    import ssl
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        # record type 22, record version 3.1, handshake type 1, client_version 3.1
        if hello[:3] == b"\x16\x03\x01" and hello[5] == 1 and hello[9:11] == b"\x03\x01":
            return hello, f"OpenSSL ({ssl.OPENSSL_VERSION}, max TLSv1, SECLEVEL=0)"
    except (ssl.SSLError, ValueError, OSError):
        pass
    return crafted_tls10_client_hello(), "hand-crafted record"


def crafted_tls10_client_hello() -> bytes:
    sni = b"localhost"
    server_name = struct.pack("!BH", 0, len(sni)) + sni
    sni_ext = struct.pack("!HH", 0x0000, len(server_name) + 2) + struct.pack("!H", len(server_name)) + server_name
    suites = [0xC014, 0xC013, 0x0035, 0x002F, 0x000A]  # ECDHE-RSA-AES-CBC, RSA-AES-CBC, 3DES
    body = b"\x03\x01" + os.urandom(32) + b"\x00"
    body += struct.pack("!H", 2 * len(suites)) + b"".join(struct.pack("!H", s) for s in suites)
    body += b"\x01\x00"  # compression: null
    exts = sni_ext
    exts += struct.pack("!HH", 0x000A, 4) + struct.pack("!HH", 2, 0x0017)  # supported_groups: P-256
    exts += struct.pack("!HHB", 0x000B, 2, 1) + b"\x00"  # ec_point_formats: uncompressed
    body += struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def modern_client_hello(server_hostname: str | None = "localhost") -> bytes:
    """The first flight of a normal TLS client (Python's OpenSSL defaults)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


TLS_ALERTS = {0: "close_notify", 10: "unexpected_message", 40: "handshake_failure", 47: "illegal_parameter",
              50: "decode_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
              109: "missing_extension", 112: "unrecognized_name"}


def tls_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(content type, record version, payload) for each complete plaintext record."""
    out = []
    off = 0
    while off + 5 <= len(data):
        ctype, ver, ln = data[off], struct.unpack_from("!H", data, off + 1)[0], struct.unpack_from("!H", data, off + 3)[0]
        out.append((ctype, ver, data[off + 5 : off + 5 + ln]))
        off += 5 + ln
    return out


# ------------------------------------------------------------ the side probe


@dataclass
class Stats:
    n: int
    p50: float
    p99: float
    max: float

    def __str__(self) -> str:
        return f"n={self.n} p50={self.p50 * 1000:.1f}ms p99={self.p99 * 1000:.1f}ms max={self.max * 1000:.1f}ms"


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = max(0, math.ceil(q * len(sorted_vals)) - 1)
    return sorted_vals[k]


def stats(vals: list[float]) -> Stats:
    s = sorted(vals)
    return Stats(len(s), percentile(s, 0.50), percentile(s, 0.99), s[-1] if s else float("nan"))


class SideProbe:
    """Starts the side process, collects its round trips. Use:

        side = SideProbe(broker.mqtt)
        ... attack ...
        side.finish("case name", attack_seconds)   # prints p50/p99, asserts
    """

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        version: int = 5,
        ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
        name: str = "side",
    ):
        self.name = name
        args = [sys.executable, os.path.abspath(__file__), "side", addr[0], str(addr[1]), "--version", str(version)]
        if ca:
            args += ["--ca", ca]
        if username is not None:
            args += ["--username", username]
        if password is not None:
            args += ["--password", password]
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip)
        self.problems: list[str] = []
        self.timeouts: list[int] = []
        self.disconnected: str | None = None
        self.fatal: str | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.ready.wait(20):
            self._kill()
            raise AssertionError(f"side client did not get ready: {self.fatal or ''}\n{self.stderr()}")
        if self.fatal:
            self._kill()
            raise AssertionError(f"side client failed to start: {self.fatal}\n{self.stderr()}")
        self.started_at = time.monotonic()

    def _read(self):
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev[0]
            if kind == "ready":
                self.ready.set()
            elif kind == "rtt":
                self.samples.append((ev[2], ev[3]))
            elif kind == "timeout":
                self.timeouts.append(ev[1])
            elif kind == "disconnected":
                self.disconnected = ev[1]
            elif kind == "fatal":
                self.fatal = ev[1]
                self.ready.set()
            elif kind == "done":
                self.done.set()
        self.ready.set()
        self.done.set()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")[-4000:]

    def _kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.close()
            except OSError:
                pass
            if not self.done.wait(ROUND_TRIP_TIMEOUT + 5):
                self._kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._kill()
        self._reader.join(5)

    def window(self, start: float | None = None, end: float | None = None) -> list[float]:
        return [rtt for (t, rtt) in self.samples if (start is None or t >= start) and (end is None or t <= end)]

    def finish(
        self,
        what: str,
        start: float | None = None,
        end: float | None = None,
        min_samples: int = 10,
        after: int = 3,
    ) -> Stats:
        """Waits for `after` more round trips begun after `end` (the side
        client still works once the attack is over), stops the probe, prints
        its latency during [start, end] and overall, and records as problems
        (raised by assert_ok): a disconnect, any round trip over
        ROUND_TRIP_TIMEOUT, fewer than `min_samples` during the attack,
        p99 >= SIDE_P99_LIMIT."""
        if end is not None:
            deadline = time.monotonic() + ROUND_TRIP_TIMEOUT + 2
            while (
                len(self.window(end)) < after
                and time.monotonic() < deadline
                and self.proc.poll() is None
                and self.disconnected is None
            ):
                time.sleep(SIDE_INTERVAL)
        self.stop()
        during = stats(self.window(start, end))
        later = self.window(end) if end is not None else []
        overall = stats(self.window())
        p = self.problems
        if self.fatal is not None:
            p.append(f"{what}: side client: {self.fatal}\n{self.stderr()}")
        if self.disconnected is not None:
            p.append(f"{what}: side client was disconnected ({self.disconnected})")
        if self.timeouts:
            p.append(
                f"{what}: {len(self.timeouts)} side round trips took over {ROUND_TRIP_TIMEOUT}s "
                f"(seq {self.timeouts[:10]}); completed {during}"
            )
        if during.n < min_samples:
            p.append(f"{what}: only {during.n} side round trips during the attack ({during})")
        if during.n and during.p99 >= SIDE_P99_LIMIT:
            p.append(f"{what}: side p99 {during.p99:.3f}s >= {SIDE_P99_LIMIT}s ({during})")
        if end is not None and len(later) < after:
            p.append(f"{what}: only {len(later)} side round trips after the attack")
        if later and max(later) >= SIDE_P99_LIMIT:
            p.append(f"{what}: side round trip after the attack took {max(later):.3f}s")
        worst = sorted(self.samples, key=lambda x: -x[1])[:3]
        base = start if start is not None else self.started_at
        worst_s = ", ".join(f"{r * 1000:.1f}ms at {t - base:+.2f}s" for t, r in worst)
        print(
            f"\n[{what}] side client during attack: {during}; after: {stats(later)}; whole test: {overall}; "
            f"slowest: {worst_s}"
            + ("".join(f"\n  SIDE PROBLEM: {x}" for x in p)),
            flush=True,
        )
        return during

    def assert_ok(self) -> None:
        """Raises for what finish() found (called after the attack's own asserts)."""
        assert not self.problems, "; ".join(self.problems)

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass


def _emit(*ev) -> None:
    sys.stdout.write(json.dumps(list(ev)) + "\n")
    sys.stdout.flush()


def side_main(argv: list[str]) -> int:
    import argparse

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--version", type=int, default=5)
    ap.add_argument("--ca")
    ap.add_argument("--username")
    ap.add_argument("--password")
    a = ap.parse_args(argv)
    proto = mqtt.MQTTv5 if a.version == 5 else mqtt.MQTTv311
    topic = f"side/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"side{os.getpid()}{uuid.uuid4().hex[:6]}", protocol=proto,
        reconnect_on_failure=False,
    )
    if a.ca:
        c.tls_set(ca_certs=a.ca)
    if a.username is not None or a.password is not None:
        c.username_pw_set(a.username, a.password)
    got: queue.Queue = queue.Queue()
    connected = threading.Event()
    subscribed = threading.Event()
    state: dict = {}

    def on_connect(client, userdata, flags, rc, props):
        state["rc"] = rc
        connected.set()

    def on_subscribe(client, userdata, mid, codes, props):
        state["suback"] = [x.value for x in codes]
        subscribed.set()

    def on_message(client, userdata, msg):
        got.put((int(msg.payload), time.monotonic()))

    def on_disconnect(client, userdata, flags, rc, props):
        if state.get("closing"):
            return
        state["disc"] = str(rc)
        _emit("disconnected", str(rc))
        connected.set()
        subscribed.set()

    c.on_connect, c.on_subscribe, c.on_message, c.on_disconnect = on_connect, on_subscribe, on_message, on_disconnect
    try:
        c.connect(a.host, a.port, keepalive=10)
    except Exception as e:  # noqa: BLE001
        _emit("fatal", f"connect: {e!r}")
        return 1
    c.loop_start()
    if not connected.wait(10) or "rc" not in state or state["rc"].is_failure:
        _emit("fatal", f"no good CONNACK: {state}")
        return 1
    c.subscribe(topic, 1)
    if not subscribed.wait(10) or state.get("suback") != [1]:
        _emit("fatal", f"no SUBACK 1: {state}")
        return 1
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    _emit("ready", topic)
    seq = 0
    while not stop.is_set() and "disc" not in state:
        t0 = time.monotonic()
        c.publish(topic, str(seq).encode(), qos=1)
        deadline = t0 + ROUND_TRIP_TIMEOUT
        while True:
            try:
                s, t = got.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                _emit("timeout", seq)
                break
            if s == seq:
                _emit("rtt", seq, t0, t - t0)
                break
        seq += 1
        stop.wait(SIDE_INTERVAL)
    if "disc" not in state:
        state["closing"] = True
        c.disconnect()
    c.loop_stop()
    _emit("done", seq)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "side":
        sys.exit(side_main(sys.argv[2:]))
    print("usage: hostile.py side HOST PORT [--version 4|5] [--ca FILE] [--username U --password P]")
    sys.exit(2)

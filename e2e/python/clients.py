"""A thin, synchronous-looking wrapper around paho-mqtt 2.x for tests:
every wait is an Event/Queue with a timeout, never a bare sleep."""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
VERSIONS = [V311, V5]
VERSION_IDS = {V311: "v311", V5: "v5"}

TIMEOUT = 5.0
_counter = itertools.count()


# `Client.subscribe(..., expect=ANY_CODE)`: return the SUBACK codes, whatever they are.
ANY_CODE = object()


def uid(prefix: str = "t") -> str:
    """Unique, short, parallel-safe name for topics and client ids."""
    return f"{prefix}{os.getpid()}x{next(_counter)}x{uuid.uuid4().hex[:6]}"


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: object = None
    received_at: float = field(default_factory=time.monotonic)


class Client:
    def __init__(
        self,
        addr: tuple[str, int],
        version: int = V5,
        client_id: str | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 30,
        transport: str = "tcp",
        ws_path: str = "/mqtt",
        will: dict | None = None,
        connect_props: dict | None = None,
    ):
        self.addr = addr
        self.version = version
        self.client_id = client_id or uid("c")
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.connect_props = connect_props or {}
        kwargs = {}
        if version != V5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            transport=transport,
            reconnect_on_failure=False,
            **kwargs,
        )
        if transport == "websockets":
            self.c.ws_set_options(path=ws_path)
        if will:
            self.c.will_set(**will)
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack_rc = None
        self.connack_props = None
        self.session_present = None
        self.disconnect_rc = None
        self._subacks: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect

    # ---- callbacks ----
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack_rc = reason_code
        self.connack_props = properties
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(Msg(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.properties))

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._lock:
            ev, codes = self._subacks.setdefault(mid, (threading.Event(), []))
        codes.extend(reason_code_list)
        ev.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_rc = reason_code
        self.disconnected.set()
        client.loop_stop()  # from the network thread: just ends the loop, no reconnect

    # ---- actions ----
    def connect(self, expect_ok: bool = True, clean_start: bool | None = None) -> "Client":
        kwargs = {}
        if self.version == V5:
            kwargs["clean_start"] = self.clean if clean_start is None else clean_start
            p = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                p.SessionExpiryInterval = self.session_expiry
            for k, v in self.connect_props.items():
                setattr(p, k, v)
            kwargs["properties"] = p
        self.c.connect(self.addr[0], self.addr[1], keepalive=self.keepalive, **kwargs)
        self.c.loop_start()
        assert self.connected.wait(TIMEOUT), f"{self.client_id}: no CONNACK within {TIMEOUT}s"
        if expect_ok:
            assert not self.connack_rc.is_failure, f"{self.client_id}: CONNACK refused: {self.connack_rc}"
        return self

    def subscribe(self, topic: str, qos: int = 0, options: mqtt.SubscribeOptions | None = None, expect=None):
        """Subscribe and wait for SUBACK; asserts the granted code (default: qos)."""
        if self.version == V5:
            opts = options or mqtt.SubscribeOptions(qos=qos)
            rc, mid = self.c.subscribe(topic, options=opts)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        with self._lock:
            ev, codes = self._subacks.setdefault(mid, (threading.Event(), []))
        assert ev.wait(TIMEOUT), f"no SUBACK for {topic}"
        if expect is ANY_CODE:
            return codes
        want = qos if expect is None else expect
        assert [c.value for c in codes] == [want], f"SUBACK for {topic}: {codes}, wanted {want}"
        return codes

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish rc {info.rc}"
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"publish to {topic!r} (qos {qos}) not acknowledged within {TIMEOUT}s"
        return info

    def get(self, timeout: float = TIMEOUT) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            why = ""
            if self.disconnected.is_set():
                why = f" (this client was disconnected: {self.disconnect_rc})"
            raise AssertionError(f"{self.client_id}: no message within {timeout}s{why}") from None

    def get_topic(self, topic: str, timeout: float = TIMEOUT) -> Msg:
        """Next message on `topic`, skipping others (e.g. other tests' retained)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.get(max(0.01, deadline - time.monotonic()))
            if m.topic == topic:
                return m

    def collect_until(self, sentinel_topic: str, timeout: float = TIMEOUT) -> list[Msg]:
        """All messages before the first one on sentinel_topic (which is excluded)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.client_id}: sentinel {sentinel_topic} not received; got {[m.topic for m in out]}"
                )
            m = self.get(left)
            if m.topic == sentinel_topic:
                return out
            out.append(m)

    def drain(self, grace: float = 0.3) -> list[Msg]:
        """Whatever else arrives within a short grace period (negative checks)."""
        out = []
        deadline = time.monotonic() + grace
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    def disconnect(self) -> None:
        if self.c.is_connected():
            self.c.disconnect()
            self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def abort(self) -> None:
        """Close the TCP connection without DISCONNECT (abrupt close)."""
        self.c.loop_stop()  # stop the network thread first so it cannot send DISCONNECT
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        try:
            self.disconnect()
        except Exception:
            pass


class ClientFactory:
    """Makes clients for a test and cleans them all up afterwards."""

    def __init__(self, addr: tuple[str, int]):
        self.addr = addr
        self.clients: list[Client] = []

    def __call__(self, version: int = V5, connect: bool = True, **kw) -> Client:
        c = Client(self.addr, version, **kw)
        self.clients.append(c)
        if connect:
            c.connect()
        return c

    def close_all(self) -> None:
        for c in self.clients:
            c.close()


def v5_props(ptype=PacketTypes.PUBLISH, **kw) -> Properties:
    p = Properties(ptype)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class SideClient:
    """A well-behaved client that keeps publishing and receiving on its own
    topic in the background while a bad-input test abuses the broker."""

    def __init__(self, addr: tuple[str, int], version: int = V5):
        self.topic = uid("side/")
        self.cl = Client(addr, version, keepalive=5)
        self.cl.connect()
        self.cl.subscribe(self.topic, 1)
        self.sent = 0
        self.received: list[int] = []
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.cl.publish(self.topic, str(self.sent).encode(), qos=1)
                self.sent += 1
                self._pull()
            except AssertionError as e:
                self.errors.append(f"publish #{self.sent}: {e}")
                return
            self._stop.wait(0.05)

    def _pull(self):
        while True:
            try:
                m = self.cl.messages.get_nowait()
            except queue.Empty:
                return
            self.received.append(int(m.payload))

    def check(self, what: str = "") -> None:
        """The client is still connected and a fresh message round-trips now."""
        assert not self.errors, f"side client failed {what}: {self.errors}"
        assert not self.cl.disconnected.is_set(), (
            f"side client was disconnected {what}: {self.cl.disconnect_rc}"
        )
        target = self.sent  # everything published so far must come back
        deadline = time.monotonic() + TIMEOUT
        while (not self.received or max(self.received) < target) and time.monotonic() < deadline:
            try:
                m = self.cl.messages.get(timeout=0.1)
                self.received.append(int(m.payload))
            except queue.Empty:
                pass
        assert self.received and max(self.received) >= target, (
            f"side client stalled {what}: sent {self.sent}, last received "
            f"{max(self.received) if self.received else None}"
        )

    def stop(self) -> None:
        self.check("at the end")
        self._stop.set()
        self.thread.join(TIMEOUT)
        want = set(range(self.sent))
        deadline = time.monotonic() + TIMEOUT
        while not want <= set(self.received) and time.monotonic() < deadline:
            try:
                self.received.append(int(self.cl.messages.get(timeout=0.1).payload))
            except queue.Empty:
                pass
        missing = sorted(want - set(self.received))
        assert not missing, f"side client lost {len(missing)} of {self.sent} QoS 1 messages: {missing[:20]}"
        self.cl.close()

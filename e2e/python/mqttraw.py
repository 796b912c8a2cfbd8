"""Minimal hand-rolled MQTT packets for raw-socket tests (bad input, keepalive,
outbound topic aliases). Deliberately independent of paho so we can send what
a library refuses to send."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

# v5 property ids used here
P_SESSION_EXPIRY = 0x11
P_RECEIVE_MAXIMUM = 0x21
P_MAX_PACKET_SIZE = 0x27
P_TOPIC_ALIAS_MAX = 0x22
P_TOPIC_ALIAS = 0x23
P_SERVER_KEEP_ALIVE = 0x13
P_REASON_STRING = 0x1F
P_AUTH_METHOD = 0x15
P_WILL_DELAY = 0x18
P_USER_PROPERTY = 0x26

# v5 property value kinds, by id (MQTT 5.0 section 2.2.2.2)
_BYTE_PROPS = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16_PROPS = {0x13, 0x21, 0x22, 0x23}
_U32_PROPS = {0x02, 0x11, 0x18, 0x27}
_VARINT_PROPS = {0x0B}

V311, V5 = 4, 5


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


def props(pairs: list[tuple[int, object]] | None = None) -> bytes:
    """Encode v5 properties. A user property's value is a (name, value) pair;
    strings and binary data are str or bytes."""
    out = bytearray()
    for pid, val in pairs or []:
        out += varint(pid)
        if pid in _U32_PROPS:
            out += struct.pack("!I", val)
        elif pid in _U16_PROPS:
            out += struct.pack("!H", val)
        elif pid in _BYTE_PROPS:
            out.append(val)
        elif pid in _VARINT_PROPS:
            out += varint(val)
        elif pid == P_USER_PROPERTY:
            k, v = val
            out += mqtt_str(k) + mqtt_str(v)
        else:  # UTF-8 string or binary data
            out += mqtt_str(val)
    return varint(len(out)) + bytes(out)


def connect(
    client_id: str,
    version: int = V311,
    keepalive: int = 60,
    clean: bool = True,
    proto_name: bytes | str = "MQTT",
    level: int | None = None,
    connect_props: list[tuple[int, object]] | None = None,
    username: str | bytes | None = None,
    password: str | bytes | None = None,
    will_topic: str | bytes | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
    will_props: list[tuple[int, object]] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0x00
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = mqtt_str(proto_name)
    body += bytes([version if level is None else level])
    body += bytes([flags])
    body += struct.pack("!H", keepalive)
    if version == V5:
        body += props(connect_props)
    body += mqtt_str(client_id)
    if will_topic is not None:
        if version == V5:
            body += props(will_props)
        body += mqtt_str(will_topic) + mqtt_str(will_payload)
    if username is not None:
        body += mqtt_str(username)
    if password is not None:
        body += mqtt_str(password)
    return packet(CONNECT, 0, body)


def publish(
    topic: str | bytes,
    payload: bytes,
    version: int = V311,
    qos: int = 0,
    retain: bool = False,
    pid: int = 1,
    publish_props: list[tuple[int, object]] | None = None,
) -> bytes:
    body = mqtt_str(topic)
    if qos:
        body += struct.pack("!H", pid)
    if version == V5:
        body += props(publish_props)
    body += payload
    return packet(PUBLISH, (qos << 1) | int(retain), body)


def subscribe(topic: str, qos: int = 0, version: int = V311, pid: int = 1) -> bytes:
    body = struct.pack("!H", pid)
    if version == V5:
        body += props()
    body += mqtt_str(topic) + bytes([qos])
    return packet(SUBSCRIBE, 2, body)


def subscribe_many(
    filters: list[str | bytes],
    qos: int = 0,
    version: int = V311,
    pid: int = 1,
    subscribe_props: list[tuple[int, object]] | None = None,
) -> bytes:
    """One SUBSCRIBE carrying every filter (duplicates allowed) at `qos`."""
    body = bytearray(struct.pack("!H", pid))
    if version == V5:
        body += props(subscribe_props)
    opt = bytes([qos])
    for f in filters:
        body += mqtt_str(f) + opt
    return packet(SUBSCRIBE, 2, bytes(body))


def unsubscribe(filters: list[str | bytes], version: int = V311, pid: int = 1) -> bytes:
    body = bytearray(struct.pack("!H", pid))
    if version == V5:
        body += props()
    for f in filters:
        body += mqtt_str(f)
    return packet(UNSUBSCRIBE, 2, bytes(body))


def ack(ptype: int, pid: int, version: int = V311, reason: int = 0) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP (PUBREL carries flags 0b0010)."""
    body = struct.pack("!H", pid)
    if version == V5 and reason:
        body += bytes([reason])
    return packet(ptype, 2 if ptype == PUBREL else 0, body)


def pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def disconnect(version: int = V311, reason: int = 0) -> bytes:
    if version == V5 and reason:
        return bytes([DISCONNECT << 4, 1, reason])
    return bytes([DISCONNECT << 4, 0])


@dataclass
class Packet:
    ptype: int
    flags: int
    body: bytes
    version: int = V311
    # decoded for CONNACK/DISCONNECT/PUBLISH where useful
    fields: dict = field(default_factory=dict)

    @property
    def reason(self) -> int | None:
        return self.fields.get("reason")


class Closed(Exception):
    pass


class RawClient:
    """A blocking socket speaking hand-made MQTT."""

    def __init__(
        self,
        addr: tuple[str, int],
        version: int = V311,
        timeout: float = 5.0,
        ssl_context=None,
        server_hostname: str | None = None,
        rcvbuf: int | None = None,
    ):
        """`ssl_context` (an ssl.SSLContext) makes this an MQTT-over-TLS client;
        `rcvbuf` sets SO_RCVBUF before connecting (a small receive window)."""
        self.version = version
        if rcvbuf is None:
            sock = socket.create_connection(addr, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw_sock = sock
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or addr[0])
        self.sock = sock
        self.buf = bytearray()
        # how the broker ended the connection, once read_packet raised Closed:
        # "eof" (orderly FIN / TLS close), "reset" (ECONNRESET/EPIPE), "tls: ..."
        self.closed_by: str | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from broker in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from broker in time") from None
        except (ConnectionResetError, BrokenPipeError):
            self.closed_by = "reset"
            raise Closed() from None
        except ssl.SSLError as e:  # e.g. TLS record cut short by the close
            self.closed_by = f"tls: {e}"
            raise Closed() from None
        if not chunk:
            self.closed_by = "eof"
            raise Closed()
        self.buf += chunk

    def read_packet(self, timeout: float = 5.0) -> Packet:
        """Next packet; raises Closed on EOF/reset, TimeoutError on silence."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._try_parse()
            if parsed is not None:
                return parsed
            self._fill(deadline)

    def _try_parse(self) -> Packet | None:
        return split_packet(self.buf, self.version)

    def expect(self, ptype: int, timeout: float = 5.0) -> Packet:
        pkt = self.read_packet(timeout)
        assert pkt.ptype == ptype, f"expected packet type {ptype}, got {pkt.ptype} {pkt.body!r}"
        return pkt

    def wait_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Read until the broker closes the connection; return packets seen
        before the close. Fails (TimeoutError) if still open after timeout."""
        seen: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen.append(self.read_packet(max(0.0, deadline - time.monotonic())))
            except Closed:
                return seen
            except TimeoutError:
                raise AssertionError(
                    f"broker did not close the connection within {timeout}s (packets seen: "
                    f"{[(p.ptype, p.fields) for p in seen]})"
                ) from None

    def connect(self, client_id: str, keepalive: int = 60, clean: bool = True, connect_props=None) -> Packet:
        self.send(connect(client_id, self.version, keepalive, clean, connect_props=connect_props))
        ack = self.expect(CONNACK)
        assert ack.reason == 0, f"CONNACK refused: {ack.fields}"
        return ack


def split_packet(buf: bytearray, version: int = V311) -> Packet | None:
    """Take one whole packet off the front of `buf` (None if incomplete)."""
    if len(buf) < 2:
        return None
    mult, length, i = 1, 0, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
        if i > 4:
            raise AssertionError(f"broker sent a malformed remaining length: {bytes(buf[:8])!r}")
    if len(buf) < i + length:
        return None
    first = buf[0]
    body = bytes(buf[i : i + length])
    del buf[: i + length]
    pkt = Packet(first >> 4, first & 0x0F, body, version)
    decode_fields(pkt)
    return pkt


def parse_packets(data: bytes, version: int = V311) -> tuple[list[Packet], bytes]:
    """All whole packets in `data`, and the incomplete rest."""
    buf = bytearray(data)
    out = []
    while (p := split_packet(buf, version)) is not None:
        out.append(p)
    return out, bytes(buf)


def _read_props(body: bytes, off: int) -> tuple[dict, int]:
    """Decode a v5 property block into {id: value or [values]}."""
    n, mult = 0, 1
    while True:
        b = body[off]
        off += 1
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    end = off + n
    out: dict = {}
    while off < end:
        pid = body[off]
        off += 1
        if pid in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):  # byte
            val = body[off]
            off += 1
        elif pid in (0x13, 0x21, 0x22, 0x23):  # two-byte int
            val = struct.unpack_from("!H", body, off)[0]
            off += 2
        elif pid in (0x02, 0x11, 0x18, 0x27):  # four-byte int
            val = struct.unpack_from("!I", body, off)[0]
            off += 4
        elif pid == 0x0B:  # varint
            val, mult = 0, 1
            while True:
                b = body[off]
                off += 1
                val += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
        elif pid == 0x26:  # user property: string pair
            ln = struct.unpack_from("!H", body, off)[0]
            k = body[off + 2 : off + 2 + ln].decode()
            off += 2 + ln
            ln = struct.unpack_from("!H", body, off)[0]
            v = body[off + 2 : off + 2 + ln].decode()
            off += 2 + ln
            out.setdefault(pid, []).append((k, v))
            continue
        else:  # string or binary data
            ln = struct.unpack_from("!H", body, off)[0]
            val = body[off + 2 : off + 2 + ln]
            off += 2 + ln
        out[pid] = val
    return out, end


def decode_fields(pkt: Packet) -> None:
    b = pkt.body
    f = pkt.fields
    if pkt.ptype == CONNACK:
        f["session_present"] = bool(b[0] & 1)
        f["reason"] = b[1]
        if pkt.version == V5 and len(b) > 2:
            f["props"], _ = _read_props(b, 2)
    elif pkt.ptype == DISCONNECT:
        f["reason"] = b[0] if b else 0
        if len(b) > 1:
            f["props"], _ = _read_props(b, 1)
    elif pkt.ptype == PUBLISH:
        qos = (pkt.flags >> 1) & 3
        f["qos"] = qos
        f["retain"] = bool(pkt.flags & 1)
        f["dup"] = bool(pkt.flags & 8)
        ln = struct.unpack_from("!H", b, 0)[0]
        f["topic"] = b[2 : 2 + ln]
        off = 2 + ln
        if qos:
            f["pid"] = struct.unpack_from("!H", b, off)[0]
            off += 2
        if pkt.version == V5:
            f["props"], off = _read_props(b, off)
        f["payload"] = b[off:]
    elif pkt.ptype == SUBACK:
        f["pid"] = struct.unpack_from("!H", b, 0)[0]
        off = 2
        if pkt.version == V5:
            f["props"], off = _read_props(b, off)
        f["codes"] = list(b[off:])
    elif pkt.ptype == UNSUBACK:
        f["pid"] = struct.unpack_from("!H", b, 0)[0]
        off = 2
        if pkt.version == V5:
            f["props"], off = _read_props(b, off)
        f["codes"] = list(b[off:])
    elif pkt.ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        f["pid"] = struct.unpack_from("!H", b, 0)[0]
        f["reason"] = b[2] if len(b) > 2 else 0

//! A deliberately small, independent MQTT 3.1.1 / 5.0 client codec.
//!
//! It does not share code with the broker's codec: the benchmark must not be
//! able to hide a bug or a shortcut of the broker by making the same one.
//! Encoders append to a caller-owned `Vec<u8>` so that many packets can be
//! batched into one write; the decoder works on a caller-owned read buffer
//! and never allocates per packet.

use anyhow::{Context, Result, bail, ensure};
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// Largest frame the generator accepts from a broker.
pub const MAX_FRAME: usize = 1 << 20;
/// Size of one read (and the initial read buffer).
pub const READ_SIZE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl Version {
    fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

fn put_varint(buf: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

/// CONNECT with no credentials, no will.
pub fn connect(buf: &mut Vec<u8>, v: Version, client_id: &[u8], keepalive: u16, clean: bool) {
    connect_with(
        buf,
        v,
        &ConnectOpts {
            client_id,
            keepalive,
            clean,
            ..Default::default()
        },
    );
}

/// What a CONNECT carries besides the protocol version (no will).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOpts<'a> {
    pub client_id: &'a [u8],
    pub keepalive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    pub username: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
    /// MQTT 5 Session Expiry Interval property, seconds (ignored for 3.1.1,
    /// whose persistent sessions have no expiry of their own).
    pub session_expiry: Option<u32>,
}

pub fn connect_with(buf: &mut Vec<u8>, v: Version, o: &ConnectOpts<'_>) {
    let v5 = v == Version::V5;
    let expiry = o.session_expiry.filter(|_| v5);
    let props = if v5 {
        1 + if expiry.is_some() { 5 } else { 0 }
    } else {
        0
    };
    let creds = o.username.map_or(0, |u| 2 + u.len()) + o.password.map_or(0, |p| 2 + p.len());
    let rem = 2 + 4 + 1 + 1 + 2 + props + 2 + o.client_id.len() + creds;
    let mut flags = if o.clean { 0x02 } else { 0x00 };
    if o.username.is_some() {
        flags |= 0x80;
    }
    if o.password.is_some() {
        flags |= 0x40;
    }
    buf.push(CONNECT << 4);
    put_varint(buf, rem);
    put_str(buf, b"MQTT");
    buf.push(v.level());
    buf.push(flags);
    buf.extend_from_slice(&o.keepalive.to_be_bytes());
    if v5 {
        match expiry {
            Some(e) => {
                buf.push(5);
                buf.push(0x11);
                buf.extend_from_slice(&e.to_be_bytes());
            }
            None => buf.push(0),
        }
    }
    put_str(buf, o.client_id);
    if let Some(u) = o.username {
        put_str(buf, u);
    }
    if let Some(p) = o.password {
        put_str(buf, p);
    }
}

pub fn subscribe(buf: &mut Vec<u8>, v: Version, pid: u16, filter: &[u8], qos: u8) {
    let props = if v == Version::V5 { 1 } else { 0 };
    let rem = 2 + props + 2 + filter.len() + 1;
    buf.push((SUBSCRIBE << 4) | 0x02);
    put_varint(buf, rem);
    buf.extend_from_slice(&pid.to_be_bytes());
    if v == Version::V5 {
        buf.push(0);
    }
    put_str(buf, filter);
    buf.push(qos);
}

/// Fixed and variable header of a PUBLISH whose payload (`payload_len`
/// bytes) the caller appends right after.
pub fn publish_header(
    buf: &mut Vec<u8>,
    v: Version,
    topic: &[u8],
    qos: u8,
    pid: u16,
    payload_len: usize,
) {
    publish_header_flags(buf, v, topic, qos, false, pid, payload_len);
}

/// [`publish_header`] with the RETAIN flag.
pub fn publish_header_flags(
    buf: &mut Vec<u8>,
    v: Version,
    topic: &[u8],
    qos: u8,
    retain: bool,
    pid: u16,
    payload_len: usize,
) {
    let rem = 2
        + topic.len()
        + if qos > 0 { 2 } else { 0 }
        + if v == Version::V5 { 1 } else { 0 }
        + payload_len;
    buf.push((PUBLISH << 4) | (qos << 1) | u8::from(retain));
    put_varint(buf, rem);
    put_str(buf, topic);
    if qos > 0 {
        buf.extend_from_slice(&pid.to_be_bytes());
    }
    if v == Version::V5 {
        buf.push(0);
    }
}

/// PUBACK (success; the short form is valid in both versions).
pub fn puback(buf: &mut Vec<u8>, pid: u16) {
    buf.push(PUBACK << 4);
    buf.push(2);
    buf.extend_from_slice(&pid.to_be_bytes());
}

/// PUBREC (success), the receiver's first QoS 2 answer.
pub fn pubrec(buf: &mut Vec<u8>, pid: u16) {
    buf.push(PUBREC << 4);
    buf.push(2);
    buf.extend_from_slice(&pid.to_be_bytes());
}

/// PUBREL (flags 0b0010, as the spec requires).
pub fn pubrel(buf: &mut Vec<u8>, pid: u16) {
    buf.push((PUBREL << 4) | 0x02);
    buf.push(2);
    buf.extend_from_slice(&pid.to_be_bytes());
}

/// PUBCOMP (success).
pub fn pubcomp(buf: &mut Vec<u8>, pid: u16) {
    buf.push(PUBCOMP << 4);
    buf.push(2);
    buf.extend_from_slice(&pid.to_be_bytes());
}

pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[PINGREQ << 4, 0]);
}

pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// MQTT 5 DISCONNECT (normal) that sets the session expiry interval, e.g.
/// 0 to end a persistent session with this connection.
pub fn disconnect_v5_expiry(buf: &mut Vec<u8>, expiry: u32) {
    buf.extend_from_slice(&[DISCONNECT << 4, 7, 0, 5, 0x11]);
    buf.extend_from_slice(&expiry.to_be_bytes());
}

/// Length of a complete frame at the start of `b`: `Ok(None)` if more bytes
/// are needed. Returns (header length, total length).
pub fn frame_len(b: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut rem = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        rem += (byte & 0x7f) as usize * mult;
        if byte & 0x80 == 0 {
            let total = 1 + i + rem;
            ensure!(
                total <= MAX_FRAME,
                "frame of {total} bytes exceeds {MAX_FRAME}"
            );
            return Ok((b.len() >= total).then_some((1 + i, total)));
        }
        mult *= 128;
    }
    bail!("malformed remaining length")
}

pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    pub body: &'a [u8],
}

pub struct Publish<'a> {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pid: u16,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
}

fn read_varint(b: &[u8]) -> Result<(usize, usize)> {
    let mut n = 0usize;
    let mut mult = 1usize;
    for i in 0..4 {
        let byte = *b.get(i).context("truncated variable integer")?;
        n += (byte & 0x7f) as usize * mult;
        if byte & 0x80 == 0 {
            return Ok((n, i + 1));
        }
        mult *= 128;
    }
    bail!("malformed variable integer")
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("truncated packet")?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

pub fn parse_publish<'a>(v: Version, flags: u8, body: &'a [u8]) -> Result<Publish<'a>> {
    let qos = (flags >> 1) & 0x03;
    ensure!(qos < 3, "PUBLISH with QoS 3");
    let tlen = u16_at(body, 0)? as usize;
    let topic = body.get(2..2 + tlen).context("truncated topic")?;
    let mut at = 2 + tlen;
    let mut pid = 0;
    if qos > 0 {
        pid = u16_at(body, at)?;
        at += 2;
    }
    if v == Version::V5 {
        let (plen, n) = read_varint(body.get(at..).context("truncated properties")?)?;
        at += n + plen;
    }
    let payload = body.get(at..).context("truncated PUBLISH")?;
    Ok(Publish {
        qos,
        retain: flags & 0x01 != 0,
        dup: flags & 0x08 != 0,
        pid,
        topic,
        payload,
    })
}

/// Return code of a CONNACK (0 = accepted, in both versions).
pub fn connack_code(body: &[u8]) -> Result<u8> {
    body.get(1).copied().context("truncated CONNACK")
}

/// Session Present flag of a CONNACK.
pub fn connack_session_present(body: &[u8]) -> Result<bool> {
    Ok(body.first().context("truncated CONNACK")? & 0x01 != 0)
}

/// Packet id and reason code of a PUBACK / PUBREC / PUBREL / PUBCOMP (the
/// short form, valid in both versions, means success).
pub fn ack_fields(body: &[u8]) -> Result<(u16, u8)> {
    Ok((u16_at(body, 0)?, body.get(2).copied().unwrap_or(0)))
}

/// Granted QoS / reason codes of a SUBACK, after its packet id.
pub fn suback_codes(v: Version, body: &[u8]) -> Result<(u16, &[u8])> {
    let pid = u16_at(body, 0)?;
    let mut at = 2;
    if v == Version::V5 {
        let (plen, n) = read_varint(body.get(at..).context("truncated SUBACK")?)?;
        at += n + plen;
    }
    Ok((pid, body.get(at..).context("truncated SUBACK")?))
}

pub fn puback_pid(body: &[u8]) -> Result<u16> {
    u16_at(body, 0)
}

/// Read buffer: reads of up to 64 KiB, frames parsed in place.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadBuf {
    pub fn new() -> Self {
        Self::with_capacity(READ_SIZE)
    }

    pub fn with_capacity(cap: usize) -> Self {
        ReadBuf {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    fn make_room(&mut self) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end < self.buf.len() {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            return Ok(());
        }
        ensure!(
            self.buf.len() < MAX_FRAME + 5,
            "frame larger than {MAX_FRAME} bytes"
        );
        let n = (self.buf.len() * 2).min(MAX_FRAME + 5);
        self.buf.resize(n, 0);
        Ok(())
    }

    /// One non-blocking read: `Ok(None)` if the socket has nothing now.
    pub fn try_fill(&mut self, s: &TcpStream) -> Result<Option<usize>> {
        self.make_room()?;
        match s.try_read(&mut self.buf[self.end..]) {
            Ok(0) => bail!("connection closed by broker"),
            Ok(n) => {
                self.end += n;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e).context("read"),
        }
    }

    /// Wait until at least one byte was read.
    pub async fn fill(&mut self, s: &TcpStream) -> Result<usize> {
        loop {
            if let Some(n) = self.try_fill(s)? {
                return Ok(n);
            }
            s.readable().await.context("wait readable")?;
        }
    }

    /// Next complete frame in the buffer, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>> {
        let avail = &self.buf[self.start..self.end];
        let Some((hdr, total)) = frame_len(avail)? else {
            return Ok(None);
        };
        let s = self.start;
        self.start += total;
        let first = self.buf[s];
        Ok(Some(Frame {
            kind: first >> 4,
            flags: first & 0x0f,
            body: &self.buf[s + hdr..s + total],
        }))
    }
}

/// A client connection: socket, its read buffer and the protocol version.
pub struct Conn {
    pub stream: TcpStream,
    pub rb: ReadBuf,
    pub v: Version,
}

impl Conn {
    /// TCP connect (TCP_NODELAY), CONNECT, wait for a successful CONNACK.
    pub async fn open(
        stream: TcpStream,
        v: Version,
        client_id: &str,
        keepalive: u16,
        rbuf: usize,
    ) -> Result<Conn> {
        let o = ConnectOpts {
            client_id: client_id.as_bytes(),
            keepalive,
            clean: true,
            ..Default::default()
        };
        Ok(Conn::open_with(stream, v, &o, rbuf).await?.0)
    }

    /// [`Conn::open`] with credentials and session options; also returns the
    /// CONNACK's Session Present flag.
    pub async fn open_with(
        stream: TcpStream,
        v: Version,
        o: &ConnectOpts<'_>,
        rbuf: usize,
    ) -> Result<(Conn, bool)> {
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = Conn {
            stream,
            rb: ReadBuf::with_capacity(rbuf),
            v,
        };
        let mut out = Vec::with_capacity(64);
        connect_with(&mut out, v, o);
        conn.stream.write_all(&out).await.context("send CONNECT")?;
        loop {
            if let Some(f) = conn.rb.next_frame()? {
                ensure!(
                    f.kind == CONNACK,
                    "expected CONNACK, got packet type {}",
                    f.kind
                );
                let code = connack_code(f.body)?;
                ensure!(code == 0, "CONNACK refused with code {code:#x}");
                let present = connack_session_present(f.body)?;
                return Ok((conn, present));
            }
            conn.rb
                .fill(&conn.stream)
                .await
                .context("wait for CONNACK")?;
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK.
    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) -> Result<()> {
        let code = self.subscribe_code(pid, filter, qos).await?;
        ensure!(code < 0x80, "subscription to {filter} refused ({code:#x})");
        Ok(())
    }

    /// SUBSCRIBE one filter; the SUBACK's code (granted QoS, or ≥ 0x80 for a
    /// refusal). Other packets before the SUBACK are skipped; those after it
    /// stay in the read buffer.
    pub async fn subscribe_code(&mut self, pid: u16, filter: &str, qos: u8) -> Result<u8> {
        let mut out = Vec::with_capacity(64);
        subscribe(&mut out, self.v, pid, filter.as_bytes(), qos);
        self.stream
            .write_all(&out)
            .await
            .context("send SUBSCRIBE")?;
        loop {
            while let Some(f) = self.rb.next_frame()? {
                if f.kind != SUBACK {
                    continue;
                }
                let (got, codes) = suback_codes(self.v, f.body)?;
                ensure!(got == pid, "SUBACK for packet id {got}, expected {pid}");
                return codes.first().copied().context("SUBACK without codes");
            }
            self.rb
                .fill(&self.stream)
                .await
                .context("wait for SUBACK")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_len(n: usize) -> usize {
        match n {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        }
    }

    #[test]
    fn publish_round_trip_both_versions() {
        for v in [Version::V311, Version::V5] {
            for qos in [0u8, 1] {
                let mut b = Vec::new();
                publish_header(&mut b, v, b"a/b", qos, 7, 3);
                b.extend_from_slice(b"xyz");
                let (hdr, total) = frame_len(&b).unwrap().unwrap();
                assert_eq!(total, b.len());
                assert_eq!(b[0] >> 4, PUBLISH);
                let p = parse_publish(v, b[0] & 0x0f, &b[hdr..total]).unwrap();
                assert_eq!(p.qos, qos);
                assert_eq!(p.topic, b"a/b");
                assert_eq!(p.payload, b"xyz");
                if qos == 1 {
                    assert_eq!(p.pid, 7);
                }
            }
        }
    }

    #[test]
    fn varint_lengths() {
        for n in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut b = Vec::new();
            put_varint(&mut b, n);
            assert_eq!(b.len(), varint_len(n));
            assert_eq!(read_varint(&b).unwrap(), (n, b.len()));
        }
    }

    #[test]
    fn incomplete_and_malformed_frames() {
        assert!(frame_len(&[0x30]).unwrap().is_none());
        assert!(frame_len(&[0x30, 0x05, 0, 1]).unwrap().is_none());
        assert!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        // 2 MiB frame announced: refused before it is buffered.
        let mut b = vec![0x30];
        put_varint(&mut b, 2 << 20);
        assert!(frame_len(&b).is_err());
    }

    #[test]
    fn connect_with_credentials_and_expiry() {
        let mut b = Vec::new();
        let o = ConnectOpts {
            client_id: b"c",
            keepalive: 30,
            clean: false,
            username: Some(b"u"),
            password: Some(b"pw"),
            session_expiry: Some(300),
        };
        connect_with(&mut b, Version::V5, &o);
        let (hdr, total) = frame_len(&b).unwrap().unwrap();
        assert_eq!(total, b.len());
        let body = &b[hdr..];
        assert_eq!(&body[..7], &[0, 4, b'M', b'Q', b'T', b'T', 5]);
        assert_eq!(body[7], 0xc0, "username + password, no clean start");
        assert_eq!(&body[10..16], &[5, 0x11, 0, 0, 1, 44]);
        assert_eq!(&body[16..], &[0, 1, b'c', 0, 1, b'u', 0, 2, b'p', b'w']);
        // 3.1.1 carries no properties.
        let mut b = Vec::new();
        connect_with(&mut b, Version::V311, &o);
        let (hdr, total) = frame_len(&b).unwrap().unwrap();
        assert_eq!(total, b.len());
        assert_eq!(&b[hdr + 10..], &[0, 1, b'c', 0, 1, b'u', 0, 2, b'p', b'w']);
    }

    #[test]
    fn qos2_acks_and_retain() {
        let mut b = Vec::new();
        pubrec(&mut b, 0x0102);
        pubrel(&mut b, 0x0102);
        pubcomp(&mut b, 0x0102);
        assert_eq!(
            b,
            [0x50, 2, 1, 2, 0x62, 2, 1, 2, 0x70, 2, 1, 2],
            "PUBREL has flags 0b0010"
        );
        assert_eq!(ack_fields(&[1, 2]).unwrap(), (0x0102, 0));
        assert_eq!(ack_fields(&[1, 2, 0x87, 0]).unwrap(), (0x0102, 0x87));
        let mut b = Vec::new();
        publish_header_flags(&mut b, Version::V311, b"t", 2, true, 9, 1);
        b.push(b'x');
        let (hdr, total) = frame_len(&b).unwrap().unwrap();
        let p = parse_publish(Version::V311, b[0] & 0x0f, &b[hdr..total]).unwrap();
        assert!(p.retain && !p.dup);
        assert_eq!((p.qos, p.pid, p.payload), (2, 9, &b"x"[..]));
        let mut b = Vec::new();
        disconnect_v5_expiry(&mut b, 0);
        assert_eq!(frame_len(&b).unwrap().unwrap(), (2, b.len()));
    }

    #[test]
    fn connect_is_well_formed() {
        let mut b = Vec::new();
        connect(&mut b, Version::V311, b"id", 30, true);
        assert_eq!(
            b,
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 2, b'i', b'd'
            ]
        );
    }
}

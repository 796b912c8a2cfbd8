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
    let props = if v == Version::V5 { 1 } else { 0 };
    let rem = 2 + 4 + 1 + 1 + 2 + props + 2 + client_id.len();
    buf.push(CONNECT << 4);
    put_varint(buf, rem);
    put_str(buf, b"MQTT");
    buf.push(v.level());
    buf.push(if clean { 0x02 } else { 0x00 });
    buf.extend_from_slice(&keepalive.to_be_bytes());
    if v == Version::V5 {
        buf.push(0); // no properties
    }
    put_str(buf, client_id);
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
    let rem = 2
        + topic.len()
        + if qos > 0 { 2 } else { 0 }
        + if v == Version::V5 { 1 } else { 0 }
        + payload_len;
    buf.push((PUBLISH << 4) | (qos << 1));
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

pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[PINGREQ << 4, 0]);
}

pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[DISCONNECT << 4, 0]);
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
        pid,
        topic,
        payload,
    })
}

/// Return code of a CONNACK (0 = accepted, in both versions).
pub fn connack_code(body: &[u8]) -> Result<u8> {
    body.get(1).copied().context("truncated CONNACK")
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
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = Conn {
            stream,
            rb: ReadBuf::with_capacity(rbuf),
            v,
        };
        let mut out = Vec::with_capacity(64);
        connect(&mut out, v, client_id.as_bytes(), keepalive, true);
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
                return Ok(conn);
            }
            conn.rb
                .fill(&conn.stream)
                .await
                .context("wait for CONNACK")?;
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK.
    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) -> Result<()> {
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
                let code = codes.first().copied().context("SUBACK without codes")?;
                ensure!(code < 0x80, "subscription to {filter} refused ({code:#x})");
                return Ok(());
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

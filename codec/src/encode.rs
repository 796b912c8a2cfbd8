//! Encoding.
//!
//! Each packet body is described once, as a walk over a [`Sink`]. Walking it
//! with [`Len`] yields the exact remaining length (and whether every field is
//! representable); walking it again with [`Out`] writes it after a single
//! `reserve`. Because both passes run the same code, the length header can
//! never disagree with the bytes that follow it.
//!
//! The per-message packets (PUBLISH and its acknowledgements) skip the
//! generic body walk: their layout is fixed apart from the property block,
//! so they size that block once and write the rest directly.
use bytes::{BufMut, BytesMut};

use crate::packet::{
    Connect, Packet, Properties, ProtocolVersion, PubResp, PublishRef, QoS, SubscribeFilter,
};
use crate::properties;
use crate::reader::MAX_VARINT;
use crate::{EncodeError, Publish};

/// Destination of a body walk: either a byte counter or the output buffer.
pub(crate) trait Sink {
    fn u8(&mut self, v: u8);
    fn u16(&mut self, v: u16);
    fn u32(&mut self, v: u32);
    fn varint(&mut self, v: usize);
    /// Bytes with no length prefix (payloads, reason-code lists).
    fn raw(&mut self, b: &[u8]);
    /// Bytes behind a two-byte length (strings and binary data).
    fn prefixed(&mut self, b: &[u8]);
    /// A property block: its variable-byte length, then the properties.
    fn props<P: PropBlock>(&mut self, p: &P);
}

/// Something that can feed a property block to a sink.
pub(crate) trait PropBlock {
    fn walk<S: Sink>(&self, s: &mut S);
}

impl PropBlock for Properties {
    #[inline]
    fn walk<S: Sink>(&self, s: &mut S) {
        properties::walk(self, true, s);
    }
}

/// PUBLISH properties: the forwarded message properties minus the three
/// per-subscriber ones, which come from `PublishRef` itself.
struct PublishProps<'a, 'b>(&'b PublishRef<'a>);

impl PropBlock for PublishProps<'_, '_> {
    #[inline]
    fn walk<S: Sink>(&self, s: &mut S) {
        let p = self.0;
        if let Some(props) = p.properties {
            properties::walk(props, false, s);
        }
        if let Some(v) = p.message_expiry_interval {
            s.u8(properties::MESSAGE_EXPIRY_INTERVAL);
            s.u32(v);
        }
        for &id in p.subscription_identifiers {
            s.u8(properties::SUBSCRIPTION_IDENTIFIER);
            s.varint(id as usize);
        }
        if let Some(v) = p.topic_alias {
            s.u8(properties::TOPIC_ALIAS);
            s.u16(v);
        }
    }
}

#[inline]
pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        _ => 4,
    }
}

/// Counts bytes and notes any field the wire format cannot represent
/// (strings over 65 535 bytes, variable byte integers over 268 435 455).
#[derive(Default)]
pub(crate) struct Len {
    n: usize,
    unrepresentable: bool,
}

impl Len {
    /// `Some(remaining length)` if the walked body can be encoded.
    #[inline]
    fn remaining(&self) -> Option<usize> {
        if self.unrepresentable || self.n > MAX_VARINT {
            None
        } else {
            Some(self.n)
        }
    }
}

impl Sink for Len {
    #[inline]
    fn u8(&mut self, _: u8) {
        self.n += 1;
    }
    #[inline]
    fn u16(&mut self, _: u16) {
        self.n += 2;
    }
    #[inline]
    fn u32(&mut self, _: u32) {
        self.n += 4;
    }
    #[inline]
    fn varint(&mut self, v: usize) {
        self.unrepresentable |= v > MAX_VARINT;
        self.n += varint_len(v);
    }
    #[inline]
    fn raw(&mut self, b: &[u8]) {
        self.n = self.n.saturating_add(b.len());
    }
    #[inline]
    fn prefixed(&mut self, b: &[u8]) {
        self.unrepresentable |= b.len() > usize::from(u16::MAX);
        self.n = self.n.saturating_add(2 + b.len());
    }
    #[inline]
    fn props<P: PropBlock>(&mut self, p: &P) {
        // One pass: the block's own size decides its length prefix.
        let start = self.n;
        p.walk(self);
        let len = self.n - start;
        self.varint(len);
    }
}

/// Writes into the output buffer; only ever run after a [`Len`] pass has
/// proven every field representable and reserved the space.
pub(crate) struct Out<'a>(&'a mut BytesMut);

impl Sink for Out<'_> {
    #[inline]
    fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    #[inline]
    fn u16(&mut self, v: u16) {
        self.0.put_u16(v);
    }
    #[inline]
    fn u32(&mut self, v: u32) {
        self.0.put_u32(v);
    }
    #[inline]
    fn varint(&mut self, v: usize) {
        put_varint(self.0, v);
    }
    #[inline]
    fn raw(&mut self, b: &[u8]) {
        self.0.put_slice(b);
    }
    #[inline]
    fn prefixed(&mut self, b: &[u8]) {
        // Length checked by the preceding `Len` pass.
        self.0.put_u16(b.len() as u16);
        self.0.put_slice(b);
    }
    #[inline]
    fn props<P: PropBlock>(&mut self, p: &P) {
        let mut len = Len::default();
        p.walk(&mut len);
        put_varint(self.0, len.n);
        p.walk(self);
    }
}

#[inline]
fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Writes fixed header + body after sizing it; `None` leaves `out` untouched.
#[inline]
fn emit(
    first: u8,
    out: &mut BytesMut,
    body: impl Fn(&mut Len),
    write: impl Fn(&mut Out<'_>),
) -> Option<()> {
    let mut len = Len::default();
    body(&mut len);
    let remaining = len.remaining()?;
    let total = 1 + varint_len(remaining) + remaining;
    out.reserve(total);
    let start = out.len();
    out.put_u8(first);
    put_varint(out, remaining);
    write(&mut Out(out));
    debug_assert_eq!(out.len() - start, total, "sizing and writing disagree");
    Some(())
}

/// Appends `packet` to `out` in the wire format of `version`.
///
/// CONNECT is written in its own `protocol` version, whatever `version` says.
/// Fails, writing nothing, if a field cannot be represented (a string over
/// 65 535 bytes, a body over 268 435 455 bytes) or the packet does not exist
/// in `version` (AUTH before v5).
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    let first = match packet {
        Packet::Publish(p) => {
            let p = publish_ref(p);
            let layout = PublishLayout::new(&p, v5).ok_or(EncodeError::TooLarge(
                p.topic.len().saturating_add(p.payload.len()),
            ))?;
            layout.write(&p, v5, out);
            return Ok(());
        }
        Packet::PubAck(r) => return write_pubresp(0x40, r, v5, out),
        Packet::PubRec(r) => return write_pubresp(0x50, r, v5, out),
        Packet::PubRel(r) => return write_pubresp(0x62, r, v5, out),
        Packet::PubComp(r) => return write_pubresp(0x70, r, v5, out),
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xa2,
        Packet::UnsubAck(_) => 0xb0,
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect(_) => 0xe0,
        Packet::Auth(_) => {
            if !v5 {
                return Err(EncodeError::NotInVersion);
            }
            0xf0
        }
    };
    emit(first, out, |s| body(packet, v5, s), |s| body(packet, v5, s)).ok_or_else(|| {
        let mut len = Len::default();
        body(packet, v5, &mut len);
        EncodeError::TooLarge(len.n)
    })
}

#[inline]
fn publish_first_byte(dup: bool, qos: QoS, retain: bool) -> u8 {
    // DUP is meaningless (and rejected by receivers) on QoS 0.
    let dup = dup && qos != QoS::AtMostOnce;
    0x30 | (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain)
}

fn publish_ref(p: &Publish) -> PublishRef<'_> {
    PublishRef {
        dup: p.dup,
        qos: p.qos,
        retain: p.retain,
        topic: &p.topic,
        pkid: p.pkid,
        payload: &p.payload,
        properties: Some(&p.properties),
        topic_alias: p.properties.topic_alias,
        subscription_identifiers: &p.properties.subscription_identifiers,
        message_expiry_interval: p.properties.message_expiry_interval,
    }
}

/// Bytes a property block would occupy, excluding its length prefix.
#[inline]
fn props_len(p: &Properties) -> usize {
    let mut len = Len::default();
    p.walk(&mut len);
    len.n
}

fn body<S: Sink>(packet: &Packet, v5: bool, s: &mut S) {
    match packet {
        Packet::Connect(c) => connect_body(c, s),
        Packet::ConnAck(c) => {
            s.u8(u8::from(c.session_present));
            s.u8(c.code);
            if v5 {
                s.props(&c.properties);
            }
        }
        // Written by `PublishLayout` and `write_pubresp`, never through the
        // generic walk.
        Packet::Publish(_)
        | Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_) => {}
        Packet::Subscribe(sub) => {
            s.u16(sub.pkid);
            if v5 {
                s.props(&sub.properties);
            }
            for f in &sub.filters {
                s.prefixed(f.filter.as_bytes());
                s.u8(subscription_options(f, v5));
            }
        }
        Packet::SubAck(a) => {
            s.u16(a.pkid);
            if v5 {
                s.props(&a.properties);
            }
            s.raw(&a.codes);
        }
        Packet::Unsubscribe(u) => {
            s.u16(u.pkid);
            if v5 {
                s.props(&u.properties);
            }
            for f in &u.filters {
                s.prefixed(f.as_bytes());
            }
        }
        Packet::UnsubAck(a) => {
            s.u16(a.pkid);
            if v5 {
                s.props(&a.properties);
                s.raw(&a.codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                // No body for success without properties. Otherwise the
                // reason code AND the property length, even when zero
                // (MQTT-2.2.2-1): §3.14.2.2.1 lets receivers accept a lone
                // reason code, but clients such as rumqttc 0.25 cannot.
                if d.reason != 0 || props_len(&d.properties) != 0 {
                    s.u8(d.reason);
                    s.props(&d.properties);
                }
            }
        }
        Packet::Auth(a) => {
            if a.reason != 0 || props_len(&a.properties) != 0 {
                s.u8(a.reason);
                s.props(&a.properties);
            }
        }
    }
}

fn connect_body<S: Sink>(c: &Connect, s: &mut S) {
    let v5 = c.protocol.is_v5();
    let (name, level): (&[u8], u8) = match c.protocol {
        ProtocolVersion::V31 => (b"MQIsdp", 3),
        ProtocolVersion::V311 => (b"MQTT", 4),
        ProtocolVersion::V5 => (b"MQTT", 5),
    };
    s.prefixed(name);
    s.u8(level);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0b100 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
    }
    flags |= u8::from(c.password.is_some()) << 6;
    flags |= u8::from(c.username.is_some()) << 7;
    s.u8(flags);
    s.u16(c.keep_alive);
    if v5 {
        s.props(&c.properties);
    }
    s.prefixed(c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            s.props(&w.properties);
        }
        s.prefixed(w.topic.as_bytes());
        s.prefixed(&w.payload);
    }
    if let Some(u) = &c.username {
        s.prefixed(u.as_bytes());
    }
    if let Some(p) = &c.password {
        s.prefixed(p);
    }
}

fn subscription_options(f: &SubscribeFilter, v5: bool) -> u8 {
    let qos = f.qos as u8;
    if !v5 {
        return qos;
    }
    qos | (u8::from(f.no_local) << 2)
        | (u8::from(f.retain_as_published) << 3)
        | ((f.retain_handling & 0b11) << 4)
}

/// PUBACK/PUBREC/PUBREL/PUBCOMP, one per QoS 1/2 message in each direction,
/// so the property block is sized once and the short forms (§3.4.2.1:
/// remaining length 2 = success without properties, 3 = reason code without
/// properties) are written as single slices.
#[inline]
fn write_pubresp(first: u8, r: &PubResp, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    let [hi, lo] = r.pkid.to_be_bytes();
    let plen = if v5 {
        let mut len = Len::default();
        r.properties.walk(&mut len);
        len.remaining().ok_or(EncodeError::TooLarge(len.n))?
    } else {
        0
    };
    if !v5 || (r.reason == 0 && plen == 0) {
        out.put_slice(&[first, 2, hi, lo]);
    } else if plen == 0 {
        out.put_slice(&[first, 3, hi, lo, r.reason]);
    } else {
        let remaining = 3 + varint_len(plen) + plen;
        if remaining > MAX_VARINT {
            return Err(EncodeError::TooLarge(remaining));
        }
        out.reserve(1 + varint_len(remaining) + remaining);
        out.put_u8(first);
        put_varint(out, remaining);
        out.put_slice(&[hi, lo, r.reason]);
        put_varint(out, plen);
        r.properties.walk(&mut Out(out));
    }
    Ok(())
}

/// Sizes of a PUBLISH, computed once and reused for writing, so the
/// property block (the only part that needs a walk) is sized exactly once.
struct PublishLayout {
    /// Property block size without its length prefix (v5 only).
    props: usize,
    remaining: usize,
}

impl PublishLayout {
    /// `None` if some field cannot be represented on the wire.
    #[inline]
    fn new(p: &PublishRef<'_>, v5: bool) -> Option<Self> {
        if p.topic.len() > usize::from(u16::MAX) {
            return None;
        }
        let mut n = 2 + p.topic.len();
        if p.qos != QoS::AtMostOnce {
            n += 2;
        }
        let mut props = 0;
        if v5 {
            let mut len = Len::default();
            PublishProps(p).walk(&mut len);
            props = len.remaining()?;
            n += varint_len(props) + props;
        }
        let remaining = n.checked_add(p.payload.len())?;
        (remaining <= MAX_VARINT).then_some(PublishLayout { props, remaining })
    }

    #[inline]
    fn total(&self) -> usize {
        1 + varint_len(self.remaining) + self.remaining
    }

    #[inline]
    fn write(&self, p: &PublishRef<'_>, v5: bool, out: &mut BytesMut) {
        let total = self.total();
        out.reserve(total);
        let start = out.len();
        out.put_u8(publish_first_byte(p.dup, p.qos, p.retain));
        put_varint(out, self.remaining);
        // Length checked in `new`.
        out.put_u16(p.topic.len() as u16);
        out.put_slice(p.topic.as_bytes());
        if p.qos != QoS::AtMostOnce {
            out.put_u16(p.pkid);
        }
        if v5 {
            put_varint(out, self.props);
            PublishProps(p).walk(&mut Out(out));
        }
        out.put_slice(p.payload);
        debug_assert_eq!(out.len() - start, total, "sizing and writing disagree");
    }
}

/// Appends one PUBLISH (hot path: no allocation besides `out` growing).
///
/// A PUBLISH that cannot be represented on the wire (topic or a property
/// string over 65 535 bytes, subscription identifier over 268 435 455, body
/// over 268 435 455 bytes) is not written at all; [`publish_encoded_len`]
/// reports such a message as `usize::MAX`, so the size check the broker
/// makes against the client's Maximum Packet Size already filters it out.
#[inline]
pub fn encode_publish(p: &PublishRef<'_>, version: ProtocolVersion, out: &mut BytesMut) {
    let v5 = version.is_v5();
    if let Some(layout) = PublishLayout::new(p, v5) {
        layout.write(p, v5, out);
    }
}

/// Exact encoded size of `p`, to compare with the client's Maximum Packet Size.
///
/// `usize::MAX` for a message that cannot be encoded at all (see
/// [`encode_publish`]).
#[inline]
pub fn publish_encoded_len(p: &PublishRef<'_>, version: ProtocolVersion) -> usize {
    PublishLayout::new(p, version.is_v5()).map_or(usize::MAX, |l| l.total())
}

//! The checks behind the cargo-fuzz targets in `fuzz/`, kept in the library
//! so that `cargo test` (codec/tests/fuzz_corpus.rs) replays the committed
//! corpus and every past crash without libFuzzer.
//!
//! Each function takes arbitrary bytes, as a peer could send them. Malformed
//! input is never a failure: a function panics only when the codec breaks
//! one of its own invariants, and the panic message says which.

use bytes::{Bytes, BytesMut};

use crate::{
    DecodeError, Packet, Properties, ProtocolVersion, PublishRef, decode, encode, encode_publish,
    publish_encoded_len,
};

/// Packet size limit for [`decode_stream_v311`] and [`decode_stream_v5`]:
/// the broker's default `max_packet_size`.
pub const STREAM_MAX_PACKET_SIZE: usize = 1024 * 1024;

/// A second, small limit the same stream is decoded under, so that the
/// "too large" path is compared with the unlimited one on every input.
pub const SMALL_MAX_PACKET_SIZE: usize = 64;

/// Decodes `data` as a client's byte stream on an MQTT 3.1.1 connection;
/// see [`decode_stream`] for what is checked.
pub fn decode_stream_v311(data: &[u8]) {
    decode_stream(data, ProtocolVersion::V311);
}

/// Decodes `data` as a client's byte stream on an MQTT 5.0 connection;
/// see [`decode_stream`] for what is checked.
pub fn decode_stream_v5(data: &[u8]) {
    decode_stream(data, ProtocolVersion::V5);
}

/// Checks [`roundtrip_packet`] for every packet that `data` decodes to,
/// first on a 3.1.1 connection, then on a 5.0 one.
pub fn roundtrip(data: &[u8]) {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (packets, _) = decode_all(data, version, usize::MAX);
        for (packet, _) in &packets {
            roundtrip_packet(packet, version);
        }
    }
}

/// How a stream decode ended after its last complete packet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// `Ok(None)` with this many bytes left over (an incomplete packet).
    Incomplete(usize),
    Error(DecodeError),
}

/// Feeds `data` to [`decode`] as one buffer, packet after packet, until it
/// returns `Ok(None)` or an error, with [`STREAM_MAX_PACKET_SIZE`]. Checks:
///
/// * no call consumes more than the buffer holds; `Ok(None)` consumes
///   nothing; a decoded packet consumes at least its two-byte fixed header
///   and no more than the packet size limit;
/// * every decoded packet re-encodes ([`encode`] succeeds in the
///   connection's version, or the CONNECT's own);
/// * [`Properties::detach`] leaves every property block equal and no longer
///   pointing into the read buffer;
/// * splitting the stream into reads does not matter: fed one byte at a
///   time, the decoder yields the same packets and ends the same way (same
///   error, or the same number of bytes left waiting), and consumes nothing
///   while a packet is incomplete;
/// * the size limit only ever cuts the stream short: under
///   [`SMALL_MAX_PACKET_SIZE`] the same packets come out up to the first one
///   larger than the limit, which fails with `PacketTooLarge` naming its exact
///   size; where the unlimited decode ended on an error or an incomplete
///   packet, the limited one ends the same way or with `PacketTooLarge` for
///   a size over the limit.
pub fn decode_stream(data: &[u8], version: ProtocolVersion) {
    let mut buf = BytesMut::from(data);
    let start = buf.as_ptr() as usize;
    let read_buffer = start..start + buf.len();
    let (packets, end) = decode_buf(&mut buf, version, STREAM_MAX_PACKET_SIZE);
    for (packet, _) in &packets {
        let mut out = BytesMut::new();
        if let Err(e) = encode(packet, encode_version(packet, version), &mut out) {
            panic!("decoded packet does not re-encode ({e}): {packet:?}");
        }
        for props in properties_of(packet) {
            let mut detached = props.clone();
            detached.detach();
            assert_eq!(&detached, props, "detach changed the properties");
            for (field, ptr) in borrowed(&detached) {
                assert!(
                    !read_buffer.contains(&ptr),
                    "after detach, {field} still points into the read buffer: {props:?}"
                );
            }
        }
    }
    byte_at_a_time(data, version, &packets, &end);
    small_limit(data, version, &packets, &end);
}

/// Decodes packets from `data` until `Ok(None)` or an error, checking the
/// consumption rules; returns each packet with the bytes it consumed.
fn decode_all(data: &[u8], version: ProtocolVersion, max: usize) -> (Vec<(Packet, usize)>, End) {
    decode_buf(&mut BytesMut::from(data), version, max)
}

fn decode_buf(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max: usize,
) -> (Vec<(Packet, usize)>, End) {
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        let result = decode(buf, version, max);
        let after = buf.len();
        assert!(
            after <= before,
            "decode grew its buffer from {before} to {after} bytes"
        );
        match result {
            Ok(Some(packet)) => {
                let used = before - after;
                assert!(
                    used >= 2,
                    "a packet was decoded from {used} bytes: {packet:?}"
                );
                assert!(
                    used <= max,
                    "a {used}-byte packet was accepted under a limit of {max}"
                );
                packets.push((packet, used));
            }
            Ok(None) => {
                assert_eq!(after, before, "Ok(None) consumed input");
                return (packets, End::Incomplete(after));
            }
            Err(e) => return (packets, End::Error(e)),
        }
    }
}

/// Every property block a packet carries (a CONNECT's will has its own).
fn properties_of(packet: &Packet) -> Vec<&Properties> {
    match packet {
        Packet::Connect(c) => {
            let mut v = vec![&c.properties];
            v.extend(c.will.as_ref().map(|w| &w.properties));
            v
        }
        Packet::ConnAck(p) => vec![&p.properties],
        Packet::Publish(p) => vec![&p.properties],
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            vec![&p.properties]
        }
        Packet::Subscribe(p) => vec![&p.properties],
        Packet::SubAck(p) => vec![&p.properties],
        Packet::Unsubscribe(p) => vec![&p.properties],
        Packet::UnsubAck(p) => vec![&p.properties],
        Packet::Disconnect(p) => vec![&p.properties],
        Packet::Auth(p) => vec![&p.properties],
        Packet::PingReq | Packet::PingResp => Vec::new(),
    }
}

/// Where each non-empty string or binary property's bytes live.
fn borrowed(p: &Properties) -> Vec<(&'static str, usize)> {
    let mut out = Vec::new();
    let strings = [
        ("content_type", &p.content_type),
        ("response_topic", &p.response_topic),
        ("assigned_client_identifier", &p.assigned_client_identifier),
        ("authentication_method", &p.authentication_method),
        ("response_information", &p.response_information),
        ("server_reference", &p.server_reference),
        ("reason_string", &p.reason_string),
    ];
    for (name, v) in strings {
        if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
            out.push((name, v.as_ptr() as usize));
        }
    }
    for (name, v) in [
        ("correlation_data", &p.correlation_data),
        ("authentication_data", &p.authentication_data),
    ] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
            out.push((name, v.as_ptr() as usize));
        }
    }
    for (k, v) in &p.user_properties {
        for s in [k, v] {
            if !s.is_empty() {
                out.push(("a user property", s.as_ptr() as usize));
            }
        }
    }
    out
}

/// CONNECT is written in its own protocol version, everything else in the
/// connection's.
fn encode_version(packet: &Packet, connection: ProtocolVersion) -> ProtocolVersion {
    match packet {
        Packet::Connect(c) => c.protocol,
        _ => connection,
    }
}

fn byte_at_a_time(data: &[u8], version: ProtocolVersion, expected: &[(Packet, usize)], end: &End) {
    let mut buf = BytesMut::with_capacity(data.len());
    let mut got = 0usize;
    for &byte in data {
        buf.extend_from_slice(&[byte]);
        loop {
            let before = buf.len();
            match decode(&mut buf, version, STREAM_MAX_PACKET_SIZE) {
                Ok(Some(packet)) => {
                    let Some((want, used)) = expected.get(got) else {
                        panic!(
                            "fed byte by byte, an extra packet {packet:?} was decoded \
                             where the whole buffer gave {end:?}"
                        );
                    };
                    assert_eq!(&packet, want, "packet {got} differs when fed byte by byte");
                    assert_eq!(
                        before - buf.len(),
                        *used,
                        "packet {got} consumed a different length when fed byte by byte"
                    );
                    got += 1;
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed input");
                    break;
                }
                Err(e) => {
                    assert_eq!(
                        got,
                        expected.len(),
                        "fed byte by byte, the stream failed ({e}) after {got} packets, \
                         the whole buffer decoded {}",
                        expected.len()
                    );
                    assert_eq!(
                        &End::Error(e),
                        end,
                        "fed byte by byte, the stream ended differently"
                    );
                    return;
                }
            }
        }
    }
    assert_eq!(
        got,
        expected.len(),
        "fed byte by byte, fewer packets were decoded"
    );
    assert_eq!(
        &End::Incomplete(buf.len()),
        end,
        "fed byte by byte, the stream ended differently"
    );
}

fn small_limit(data: &[u8], version: ProtocolVersion, expected: &[(Packet, usize)], end: &End) {
    let (small, small_end) = decode_all(data, version, SMALL_MAX_PACKET_SIZE);
    let fitting = expected
        .iter()
        .take_while(|(_, used)| *used <= SMALL_MAX_PACKET_SIZE)
        .count();
    assert_eq!(
        small.len(),
        fitting,
        "under a {SMALL_MAX_PACKET_SIZE}-byte limit {} packets were decoded, expected the \
         first {fitting}",
        small.len()
    );
    for (i, ((a, _), (b, _))) in small.iter().zip(expected).enumerate() {
        assert_eq!(a, b, "packet {i} differs under a small limit");
    }
    let too_large = |size: usize| DecodeError::PacketTooLarge {
        size,
        max: SMALL_MAX_PACKET_SIZE,
    };
    if let Some((_, used)) = expected.get(fitting) {
        assert_eq!(
            small_end,
            End::Error(too_large(*used)),
            "packet {fitting} of {used} bytes was not refused as too large"
        );
        return;
    }
    let acceptable = match (&small_end, end) {
        (End::Error(DecodeError::PacketTooLarge { size, max }), _) => {
            *max == SMALL_MAX_PACKET_SIZE
                && *size > SMALL_MAX_PACKET_SIZE
                && match end {
                    End::Error(DecodeError::PacketTooLarge { size: s, .. }) => s == size,
                    _ => true,
                }
        }
        (a, b) => a == b,
    };
    assert!(
        acceptable,
        "under a small limit the stream ended with {small_end:?}, without one with {end:?}"
    );
}

/// Checks that one decoded packet survives the encoder unchanged:
///
/// * it encodes (in `version`, or a CONNECT's own), and the bytes decode,
///   consuming all of them, to an equal packet; encoding that packet gives
///   the same bytes again;
/// * the encoding decodes under a packet size limit equal to its length and
///   fails with `PacketTooLarge` naming that length under one byte less;
///   without its last byte it is incomplete (`Ok(None)`), not an error;
/// * for PUBLISH, the broker's fan-out path agrees: [`publish_encoded_len`]
///   is the exact length [`encode_publish`] writes, the bytes equal
///   [`encode`]'s when nothing is rewritten, and (v5) the per-subscriber
///   topic alias, subscription identifiers and message expiry it writes are
///   the ones the subscriber decodes, with every other property unchanged;
/// * the Debug form of a CONNECT (what logs show) does not depend on its
///   password.
pub fn roundtrip_packet(packet: &Packet, version: ProtocolVersion) {
    let enc = encode_version(packet, version);
    let first = encode_ok(packet, enc);
    let len = first.len();

    let mut buf = first.clone();
    let again = match decode(&mut buf, version, len) {
        Ok(Some(p)) => p,
        other => panic!(
            "the encoding of {packet:?} ({first:02x?}) does not decode under a limit of its \
             own length: {other:?}"
        ),
    };
    assert!(
        buf.is_empty(),
        "decoding the encoding of {packet:?} left {} bytes",
        buf.len()
    );
    assert_eq!(&again, packet, "decode(encode(p)) != p; bytes {first:02x?}");
    let second = encode_ok(&again, enc);
    assert_eq!(first, second, "encoding is not stable for {packet:?}");

    let mut buf = first.clone();
    assert_eq!(
        decode(&mut buf, version, len - 1),
        Err(DecodeError::PacketTooLarge {
            size: len,
            max: len - 1
        }),
        "a {len}-byte packet was not refused under a limit of {}",
        len - 1
    );
    let mut buf = BytesMut::from(&first[..len - 1]);
    assert_eq!(
        decode(&mut buf, version, usize::MAX),
        Ok(None),
        "the encoding of {packet:?} without its last byte is not just incomplete"
    );

    if let Packet::Connect(c) = packet {
        let mut other = c.clone();
        other.password = c
            .password
            .as_ref()
            .map(|_| Bytes::from_static(b"\0not the password"));
        assert_eq!(
            format!("{c:?}"),
            format!("{other:?}"),
            "the Debug form of CONNECT depends on the password"
        );
    }

    if let Packet::Publish(p) = packet {
        let plain = PublishRef {
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
        };
        let mut out = BytesMut::new();
        encode_publish(&plain, version, &mut out);
        assert_eq!(out, first, "encode_publish and encode disagree for {p:?}");
        assert_eq!(
            publish_encoded_len(&plain, version),
            len,
            "publish_encoded_len is wrong for {p:?}"
        );
        if version.is_v5() {
            // What the broker writes for one subscriber: an alias of its
            // own, the identifiers of its matching subscriptions and the
            // remaining expiry, whatever the publisher sent.
            let ids = [1, u32::from(p.pkid) + 1, 268_435_455];
            let alias = p.pkid.max(1);
            let rewritten = PublishRef {
                topic_alias: Some(alias),
                subscription_identifiers: &ids,
                message_expiry_interval: Some(u32::from(p.pkid)),
                ..plain
            };
            let mut out = BytesMut::new();
            encode_publish(&rewritten, version, &mut out);
            assert_eq!(
                out.len(),
                publish_encoded_len(&rewritten, version),
                "publish_encoded_len is wrong for a rewritten {p:?}"
            );
            let mut want = p.clone();
            want.properties.topic_alias = Some(alias);
            want.properties.subscription_identifiers = ids.to_vec();
            want.properties.message_expiry_interval = Some(u32::from(p.pkid));
            match decode(&mut out, version, usize::MAX) {
                Ok(Some(got)) => assert_eq!(
                    got,
                    Packet::Publish(want),
                    "the subscriber does not decode what encode_publish wrote"
                ),
                other => panic!("a rewritten PUBLISH does not decode: {other:?} for {p:?}"),
            }
            assert!(out.is_empty(), "a rewritten PUBLISH left bytes over");
        }
    }
}

fn encode_ok(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    if let Err(e) = encode(packet, version, &mut out) {
        panic!("decoded packet does not re-encode in {version:?} ({e}): {packet:?}");
    }
    assert!(out.len() >= 2, "{packet:?} encoded to {} bytes", out.len());
    out
}

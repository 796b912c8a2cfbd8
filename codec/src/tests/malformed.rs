use bytes::BytesMut;

use super::*;
use crate::{DecodeError, decode};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Not an error yet: wait for more bytes, consume nothing.
    Incomplete,
    Malformed,
    Protocol,
    TooLarge(usize),
    Unsupported,
    InvalidTopic,
    TooMany,
}

fn classify(r: Result<Option<Packet>, DecodeError>) -> Result<Want, String> {
    match r {
        Ok(None) => Ok(Want::Incomplete),
        Ok(Some(p)) => Err(format!("{p:?}")),
        Err(DecodeError::Malformed(_)) => Ok(Want::Malformed),
        Err(DecodeError::Protocol(_)) => Ok(Want::Protocol),
        Err(DecodeError::PacketTooLarge { size, .. }) => Ok(Want::TooLarge(size)),
        Err(DecodeError::UnsupportedProtocol) => Ok(Want::Unsupported),
        Err(DecodeError::InvalidTopic(_)) => Ok(Want::InvalidTopic),
        Err(DecodeError::TooMany(_)) => Ok(Want::TooMany),
    }
}

/// CONNECT body after the protocol name/level, for v3.1.1.
fn connect311(flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut b = b"\x00\x04MQTT\x04".to_vec();
    b.push(flags);
    b.extend_from_slice(&[0, 60]);
    b.extend_from_slice(rest);
    raw(0x10, &b)
}

/// v5 PUBLISH QoS 0 to topic "t" with the given property block content.
fn publish5_props(props: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 1, b't', props.len() as u8];
    b.extend_from_slice(props);
    b.extend_from_slice(b"payload");
    raw(0x30, &b)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn malformed_inputs_are_rejected_with_the_right_error() {
    use Want::*;
    let max = 1024;
    let cases: Vec<(&str, Vec<u8>, ProtocolVersion, Want)> = vec![
        // Framing.
        ("empty buffer", vec![], V3, Incomplete),
        ("truncated remaining length", vec![0x30, 0x80], V3, Incomplete),
        ("truncated remaining length, 3 of 4 bytes", vec![0x30, 0xff, 0xff, 0xff], V3, Incomplete),
        ("body not yet arrived", vec![0x30, 10, 0, 1], V3, Incomplete),
        ("5-byte remaining length", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], V3, Malformed),
        ("non-minimal remaining length", vec![0xc0, 0x80, 0x00], V3, Malformed),
        (
            "oversized declared length, no body yet",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            V3,
            TooLarge(268_435_455 + 5),
        ),
        ("oversized by one byte", vec![0x30, 0xfe, 0x07], V5, TooLarge(1025)),
        ("packet type 0", vec![0x00, 0], V3, Malformed),
        ("AUTH in v3.1.1", vec![0xf0, 0], V3, Malformed),
        // Fixed header flags.
        ("PUBACK flags", vec![0x41, 2, 0, 1], V3, Malformed),
        ("PUBREL flags 0", vec![0x60, 2, 0, 1], V3, Malformed),
        ("SUBSCRIBE flags 0", raw(0x80, b"\x00\x01\x00\x01a\x00"), V3, Malformed),
        ("UNSUBSCRIBE flags 3", raw(0xa3, b"\x00\x01\x00\x01a"), V3, Malformed),
        ("PINGREQ flags", vec![0xc1, 0], V3, Malformed),
        ("DISCONNECT flags", vec![0xe8, 0], V5, Malformed),
        ("PUBLISH QoS 3", raw(0x36, b"\x00\x01t\x00\x01"), V3, Malformed),
        ("PUBLISH QoS 0 with DUP", raw(0x38, b"\x00\x01t"), V3, Malformed),
        // CONNECT.
        ("wrong protocol name", raw(0x10, b"\x00\x04MQTX\x04\x02\x00\x3c\x00\x01a"), V3, Unsupported),
        ("wrong level for MQTT", raw(0x10, b"\x00\x04MQTT\x03\x02\x00\x3c\x00\x01a"), V3, Unsupported),
        ("level 6", raw(0x10, b"\x00\x04MQTT\x06\x02\x00\x3c\x00\x01a"), V5, Unsupported),
        ("MQIsdp with level 4", raw(0x10, b"\x00\x06MQIsdp\x04\x02\x00\x3c\x00\x01a"), V3, Unsupported),
        ("truncated protocol name", raw(0x10, b"\x00\x04MQ"), V3, Malformed),
        ("missing level", raw(0x10, b"\x00\x04MQTT"), V3, Malformed),
        ("reserved connect flag", connect311(0b11, b"\x00\x01a"), V3, Malformed),
        ("will QoS without will flag", connect311(0b1000, b"\x00\x01a"), V3, Malformed),
        ("will retain without will flag", connect311(0b10_0000, b"\x00\x01a"), V3, Malformed),
        ("will QoS 3", connect311(0b1_1100, b"\x00\x01a\x00\x01t\x00\x00"), V3, Malformed),
        ("password without username (3.1.1)", connect311(0b100_0000, b"\x00\x01a\x00\x01p"), V3, Protocol),
        ("wildcard will topic", connect311(0b100, b"\x00\x01a\x00\x01#\x00\x00"), V3, InvalidTopic),
        ("client id beyond packet", connect311(0b10, b"\x00\x09a"), V3, Malformed),
        ("trailing bytes after CONNECT", connect311(0b10, b"\x00\x01a\xff"), V3, Malformed),
        ("missing username", connect311(0b1000_0000, b"\x00\x01a"), V3, Malformed),
        (
            "v5 CONNECT property not allowed (topic alias)",
            raw(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x23\x00\x01\x00\x01a"),
            V3,
            Protocol,
        ),
        (
            "v5 will property not allowed (session expiry)",
            raw(0x10, b"\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x01a\x05\x11\x00\x00\x00\x01\x00\x01t\x00\x00"),
            V3,
            Protocol,
        ),
        (
            "v5 auth data without method",
            raw(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c\x04\x16\x00\x01x\x00\x01a"),
            V5,
            Protocol,
        ),
        // Strings.
        ("bad UTF-8 topic", raw(0x30, b"\x00\x02\xc3\x28"), V3, Malformed),
        ("surrogate in topic", raw(0x30, b"\x00\x03\xed\xa0\x80"), V3, Malformed),
        ("NUL in topic", raw(0x30, b"\x00\x03a\x00b"), V3, Malformed),
        ("NUL in client id", connect311(0b10, b"\x00\x02a\x00"), V3, Malformed),
        ("NUL in subscribe filter", raw(0x82, b"\x00\x01\x00\x02a\x00\x00"), V3, Malformed),
        ("'+' in PUBLISH topic", raw(0x30, b"\x00\x03a/+"), V3, InvalidTopic),
        ("'#' in PUBLISH topic", raw(0x30, b"\x00\x03a/#"), V5, InvalidTopic),
        ("topic length beyond packet", raw(0x30, b"\x00\x0aabc"), V3, Malformed),
        ("topic length cut in half", raw(0x30, b"\x00"), V3, Malformed),
        ("empty topic (3.1.1)", raw(0x30, b"\x00\x00x"), V3, InvalidTopic),
        ("empty topic without alias (v5)", raw(0x30, b"\x00\x00\x00x"), V5, Protocol),
        // Packet identifiers.
        ("PUBLISH QoS 1 packet id 0", raw(0x32, b"\x00\x01t\x00\x00"), V3, Protocol),
        ("PUBLISH QoS 1 packet id missing", raw(0x32, b"\x00\x01t\x00"), V3, Malformed),
        ("PUBACK packet id 0", vec![0x40, 2, 0, 0], V3, Protocol),
        ("PUBCOMP v5 packet id 0", vec![0x70, 3, 0, 0, 0], V5, Protocol),
        ("SUBSCRIBE packet id 0", raw(0x82, b"\x00\x00\x00\x01a\x00"), V3, Protocol),
        ("UNSUBSCRIBE packet id 0", raw(0xa2, b"\x00\x00\x00\x01a"), V3, Protocol),
        // Remaining length vs. fixed layouts.
        ("PUBACK too short", vec![0x40, 1, 0], V3, Malformed),
        ("PUBACK too long (3.1.1)", vec![0x40, 3, 0, 1, 0], V3, Malformed),
        ("PINGREQ with body", vec![0xc0, 1, 0], V3, Malformed),
        ("DISCONNECT with body (3.1.1)", vec![0xe0, 1, 0], V3, Malformed),
        ("UNSUBACK with codes (3.1.1)", vec![0xb0, 3, 0, 1, 0], V3, Malformed),
        ("CONNACK reserved flags", vec![0x20, 2, 2, 0], V3, Malformed),
        ("v5 CONNACK without property length", vec![0x20, 2, 0, 0], V5, Malformed),
        // SUBSCRIBE / UNSUBSCRIBE payloads.
        ("SUBSCRIBE without filters", raw(0x82, b"\x00\x01"), V3, Protocol),
        ("v5 SUBSCRIBE without filters", raw(0x82, b"\x00\x01\x00"), V5, Protocol),
        ("UNSUBSCRIBE without filters", raw(0xa2, b"\x00\x01"), V3, Protocol),
        ("SUBSCRIBE missing options byte", raw(0x82, b"\x00\x01\x00\x01a"), V3, Malformed),
        ("SUBSCRIBE v3 no-local bit", raw(0x82, b"\x00\x01\x00\x01a\x04"), V3, Malformed),
        ("SUBSCRIBE v3 QoS 3", raw(0x82, b"\x00\x01\x00\x01a\x03"), V3, Malformed),
        ("SUBSCRIBE v5 reserved bits", raw(0x82, b"\x00\x01\x00\x00\x01a\x40"), V5, Malformed),
        ("SUBSCRIBE v5 retain handling 3", raw(0x82, b"\x00\x01\x00\x00\x01a\x30"), V5, Protocol),
        ("SUBSCRIBE v5 QoS 3", raw(0x82, b"\x00\x01\x00\x00\x01a\x03"), V5, Protocol),
        ("SUBACK without codes", vec![0x90, 2, 0, 1], V3, Protocol),
        // Properties.
        ("property not allowed (session expiry on PUBLISH)", publish5_props(b"\x11\x00\x00\x00\x01"), V5, Protocol),
        ("property not allowed (reason string on PUBLISH)", publish5_props(b"\x1f\x00\x01x"), V5, Protocol),
        ("duplicate property", publish5_props(b"\x01\x01\x01\x00"), V5, Protocol),
        ("duplicate content type", publish5_props(b"\x03\x00\x01a\x03\x00\x01b"), V5, Protocol),
        ("unknown property 0x04", publish5_props(b"\x04\x00"), V5, Malformed),
        ("unknown property 0x2b", publish5_props(b"\x2b\x00"), V5, Malformed),
        ("unknown property 0x80", publish5_props(b"\x80\x01"), V5, Malformed),
        ("subscription identifier 0", publish5_props(b"\x0b\x00"), V5, Protocol),
        ("topic alias 0", publish5_props(b"\x23\x00\x00"), V5, Protocol),
        ("payload format indicator 2", publish5_props(b"\x01\x02"), V5, Protocol),
        ("wildcard response topic", publish5_props(b"\x08\x00\x01#"), V5, Protocol),
        ("property value crosses property length", publish5_props(b"\x02\x00\x00"), V5, Malformed),
        ("user property value missing", publish5_props(b"\x26\x00\x01k"), V5, Malformed),
        ("property length beyond packet", raw(0x30, b"\x00\x01t\x09\x01\x00"), V5, Malformed),
        ("property length truncated", raw(0x30, b"\x00\x01t\x80"), V5, Malformed),
        (
            "repeated subscription identifier on SUBSCRIBE",
            raw(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00"),
            V5,
            Protocol,
        ),
        (
            "PUBACK property not allowed",
            cat(&[&[0x40, 7, 0, 1, 0, 3], b"\x23\x00\x01"]),
            V5,
            Protocol,
        ),
        ("PUBACK trailing after properties", vec![0x40, 5, 0, 1, 0, 0, 0], V5, Malformed),
        ("DISCONNECT will delay not allowed", raw(0xe0, b"\x00\x05\x18\x00\x00\x00\x01"), V5, Protocol),
        ("AUTH topic alias not allowed", raw(0xf0, b"\x18\x03\x23\x00\x01"), V5, Protocol),
        // Empty topic filters (MQTT-4.7.3-1).
        ("SUBSCRIBE empty filter", raw(0x82, b"\x00\x01\x00\x00\x00"), V3, Protocol),
        ("SUBSCRIBE empty filter v5", raw(0x82, b"\x00\x01\x00\x00\x00\x00"), V5, Protocol),
        ("UNSUBSCRIBE empty filter", raw(0xa2, b"\x00\x01\x00\x00"), V3, Protocol),
    ];
    let mut failures = Vec::new();
    for (name, bytes, v, want) in &cases {
        let mut buf = BytesMut::from(&bytes[..]);
        let got = classify(decode(&mut buf, *v, max));
        if got != Ok(*want) {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
        if *want == Incomplete && buf.len() != bytes.len() {
            failures.push(format!("{name}: consumed bytes while incomplete"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// One decoded packet costs a small multiple of its wire size: a packet
/// of empty items is cut off at the item caps.
#[test]
fn item_counts_per_packet_are_capped() {
    let max = 1 << 20;
    let many = |n: usize, item: &[u8]| -> Vec<u8> { item.repeat(n) };
    let sub = |n: usize| {
        let mut b = vec![0, 1];
        b.extend(many(n, b"\x00\x01#\x00"));
        raw(0x82, &b)
    };
    let mut at = BytesMut::from(&sub(crate::MAX_ITEMS_PER_PACKET)[..]);
    assert!(matches!(
        decode(&mut at, V3, max),
        Ok(Some(Packet::Subscribe(_)))
    ));
    let mut over = BytesMut::from(&sub(crate::MAX_ITEMS_PER_PACKET + 1)[..]);
    assert_eq!(classify(decode(&mut over, V3, max)), Ok(Want::TooMany));
    let mut unsub_body = vec![0, 1];
    unsub_body.extend(many(crate::MAX_ITEMS_PER_PACKET + 1, b"\x00\x01a"));
    let mut unsub = BytesMut::from(&raw(0xa2, &unsub_body)[..]);
    assert_eq!(classify(decode(&mut unsub, V3, max)), Ok(Want::TooMany));
    // v5 PUBLISH with empty user properties: 5 bytes each on the wire.
    let props = many(crate::MAX_USER_PROPERTIES + 1, b"\x26\x00\x00\x00\x00");
    let mut b = vec![0, 1, b't'];
    let mut len = Vec::new();
    let mut n = props.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            len.push(byte);
            break;
        }
        len.push(byte | 0x80);
    }
    b.extend(len);
    b.extend(props);
    let mut publish = BytesMut::from(&raw(0x30, &b)[..]);
    assert_eq!(classify(decode(&mut publish, V5, max)), Ok(Want::TooMany));
    assert_eq!(
        DecodeError::TooMany("x").reason_code(),
        crate::reason::QUOTA_EXCEEDED
    );
}

#[test]
fn valid_edge_cases_are_accepted() {
    // Repeatable properties on PUBLISH.
    let p = decode_one(
        &publish5_props(b"\x0b\x01\x0b\x80\x01\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w"),
        V5,
    )
    .unwrap();
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 128]);
    assert_eq!(p.properties.user_properties.len(), 2);
    assert_eq!(&p.payload[..], b"payload");
    // Empty topic with an alias (v5).
    let p = decode_one(&raw(0x30, b"\x00\x00\x03\x23\x00\x05x"), V5).unwrap();
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(p.topic, "");
    assert_eq!(p.properties.topic_alias, Some(5));
    // v5 allows a password without a username.
    let c = raw(0x10, b"\x00\x04MQTT\x05\x42\x00\x3c\x00\x00\x01a\x00\x01p");
    let Packet::Connect(c) = decode_one(&c, V3).unwrap() else {
        panic!()
    };
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert_eq!(c.username, None);
    // Exactly at the size limit is fine.
    let mut buf = BytesMut::from(&raw(0x30, &[b'x'; 1021][..])[..]);
    buf[3] = 0;
    buf[4] = 1;
    assert_eq!(buf.len(), 1024);
    assert!(decode(&mut buf, V3, 1024).unwrap().is_some());
}

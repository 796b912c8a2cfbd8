use bytes::{Bytes, BytesMut};

use super::*;
use crate::{decode, encode, encode_publish, publish_encoded_len};

fn forwarded() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        content_type: Some(bs("text/plain")),
        response_topic: Some(bs("r/1")),
        correlation_data: Some(Bytes::from_static(b"c")),
        user_properties: vec![(bs("a"), bs("b"))],
        // These three belong to the sender's view and must not be forwarded.
        topic_alias: Some(99),
        subscription_identifiers: vec![77],
        message_expiry_interval: Some(1000),
        ..Properties::default()
    }
}

fn pref<'a>(
    topic: &'a str,
    payload: &'a [u8],
    qos: QoS,
    properties: Option<&'a Properties>,
    sub_ids: &'a [u32],
) -> PublishRef<'a> {
    PublishRef {
        dup: false,
        qos,
        retain: true,
        topic,
        pkid: if qos == QoS::AtMostOnce { 0 } else { 42 },
        payload,
        properties,
        topic_alias: None,
        subscription_identifiers: sub_ids,
        message_expiry_interval: None,
    }
}

#[test]
fn encoded_len_matches_bytes_written() {
    let props = forwarded();
    let empty = Properties::default();
    // Payload sizes straddle every remaining-length varint boundary.
    let sizes = [
        0usize, 1, 100, 120, 127, 128, 16_370, 16_383, 16_384, 2_097_151, 2_097_152,
    ];
    let big = vec![0x5au8; 2_097_152 + 10];
    let mut out = BytesMut::new();
    let mut checked = 0;
    for &n in &sizes {
        for v in [ProtocolVersion::V31, V3, V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for (p, ids) in [
                    (None, &[][..]),
                    (Some(&empty), &[][..]),
                    (Some(&props), &[1, 200, 268_435_455][..]),
                ] {
                    for alias in [None, Some(3)] {
                        let mut r = pref("t/x", &big[..n], qos, p, ids);
                        r.topic_alias = alias;
                        r.message_expiry_interval = alias.map(|_| 5);
                        out.clear();
                        encode_publish(&r, v, &mut out);
                        assert_eq!(publish_encoded_len(&r, v), out.len(), "{n} {v:?}");
                        checked += 1;
                        if n <= 16_384 || (qos == QoS::AtMostOnce && alias.is_none()) {
                            // Decodes back, across every varint boundary.
                            let mut buf = out.split();
                            let Some(Packet::Publish(p)) = decode(&mut buf, v, usize::MAX).unwrap()
                            else {
                                panic!("expected PUBLISH")
                            };
                            assert!(buf.is_empty());
                            assert_eq!((p.payload.len(), &*p.topic, p.qos), (n, "t/x", qos));
                        }
                    }
                }
            }
        }
    }
    assert_eq!(checked, sizes.len() * 3 * 3 * 3 * 2);
}

#[test]
fn encode_of_a_publish_matches_encode_publish() {
    for (v5, v) in [(true, V5), (false, V3)] {
        for p in sample_packets(v5) {
            let Packet::Publish(p) = &p else { continue };
            let mut a = BytesMut::new();
            encode(&Packet::Publish(p.clone()), v, &mut a).unwrap();
            let r = PublishRef {
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
            let mut b = BytesMut::new();
            encode_publish(&r, v, &mut b);
            assert_eq!(a, b);
            assert_eq!(publish_encoded_len(&r, v), b.len());
        }
    }
}

#[test]
fn per_subscriber_fields_replace_forwarded_ones() {
    let props = forwarded();
    let mut r = pref("t", b"data", QoS::AtLeastOnce, Some(&props), &[5, 6]);
    r.topic_alias = Some(2);
    r.message_expiry_interval = Some(30);
    let mut out = BytesMut::new();
    encode_publish(&r, V5, &mut out);
    let Packet::Publish(p) = decode_one(&out, V5).unwrap() else {
        panic!()
    };
    let want = Properties {
        topic_alias: Some(2),
        subscription_identifiers: vec![5, 6],
        message_expiry_interval: Some(30),
        ..forwarded()
    };
    assert_eq!(p.properties, want);
    assert_eq!(
        (p.pkid, p.qos, p.retain, p.dup),
        (42, QoS::AtLeastOnce, true, false)
    );
    assert_eq!(&p.payload[..], b"data");

    // None of them when the PublishRef has none.
    let r = pref("t", b"data", QoS::AtMostOnce, Some(&props), &[]);
    out.clear();
    encode_publish(&r, V5, &mut out);
    let Packet::Publish(p) = decode_one(&out, V5).unwrap() else {
        panic!()
    };
    assert_eq!(p.properties.topic_alias, None);
    assert!(p.properties.subscription_identifiers.is_empty());
    assert_eq!(p.properties.message_expiry_interval, None);
}

#[test]
fn v311_publish_ignores_properties() {
    let props = forwarded();
    let mut r = pref("a/b", b"x", QoS::AtMostOnce, Some(&props), &[1]);
    r.topic_alias = Some(1);
    let mut out = BytesMut::new();
    encode_publish(&r, V3, &mut out);
    assert_eq!(&out[..], b"\x31\x06\x00\x03a/bx");
}

#[test]
fn dup_is_cleared_on_qos0() {
    let mut r = pref("a", b"", QoS::AtMostOnce, None, &[]);
    r.dup = true;
    let mut out = BytesMut::new();
    encode_publish(&r, V3, &mut out);
    assert_eq!(out[0], 0x31);
}

#[test]
fn unrepresentable_publish_is_not_written() {
    let long = "x".repeat(65_536);
    let r = pref(&long, b"", QoS::AtMostOnce, None, &[]);
    assert_eq!(publish_encoded_len(&r, V3), usize::MAX);
    let mut out = BytesMut::new();
    encode_publish(&r, V3, &mut out);
    assert!(out.is_empty());
    let r = pref("t", b"", QoS::AtMostOnce, None, &[268_435_456]);
    assert_eq!(publish_encoded_len(&r, V5), usize::MAX);
    // ...but fine in v3.1.1, where subscription identifiers are not sent.
    assert_eq!(publish_encoded_len(&r, V3), 5);
}

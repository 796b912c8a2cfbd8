use bytes::{Bytes, BytesMut};

use super::*;
use crate::{EncodeError, decode, encode};

fn round_trip(p: &Packet, v: ProtocolVersion) {
    let bytes = encode_one(p, v);
    let back = decode_one(&bytes, v).unwrap_or_else(|e| panic!("{p:?} in {v:?}: {e}"));
    assert_eq!(&back, p, "{v:?}");
}

#[test]
fn every_packet_round_trips_in_v5() {
    for p in sample_packets(true) {
        round_trip(&p, V5);
    }
}

#[test]
fn every_packet_round_trips_in_v311() {
    for p in sample_packets(false) {
        round_trip(&p, V3);
    }
}

#[test]
fn v31_connect_round_trips_and_uses_mqisdp() {
    let c = Connect {
        protocol: ProtocolVersion::V31,
        clean_start: true,
        keep_alive: 10,
        client_id: bs("old"),
        will: None,
        username: Some(bs("u")),
        password: Some(Bytes::from_static(b"p")),
        properties: Properties::default(),
    };
    let p = Packet::Connect(Box::new(c));
    // The connection version passed in is irrelevant for CONNECT.
    let bytes = encode_one(&p, V5);
    assert_eq!(&bytes[2..11], b"\x00\x06MQIsdp\x03");
    assert_eq!(decode_one(&bytes, V5).unwrap(), p);
    assert_eq!(decode_one(&bytes, V3).unwrap(), p);
}

#[test]
fn v311_connect_matches_spec_bytes() {
    let p = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 60,
        client_id: bs("a"),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }));
    let expected = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b10, 0, 60, 0, 1, b'a',
    ];
    assert_eq!(&encode_one(&p, V3)[..], &expected);
    assert_eq!(decode_one(&expected, V5).unwrap(), p);
}

#[test]
fn v5_connect_is_parsed_by_its_own_level_on_a_v311_connection() {
    let p = &sample_packets(true)[0];
    let bytes = encode_one(p, V5);
    assert_eq!(&decode_one(&bytes, V3).unwrap(), p);
}

#[test]
fn v311_omits_v5_fields() {
    // Properties and reason codes set on a packet are dropped for v3.1.1.
    let ack = Packet::PubAck(PubResp {
        pkid: 1,
        reason: 0x10,
        properties: Properties {
            reason_string: Some(bs("x")),
            ..Properties::default()
        },
    });
    assert_eq!(&encode_one(&ack, V3)[..], &[0x40, 2, 0, 1]);
    let unsuback = Packet::UnsubAck(UnsubAck {
        pkid: 1,
        codes: vec![0, 0x11],
        properties: Properties::default(),
    });
    assert_eq!(&encode_one(&unsuback, V3)[..], &[0xb0, 2, 0, 1]);
    let disc = Packet::Disconnect(Disconnect {
        reason: 0x8b,
        properties: Properties::default(),
    });
    assert_eq!(&encode_one(&disc, V3)[..], &[0xe0, 0]);
    let suback = Packet::SubAck(SubAck {
        pkid: 2,
        codes: vec![1, 0x80],
        properties: Properties::default(),
    });
    assert_eq!(&encode_one(&suback, V3)[..], &[0x90, 4, 0, 2, 1, 0x80]);
    let connack = Packet::ConnAck(ConnAck {
        session_present: true,
        code: 0,
        properties: Properties::default(),
    });
    assert_eq!(&encode_one(&connack, V3)[..], &[0x20, 2, 1, 0]);
    assert_eq!(&encode_one(&connack, V5)[..], &[0x20, 3, 1, 0, 0]);
}

#[test]
fn auth_is_not_in_v311() {
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&Packet::Auth(Auth::default()), V3, &mut out),
        Err(EncodeError::NotInVersion)
    );
    assert!(out.is_empty());
}

#[test]
fn v5_short_forms_are_written() {
    let cases: [(Packet, &[u8]); 8] = [
        (Packet::PubAck(PubResp::new(1, 0)), &[0x40, 2, 0, 1]),
        (
            Packet::PubRec(PubResp::new(1, 0x10)),
            &[0x50, 3, 0, 1, 0x10],
        ),
        (Packet::PubRel(PubResp::new(2, 0)), &[0x62, 2, 0, 2]),
        (
            Packet::PubComp(PubResp::new(2, 0x92)),
            &[0x70, 3, 0, 2, 0x92],
        ),
        (Packet::Disconnect(Disconnect::default()), &[0xe0, 0]),
        (
            Packet::Disconnect(Disconnect {
                reason: 4,
                properties: Properties::default(),
            }),
            &[0xe0, 2, 4, 0],
        ),
        (Packet::Auth(Auth::default()), &[0xf0, 0]),
        (Packet::PingReq, &[0xc0, 0]),
    ];
    for (p, bytes) in cases {
        assert_eq!(&encode_one(&p, V5)[..], bytes, "{p:?}");
        assert_eq!(decode_one(bytes, V5).unwrap(), p);
    }
}

#[test]
fn v5_short_forms_are_read() {
    // Reason code with an explicit empty property block.
    assert_eq!(
        decode_one(&[0x40, 4, 0, 1, 0x10, 0], V5).unwrap(),
        Packet::PubAck(PubResp::new(1, 0x10))
    );
    assert_eq!(
        decode_one(&[0x62, 3, 0, 9, 0], V5).unwrap(),
        Packet::PubRel(PubResp::new(9, 0))
    );
    assert_eq!(
        decode_one(&[0xe0, 2, 0x8e, 0], V5).unwrap(),
        Packet::Disconnect(Disconnect {
            reason: 0x8e,
            properties: Properties::default()
        })
    );
    // v3.1.1 has no long forms.
    assert!(matches!(
        decode_one(&[0x40, 3, 0, 1, 0], V3),
        Err(crate::DecodeError::Malformed(_))
    ));
}

#[test]
fn unrepresentable_packets_are_refused_without_writing() {
    let long = "x".repeat(70_000);
    let p = Packet::Unsubscribe(Unsubscribe {
        pkid: 1,
        filters: vec![bs(&long)],
        properties: Properties::default(),
    });
    let mut out = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode(&p, V3, &mut out),
        Err(EncodeError::TooLarge(_))
    ));
    assert_eq!(&out[..], b"keep");
    let sub_id = Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![SubscribeFilter {
            filter: bs("a"),
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }],
        properties: Properties {
            subscription_identifiers: vec![268_435_456],
            ..Properties::default()
        },
    });
    assert!(encode(&sub_id, V5, &mut out).is_err());
    assert_eq!(&out[..], b"keep");
}

#[test]
fn decoded_publish_shares_the_read_buffer() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: bs("zero/copy"),
        pkid: 5,
        properties: Properties::default(),
        payload: Bytes::from(vec![7u8; 1000]),
    });
    let mut buf = encode_one(&p, V5);
    buf.extend_from_slice(&encode_one(&Packet::PingReq, V5));
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(got)) = decode(&mut buf, V5, usize::MAX).unwrap() else {
        panic!("expected PUBLISH");
    };
    assert!(range.contains(&(got.payload.as_ptr() as usize)));
    assert!(range.contains(&(got.topic.as_ptr() as usize)));
    assert_eq!(
        decode(&mut buf, V5, usize::MAX).unwrap(),
        Some(Packet::PingReq)
    );
}

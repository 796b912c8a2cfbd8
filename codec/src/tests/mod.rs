//! Codec tests. Shared fixtures live here; each submodule covers one concern.

mod fuzz;
mod malformed;
mod publish;
mod roundtrip;
mod stream;

use bytes::{Bytes, BytesMut};

use crate::packet::*;
use crate::{decode, encode};

pub(crate) const V3: ProtocolVersion = ProtocolVersion::V311;
pub(crate) const V5: ProtocolVersion = ProtocolVersion::V5;

pub(crate) fn bs(s: &str) -> ByteString {
    ByteString::from(s)
}

pub(crate) fn encode_one(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).expect("encodable");
    out
}

/// Decodes exactly one packet that must fill `bytes` completely.
pub(crate) fn decode_one(bytes: &[u8], v: ProtocolVersion) -> Result<Packet, crate::DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, usize::MAX)?.expect("complete packet");
    assert!(buf.is_empty(), "packet left {} bytes", buf.len());
    Ok(p)
}

/// Builds a raw packet from a first byte and a body, computing the
/// remaining length, for hand-written wire fixtures.
pub(crate) fn raw(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut n = body.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            v.push(b);
            break;
        }
        v.push(b | 0x80);
    }
    v.extend_from_slice(body);
    v
}

fn user_props() -> Vec<(ByteString, ByteString)> {
    vec![(bs("k"), bs("v")), (bs("k"), bs("second value ✓"))]
}

/// Every packet type with representative content. With `v5` false the
/// v5-only parts (properties, reason codes) are left empty so the packets
/// survive a v3.1.1 round trip.
pub(crate) fn sample_packets(v5: bool) -> Vec<Packet> {
    let props = |p: Properties| if v5 { p } else { Properties::default() };
    let reason = |r: u8| if v5 { r } else { 0 };
    let ack_props = || {
        props(Properties {
            reason_string: Some(bs("because")),
            user_properties: user_props(),
            ..Properties::default()
        })
    };
    let protocol = if v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    };
    vec![
        Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: bs("client-1"),
            will: Some(LastWill {
                topic: bs("will/topic"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: props(Properties {
                    will_delay_interval: Some(30),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(600),
                    content_type: Some(bs("text/plain")),
                    response_topic: Some(bs("reply/here")),
                    correlation_data: Some(Bytes::from_static(&[0, 1, 2])),
                    user_properties: user_props(),
                    ..Properties::default()
                }),
            }),
            username: Some(bs("user")),
            password: Some(Bytes::from_static(b"p\0ss")),
            properties: props(Properties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(100),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                authentication_method: Some(bs("SCRAM-SHA-1")),
                authentication_data: Some(Bytes::from_static(b"client-first")),
                user_properties: user_props(),
                ..Properties::default()
            }),
        })),
        Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: false,
            keep_alive: 0,
            client_id: bs(""),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: props(Properties {
                session_expiry_interval: Some(0),
                assigned_client_identifier: Some(bs("auto-123")),
                server_keep_alive: Some(120),
                authentication_method: Some(bs("SCRAM-SHA-1")),
                authentication_data: Some(Bytes::from_static(b"server-final")),
                response_information: Some(bs("resp/")),
                server_reference: Some(bs("other:1883")),
                reason_string: Some(bs("welcome")),
                receive_maximum: Some(65535),
                topic_alias_maximum: Some(0),
                maximum_qos: Some(1),
                retain_available: Some(0),
                user_properties: user_props(),
                maximum_packet_size: Some(65536),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(1),
                shared_subscription_available: Some(0),
                ..Properties::default()
            }),
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: if v5 { reason::NOT_AUTHORIZED } else { 5 },
            properties: Properties::default(),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: bs("a/b"),
            pkid: 0,
            properties: Properties::default(),
            payload: Bytes::from_static(b"hello"),
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: bs("sensors/ünïcode/temp"),
            pkid: 65535,
            properties: props(Properties {
                payload_format_indicator: Some(0),
                message_expiry_interval: Some(10),
                content_type: Some(bs("application/json")),
                response_topic: Some(bs("resp/1")),
                correlation_data: Some(Bytes::from_static(b"corr")),
                subscription_identifiers: vec![1, 268_435_455, 300],
                topic_alias: Some(7),
                user_properties: user_props(),
                ..Properties::default()
            }),
            payload: Bytes::from(vec![0xAB; 300]),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: bs("empty/payload"),
            pkid: 1,
            properties: Properties::default(),
            payload: Bytes::new(),
        }),
        Packet::PubAck(PubResp::new(1, 0)),
        Packet::PubAck(PubResp {
            pkid: 2,
            reason: reason(reason::NO_MATCHING_SUBSCRIBERS),
            properties: ack_props(),
        }),
        Packet::PubRec(PubResp::new(3, reason(reason::QUOTA_EXCEEDED))),
        Packet::PubRec(PubResp {
            pkid: 4,
            reason: 0,
            properties: ack_props(),
        }),
        Packet::PubRel(PubResp::new(5, 0)),
        Packet::PubRel(PubResp {
            pkid: 6,
            reason: reason(reason::PACKET_IDENTIFIER_NOT_FOUND),
            properties: ack_props(),
        }),
        Packet::PubComp(PubResp::new(7, 0)),
        Packet::PubComp(PubResp {
            pkid: 8,
            reason: reason(reason::PACKET_IDENTIFIER_NOT_FOUND),
            properties: ack_props(),
        }),
        Packet::Subscribe(Subscribe {
            pkid: 9,
            filters: vec![
                SubscribeFilter {
                    filter: bs("a/+/c"),
                    qos: QoS::AtMostOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
                SubscribeFilter {
                    filter: bs("$share/g/x/#"),
                    qos: QoS::ExactlyOnce,
                    no_local: v5,
                    retain_as_published: v5,
                    retain_handling: if v5 { 2 } else { 0 },
                },
            ],
            properties: props(Properties {
                subscription_identifiers: vec![42],
                user_properties: user_props(),
                ..Properties::default()
            }),
        }),
        Packet::SubAck(SubAck {
            pkid: 9,
            codes: vec![0, 2, 0x80],
            properties: ack_props(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            pkid: 10,
            filters: vec![bs("a/+/c"), bs("#")],
            properties: props(Properties {
                user_properties: user_props(),
                ..Properties::default()
            }),
        }),
        Packet::UnsubAck(UnsubAck {
            pkid: 10,
            codes: if v5 {
                vec![0, reason::NO_SUBSCRIPTION_EXISTED]
            } else {
                vec![]
            },
            properties: ack_props(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
        Packet::Disconnect(Disconnect {
            reason: reason(reason::DISCONNECT_WITH_WILL),
            properties: Properties::default(),
        }),
        Packet::Disconnect(Disconnect {
            reason: reason(reason::SERVER_SHUTTING_DOWN),
            properties: props(Properties {
                session_expiry_interval: Some(0),
                server_reference: Some(bs("elsewhere")),
                reason_string: Some(bs("bye")),
                user_properties: user_props(),
                ..Properties::default()
            }),
        }),
    ]
    .into_iter()
    .chain(
        v5.then(|| {
            [
                Packet::Auth(Auth::default()),
                Packet::Auth(Auth {
                    reason: 0x18,
                    properties: Properties {
                        authentication_method: Some(bs("SCRAM-SHA-1")),
                        authentication_data: Some(Bytes::from_static(b"\x00\xff")),
                        reason_string: Some(bs("continue")),
                        user_properties: user_props(),
                        ..Properties::default()
                    },
                }),
            ]
        })
        .into_iter()
        .flatten(),
    )
    .collect()
}

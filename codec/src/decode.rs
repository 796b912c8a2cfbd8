//! Bounded, zero-copy decoding.
//!
//! Order of checks matters for a server facing untrusted peers: the first
//! byte (type and flags) is judged as soon as it arrives, the declared size
//! as soon as the remaining length is complete, and only then do we wait for
//! the body. A peer can therefore never make us buffer a packet we would
//! reject anyway.
use bytes::{Buf, Bytes, BytesMut};

use crate::packet::{
    Auth, ConnAck, Connect, Disconnect, LastWill, Packet, ProtocolVersion, PubResp, Publish, QoS,
    SubAck, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe,
};
use crate::properties::{self, Ctx};
use crate::reader::{Reader, parse_varint, topic_name};
use crate::{DecodeError, Properties};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Decodes one packet from the front of `buf`, consuming its bytes.
///
/// * `Ok(None)`: not enough bytes yet; nothing consumed.
/// * Declared size (fixed header + remaining length) over `max_packet_size`
///   fails at once, before the body has arrived.
/// * `version` is the connection's version (from its CONNECT); CONNECT itself
///   is parsed by its own protocol level.
///
/// On error the connection is unusable (framing is lost); how much of `buf`
/// was consumed is then unspecified, but never more than `buf` held.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let v5 = version.is_v5();
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, v5)?;
    let Some((remaining, n)) = parse_varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header = 1 + n;
    let total = header + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let kind = first >> 4;

    // Packets that keep no slice of the input are parsed straight from the
    // buffer: skipping `freeze` saves two atomic reference-count operations
    // per QoS 1/2 acknowledgement and per ping.
    if let Some(p) = short_packet(kind, buf.get(header..total).unwrap_or_default(), v5)? {
        buf.advance(total);
        return Ok(Some(p.into_packet()));
    }

    let mut body = buf.split_to(total).freeze();
    body.advance(header);
    if kind == PUBLISH {
        return publish(first, body, v5);
    }
    let packet = match kind {
        CONNECT => Packet::Connect(Box::new(connect(body)?)),
        CONNACK => Packet::ConnAck(connack(body, v5)?),
        PUBACK => Packet::PubAck(pubresp(body, v5)?),
        PUBREC => Packet::PubRec(pubresp(body, v5)?),
        PUBREL => Packet::PubRel(pubresp(body, v5)?),
        PUBCOMP => Packet::PubComp(pubresp(body, v5)?),
        SUBSCRIBE => Packet::Subscribe(subscribe(body, v5)?),
        SUBACK => Packet::SubAck(suback(body, v5)?),
        UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(body, v5)?),
        UNSUBACK => Packet::UnsubAck(unsuback(body, v5)?),
        DISCONNECT => Packet::Disconnect(disconnect(body, v5)?),
        AUTH => Packet::Auth(auth(body)?),
        // PINGREQ/PINGRESP are always handled by `short_packet`, type 0 by
        // `check_first_byte`.
        _ => return Err(DecodeError::Malformed("unexpected packet type")),
    };
    Ok(Some(packet))
}

/// Rejects reserved packet types and flag combinations from the first byte
/// alone (spec §2.1.3), before the rest of the packet is even read.
#[inline]
fn check_first_byte(first: u8, v5: bool) -> Result<(), DecodeError> {
    let flags = first & 0x0f;
    match first >> 4 {
        0 => Err(DecodeError::Malformed("reserved packet type 0")),
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                Err(DecodeError::Malformed("PUBLISH with QoS 3"))
            } else if qos == 0 && flags & 0b1000 != 0 {
                Err(DecodeError::Malformed("PUBLISH with QoS 0 and DUP set"))
            } else {
                Ok(())
            }
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => {
            if flags == 0b0010 {
                Ok(())
            } else {
                Err(DecodeError::Malformed("invalid fixed header flags"))
            }
        }
        AUTH if !v5 => Err(DecodeError::Malformed("AUTH is not an MQTT 3.1.1 packet")),
        _ => {
            if flags == 0 {
                Ok(())
            } else {
                Err(DecodeError::Malformed("invalid fixed header flags"))
            }
        }
    }
}

#[inline]
fn nonzero_pkid(id: u16) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(DecodeError::Protocol("packet identifier 0"))
    } else {
        Ok(id)
    }
}

/// A fixed-size packet that holds no borrowed data, in a few bytes.
///
/// `Packet` is ~470 bytes (the inline `Properties`), and moving one copies
/// all of it whatever the variant; returning this instead and building the
/// `Packet` only in the final return expression keeps acknowledgements and
/// pings free of those copies.
#[derive(Clone, Copy)]
enum Short {
    Ack { kind: u8, pkid: u16, reason: u8 },
    PingReq,
    PingResp,
    Disconnect(u8),
    Auth,
}

impl Short {
    #[inline(always)]
    fn into_packet(self) -> Packet {
        match self {
            Short::Ack { kind, pkid, reason } => {
                let r = PubResp::new(pkid, reason);
                match kind {
                    PUBACK => Packet::PubAck(r),
                    PUBREC => Packet::PubRec(r),
                    PUBREL => Packet::PubRel(r),
                    _ => Packet::PubComp(r),
                }
            }
            Short::PingReq => Packet::PingReq,
            Short::PingResp => Packet::PingResp,
            Short::Disconnect(reason) => Packet::Disconnect(Disconnect {
                reason,
                properties: Properties::default(),
            }),
            Short::Auth => Packet::Auth(Auth::default()),
        }
    }
}

/// Decodes the fixed-size packets that hold no borrowed data, or returns
/// `None` to send the packet down the general (frozen `Bytes`) path.
#[inline(always)]
fn short_packet(kind: u8, body: &[u8], v5: bool) -> Result<Option<Short>, DecodeError> {
    let p = match kind {
        PUBACK | PUBREC | PUBREL | PUBCOMP => {
            let (pkid, reason) = match *body {
                [a, b] => (u16::from_be_bytes([a, b]), 0),
                // v5 short form: reason code present, property length omitted.
                [a, b, r] if v5 => (u16::from_be_bytes([a, b]), r),
                [_, _, _, ..] if v5 => return Ok(None),
                _ => {
                    return Err(DecodeError::Malformed(
                        "invalid remaining length for acknowledgement",
                    ));
                }
            };
            Short::Ack {
                kind,
                pkid: nonzero_pkid(pkid)?,
                reason,
            }
        }
        PINGREQ | PINGRESP => {
            if !body.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ/PINGRESP with a body"));
            }
            if kind == PINGREQ {
                Short::PingReq
            } else {
                Short::PingResp
            }
        }
        DISCONNECT => match *body {
            [] => Short::Disconnect(0),
            [r] if v5 => Short::Disconnect(r),
            _ if v5 => return Ok(None),
            _ => return Err(DecodeError::Malformed("DISCONNECT with a body")),
        },
        AUTH => match *body {
            [] => Short::Auth,
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(p))
}

fn connect(body: Bytes) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    // The name is compared as raw bytes: a wrong name is "unsupported
    // protocol" (answered with a CONNACK), not a malformed string.
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (name.as_ref(), level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        _ => return Err(DecodeError::UnsupportedProtocol),
    };
    let v5 = protocol.is_v5();

    let flags = r.u8()?;
    if flags & 0b0000_0001 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS/retain set without will flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3 in CONNECT"))?;
    if !v5 && has_password && !has_username {
        return Err(DecodeError::Protocol("password flag without username flag"));
    }

    let keep_alive = r.u16()?;
    let properties = if v5 {
        properties::read(&mut r, properties::CONNECT)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 {
            properties::read(&mut r, properties::WILL)?
        } else {
            Properties::default()
        };
        let topic = topic_name(r.binary()?)?;
        if topic.is_empty() {
            return Err(DecodeError::InvalidTopic("empty will topic"));
        }
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn connack(body: Bytes, v5: bool) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(body);
    let flags = r.u8()?;
    if flags & 0b1111_1110 != 0 {
        return Err(DecodeError::Malformed("reserved CONNACK flags set"));
    }
    let code = r.u8()?;
    let properties = read_props(&mut r, v5, properties::CONNACK)?;
    r.finish()?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        code,
        properties,
    })
}

#[inline]
fn read_props(r: &mut Reader, v5: bool, ctx: Ctx) -> Result<Properties, DecodeError> {
    if v5 {
        properties::read(r, ctx)
    } else {
        Ok(Properties::default())
    }
}

/// Returns the decoder's final result type so that the PUBLISH is built
/// directly in the caller's return slot: `Packet` is ~470 bytes and moving a
/// local one into the result costs a memcpy per packet. The property-less
/// case writes default properties in place and copies nothing.
#[inline]
fn publish(first: u8, body: Bytes, v5: bool) -> Result<Option<Packet>, DecodeError> {
    let mut r = Reader::new(body);
    let dup = first & 0b1000 != 0;
    let retain = first & 1 != 0;
    let qos = QoS::from_u8((first >> 1) & 0b11).ok_or(DecodeError::Malformed("QoS 3"))?;
    let topic = topic_name(r.binary()?)?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        nonzero_pkid(r.u16()?)?
    };
    if v5 && !r.skip_zero_byte() {
        let properties = properties::read(&mut r, properties::PUBLISH)?;
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::Protocol(
                "empty topic name without topic alias",
            ));
        }
        return Ok(Some(Packet::Publish(Publish {
            dup,
            qos,
            retain,
            topic,
            pkid,
            properties,
            payload: r.rest(),
        })));
    }
    if topic.is_empty() {
        return Err(if v5 {
            DecodeError::Protocol("empty topic name without topic alias")
        } else {
            DecodeError::InvalidTopic("empty topic name")
        });
    }
    Ok(Some(Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        properties: Properties::default(),
        payload: r.rest(),
    })))
}

/// Long form of PUBACK/PUBREC/PUBREL/PUBCOMP (v5 with properties); the
/// short forms never reach here.
fn pubresp(body: Bytes, v5: bool) -> Result<PubResp, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(r.u16()?)?;
    let (reason, properties) = if v5 && !r.is_empty() {
        let reason = r.u8()?;
        let props = if r.is_empty() {
            Properties::default()
        } else {
            properties::read(&mut r, properties::ACK)?
        };
        (reason, props)
    } else {
        (0, Properties::default())
    };
    r.finish()?;
    Ok(PubResp {
        pkid,
        reason,
        properties,
    })
}

fn subscribe(body: Bytes, v5: bool) -> Result<Subscribe, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(r.u16()?)?;
    let properties = read_props(&mut r, v5, properties::SUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        if filters.len() >= crate::MAX_ITEMS_PER_PACKET {
            return Err(DecodeError::TooMany("topic filters"));
        }
        let filter = r.string()?;
        if filter.is_empty() {
            return Err(DecodeError::Protocol("empty topic filter"));
        }
        let opts = r.u8()?;
        let qos = opts & 0b11;
        let retain_handling = (opts >> 4) & 0b11;
        if v5 {
            if opts & 0b1100_0000 != 0 {
                return Err(DecodeError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            if qos == 3 {
                return Err(DecodeError::Protocol("subscription QoS 3"));
            }
            if retain_handling == 3 {
                return Err(DecodeError::Protocol("retain handling 3"));
            }
        } else if opts & 0b1111_1100 != 0 || qos == 3 {
            return Err(DecodeError::Malformed("invalid requested QoS byte"));
        }
        filters.push(SubscribeFilter {
            filter,
            qos: QoS::from_u8(qos).ok_or(DecodeError::Malformed("subscription QoS 3"))?,
            no_local: opts & 0b0100 != 0,
            retain_as_published: opts & 0b1000 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        pkid,
        filters,
        properties,
    })
}

fn suback(body: Bytes, v5: bool) -> Result<SubAck, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(r.u16()?)?;
    let properties = read_props(&mut r, v5, properties::ACK)?;
    let codes = r.rest().to_vec();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without return codes"));
    }
    Ok(SubAck {
        pkid,
        codes,
        properties,
    })
}

fn unsubscribe(body: Bytes, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(r.u16()?)?;
    let properties = read_props(&mut r, v5, properties::UNSUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        if filters.len() >= crate::MAX_ITEMS_PER_PACKET {
            return Err(DecodeError::TooMany("topic filters"));
        }
        let filter = r.string()?;
        if filter.is_empty() {
            return Err(DecodeError::Protocol("empty topic filter"));
        }
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        pkid,
        filters,
        properties,
    })
}

fn unsuback(body: Bytes, v5: bool) -> Result<UnsubAck, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(r.u16()?)?;
    if !v5 {
        r.finish()?;
        return Ok(UnsubAck {
            pkid,
            codes: Vec::new(),
            properties: Properties::default(),
        });
    }
    let properties = properties::read(&mut r, properties::ACK)?;
    let codes = r.rest().to_vec();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
    }
    Ok(UnsubAck {
        pkid,
        codes,
        properties,
    })
}

/// Long form only (v5 with properties); see `short_packet`.
fn disconnect(body: Bytes, v5: bool) -> Result<Disconnect, DecodeError> {
    if !v5 {
        return Err(DecodeError::Malformed("DISCONNECT with a body"));
    }
    let mut r = Reader::new(body);
    let reason = r.u8()?;
    let properties = properties::read(&mut r, properties::DISCONNECT)?;
    r.finish()?;
    Ok(Disconnect { reason, properties })
}

/// Long form only; the empty AUTH (success, no properties) is handled by
/// `short_packet`. A lone reason byte is accepted like DISCONNECT's.
fn auth(body: Bytes) -> Result<Auth, DecodeError> {
    let mut r = Reader::new(body);
    let reason = r.u8()?;
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        properties::read(&mut r, properties::AUTH)?
    };
    r.finish()?;
    Ok(Auth { reason, properties })
}

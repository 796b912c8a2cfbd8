//! MQTT 5 properties: identifiers, which packet may carry which, decoding and
//! the single field walk the encoder uses both to size and to write them.

use crate::DecodeError;
use crate::encode::Sink;
use crate::packet::Properties;
use crate::reader::Reader;

pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const MAXIMUM_QOS: u8 = 0x24;
pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

const fn bits(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << ids[i];
        i += 1;
    }
    m
}

/// Every identifier defined by the spec; anything else is malformed.
const KNOWN: u64 = bits(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    SUBSCRIPTION_IDENTIFIER,
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    WILL_DELAY_INTERVAL,
    REQUEST_RESPONSE_INFORMATION,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    TOPIC_ALIAS,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);

/// Where a property block appears: which identifiers it admits and which of
/// those may repeat (spec §2.2.2.2 and the per-packet sections).
#[derive(Clone, Copy)]
pub(crate) struct Ctx {
    allowed: u64,
    repeatable: u64,
}

const USER: u64 = bits(&[USER_PROPERTY]);

pub(crate) const CONNECT: Ctx = Ctx {
    allowed: bits(&[
        SESSION_EXPIRY_INTERVAL,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REQUEST_PROBLEM_INFORMATION,
        REQUEST_RESPONSE_INFORMATION,
        RECEIVE_MAXIMUM,
        TOPIC_ALIAS_MAXIMUM,
        USER_PROPERTY,
        MAXIMUM_PACKET_SIZE,
    ]),
    repeatable: USER,
};

pub(crate) const WILL: Ctx = Ctx {
    allowed: bits(&[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        WILL_DELAY_INTERVAL,
        USER_PROPERTY,
    ]),
    repeatable: USER,
};

pub(crate) const CONNACK: Ctx = Ctx {
    allowed: bits(&[
        SESSION_EXPIRY_INTERVAL,
        ASSIGNED_CLIENT_IDENTIFIER,
        SERVER_KEEP_ALIVE,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        RESPONSE_INFORMATION,
        SERVER_REFERENCE,
        REASON_STRING,
        RECEIVE_MAXIMUM,
        TOPIC_ALIAS_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        USER_PROPERTY,
        MAXIMUM_PACKET_SIZE,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        SHARED_SUBSCRIPTION_AVAILABLE,
    ]),
    repeatable: USER,
};

/// A PUBLISH fanned out to a client matching several subscriptions carries
/// one Subscription Identifier per subscription, hence repeatable here only.
pub(crate) const PUBLISH: Ctx = Ctx {
    allowed: bits(&[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        SUBSCRIPTION_IDENTIFIER,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ]),
    repeatable: bits(&[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER]),
};

/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(crate) const ACK: Ctx = Ctx {
    allowed: bits(&[REASON_STRING, USER_PROPERTY]),
    repeatable: USER,
};

pub(crate) const SUBSCRIBE: Ctx = Ctx {
    allowed: bits(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]),
    repeatable: USER,
};

pub(crate) const UNSUBSCRIBE: Ctx = Ctx {
    allowed: USER,
    repeatable: USER,
};

pub(crate) const DISCONNECT: Ctx = Ctx {
    allowed: bits(&[
        SESSION_EXPIRY_INTERVAL,
        SERVER_REFERENCE,
        REASON_STRING,
        USER_PROPERTY,
    ]),
    repeatable: USER,
};

pub(crate) const AUTH: Ctx = Ctx {
    allowed: bits(&[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ]),
    repeatable: USER,
};

/// Single-byte properties whose only legal values are 0 and 1.
fn flag(v: u8) -> Result<u8, DecodeError> {
    if v <= 1 {
        Ok(v)
    } else {
        Err(DecodeError::Protocol("property value must be 0 or 1"))
    }
}

fn nonzero_u16(v: u16, what: &'static str) -> Result<u16, DecodeError> {
    if v == 0 {
        Err(DecodeError::Protocol(what))
    } else {
        Ok(v)
    }
}

/// Reads a property length and the block it announces.
pub(crate) fn read(r: &mut Reader, ctx: Ctx) -> Result<Properties, DecodeError> {
    let mut props = Properties::default();
    read_into(r, ctx, &mut props)?;
    Ok(props)
}

/// Like [`read`], but fills a `Properties` that already sits inside the
/// packet being built. `Properties` is ~400 bytes; returning it by value on
/// the PUBLISH path costs a measurable memcpy per packet. `props` must be
/// default on entry.
#[inline]
pub(crate) fn read_into(
    r: &mut Reader,
    ctx: Ctx,
    props: &mut Properties,
) -> Result<(), DecodeError> {
    let len = r.varint()?;
    if len == 0 {
        return Ok(());
    }
    let saved = r.limit(len)?;
    let mut seen = 0u64;
    while !r.is_empty() {
        let id = r.u8()?;
        // Identifiers are formally variable byte integers, but every defined
        // one is below 0x80, so a single byte >= 64 is simply unknown.
        let bit = 1u64.checked_shl(u32::from(id)).unwrap_or(0);
        if bit & KNOWN == 0 {
            return Err(DecodeError::Malformed("unknown property identifier"));
        }
        if bit & ctx.allowed == 0 {
            return Err(DecodeError::Protocol("property not allowed on this packet"));
        }
        if seen & bit != 0 && ctx.repeatable & bit == 0 {
            return Err(DecodeError::Protocol("property appears more than once"));
        }
        seen |= bit;
        read_one(r, id, props)?;
    }
    r.unlimit(saved);
    if props.authentication_data.is_some() && props.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "authentication data without authentication method",
        ));
    }
    Ok(())
}

fn read_one(r: &mut Reader, id: u8, p: &mut Properties) -> Result<(), DecodeError> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(flag(r.u8()?)?),
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
        CONTENT_TYPE => p.content_type = Some(r.string()?),
        RESPONSE_TOPIC => {
            let t = r.string()?;
            if t.is_empty() || t.bytes().any(|c| c == b'+' || c == b'#') {
                return Err(DecodeError::Protocol("invalid response topic"));
            }
            p.response_topic = Some(t);
        }
        CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
        SUBSCRIPTION_IDENTIFIER => {
            let v = r.varint()?;
            if v == 0 {
                return Err(DecodeError::Protocol("subscription identifier 0"));
            }
            // parse_varint caps values at 268_435_455, which fits in u32.
            let v = u32::try_from(v)
                .map_err(|_| DecodeError::Malformed("subscription identifier too large"))?;
            if p.subscription_identifiers.len() >= crate::MAX_ITEMS_PER_PACKET {
                return Err(DecodeError::TooMany("subscription identifiers"));
            }
            p.subscription_identifiers.push(v);
        }
        SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
        SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
        AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
        AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
        REQUEST_PROBLEM_INFORMATION => p.request_problem_information = Some(flag(r.u8()?)?),
        WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
        REQUEST_RESPONSE_INFORMATION => p.request_response_information = Some(flag(r.u8()?)?),
        RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
        SERVER_REFERENCE => p.server_reference = Some(r.string()?),
        REASON_STRING => p.reason_string = Some(r.string()?),
        RECEIVE_MAXIMUM => {
            p.receive_maximum = Some(nonzero_u16(r.u16()?, "receive maximum 0")?);
        }
        TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
        TOPIC_ALIAS => p.topic_alias = Some(nonzero_u16(r.u16()?, "topic alias 0")?),
        MAXIMUM_QOS => p.maximum_qos = Some(flag(r.u8()?)?),
        RETAIN_AVAILABLE => p.retain_available = Some(flag(r.u8()?)?),
        USER_PROPERTY => {
            if p.user_properties.len() >= crate::MAX_USER_PROPERTIES {
                return Err(DecodeError::TooMany("user properties"));
            }
            let k = r.string()?;
            let v = r.string()?;
            p.user_properties.push((k, v));
        }
        MAXIMUM_PACKET_SIZE => {
            let v = r.u32()?;
            if v == 0 {
                return Err(DecodeError::Protocol("maximum packet size 0"));
            }
            p.maximum_packet_size = Some(v);
        }
        WILDCARD_SUBSCRIPTION_AVAILABLE => {
            p.wildcard_subscription_available = Some(flag(r.u8()?)?);
        }
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
            p.subscription_identifier_available = Some(flag(r.u8()?)?);
        }
        SHARED_SUBSCRIPTION_AVAILABLE => p.shared_subscription_available = Some(flag(r.u8()?)?),
        _ => return Err(DecodeError::Malformed("unknown property identifier")),
    }
    Ok(())
}

/// Feeds every set property to `s`, in identifier order.
///
/// The same walk sizes and writes a block, so the announced property length
/// can never disagree with the bytes written. With `per_subscriber` false the
/// three fields that differ per PUBLISH recipient are skipped; the PUBLISH
/// encoder supplies them from `PublishRef` instead.
pub(crate) fn walk<S: Sink>(p: &Properties, per_subscriber: bool, s: &mut S) {
    if let Some(v) = p.payload_format_indicator {
        s.u8(PAYLOAD_FORMAT_INDICATOR);
        s.u8(v);
    }
    if let Some(v) = p.message_expiry_interval.filter(|_| per_subscriber) {
        s.u8(MESSAGE_EXPIRY_INTERVAL);
        s.u32(v);
    }
    if let Some(v) = &p.content_type {
        s.u8(CONTENT_TYPE);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = &p.response_topic {
        s.u8(RESPONSE_TOPIC);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = &p.correlation_data {
        s.u8(CORRELATION_DATA);
        s.prefixed(v);
    }
    if per_subscriber {
        for &v in &p.subscription_identifiers {
            s.u8(SUBSCRIPTION_IDENTIFIER);
            s.varint(v as usize);
        }
    }
    if let Some(v) = p.session_expiry_interval {
        s.u8(SESSION_EXPIRY_INTERVAL);
        s.u32(v);
    }
    if let Some(v) = &p.assigned_client_identifier {
        s.u8(ASSIGNED_CLIENT_IDENTIFIER);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = p.server_keep_alive {
        s.u8(SERVER_KEEP_ALIVE);
        s.u16(v);
    }
    if let Some(v) = &p.authentication_method {
        s.u8(AUTHENTICATION_METHOD);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = &p.authentication_data {
        s.u8(AUTHENTICATION_DATA);
        s.prefixed(v);
    }
    if let Some(v) = p.request_problem_information {
        s.u8(REQUEST_PROBLEM_INFORMATION);
        s.u8(v);
    }
    if let Some(v) = p.will_delay_interval {
        s.u8(WILL_DELAY_INTERVAL);
        s.u32(v);
    }
    if let Some(v) = p.request_response_information {
        s.u8(REQUEST_RESPONSE_INFORMATION);
        s.u8(v);
    }
    if let Some(v) = &p.response_information {
        s.u8(RESPONSE_INFORMATION);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = &p.server_reference {
        s.u8(SERVER_REFERENCE);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = &p.reason_string {
        s.u8(REASON_STRING);
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = p.receive_maximum {
        s.u8(RECEIVE_MAXIMUM);
        s.u16(v);
    }
    if let Some(v) = p.topic_alias_maximum {
        s.u8(TOPIC_ALIAS_MAXIMUM);
        s.u16(v);
    }
    if let Some(v) = p.topic_alias.filter(|_| per_subscriber) {
        s.u8(TOPIC_ALIAS);
        s.u16(v);
    }
    if let Some(v) = p.maximum_qos {
        s.u8(MAXIMUM_QOS);
        s.u8(v);
    }
    if let Some(v) = p.retain_available {
        s.u8(RETAIN_AVAILABLE);
        s.u8(v);
    }
    for (k, v) in &p.user_properties {
        s.u8(USER_PROPERTY);
        s.prefixed(k.as_bytes());
        s.prefixed(v.as_bytes());
    }
    if let Some(v) = p.maximum_packet_size {
        s.u8(MAXIMUM_PACKET_SIZE);
        s.u32(v);
    }
    if let Some(v) = p.wildcard_subscription_available {
        s.u8(WILDCARD_SUBSCRIPTION_AVAILABLE);
        s.u8(v);
    }
    if let Some(v) = p.subscription_identifier_available {
        s.u8(SUBSCRIPTION_IDENTIFIER_AVAILABLE);
        s.u8(v);
    }
    if let Some(v) = p.shared_subscription_available {
        s.u8(SHARED_SUBSCRIPTION_AVAILABLE);
        s.u8(v);
    }
}

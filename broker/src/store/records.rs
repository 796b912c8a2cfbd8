//! How state is laid out on disk: keys and values of each keyspace. Pure
//! functions, so the format is unit-tested without a store.
//!
//! Messages are kept as MQTT 5 PUBLISH packets (the codec already encodes
//! and validates every property) behind an 8-byte wall-clock expiry, since
//! monotonic instants mean nothing to the next process.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use starling_codec::{self as codec, Packet, ProtocolVersion, PublishRef, QoS};
use tokio::time::Instant;

use super::QueueEntry;
use crate::router::{Message, SubIds, SubOptions};

/// Why a stored value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRecord(pub &'static str);

/// A persistent session as stored: everything needed to rebuild it except
/// its subscriptions, queue and incoming QoS 2 ids, which have keyspaces of
/// their own so that one SUBSCRIBE or acknowledgement writes one small record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub owner: Option<String>,
    pub expiry_secs: u64,
    /// Unix milliseconds when its client left; `None` while connected.
    pub disconnected_at_ms: Option<u64>,
    /// The connected client's will, published after a crash as after any
    /// connection lost without DISCONNECT.
    pub will: Option<StoredWill>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSub {
    /// As the client sent it, with any `$share/<group>/` prefix.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub sub_id: u32,
    pub check_read: bool,
    pub pub_states: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    /// The will message, encoded with [`encode_message`].
    pub message: Vec<u8>,
    pub delay_secs: u64,
}

impl StoredSub {
    pub fn new(filter: &str, o: &SubOptions) -> Self {
        StoredSub {
            filter: filter.to_owned(),
            qos: o.qos as u8,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
            sub_id: o.sub_id,
            check_read: o.check_read,
            pub_states: o.pub_states,
        }
    }

    pub fn options(&self) -> Result<SubOptions, BadRecord> {
        Ok(SubOptions {
            qos: qos(self.qos)?,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
            sub_id: self.sub_id,
            check_read: self.check_read,
            pub_states: self.pub_states,
        })
    }
}

fn qos(b: u8) -> Result<QoS, BadRecord> {
    match b {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(BadRecord("invalid QoS")),
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Encodes a message: expiry (unix ms, 0 = none) and a v5 PUBLISH.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let expiry_ms = m.expires_at.map_or(0, |t| {
        let left = t.saturating_duration_since(Instant::now());
        now_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
    });
    let p = PublishRef {
        dup: false,
        qos: m.qos,
        retain: m.retain,
        topic: &m.topic,
        // Any non-zero id: the packet is never sent, but QoS > 0 needs one.
        pkid: if m.qos == QoS::AtMostOnce { 0 } else { 1 },
        payload: &m.payload,
        properties: m.properties.as_deref(),
        topic_alias: None,
        subscription_identifiers: &[],
        message_expiry_interval: None,
    };
    let mut out = BytesMut::with_capacity(16 + m.topic.len() + m.payload.len());
    out.extend_from_slice(&expiry_ms.to_be_bytes());
    codec::encode_publish(&p, ProtocolVersion::V5, &mut out);
    // Unique: the buffer becomes the Vec without a copy.
    Vec::from(out)
}

/// Decodes [`encode_message`]'s bytes; `Ok(None)` if it has expired.
pub fn decode_message(b: &[u8], now_wall_ms: u64) -> Result<Option<Message>, BadRecord> {
    let (head, rest) = b
        .split_at_checked(8)
        .ok_or(BadRecord("message record too short"))?;
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(head);
    let expiry_ms = u64::from_be_bytes(expiry);
    if expiry_ms != 0 && expiry_ms <= now_wall_ms {
        return Ok(None);
    }
    let mut buf = BytesMut::from(rest);
    let p = match codec::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p))) => p,
        _ => return Err(BadRecord("message record is not a valid PUBLISH")),
    };
    let expires_at = (expiry_ms != 0)
        .then(|| Instant::now() + Duration::from_millis(expiry_ms.saturating_sub(now_wall_ms)));
    Ok(Some(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: (!p.properties.is_empty()).then(|| Arc::new(p.properties)),
        expires_at,
        origin: 0,
    }))
}

/// Queue entry: payload id, QoS, flags (1 retain, 2 released, 4 the
/// message follows inline), packet id, subscription identifiers.
pub fn encode_entry(e: &QueueEntry) -> Vec<u8> {
    encode_entry_with(e, None)
}

/// The same, with the message ([`encode_message`]'s bytes) inline: for a
/// message only this entry refers to, one record instead of two.
pub fn encode_entry_with(e: &QueueEntry, inline: Option<&[u8]>) -> Vec<u8> {
    let ids = e.sub_ids.as_slice();
    let extra = inline.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(14 + 4 * ids.len() + extra);
    out.extend_from_slice(&e.payload.to_be_bytes());
    out.push(e.qos as u8);
    out.push(u8::from(e.retain) | (u8::from(e.released) << 1) | (u8::from(inline.is_some()) << 2));
    out.extend_from_slice(&e.pkid.to_be_bytes());
    let n = u16::try_from(ids.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for id in ids.iter().take(usize::from(n)) {
        out.extend_from_slice(&id.to_be_bytes());
    }
    if let Some(m) = inline {
        out.extend_from_slice(m);
    }
    out
}

pub fn decode_entry(b: &[u8]) -> Result<QueueEntry, BadRecord> {
    decode_entry_with(b).map(|(e, _)| e)
}

/// A queue entry and, if it carries one, its inline message bytes.
pub fn decode_entry_with(b: &[u8]) -> Result<(QueueEntry, Option<&[u8]>), BadRecord> {
    let short = BadRecord("queue record too short");
    let (head, mut rest) = b.split_at_checked(14).ok_or(short.clone())?;
    let mut p = [0u8; 8];
    p.copy_from_slice(&head[..8]);
    let flags = head[9];
    let n = usize::from(u16::from_be_bytes([head[12], head[13]]));
    let mut sub_ids = SubIds::None;
    for _ in 0..n {
        let (id, r) = rest.split_at_checked(4).ok_or(short.clone())?;
        sub_ids.push(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        rest = r;
    }
    let inline = if flags & 4 != 0 {
        Some(rest)
    } else if rest.is_empty() {
        None
    } else {
        return Err(BadRecord("queue record has trailing bytes"));
    };
    let e = QueueEntry {
        payload: u64::from_be_bytes(p),
        qos: qos(head[8])?,
        retain: flags & 1 != 0,
        released: flags & 2 != 0,
        pkid: u16::from_be_bytes([head[10], head[11]]),
        sub_ids,
    };
    Ok((e, inline))
}

pub fn encode_sub(s: &StoredSub) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

pub fn decode_sub(b: &[u8]) -> Result<StoredSub, BadRecord> {
    serde_json::from_slice(b).map_err(|_| BadRecord("subscription record is not valid"))
}

pub fn sub_key(id: &str, filter: &str) -> Vec<u8> {
    let mut k = session_prefix(id);
    k.extend_from_slice(filter.as_bytes());
    k
}

pub fn encode_session(r: &SessionRecord) -> Vec<u8> {
    // A record of plain fields: serialization cannot fail.
    serde_json::to_vec(r).unwrap_or_default()
}

pub fn decode_session(b: &[u8]) -> Result<SessionRecord, BadRecord> {
    serde_json::from_slice(b).map_err(|_| BadRecord("session record is not valid"))
}

/// Keys of per-session records: the session id, length-prefixed so one
/// id is never a prefix of another's keys, then the record's own part.
pub fn session_prefix(id: &str) -> Vec<u8> {
    let n = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(2 + id.len() + 8);
    k.extend_from_slice(&n.to_be_bytes());
    k.extend_from_slice(&id.as_bytes()[..usize::from(n)]);
    k
}

pub fn queue_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = session_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn qos2_key(id: &str, pkid: u16) -> Vec<u8> {
    let mut k = session_prefix(id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

/// Splits a per-session key into the session id and the rest.
pub fn split_key(k: &[u8]) -> Result<(&str, &[u8]), BadRecord> {
    let bad = BadRecord("invalid key");
    let (n, rest) = k.split_at_checked(2).ok_or(bad.clone())?;
    let n = usize::from(u16::from_be_bytes([n[0], n[1]]));
    let (id, rest) = rest.split_at_checked(n).ok_or(bad.clone())?;
    let id = std::str::from_utf8(id).map_err(|_| bad)?;
    Ok((id, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_codec::{ByteString, Properties};

    fn msg(qos: QoS, expires: Option<Duration>) -> Message {
        let props = Properties {
            content_type: Some(ByteString::from("text/plain")),
            user_properties: vec![(ByteString::from("k"), ByteString::from("v"))],
            ..Properties::default()
        };
        Message {
            topic: ByteString::from("a/b"),
            payload: bytes::Bytes::from_static(b"\x00\xffbinary"),
            qos,
            retain: true,
            properties: Some(Arc::new(props)),
            expires_at: expires.map(|d| Instant::now() + d),
            origin: 7,
        }
    }

    #[test]
    fn messages_round_trip_with_properties_and_expiry() {
        for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let m = msg(q, Some(Duration::from_secs(100)));
            let back = decode_message(&encode_message(&m), now_ms())
                .unwrap()
                .unwrap();
            assert_eq!(back.topic, m.topic);
            assert_eq!(back.payload, m.payload);
            assert_eq!(back.qos, q);
            assert!(back.retain);
            assert_eq!(back.properties, m.properties);
            let left = back.remaining_expiry(Instant::now()).unwrap();
            assert!((98..=100).contains(&left), "{left}");
        }
        let plain = Message {
            properties: None,
            expires_at: None,
            ..msg(QoS::AtLeastOnce, None)
        };
        let back = decode_message(&encode_message(&plain), now_ms())
            .unwrap()
            .unwrap();
        assert!(back.properties.is_none() && back.expires_at.is_none());
    }

    #[test]
    fn expired_messages_read_back_as_none_and_garbage_is_an_error() {
        let m = encode_message(&msg(QoS::AtLeastOnce, Some(Duration::from_secs(5))));
        assert!(decode_message(&m, now_ms() + 6_000).unwrap().is_none());
        assert!(decode_message(&m[..5], now_ms()).is_err());
        assert!(decode_message(&m[..m.len() - 3], now_ms()).is_err());
        let mut bad = m.clone();
        bad[8] = 0x10; // a CONNECT header, not PUBLISH
        assert!(decode_message(&bad, now_ms()).is_err());
    }

    #[test]
    fn queue_entries_round_trip() {
        let mut ids = SubIds::None;
        ids.push(3);
        ids.push(9);
        let e = QueueEntry {
            payload: u64::MAX - 1,
            qos: QoS::ExactlyOnce,
            retain: true,
            sub_ids: ids,
            pkid: 65535,
            released: true,
        };
        assert_eq!(decode_entry(&encode_entry(&e)).unwrap(), e);
        let with = encode_entry_with(&e, Some(b"message"));
        assert_eq!(
            decode_entry_with(&with).unwrap(),
            (e.clone(), Some(&b"message"[..]))
        );
        assert_eq!(decode_entry_with(&encode_entry(&e)).unwrap().1, None);
        let b = encode_entry(&e);
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(
            decode_entry(&trailing).is_err(),
            "bytes without the inline flag"
        );
        assert!(decode_entry(&b[..b.len() - 1]).is_err());
        let mut bad = b.clone();
        bad[8] = 3;
        assert!(decode_entry(&bad).is_err(), "QoS 3 is refused");
    }

    #[test]
    fn keys_keep_sessions_apart_and_sort_by_sequence() {
        let a = queue_key("a", 2);
        let ab = queue_key("a\0b", 1);
        assert!(!ab.starts_with(&session_prefix("a")));
        assert!(queue_key("a", 1) < a && a < queue_key("a", 256));
        let (id, rest) = split_key(&ab).unwrap();
        assert_eq!((id, rest), ("a\0b", &1u64.to_be_bytes()[..]));
        assert!(split_key(&[0, 9, b'x']).is_err());
    }

    #[test]
    fn session_and_subscription_records_round_trip() {
        let r = SessionRecord {
            owner: Some("dev".into()),
            expiry_secs: 3600,
            disconnected_at_ms: Some(5),
            will: Some(StoredWill {
                message: vec![1, 2],
                delay_secs: 9,
            }),
        };
        assert_eq!(decode_session(&encode_session(&r)).unwrap(), r);
        assert!(decode_session(b"{").is_err());
        let sub = StoredSub::new(
            "$share/g/a/#",
            &SubOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                sub_id: 4,
                check_read: true,
                pub_states: false,
            },
        );
        let back = decode_sub(&encode_sub(&sub)).unwrap();
        assert_eq!(back, sub);
        assert_eq!(back.options().unwrap().qos, QoS::ExactlyOnce);
        let mut bad = sub.clone();
        bad.qos = 3;
        assert!(decode_sub(&encode_sub(&bad)).unwrap().options().is_err());
        let key = sub_key("dev", "a/#");
        let (id, filter) = split_key(&key).unwrap();
        assert_eq!((id, filter), ("dev", &b"a/#"[..]));
    }
}

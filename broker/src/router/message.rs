//! What travels from a publisher to its subscribers.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use starling_codec::{ByteString, Properties, QoS};
use tokio::time::Instant;

/// A published message as the router hands it out. Cloning it is a few
/// reference-count increments: topic and payload are slices of the
/// publisher's read buffer, shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 properties forwarded to subscribers (user properties, content
    /// type, response topic, …). `None` for v3.1.1 publishers and v5
    /// publishes without properties, so the common case allocates nothing.
    pub properties: Option<Arc<Properties>>,
    pub expires_at: Option<Instant>,
    /// Session that published it (for the v5 no-local option); 0 = none.
    pub origin: u64,
}

impl Message {
    /// Gives topic, payload and properties their own allocations. Decoded
    /// messages are slices of the read buffer they arrived in (up to
    /// 64 KiB, shared with every other packet of that read): kept in a queue
    /// or the retained store, a few bytes of payload would pin all of it, and
    /// `max_queued_bytes` would not bound real memory.
    pub fn detach(&mut self) {
        // One allocation for topic and payload together (plus the shared
        // header made when it is first sliced): half the allocator work of
        // copying them separately, which fan-in at line rate notices.
        let t = self.topic.len();
        let mut buf = BytesMut::with_capacity(t + self.payload.len());
        buf.extend_from_slice(self.topic.as_bytes());
        buf.extend_from_slice(&self.payload);
        let all = buf.freeze();
        // A copy of a valid topic is valid UTF-8; the check cannot fail.
        if let Ok(topic) = ByteString::try_from(all.slice(..t)) {
            self.topic = topic;
            self.payload = all.slice(t..);
        }
        if let Some(p) = &mut self.properties {
            Arc::make_mut(p).detach();
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Remaining message expiry in whole seconds (v5 says the server
    /// forwards the remaining lifetime, not the original).
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            u32::try_from(left.as_secs()).unwrap_or(u32::MAX).max(1)
        })
    }
}

/// Subscription identifiers attached to one delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SubIds {
    #[default]
    None,
    One(u32),
    Many(Arc<[u32]>),
}

impl SubIds {
    pub fn as_slice(&self) -> &[u32] {
        match self {
            SubIds::None => &[],
            SubIds::One(id) => std::slice::from_ref(id),
            SubIds::Many(ids) => ids,
        }
    }

    pub fn push(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        *self = match std::mem::take(self) {
            SubIds::None => SubIds::One(id),
            SubIds::One(a) if a == id => SubIds::One(a),
            SubIds::One(a) => SubIds::Many(Arc::from([a, id])),
            SubIds::Many(v) if v.contains(&id) => SubIds::Many(v),
            SubIds::Many(v) => SubIds::Many(v.iter().copied().chain([id]).collect()),
        };
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Message,
    /// min(publish QoS, subscription QoS).
    pub qos: QoS,
    /// Retain flag as sent: true for retained messages sent on subscribe,
    /// or with retain-as-published.
    pub retain: bool,
    pub sub_ids: SubIds,
    /// Its place in the session's stored queue, for persistent sessions.
    pub stored: Option<crate::store::StoredRef>,
}

impl Delivery {
    pub fn cost(&self) -> usize {
        self.msg.payload.len() + self.msg.topic.len()
    }
}

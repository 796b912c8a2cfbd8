//! The last-value cache: the latest message published on each topic,
//! retained or not. It answers `GET /broker/<topic>` and `?pubStates=1`
//! subscriptions, which want "the current value" even from publishers that
//! never set the retain flag.
//!
//! Every routed publish writes here, so the cache is sharded by topic hash
//! (one short lock per publish, rarely contended) and bounded in entries and
//! bytes: past either cap the least recently published topic of the shard
//! is evicted and counted. A retained publish with an empty payload clears
//! the topic here too: in MQTT it means "this topic has no state".

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use lru::LruCache;
use starling_codec::ByteString;
use starling_model::topic;
use tokio::time::Instant;

use super::Message;

const SHARDS: usize = 16;

/// One cached value and when it was published (a process-wide sequence, so
/// "the most recent across matching topics" compares across shards).
#[derive(Debug, Clone)]
pub struct LastValue {
    pub msg: Message,
    pub seq: u64,
}

#[derive(Debug)]
struct Shard {
    /// foldhash, seeded per process: SipHash cost more than the rest of
    /// an update, and a random seed keeps chosen topics from colliding.
    map: LruCache<ByteString, LastValue, foldhash::fast::RandomState>,
    bytes: usize,
}

#[derive(Debug)]
pub struct LastValues {
    shards: Vec<Mutex<Shard>>,
    max_entries: usize,
    max_bytes: usize,
    seq: AtomicU64,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    pub evictions: AtomicU64,
    /// With persistence: topics evicted or cleared since the last
    /// [`LastValues::take_removed`], so the store drops them too.
    track: bool,
    removed: Mutex<Vec<ByteString>>,
}

fn cost(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}

impl LastValues {
    /// A cache of at most `max_entries` topics and `max_bytes` bytes;
    /// `max_entries == 0` makes a cache that keeps nothing.
    pub fn new(max_entries: usize, max_bytes: usize, track: bool) -> Self {
        let n = max_entries.clamp(1, SHARDS);
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    map: LruCache::unbounded_with_hasher(foldhash::fast::RandomState::default()),
                    bytes: 0,
                })
            })
            .collect();
        LastValues {
            shards,
            max_entries,
            max_bytes,
            seq: AtomicU64::new(0),
            entries: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            track,
            removed: Mutex::new(Vec::new()),
        }
    }

    fn note_removed(&self, topic: ByteString) {
        if self.track {
            let mut r = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: if more topics go between two writes than the
            // cache holds, the rest stay on disk, and a restart brings
            // them back as old values (still within the cache's caps).
            if r.len() < self.max_entries.max(1024) {
                r.push(topic);
            }
        }
    }

    /// Topics removed since the last call (persistence only).
    pub fn take_removed(&self) -> Vec<ByteString> {
        std::mem::take(&mut *self.removed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Values recorded after `seq`, and the newest sequence seen: what the
    /// store has not been given yet. Walks the cache (its caps bound it);
    /// run every few seconds, never per publish.
    pub fn changed_since(&self, seq: u64) -> (Vec<Message>, u64) {
        let mut out = Vec::new();
        let mut newest = seq;
        for shard in &self.shards {
            let sh = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (_, v) in sh.map.iter() {
                if v.seq > seq {
                    newest = newest.max(v.seq);
                    out.push(v.msg.clone());
                }
            }
        }
        (out, newest)
    }

    pub fn is_enabled(&self) -> bool {
        self.max_entries > 0
    }

    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> crate::metrics::LvcStats {
        crate::metrics::LvcStats {
            entries: self.len(),
            bytes: self.bytes(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn shard(&self, topic: &str) -> &Mutex<Shard> {
        // FNV-1a: every publish pays for this, and SipHash over the topic
        // cost as much as the rest of `record` together. Which shard a
        // topic lands in is not a security boundary (each shard is capped).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        &self.shards[(h as usize) % self.shards.len()]
    }

    fn per_shard(&self, total: usize) -> usize {
        (total / self.shards.len()).max(1)
    }

    /// Records `msg` as its topic's latest value. The caller has detached it
    /// from the publisher's read buffer.
    pub fn record(&self, msg: &Message) {
        if !self.is_enabled() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut sh = self
            .shard(&msg.topic)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if msg.retain && msg.payload.is_empty() {
            if let Some(old) = sh.map.pop(&msg.topic) {
                sh.bytes -= cost(&old.msg);
                self.entries.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(cost(&old.msg), Ordering::Relaxed);
                self.note_removed(old.msg.topic);
            }
            return;
        }
        let new_cost = cost(msg);
        let value = LastValue {
            msg: msg.clone(),
            seq,
        };
        match sh.map.get_mut(&msg.topic) {
            Some(old) => {
                let old_cost = cost(&old.msg);
                *old = value;
                sh.bytes = sh.bytes - old_cost + new_cost;
                self.bytes.fetch_add(new_cost, Ordering::Relaxed);
                self.bytes.fetch_sub(old_cost, Ordering::Relaxed);
            }
            None => {
                sh.map.put(msg.topic.clone(), value);
                sh.bytes += new_cost;
                self.entries.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(new_cost, Ordering::Relaxed);
            }
        }
        let (max_n, max_b) = (
            self.per_shard(self.max_entries),
            self.per_shard(self.max_bytes),
        );
        while sh.map.len() > max_n || (sh.bytes > max_b && sh.map.len() > 1) {
            let Some((_, old)) = sh.map.pop_lru() else {
                break;
            };
            sh.bytes -= cost(&old.msg);
            self.entries.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(cost(&old.msg), Ordering::Relaxed);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            self.note_removed(old.msg.topic);
        }
    }

    /// The latest unexpired value of one topic name.
    pub fn get(&self, topic_name: &str, now: Instant) -> Option<LastValue> {
        let sh = self
            .shard(topic_name)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sh.map
            .peek(topic_name)
            .filter(|v| !v.msg.is_expired(now))
            .cloned()
    }

    /// Calls `f` with every unexpired value whose topic `filter` matches,
    /// until it breaks. A plain topic is one lookup; a wildcard filter
    /// walks the cache, which its caps bound.
    pub fn for_each_match(
        &self,
        filter: &str,
        now: Instant,
        mut f: impl FnMut(&LastValue) -> ControlFlow<()>,
    ) {
        if !filter.contains(['+', '#']) {
            if let Some(v) = self.get(filter, now) {
                let _ = f(&v);
            }
            return;
        }
        for shard in &self.shards {
            // Matches are copied out so `f` (which queues into a session)
            // never runs under a shard lock that publishers need.
            let found: Vec<LastValue> = {
                let sh = shard.lock().unwrap_or_else(|e| e.into_inner());
                sh.map
                    .iter()
                    .filter(|(t, v)| !v.msg.is_expired(now) && topic::matches(filter, t))
                    .map(|(_, v)| v.clone())
                    .collect()
            };
            for v in &found {
                if f(v).is_break() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use starling_codec::QoS;

    fn msg(topic: &str, payload: &str, retain: bool) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: Bytes::from(payload.to_owned()),
            qos: QoS::AtMostOnce,
            retain,
            properties: None,
            expires_at: None,
            origin: 0,
        }
    }

    fn all(c: &LastValues, filter: &str) -> Vec<(String, String)> {
        let mut out = vec![];
        c.for_each_match(filter, Instant::now(), |v| {
            out.push((
                v.msg.topic.to_string(),
                String::from_utf8_lossy(&v.msg.payload).into_owned(),
            ));
            ControlFlow::Continue(())
        });
        out.sort();
        out
    }

    #[test]
    fn keeps_the_latest_value_per_topic() {
        let c = LastValues::new(100, 1 << 20, false);
        c.record(&msg("a/1", "x", false));
        c.record(&msg("a/1", "y", false));
        c.record(&msg("a/2", "z", true));
        c.record(&msg("b", "w", false));
        assert_eq!(c.len(), 3);
        assert_eq!(
            all(&c, "a/+"),
            [("a/1".into(), "y".into()), ("a/2".into(), "z".into())]
        );
        assert_eq!(all(&c, "b"), [("b".into(), "w".into())]);
        let now = Instant::now();
        assert!(c.get("b", now).unwrap().seq > c.get("a/1", now).unwrap().seq);
        // An empty retained publish clears the topic's state.
        c.record(&msg("a/2", "", true));
        assert_eq!(all(&c, "a/#"), [("a/1".into(), "y".into())]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.bytes(), 4 + 2);
    }

    #[test]
    fn evicts_the_least_recently_published_past_its_caps() {
        let c = LastValues::new(1, 1 << 20, false);
        c.record(&msg("a", "1", false));
        c.record(&msg("b", "2", false));
        assert_eq!(all(&c, "#"), [("b".into(), "2".into())]);
        assert_eq!(c.evictions.load(Ordering::Relaxed), 1);

        let c = LastValues::new(16, 16 * 10, false);
        for i in 0..1000 {
            c.record(&msg(&format!("t/{i}"), "0123456789", false));
        }
        assert!(c.len() <= 16, "{}", c.len());
        // Each shard keeps its newest entry even past its byte share.
        assert!(c.bytes() <= 16 * 15, "{}", c.bytes());
        assert!(c.evictions.load(Ordering::Relaxed) >= 1000 - 16);
    }

    #[test]
    fn off_keeps_nothing() {
        let c = LastValues::new(0, 0, false);
        c.record(&msg("a", "1", false));
        assert!(c.is_empty());
        assert!(all(&c, "#").is_empty());
    }

    #[test]
    fn expired_values_are_not_served() {
        let c = LastValues::new(10, 1000, false);
        let mut m = msg("a", "1", false);
        m.expires_at = Some(Instant::now());
        c.record(&m);
        assert!(c.get("a", Instant::now()).is_none());
        assert!(all(&c, "#").is_empty());
    }
}

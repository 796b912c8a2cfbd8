//! Retained messages: one per topic, replaced by each retained publish and
//! cleared by an empty retained publish (and only by that).
//!
//! Stored in a trie keyed by topic level, so a new subscription visits only
//! the branches its filter selects instead of every retained topic, and the
//! walk can stop as soon as the subscriber's queue is full: one SUBSCRIBE
//! costs at most what it can deliver. Topics are at most
//! `max_topic_levels` deep (checked before they get here), which bounds the
//! recursive parts (pruning, drop).

use std::collections::HashMap;
use std::ops::ControlFlow;

use starling_codec::ByteString;
use tokio::time::Instant;

use super::Message;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    msg: Option<Message>,
    /// When `msg` was stored (the store's own sequence), so a wildcard GET
    /// can pick the most recent retained message across topics.
    seq: u64,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.msg.is_none()
    }
}

/// Caps on what the store holds.
#[derive(Debug, Clone, Copy)]
pub struct RetainedLimits {
    pub max_messages: usize,
    /// Topic + payload bytes over all messages.
    pub max_bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        RetainedLimits {
            max_messages: usize::MAX,
            max_bytes: usize::MAX,
        }
    }
}

/// What a retained publish did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retain {
    Stored,
    Replaced,
    Cleared,
    /// Empty payload for a topic with nothing retained.
    Nothing,
    /// A new topic past the count or byte cap: not stored.
    Full,
}

#[derive(Debug, Default)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    bytes: usize,
    /// Stored messages with a message expiry: the purge walks only when
    /// there are some.
    expiring: usize,
    limits: RetainedLimits,
    seq: u64,
}

fn cost(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}

impl RetainedStore {
    /// New caps; what is stored stays (a lower cap refuses new topics
    /// until enough are cleared).
    pub fn set_limits(&mut self, limits: RetainedLimits) {
        self.limits = limits;
    }

    pub fn new(limits: RetainedLimits) -> Self {
        RetainedStore {
            limits,
            ..RetainedStore::default()
        }
    }

    /// Whether `msg` (a retained publish) could be applied: clearing and
    /// replacing always can; a new topic must fit the caps.
    pub fn admits(&self, msg: &Message) -> bool {
        if msg.payload.is_empty() {
            return true;
        }
        let old = self.get(&msg.topic).map_or(0, cost);
        if old > 0 {
            return self.bytes - old + cost(msg) <= self.limits.max_bytes;
        }
        self.count < self.limits.max_messages && self.bytes + cost(msg) <= self.limits.max_bytes
    }

    fn get(&self, topic: &str) -> Option<&Message> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.msg.as_ref()
    }

    /// Stores, replaces or clears the message for its topic.
    pub fn apply(&mut self, msg: &Message) -> Retain {
        if msg.payload.is_empty() {
            let Some(old) = remove(&mut self.root, &mut msg.topic.split('/')) else {
                return Retain::Nothing;
            };
            self.forget(&old);
            return Retain::Cleared;
        }
        if !self.admits(msg) {
            return Retain::Full;
        }
        let mut node = &mut self.root;
        for level in msg.topic.split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        let old = node.msg.replace(msg.clone());
        self.seq += 1;
        node.seq = self.seq;
        self.bytes += cost(msg);
        self.expiring += usize::from(msg.expires_at.is_some());
        match old {
            Some(old) => {
                self.forget(&old);
                self.count += 1;
                Retain::Replaced
            }
            None => {
                self.count += 1;
                Retain::Stored
            }
        }
    }

    fn forget(&mut self, old: &Message) {
        self.count -= 1;
        self.bytes -= cost(old);
        self.expiring -= usize::from(old.expires_at.is_some());
    }

    /// Calls `f` with each unexpired retained message matching `filter`
    /// until it returns `Break`. Iterative; visits only matching branches.
    pub fn for_each_match(
        &self,
        filter: &str,
        now: Instant,
        mut f: impl FnMut(&Message) -> ControlFlow<()>,
    ) {
        self.walk(filter, now, |n| f(n))
    }

    /// The most recently stored unexpired message matching `filter` whose
    /// topic `readable` lets through.
    pub fn latest_match(
        &self,
        filter: &str,
        now: Instant,
        readable: impl Fn(&str) -> bool,
    ) -> Option<Message> {
        let mut best: Option<(u64, &Message)> = None;
        self.walk_nodes(filter, now, |m, seq| {
            if best.is_none_or(|(s, _)| seq > s) && readable(&m.topic) {
                best = Some((seq, m));
            }
            ControlFlow::Continue(())
        });
        best.map(|(_, m)| m.clone())
    }

    fn walk(&self, filter: &str, now: Instant, mut f: impl FnMut(&Message) -> ControlFlow<()>) {
        self.walk_nodes(filter, now, |m, _| f(m))
    }

    fn walk_nodes<'a>(
        &'a self,
        filter: &str,
        now: Instant,
        mut f: impl FnMut(&'a Message, u64) -> ControlFlow<()>,
    ) {
        let levels: Vec<&str> = filter.split('/').collect();
        // (node, index of the filter level to match against its children)
        let mut stack: Vec<(&Node, usize)> = vec![(&self.root, 0)];
        let mut visit = |n: &'a Node| match &n.msg {
            Some(m) if !m.is_expired(now) => f(m, n.seq),
            _ => ControlFlow::Continue(()),
        };
        while let Some((node, i)) = stack.pop() {
            let Some(&level) = levels.get(i) else {
                if visit(node).is_break() {
                    return;
                }
                continue;
            };
            // MQTT 4.7.2: a wildcard first level does not match `$` topics.
            let skip_dollar = i == 0;
            match level {
                "#" => {
                    // `a/#` matches `a` itself too.
                    if i > 0 && visit(node).is_break() {
                        return;
                    }
                    let mut sub: Vec<&Node> = node
                        .children
                        .iter()
                        .filter(|(k, _)| !(skip_dollar && k.starts_with('$')))
                        .map(|(_, n)| n)
                        .collect();
                    while let Some(n) = sub.pop() {
                        if visit(n).is_break() {
                            return;
                        }
                        sub.extend(n.children.values());
                    }
                }
                "+" => {
                    for (k, child) in &node.children {
                        if !(skip_dollar && k.starts_with('$')) {
                            stack.push((child, i + 1));
                        }
                    }
                }
                name => {
                    if let Some(child) = node.children.get(name) {
                        stack.push((child, i + 1));
                    }
                }
            }
        }
    }

    /// Drops expired messages; returns how many. Cheap when none expire.
    /// Drops expired messages; returns their topics.
    pub fn purge_expired(&mut self, now: Instant) -> Vec<ByteString> {
        if self.expiring == 0 {
            return Vec::new();
        }
        let mut expired = Vec::new();
        let mut stack: Vec<&Node> = vec![&self.root];
        while let Some(node) = stack.pop() {
            if let Some(m) = &node.msg
                && m.is_expired(now)
            {
                expired.push(m.topic.clone());
            }
            stack.extend(node.children.values());
        }
        for topic in &expired {
            if let Some(old) = remove(&mut self.root, &mut topic.split('/')) {
                self.forget(&old);
            }
        }
        expired
    }
}

/// Takes the message at the end of `levels` and prunes emptied branches.
/// Recursion depth is the topic's level count, bounded by
/// `max_topic_levels`.
fn remove(node: &mut Node, levels: &mut std::str::Split<'_, char>) -> Option<Message> {
    let Some(level) = levels.next() else {
        return node.msg.take();
    };
    let child = node.children.get_mut(level)?;
    let taken = remove(child, levels);
    if child.is_empty() {
        node.children.remove(level);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use starling_codec::QoS;

    fn msg(topic: &str, payload: &str) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            expires_at: None,
            origin: 0,
        }
    }

    fn topics(s: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.for_each_match(filter, Instant::now(), |m| {
            out.push(m.topic.to_string());
            ControlFlow::Continue(())
        });
        out.sort();
        out
    }

    #[test]
    fn agrees_with_the_reference_matcher() {
        let names = [
            "a", "a/b", "a/b/c", "a//c", "$SYS/x", "/", "/x", "b/b/d", "a/", "$SYS",
        ];
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/+/c", "+/b/#", "a//c", "$SYS/#", "+/+", "a/b/c", "/#",
            "$SYS", "+/#",
        ];
        let mut s = RetainedStore::default();
        for t in names {
            assert_eq!(s.apply(&msg(t, "x")), Retain::Stored);
        }
        assert_eq!(s.count, names.len());
        for f in filters {
            let mut want: Vec<String> = names
                .iter()
                .filter(|t| starling_model::topic::matches(f, t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(topics(&s, f), want, "filter {f}");
        }
        for t in names {
            assert_eq!(s.apply(&msg(t, "")), Retain::Cleared, "{t}");
        }
        assert_eq!(s.count, 0);
        assert!(s.root.is_empty(), "branches pruned");
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn caps_refuse_new_topics_but_not_replacements() {
        let mut s = RetainedStore::new(RetainedLimits {
            max_messages: 2,
            max_bytes: 100,
        });
        assert_eq!(s.apply(&msg("a", "1")), Retain::Stored);
        assert_eq!(s.apply(&msg("b", "1")), Retain::Stored);
        assert_eq!(s.apply(&msg("c", "1")), Retain::Full);
        assert_eq!(s.apply(&msg("a", "2")), Retain::Replaced);
        assert_eq!(s.apply(&msg("a", &"x".repeat(200))), Retain::Full, "bytes");
        assert_eq!(s.apply(&msg("c", "")), Retain::Nothing);
        assert_eq!(s.apply(&msg("b", "")), Retain::Cleared);
        assert_eq!(s.apply(&msg("c", "1")), Retain::Stored);
        assert_eq!(topics(&s, "#"), vec!["a", "c"]);
    }

    #[test]
    fn walk_stops_when_told() {
        let mut s = RetainedStore::default();
        for i in 0..100 {
            s.apply(&msg(&format!("t/{i}"), "x"));
        }
        let mut n = 0;
        s.for_each_match("t/#", Instant::now(), |_| {
            n += 1;
            if n == 10 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(n, 10);
    }

    #[test]
    fn expired_are_skipped_and_purged() {
        let mut s = RetainedStore::default();
        let now = Instant::now();
        let mut old = msg("a/old", "x");
        old.expires_at = Some(now);
        s.apply(&old);
        s.apply(&msg("a/new", "x"));
        assert_eq!(topics(&s, "a/#"), vec!["a/new"]);
        assert_eq!(s.purge_expired(now).len(), 1);
        assert_eq!(s.count, 1);
        assert!(s.purge_expired(now).is_empty());
    }

    #[test]
    fn deep_topics_at_the_level_cap() {
        let mut s = RetainedStore::default();
        let deep = "/".repeat(1023);
        assert_eq!(s.apply(&msg(&deep, "x")), Retain::Stored);
        assert_eq!(topics(&s, "#").len(), 1);
        assert_eq!(s.apply(&msg(&deep, "")), Retain::Cleared);
    }
}

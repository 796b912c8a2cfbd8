//! The topic index: a trie keyed by topic level, so a publish visits only
//! the branches its levels (and `+`/`#`) select instead of every
//! subscription.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use starling_codec::QoS;

use crate::session::Session;

/// Options of one subscription (MQTT 5 subscription options; v3.1.1 uses
/// only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    /// v5 subscription identifier; 0 = none.
    pub sub_id: u32,
    /// A deny rule overlaps the filter (an ACL `Grant::Filtered`): each
    /// message's topic is checked against the subscriber's rules before it
    /// is delivered. False for every other subscription, which pay nothing.
    pub check_read: bool,
    /// `?pubStates=1`: the last value of each matching topic is sent on
    /// subscribe and again on every resume of the session.
    pub pub_states: bool,
}

#[derive(Debug, Clone)]
pub struct SubEntry {
    pub session: Arc<Session>,
    pub opts: SubOptions,
}

/// A `$share/<name>/<filter>` group: each message goes to one member.
#[derive(Debug)]
struct SharedGroup {
    name: Arc<str>,
    members: Vec<SubEntry>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Slot {
    subs: Vec<SubEntry>,
    shared: Vec<SharedGroup>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.shared.is_empty()
    }

    /// Adds or replaces; returns true if the subscription is new. A new
    /// shared group is made only if `groups_left`.
    fn insert(
        &mut self,
        share: Option<&str>,
        entry: SubEntry,
        groups_left: bool,
    ) -> Result<Added, GroupsFull> {
        let mut new_group = false;
        let list = match share {
            None => &mut self.subs,
            Some(name) => {
                let pos = match self.shared.iter().position(|g| &*g.name == name) {
                    Some(p) => p,
                    None => {
                        if !groups_left {
                            return Err(GroupsFull);
                        }
                        new_group = true;
                        self.shared.push(SharedGroup {
                            name: Arc::from(name),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        self.shared.len() - 1
                    }
                };
                &mut self.shared[pos].members
            }
        };
        let new = match list.iter_mut().find(|e| e.session.key == entry.session.key) {
            Some(e) => {
                *e = entry;
                false
            }
            None => {
                list.push(entry);
                true
            }
        };
        Ok(Added { new, new_group })
    }

    fn remove(&mut self, share: Option<&str>, key: u64) -> Removed {
        match share {
            None => {
                let before = self.subs.len();
                self.subs.retain(|e| e.session.key != key);
                Removed {
                    removed: before != self.subs.len(),
                    group_gone: false,
                }
            }
            Some(name) => {
                let Some(pos) = self.shared.iter().position(|g| &*g.name == name) else {
                    return Removed::default();
                };
                let g = &mut self.shared[pos];
                let before = g.members.len();
                g.members.retain(|e| e.session.key != key);
                let removed = before != g.members.len();
                let group_gone = g.members.is_empty();
                if group_gone {
                    self.shared.swap_remove(pos);
                }
                Removed {
                    removed,
                    group_gone,
                }
            }
        }
    }

    fn collect(&self, out: &mut Vec<SubEntry>) {
        out.extend(self.subs.iter().cloned());
        for g in &self.shared {
            if let Some(e) = pick_member(g) {
                out.push(e.clone());
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Added {
    new: bool,
    new_group: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Removed {
    removed: bool,
    group_gone: bool,
}

/// The broker already has `max_shared_groups` shared groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupsFull;

/// Round robin over the group, skipping members whose client is offline
/// while any member is online (an offline member would only queue it).
fn pick_member(g: &SharedGroup) -> Option<&SubEntry> {
    let n = g.members.len();
    if n == 0 {
        return None;
    }
    let start = g.next.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|i| &g.members[(start + i) % n])
        .find(|e| e.session.is_online())
        .or_else(|| g.members.get(start % n))
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters that end at this node.
    exact: Slot,
    /// Filters that end with `/#` below this node (or `#` at the root).
    hash: Slot,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

/// Subscriptions by filter. Filters are at most `max_topic_levels` deep
/// (checked before they get here), which bounds the recursive walks below.
#[derive(Debug)]
pub struct TopicIndex {
    root: Node,
    count: usize,
    groups: usize,
    max_groups: usize,
}

impl Default for TopicIndex {
    fn default() -> Self {
        TopicIndex::new(usize::MAX)
    }
}

impl TopicIndex {
    pub fn new(max_groups: usize) -> Self {
        TopicIndex {
            root: Node::default(),
            count: 0,
            groups: 0,
            max_groups,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds (or updates) a subscription to a validated `filter`. Returns
    /// true if it did not exist before.
    pub fn insert(
        &mut self,
        filter: &str,
        share: Option<&str>,
        entry: SubEntry,
    ) -> Result<bool, GroupsFull> {
        let groups_left = self.groups < self.max_groups;
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut slot = None;
        while let Some(level) = levels.next() {
            if level == "#" {
                slot = Some(&mut node.hash);
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(Box::from(level)).or_default()
            };
            if levels.peek().is_none() {
                slot = Some(&mut node.exact);
            }
        }
        let Some(slot) = slot else {
            return Ok(false);
        };
        let added = slot.insert(share, entry, groups_left)?;
        self.count += usize::from(added.new);
        self.groups += usize::from(added.new_group);
        Ok(added.new)
    }

    /// Removes `key`'s subscription to `filter`; prunes empty branches.
    pub fn remove(&mut self, filter: &str, share: Option<&str>, key: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let r = remove_in(&mut self.root, &levels, share, key);
        self.count -= usize::from(r.removed);
        self.groups -= usize::from(r.group_gone);
        r.removed
    }

    /// Appends every subscription matching `topic` to `out` (shared groups
    /// contribute one member each). A session can appear more than once if
    /// several of its filters match.
    pub fn matches(&self, topic: &str, out: &mut Vec<SubEntry>) {
        // MQTT 4.7.2: wildcards at the first level do not match `$` topics.
        let dollar = topic.starts_with('$');
        collect(&self.root, topic.split('/'), dollar, out);
    }
}

fn collect(
    node: &Node,
    mut levels: std::str::Split<'_, char>,
    skip_wild: bool,
    out: &mut Vec<SubEntry>,
) {
    if !skip_wild {
        node.hash.collect(out);
    }
    let Some(level) = levels.next() else {
        node.exact.collect(out);
        return;
    };
    if let Some(child) = node.children.get(level) {
        collect(child, levels.clone(), false, out);
    }
    if !skip_wild && let Some(plus) = &node.plus {
        collect(plus, levels, false, out);
    }
}

fn remove_in(node: &mut Node, levels: &[&str], share: Option<&str>, key: u64) -> Removed {
    let Some((&level, rest)) = levels.split_first() else {
        return Removed::default();
    };
    if level == "#" {
        return node.hash.remove(share, key);
    }
    let removed;
    if level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return Removed::default();
        };
        removed = remove_at(child, rest, share, key);
        if child.is_empty() {
            node.plus = None;
        }
    } else {
        let Some(child) = node.children.get_mut(level) else {
            return Removed::default();
        };
        removed = remove_at(child, rest, share, key);
        if child.is_empty() {
            node.children.remove(level);
        }
    }
    removed
}

/// Removes from `child` (the node for the level just consumed): here if no
/// levels remain, otherwise further down.
fn remove_at(child: &mut Node, rest: &[&str], share: Option<&str>, key: u64) -> Removed {
    if rest.is_empty() {
        child.exact.remove(share, key)
    } else {
        remove_in(child, rest, share, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::state::QueueLimits;

    fn session(key: u64) -> Arc<Session> {
        Arc::new(Session::new(
            key,
            Arc::from(format!("c{key}")),
            QueueLimits {
                max_messages: 10,
                max_bytes: 1000,
            },
        ))
    }

    fn entry(s: &Arc<Session>) -> SubEntry {
        SubEntry {
            session: s.clone(),
            opts: SubOptions::default(),
        }
    }

    fn keys(idx: &TopicIndex, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        idx.matches(topic, &mut out);
        let mut k: Vec<u64> = out.iter().map(|e| e.session.key).collect();
        k.sort();
        k
    }

    #[test]
    fn agrees_with_the_reference_matcher() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/+/c", "+/b/#", "a//c", "$SYS/#", "+/+", "a/b/c", "/#",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a//c", "$SYS/x", "/", "/x", "b/b/d", "a/",
        ];
        let mut idx = TopicIndex::default();
        let sessions: Vec<_> = (0..filters.len() as u64).map(session).collect();
        for (f, s) in filters.iter().zip(&sessions) {
            assert_eq!(idx.insert(f, None, entry(s)), Ok(true));
        }
        assert_eq!(idx.len(), filters.len());
        for t in topics {
            let want: Vec<u64> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| starling_model::topic::matches(f, t))
                .map(|(i, _)| i as u64)
                .collect();
            assert_eq!(keys(&idx, t), want, "topic {t}");
        }
        for (f, s) in filters.iter().zip(&sessions) {
            assert!(idx.remove(f, None, s.key), "{f}");
        }
        assert!(idx.is_empty());
        assert!(idx.root.is_empty(), "branches pruned");
    }

    #[test]
    fn resubscribe_replaces() {
        let mut idx = TopicIndex::default();
        let s = session(1);
        assert_eq!(idx.insert("a/b", None, entry(&s)), Ok(true));
        assert_eq!(idx.insert("a/b", None, entry(&s)), Ok(false));
        assert_eq!(keys(&idx, "a/b"), vec![1]);
        assert!(!idx.remove("a/c", None, 1));
    }

    #[test]
    fn shared_groups_pick_one_member_each() {
        let mut idx = TopicIndex::default();
        let (a, b, c) = (session(1), session(2), session(3));
        for (g, s) in [("g", &a), ("g", &b), ("h", &c)] {
            idx.insert("t", Some(g), entry(s)).unwrap();
        }
        let mut seen = [0; 4];
        for _ in 0..10 {
            let k = keys(&idx, "t");
            assert_eq!(k.len(), 2);
            assert!(k.contains(&3));
            for x in k {
                seen[x as usize] += 1;
            }
        }
        assert_eq!(seen[1] + seen[2], 10);
        assert!(seen[1] > 0 && seen[2] > 0, "round robin");
        assert!(idx.remove("t", Some("g"), 1));
        assert_eq!(keys(&idx, "t"), vec![2, 3]);
    }

    #[test]
    fn shared_group_cap() {
        let mut idx = TopicIndex::new(2);
        let (a, b) = (session(1), session(2));
        assert_eq!(idx.insert("t", Some("g1"), entry(&a)), Ok(true));
        assert_eq!(
            idx.insert("u", Some("g1"), entry(&a)),
            Ok(true),
            "same name, other filter: a group"
        );
        assert_eq!(idx.insert("t", Some("g2"), entry(&a)), Err(GroupsFull));
        assert_eq!(
            idx.insert("t", Some("g1"), entry(&b)),
            Ok(true),
            "joining is fine"
        );
        assert_eq!(
            idx.insert("x", None, entry(&b)),
            Ok(true),
            "plain subscriptions are not groups"
        );
        assert!(idx.remove("u", Some("g1"), 1));
        assert_eq!(
            idx.insert("t", Some("g2"), entry(&a)),
            Ok(true),
            "room again"
        );
    }
}

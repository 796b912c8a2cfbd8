//! One router for every protocol: the topic index, the retained store, the
//! last-value cache and delivery into subscriber sessions. MQTT connections,
//! the HTTP API and native WebSocket streams all publish through
//! [`Router::publish`] and subscribe through [`Router::subscribe`].

mod index;
mod lvc;
mod message;
mod retained;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use std::ops::ControlFlow;

pub use index::{GroupsFull, SubEntry, SubOptions, TopicIndex};
pub use lvc::{LastValue, LastValues};
pub use message::{Delivery, Message, SubIds};
pub use retained::{Retain, RetainedLimits, RetainedStore};
use starling_model::config::{Limits, LvcConfig};
use tokio::time::Instant;

use crate::metrics::{self, Limit, Metrics};
use crate::session::Session;
use crate::session::state::Queued;
use crate::store::{Op, Routing, StateStore, TicketSpan};

/// The outcome of [`Router::publish`].
#[derive(Debug, Default)]
pub struct Routed {
    /// Sessions with a matching subscription.
    pub matched: usize,
    /// A connected subscriber over its queue cap: the publisher should
    /// pause reading until it has room (QoS 1/2 backpressure).
    pub congested: Option<Arc<Session>>,
    /// A subscriber's queue is filling up: the publisher should yield so the
    /// subscriber's connection gets to run (matters most when several
    /// publishers share one worker thread with it).
    pub busy: bool,
    /// A retained publish on a new topic with the retained store full:
    /// nothing was stored or delivered.
    pub retained_full: bool,
    /// What the store must have written before the publish is acknowledged.
    pub span: TicketSpan,
}

#[derive(Debug)]
pub struct Router {
    index: RwLock<TopicIndex>,
    retained: RwLock<RetainedStore>,
    pub lvc: LastValues,
    metrics: Arc<Metrics>,
    pub store: Arc<dyn StateStore>,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    pub fn new(
        metrics: Arc<Metrics>,
        limits: &Limits,
        lvc: &LvcConfig,
        store: Arc<dyn StateStore>,
    ) -> Self {
        Router {
            index: RwLock::new(TopicIndex::new(limits.max_shared_groups)),
            retained: RwLock::new(RetainedStore::new(RetainedLimits {
                max_messages: limits.max_retained_messages,
                max_bytes: limits.max_retained_bytes,
            })),
            lvc: LastValues::new(lvc.max_entries, lvc.max_bytes, store.persists()),
            metrics,
            store,
        }
    }

    pub fn set_retained_limits(&self, limits: &Limits) {
        write(&self.retained).set_limits(RetainedLimits {
            max_messages: limits.max_retained_messages,
            max_bytes: limits.max_retained_bytes,
        });
    }

    /// Puts a stored retained message back at startup.
    pub fn restore_retained(&self, msg: &Message) {
        if write(&self.retained).apply(msg) == Retain::Stored {
            metrics::inc(&self.metrics.retained);
        }
    }

    /// Adds a subscription; returns true if it is new (for retain handling 1).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        share: Option<&str>,
        opts: SubOptions,
    ) -> Result<bool, GroupsFull> {
        let entry = SubEntry {
            session: session.clone(),
            opts,
        };
        let added = write(&self.index).insert(filter, share, entry);
        match added {
            Ok(true) => metrics::inc(&self.metrics.subscriptions),
            Ok(false) => {}
            Err(GroupsFull) => self.metrics.limit_hit(Limit::SharedGroups),
        }
        added
    }

    pub fn unsubscribe(&self, session_key: u64, filter: &str, share: Option<&str>) -> bool {
        let removed = write(&self.index).remove(filter, share, session_key);
        if removed {
            metrics::dec(&self.metrics.subscriptions);
        }
        removed
    }

    /// Removes every subscription a session holds (clean start, expiry).
    pub fn drop_session(&self, session: &Session) {
        let subs: Vec<_> = session.lock().subscriptions.drain().collect();
        let mut index = write(&self.index);
        for (raw, _) in subs {
            if let Ok(f) = starling_model::topic::parse_subscription(&raw)
                && index.remove(f.filter, f.share_group, session.key)
            {
                metrics::dec(&self.metrics.subscriptions);
            }
        }
    }

    /// Routes `msg` to every matching subscriber and, if it is retained,
    /// updates the retained store. `scratch` is the caller's reusable buffer
    /// (one per connection) so routing allocates nothing once warm.
    pub fn publish(&self, mut msg: Message, scratch: &mut Vec<SubEntry>) -> Routed {
        scratch.clear();
        read(&self.index).matches(&msg.topic, scratch);
        if msg.retain || !scratch.is_empty() || self.lvc.is_enabled() {
            // It outlives the packet: stop pinning the publisher's read buffer.
            msg.detach();
        }
        let mut routing = Routing::default();
        if msg.retain {
            let applied = write(&self.retained).apply(&msg);
            if matches!(applied, Retain::Stored | Retain::Replaced | Retain::Cleared)
                && self.store.persists()
            {
                let t = self.store.submit(Op::Retain {
                    topic: msg.topic.clone(),
                    msg: (!msg.payload.is_empty()).then(|| msg.clone()),
                });
                routing.span.note(t);
            }
            match applied {
                Retain::Stored => metrics::inc(&self.metrics.retained),
                Retain::Cleared => metrics::dec(&self.metrics.retained),
                Retain::Replaced | Retain::Nothing => {}
                Retain::Full => {
                    self.metrics.limit_hit(Limit::Retained);
                    scratch.clear();
                    return Routed {
                        retained_full: true,
                        ..Routed::default()
                    };
                }
            }
        }
        self.lvc.record(&msg);
        if scratch.len() > 1 {
            // One copy per session, at the highest QoS of its matching
            // subscriptions, carrying all their identifiers (MQTT 3.3.4).
            scratch.sort_unstable_by_key(|e| e.session.key);
        }
        let mut routed = Routed::default();
        let mut i = 0;
        while i < scratch.len() {
            let e = &scratch[i];
            let mut qos = e.opts.qos;
            let mut rap = e.opts.retain_as_published;
            let mut sub_ids = SubIds::None;
            let mut local_only = e.opts.no_local;
            let mut check = e.opts.check_read;
            sub_ids.push(e.opts.sub_id);
            let mut j = i + 1;
            while j < scratch.len() && scratch[j].session.key == e.session.key {
                let o = &scratch[j].opts;
                qos = qos.max(o.qos);
                rap |= o.retain_as_published;
                local_only &= o.no_local;
                // One whole grant that matches proves the topic readable.
                check &= o.check_read;
                sub_ids.push(o.sub_id);
                j += 1;
            }
            let withheld = check && !e.session.may_read(&msg.topic);
            if !(withheld || local_only && msg.origin == e.session.key) {
                let d = Delivery {
                    qos: qos.min(msg.qos),
                    retain: rap && msg.retain,
                    sub_ids,
                    msg: msg.clone(),
                    stored: None,
                };
                routed.matched += 1;
                match e.session.enqueue(d, &self.metrics, &mut routing) {
                    Queued::Yes | Queued::Dropped => {}
                    Queued::Busy => routed.busy = true,
                    Queued::Congested => {
                        if routed.congested.is_none() {
                            routed.congested = Some(e.session.clone());
                        }
                    }
                }
            }
            i = j;
        }
        scratch.clear();
        self.routed(&mut routing);
        routed.span = routing.span;
        routed
    }

    /// Tells the store that every session that queues this message has.
    fn routed(&self, routing: &mut Routing) {
        if let Some(payload) = routing.payload {
            let t = self.store.submit(Op::Routed { payload });
            routing.span.note(t);
        }
    }

    /// Queues the retained messages matching a new subscription for
    /// `session`, at the subscription's QoS with the retain flag set, until
    /// its queue is at its cap: one SUBSCRIBE can cost no more than the
    /// session may hold. Returns how many were queued.
    pub fn deliver_retained(
        &self,
        session: &Session,
        filter: &str,
        opts: &SubOptions,
        span: &mut TicketSpan,
    ) -> usize {
        let now = Instant::now();
        let mut queued = 0;
        read(&self.retained).for_each_match(filter, now, |msg| {
            if opts.check_read && !session.may_read(&msg.topic) {
                return ControlFlow::Continue(());
            }
            let more = self.queue_initial(session, msg, true, opts, span);
            queued += usize::from(more.is_continue());
            more
        });
        queued
    }

    /// Queues one message a new subscription gets first (a retained one, or
    /// a last value), within the session's cap: `Break` once it is full.
    fn queue_initial(
        &self,
        session: &Session,
        msg: &Message,
        retain: bool,
        opts: &SubOptions,
        span: &mut TicketSpan,
    ) -> ControlFlow<()> {
        let mut sub_ids = SubIds::None;
        sub_ids.push(opts.sub_id);
        let d = Delivery {
            qos: opts.qos.min(msg.qos),
            retain,
            sub_ids,
            msg: msg.clone(),
            stored: None,
        };
        let mut routing = Routing::default();
        let outcome = session.enqueue_within_cap(d, &self.metrics, &mut routing);
        self.routed(&mut routing);
        span.join(routing.span);
        match outcome {
            Queued::Yes | Queued::Busy => ControlFlow::Continue(()),
            Queued::Congested | Queued::Dropped => ControlFlow::Break(()),
        }
    }

    /// `?pubStates=1`: queues the last value of every topic matching
    /// `filter` for `session`, without the retain flag, up to its queue cap
    /// (like [`Router::deliver_retained`]). Returns how many were queued.
    pub fn deliver_last_values(
        &self,
        session: &Session,
        filter: &str,
        opts: &SubOptions,
        span: &mut TicketSpan,
    ) -> usize {
        let now = Instant::now();
        let mut queued = 0;
        self.lvc.for_each_match(filter, now, |v| {
            if opts.check_read && !session.may_read(&v.msg.topic) {
                return ControlFlow::Continue(());
            }
            let more = self.queue_initial(session, &v.msg, false, opts, span);
            queued += usize::from(more.is_continue());
            more
        });
        queued
    }

    /// The most recent message matching `filter` that `readable` lets
    /// through: from the last-value cache, or with `retained` the most
    /// recently stored retained message.
    pub fn latest(
        &self,
        filter: &str,
        retained: bool,
        readable: impl Fn(&str) -> bool,
    ) -> Option<Message> {
        let now = Instant::now();
        if retained {
            return read(&self.retained).latest_match(filter, now, readable);
        }
        let mut best: Option<LastValue> = None;
        self.lvc.for_each_match(filter, now, |v| {
            if best.as_ref().is_none_or(|b| v.seq > b.seq) && readable(&v.msg.topic) {
                best = Some(v.clone());
            }
            ControlFlow::Continue(())
        });
        best.map(|v| v.msg)
    }

    /// Drops expired retained messages (the periodic housekeeping).
    pub fn purge_expired_retained(&self) {
        let now = Instant::now();
        let gone = write(&self.retained).purge_expired(now);
        if !gone.is_empty() {
            metrics::sub(&self.metrics.retained, gone.len() as u64);
        }
        if self.store.persists() {
            for topic in gone {
                self.store.submit(Op::Retain { topic, msg: None });
            }
        }
    }
}

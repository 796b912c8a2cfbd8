//! One router for every protocol: the topic index, the retained store and
//! delivery into subscriber sessions. MQTT connections, and later the HTTP
//! API and native WebSocket streams, all publish through [`Router::publish`].

mod index;
mod message;
mod retained;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use index::{SubEntry, SubOptions, TopicIndex};
pub use message::{Delivery, Message, SubIds};
pub use retained::RetainedStore;
use tokio::time::Instant;

use crate::metrics::{self, Metrics};
use crate::session::Session;
use crate::session::state::Queued;

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
}

#[derive(Debug)]
pub struct Router {
    index: RwLock<TopicIndex>,
    retained: RwLock<RetainedStore>,
    metrics: Arc<Metrics>,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Router {
            index: RwLock::default(),
            retained: RwLock::default(),
            metrics,
        }
    }

    /// Adds a subscription; returns true if it is new (for retain handling 1).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        share: Option<&str>,
        opts: SubOptions,
    ) -> bool {
        let entry = SubEntry {
            session: session.clone(),
            opts,
        };
        let added = write(&self.index).insert(filter, share, entry);
        if added {
            metrics::inc(&self.metrics.subscriptions);
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
    pub fn publish(&self, msg: Message, scratch: &mut Vec<SubEntry>) -> Routed {
        if msg.retain {
            let delta = write(&self.retained).apply(&msg);
            match delta {
                1 => metrics::inc(&self.metrics.retained),
                -1 => metrics::dec(&self.metrics.retained),
                _ => {}
            }
        }
        scratch.clear();
        read(&self.index).matches(&msg.topic, scratch);
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
            sub_ids.push(e.opts.sub_id);
            let mut j = i + 1;
            while j < scratch.len() && scratch[j].session.key == e.session.key {
                let o = &scratch[j].opts;
                qos = qos.max(o.qos);
                rap |= o.retain_as_published;
                local_only &= o.no_local;
                sub_ids.push(o.sub_id);
                j += 1;
            }
            if !(local_only && msg.origin == e.session.key) {
                let d = Delivery {
                    qos: qos.min(msg.qos),
                    retain: rap && msg.retain,
                    sub_ids,
                    msg: msg.clone(),
                };
                routed.matched += 1;
                match e.session.enqueue(d, &self.metrics) {
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
        routed
    }

    /// Retained messages for a new subscription, as deliveries at the
    /// subscription's QoS with the retain flag set.
    pub fn retained_for(&self, filter: &str, opts: &SubOptions) -> Vec<Delivery> {
        let now = Instant::now();
        read(&self.retained)
            .matching(filter, now)
            .into_iter()
            .map(|msg| {
                let mut sub_ids = SubIds::None;
                sub_ids.push(opts.sub_id);
                Delivery {
                    qos: opts.qos.min(msg.qos),
                    retain: true,
                    sub_ids,
                    msg,
                }
            })
            .collect()
    }
}

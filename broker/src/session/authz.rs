//! Authorization on a live connection: the publish check with its cache,
//! and re-checking the session after a bundle change or on resume.

use starling_codec::{ByteString, reason};

use super::connection::{Connection, End};
use crate::metrics;
use crate::router::{Delivery, SubOptions};
use starling_model::acl::Grant;

impl Connection {
    /// Publish check with a per-connection cache (topics repeat; the ACL
    /// walk need not). The cache is bounded and dropped on bundle change.
    /// `topic` is a valid topic name (checked before).
    pub(super) fn may_publish(&mut self, topic: &ByteString) -> bool {
        if let Some(allowed) = self.principal.publish_for_every_topic() {
            // No rule to walk: hashing the topic would cost more.
            return allowed;
        }
        if let Some(&allowed) = self.acl_cache.get(topic) {
            return allowed;
        }
        let allowed = self.principal.may_publish(topic);
        if self.acl_cache.len() >= 1024 {
            self.acl_cache.clear();
        }
        // Its own copy: a slice would pin the publisher's read buffer.
        self.acl_cache.insert(ByteString::from(&**topic), allowed);
        allowed
    }

    /// After a bundle change or a token expiry: refresh the principal (or
    /// end the connection if its token is gone) and drop subscriptions the
    /// new rules no longer allow.
    pub(super) fn reauthorize(&mut self) -> Option<End> {
        let state = self.shared.auth.current();
        match state.refresh(&self.principal, std::time::SystemTime::now()) {
            Ok(p) => {
                self.session.set_reader(p.clone());
                self.principal = p;
                self.acl_cache.clear();
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, client_id = %self.client_id(), reason = %e, "closing connection: token no longer valid");
                // A revoked token publishes nothing more, its will included.
                self.will = None;
                return Some(End::Server(reason::NOT_AUTHORIZED));
            }
        }
        self.prune_unauthorized();
        None
    }

    /// Makes the session hold only what the current principal may read:
    /// subscriptions it may no longer make are removed, and messages queued
    /// or in flight on topics it may not receive are dropped. Runs after a
    /// bundle change and when a persistent session is resumed — the session
    /// may have been built under older rules, or by another token that used
    /// the same client id.
    pub(super) fn prune_unauthorized(&mut self) {
        let subs: Vec<(ByteString, SubOptions)> = self
            .session
            .lock()
            .subscriptions
            .iter()
            .map(|(k, o)| (k.clone(), *o))
            .collect();
        for (raw, opts) in subs {
            let Ok(parsed) = starling_model::topic::parse_subscription(&raw) else {
                continue;
            };
            let grant = self.principal.grant_subscribe(parsed.filter);
            if !grant.allowed() {
                self.session.lock().subscriptions.remove(&raw);
                self.session.unstore_subscription(&raw);
                self.shared
                    .router
                    .unsubscribe(self.session.key, parsed.filter, parsed.share_group);
                metrics::inc(&self.shared.metrics.acl_refusals);
                tracing::info!(peer = %self.peer, client_id = %self.client_id(), filter = %raw, "subscription removed: no longer allowed");
                continue;
            }
            let check_read = grant == Grant::Filtered;
            if check_read != opts.check_read {
                // A deny rule came or went: the router must (or need no
                // longer) check this subscription's messages one by one.
                let opts = SubOptions { check_read, ..opts };
                let mut st = self.session.lock();
                if st.owned_by(&self.link) {
                    st.subscriptions.insert(raw.clone(), opts);
                    let _ = self.shared.router.subscribe(
                        &self.session,
                        parsed.filter,
                        parsed.share_group,
                        opts,
                    );
                    drop(st);
                    self.session.store_subscription(&raw, &opts);
                }
            }
        }
        let principal = self.principal.clone();
        let mut st = self.session.lock();
        let before = st.queue.len() + st.inflight.len();
        st.queue.retain(|d| principal.may_receive(&d.msg.topic));
        // A released QoS 2 message (PUBREL stage) carries no payload any more.
        st.inflight
            .retain(|i| i.released || principal.may_receive(&i.delivery.msg.topic));
        st.queued_bytes = st.queue.iter().map(Delivery::cost).sum();
        let dropped = before - st.queue.len() - st.inflight.len();
        drop(st);
        if dropped > 0 {
            metrics::add(&self.shared.metrics.acl_refusals, dropped as u64);
            tracing::info!(peer = %self.peer, client_id = %self.client_id(), dropped, "queued messages dropped: no longer allowed");
        }
    }
}

//! A subscriber that is not an MQTT session: a WebSocket topic stream or a
//! GET waiting for its first message. It is a [`Session`] all the same — the
//! router delivers into its queue with the same caps, backpressure and ACL
//! read check as for MQTT clients — that lives exactly as long as the
//! request, with no client id and nothing kept after it.

use std::sync::Arc;
use std::time::Duration;

use starling_codec::QoS;
use starling_model::acl::{Grant, Principal};
use tokio::time::Instant;

use crate::metrics;
use crate::router::{Delivery, Routed, SubOptions};
use crate::server::Shared;
use crate::session::Session;
use crate::session::connection::BACKPRESSURE_WAIT;
use crate::session::state::{ConnLink, QueueLimits};

pub struct WebSubscriber {
    shared: Arc<Shared>,
    pub session: Arc<Session>,
    pub link: Arc<ConnLink>,
    filter: String,
    opts: SubOptions,
}

impl WebSubscriber {
    /// Subscribes to `filter` (already validated, no `$share/`) with the
    /// grant the principal's rules gave it. At QoS 2, so each delivery keeps
    /// its publisher's QoS and QoS 1/2 publishers feel this subscriber's
    /// backpressure like any MQTT subscriber's.
    pub fn open(
        shared: &Arc<Shared>,
        principal: &Arc<Principal>,
        filter: &str,
        grant: Grant,
        pub_states: bool,
    ) -> WebSubscriber {
        let link = Arc::new(ConnLink::default());
        let key = shared.registry.join_web(link.clone());
        let limits = shared.limits();
        let session = Arc::new(Session::owned(
            key,
            Arc::from("web"),
            QueueLimits {
                max_messages: limits.max_queued_messages,
                max_bytes: limits.max_queued_bytes,
            },
            principal.name().map(Arc::from),
        ));
        session.attach(link.clone(), Duration::ZERO);
        session.set_reader(principal.clone());
        let opts = SubOptions {
            qos: QoS::ExactlyOnce,
            check_read: grant == Grant::Filtered,
            pub_states,
            ..SubOptions::default()
        };
        // Not shared, so the share-group cap cannot refuse it.
        let _ = shared.router.subscribe(&session, filter, None, opts);
        WebSubscriber {
            shared: shared.clone(),
            session,
            link,
            filter: filter.to_owned(),
            opts,
        }
    }

    pub fn key(&self) -> u64 {
        self.session.key
    }

    /// Queues what a new subscription gets first: the last values with
    /// `?pubStates=1`, the retained messages otherwise.
    pub fn send_initial(&self) {
        // A stream is never a persistent session: nothing to wait for.
        let mut span = crate::store::TicketSpan::default();
        let router = &self.shared.router;
        if self.opts.pub_states {
            router.deliver_last_values(&self.session, &self.filter, &self.opts, &mut span);
        } else {
            router.deliver_retained(&self.session, &self.filter, &self.opts, &mut span);
        }
    }

    /// Takes queued deliveries into `out`, counted as sent, until `max` of
    /// them or about `max_bytes` (at least one), so what waits in the
    /// socket's write buffer stays bounded like an MQTT connection's batch.
    pub fn drain(&self, out: &mut Vec<Delivery>, max: usize, max_bytes: usize) {
        let mut st = self.session.lock();
        let mut bytes = 0;
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some(d) = st.pop_queued() else { break };
            bytes += d.cost();
            metrics::inc(&self.shared.metrics.messages_out[d.qos as usize]);
            out.push(d);
        }
        self.session.after_drain(&st);
    }

    /// After a bundle change: the new rules for this subscriber, or false
    /// when its filter is no longer allowed at all.
    pub fn regrant(&mut self, principal: &Arc<Principal>) -> bool {
        let grant = principal.grant_subscribe(&self.filter);
        if !grant.allowed() {
            return false;
        }
        self.session.set_reader(principal.clone());
        let check_read = grant == Grant::Filtered;
        if check_read != self.opts.check_read {
            self.opts.check_read = check_read;
            let _ = self
                .shared
                .router
                .subscribe(&self.session, &self.filter, None, self.opts);
        }
        // Queued under the old rules: keep only what may still be read.
        let mut st = self.session.lock();
        st.queue.retain(|d| principal.may_receive(&d.msg.topic));
        st.queued_bytes = st.queue.iter().map(Delivery::cost).sum();
        true
    }
}

impl Drop for WebSubscriber {
    fn drop(&mut self) {
        self.shared
            .router
            .unsubscribe(self.session.key, &self.filter, None);
        self.shared.registry.leave_web(self.session.key);
        self.session.detach(&self.link, Duration::ZERO);
    }
}

/// Backpressure for HTTP and stream publishers: when a QoS 1/2 message found
/// a subscriber over its queue cap, wait (at most a second, as MQTT
/// publishers do) until that subscriber has room. Answering only then keeps
/// a client that waits for each response from outrunning its subscribers.
pub async fn await_room(routed: &Routed) {
    if let Some(s) = &routed.congested {
        s.wait_for_room(Instant::now() + BACKPRESSURE_WAIT).await;
    }
}

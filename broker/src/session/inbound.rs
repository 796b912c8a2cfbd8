//! Packets from the client: PUBLISH (with topic aliases, QoS 2 dedupe and
//! ACL check), acknowledgements, SUBSCRIBE/UNSUBSCRIBE, PINGREQ, DISCONNECT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use starling_codec::{
    ByteString, Packet, Properties, PubResp, Publish, QoS, SubAck, Subscribe, SubscribeFilter,
    UnsubAck, Unsubscribe, reason,
};
use starling_model::acl::Grant;
use starling_model::topic::TopicError;
use tokio::time::Instant;

use super::connection::{Connection, End};
use crate::logging::Shown;
use crate::metrics::{self, DropReason, Limit};
use crate::router::{GroupsFull, Message, SubOptions};

impl Connection {
    pub(super) fn protocol_error(&self, why: &str) -> Option<End> {
        metrics::inc(&self.shared.metrics.protocol_errors);
        tracing::debug!(peer = %self.peer, client_id = %self.client_id(), why, "protocol violation");
        Some(End::Server(reason::PROTOCOL_ERROR))
    }

    pub(super) fn handle(&mut self, p: Packet) -> Option<End> {
        // Taken over (or kicked) while packets were still buffered: nothing
        // more of this connection may touch the session.
        if let Some(r) = self.link.kicked() {
            return Some(End::Server(r));
        }
        match p {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(r) => self.acknowledged(r.pkid),
            Packet::PubRec(r) => {
                let mut st = self.session.lock();
                let found = st.inflight.iter().position(|i| i.pkid == r.pkid);
                match found {
                    Some(pos) if r.reason >= 0x80 => {
                        let gone = st.inflight.remove(pos);
                        drop(st);
                        if let Some(i) = gone {
                            self.session.dequeue_stored(&i.delivery);
                        }
                    }
                    Some(pos) => {
                        let mut t = 0;
                        if let Some(i) = st.inflight.get_mut(pos) {
                            i.released = true;
                            // Stored before the PUBREL goes: after a restart
                            // the broker must resend PUBREL, not the message.
                            t = self.session.delivery_stored(&i.delivery, r.pkid, true);
                        }
                        drop(st);
                        self.work.gate.note(t);
                        self.write_packet(&Packet::PubRel(PubResp::new(r.pkid, 0)));
                    }
                    None => {
                        drop(st);
                        let code = if self.version.is_v5() {
                            reason::PACKET_IDENTIFIER_NOT_FOUND
                        } else {
                            0
                        };
                        self.write_packet(&Packet::PubRel(PubResp::new(r.pkid, code)));
                    }
                }
            }
            Packet::PubRel(r) => {
                let known = self.session.lock().incoming_qos2.remove(&r.pkid).is_some();
                if known {
                    // PUBCOMP waits for this: a restart must not take a
                    // reuse of the id for a duplicate.
                    let t = self.session.qos2_stored(r.pkid, false);
                    self.work.gate.note(t);
                }
                let code = if known || !self.version.is_v5() {
                    0
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.write_packet(&Packet::PubComp(PubResp::new(r.pkid, code)));
            }
            Packet::PubComp(r) => self.acknowledged(r.pkid),
            Packet::Subscribe(s) => return self.on_subscribe(s),
            Packet::Unsubscribe(u) => return self.on_unsubscribe(u),
            Packet::PingReq => self.write_packet(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if self.version.is_v5()
                    && let Some(e) = d.properties.session_expiry_interval
                {
                    // MQTT-3.14.2-2: cannot turn a 0-expiry session persistent here.
                    if self.agreed.session_expiry.is_zero() && e > 0 {
                        return self
                            .protocol_error("session expiry set on DISCONNECT after 0 on CONNECT");
                    }
                    let capped = e.min(self.limits.max_session_expiry);
                    self.agreed.session_expiry = Duration::from_secs(u64::from(capped));
                }
                return Some(End::ClientDisconnect {
                    will: d.reason == reason::DISCONNECT_WITH_WILL,
                });
            }
            Packet::Connect(_) => return self.protocol_error("second CONNECT"),
            Packet::Auth(_) => return self.protocol_error("AUTH without an authentication method"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return self.protocol_error("server-only packet from client");
            }
        }
        None
    }

    /// PUBACK or PUBCOMP: the delivery is done.
    fn acknowledged(&mut self, pkid: u16) {
        let done = self.session.lock().take_inflight(pkid);
        if let Some(i) = done {
            self.session.dequeue_stored(&i.delivery);
        }
    }

    pub(super) fn on_publish(&mut self, mut p: Publish) -> Option<End> {
        metrics::inc(&self.shared.metrics.messages_in[p.qos as usize]);
        metrics::inc(&self.session.messages_received);
        if self.version.is_v5() {
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > self.limits.max_topic_aliases {
                    metrics::inc(&self.shared.metrics.protocol_errors);
                    return Some(End::Server(reason::TOPIC_ALIAS_INVALID));
                }
                if p.topic.is_empty() {
                    match self.aliases_in.get(&alias) {
                        Some(t) => p.topic = t.clone(),
                        None => return self.protocol_error("unknown topic alias"),
                    }
                } else {
                    // Kept across packets: its own copy, not a slice of the read buffer.
                    self.aliases_in.insert(alias, ByteString::from(&*p.topic));
                }
            }
            if !p.properties.subscription_identifiers.is_empty() {
                return self.protocol_error("subscription identifier in PUBLISH");
            }
        }
        if p.topic.is_empty() {
            return self.protocol_error("empty topic");
        }
        let resent =
            p.qos == QoS::ExactlyOnce && self.session.lock().incoming_qos2.get(&p.pkid).is_some();
        if p.qos != QoS::AtMostOnce && !resent && !self.shared.router.store.healthy() {
            // The store cannot write: accepting would promise what it cannot keep.
            metrics::inc(&self.shared.metrics.store_refusals);
            metrics::inc(&self.shared.metrics.messages_dropped[p.qos as usize]);
            if !self.version.is_v5() {
                // 3.1.1 has no refusing PUBACK; closing makes the client resend later.
                return Some(End::Server(reason::QUOTA_EXCEEDED));
            }
            let refusal = PubResp::new(p.pkid, reason::QUOTA_EXCEEDED);
            self.write_packet(&if p.qos == QoS::AtLeastOnce {
                Packet::PubAck(refusal)
            } else {
                Packet::PubRec(refusal)
            });
            return None;
        }
        if p.qos == QoS::ExactlyOnce {
            let mut st = self.session.lock();
            if st.incoming_qos2.get(&p.pkid).is_some() {
                // Re-sent before our PUBREC arrived: already routed once.
                drop(st);
                self.write_packet(&Packet::PubRec(PubResp::new(p.pkid, 0)));
                return None;
            }
            if st.incoming_qos2.len() >= usize::from(self.limits.max_inflight) {
                drop(st);
                metrics::inc(&self.shared.metrics.protocol_errors);
                return Some(End::Server(reason::RECEIVE_MAXIMUM_EXCEEDED));
            }
            st.incoming_qos2.insert(p.pkid, ());
            drop(st);
            let t = self.session.qos2_stored(p.pkid, true);
            self.work.gate.note(t);
        }
        let code = match self.shared.check_topic(&p.topic, &self.limits) {
            Err(e) => {
                if matches!(e, TopicError::TooManyLevels { .. }) {
                    self.shared.metrics.limit_hit(Limit::TopicLevels);
                }
                self.shared
                    .metrics
                    .dropped(p.qos as usize, DropReason::InvalidTopic);
                reason::TOPIC_NAME_INVALID
            }
            Ok(()) if !self.may_publish(&p.topic) => {
                metrics::inc(&self.shared.metrics.acl_refusals);
                self.shared
                    .metrics
                    .dropped(p.qos as usize, DropReason::NotAuthorized);
                tracing::debug!(peer = %self.peer, token = ?self.principal.name(), topic = %p.topic, "publish refused by ACL");
                reason::NOT_AUTHORIZED
            }
            Ok(()) => {
                let msg = self.message_from(p.topic, p.payload, p.qos, p.retain, p.properties);
                let routed = self.shared.router.publish(msg, &mut self.work.scratch);
                self.work.gate.join(routed.span);
                if routed.retained_full {
                    self.shared
                        .metrics
                        .dropped(p.qos as usize, DropReason::RetainedFull);
                }
                self.work.yield_soon |= routed.busy;
                if let Some(s) = routed.congested {
                    let now = Instant::now();
                    let skipped = self
                        .work
                        .skip
                        .is_some_and(|(k, until)| k == s.key && now < until);
                    if !skipped {
                        self.work.blocked = Some((s, now + super::connection::BACKPRESSURE_WAIT));
                    }
                }
                if routed.retained_full {
                    reason::QUOTA_EXCEEDED
                } else if routed.matched == 0 {
                    reason::NO_MATCHING_SUBSCRIBERS
                } else {
                    reason::SUCCESS
                }
            }
        };
        // v3.1.1 cannot refuse a publish: it is acknowledged (and counted as
        // dropped above) so the client does not resend it forever.
        let code = if self.version.is_v5() { code } else { 0 };
        if code >= 0x80 && p.qos == QoS::ExactlyOnce {
            // A refusing PUBREC ends the QoS 2 flow (MQTT 4.3.3): the id is
            // free again, so its next use is a new message, not a duplicate,
            // and refusals never fill the Receive Maximum.
            if self.session.lock().incoming_qos2.remove(&p.pkid).is_some() {
                let t = self.session.qos2_stored(p.pkid, false);
                self.work.gate.note(t);
            }
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write_packet(&Packet::PubAck(PubResp::new(p.pkid, code))),
            QoS::ExactlyOnce => self.write_packet(&Packet::PubRec(PubResp::new(p.pkid, code))),
        }
        None
    }

    pub(super) fn message_from(
        &self,
        topic: ByteString,
        payload: bytes::Bytes,
        qos: QoS,
        retain: bool,
        mut props: Properties,
    ) -> Message {
        let expires_at = props
            .message_expiry_interval
            .take()
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        props.topic_alias = None;
        let properties = if props.is_empty() {
            None
        } else {
            Some(Arc::new(props))
        };
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at,
            origin: self.session.key,
        }
    }

    /// Handles a SUBSCRIBE with bounded work: each distinct filter once
    /// (the last occurrence's options win, as a later subscription
    /// replaces an earlier one), the session's subscription cap, and
    /// retained messages queued only up to the session's queue cap.
    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        let v5 = self.version.is_v5();
        let sub_id = s
            .properties
            .subscription_identifiers
            .first()
            .copied()
            .unwrap_or(0);
        let n = s.filters.len();
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, f) in s.filters.iter().enumerate() {
            last.insert(&f.filter, i);
        }
        let mut codes = vec![0u8; n];
        let mut retained = Vec::new();
        for (i, f) in s.filters.iter().enumerate() {
            if last.get(&*f.filter) != Some(&i) {
                continue;
            }
            let outcome = self.subscribe_one(f, sub_id);
            codes[i] = match outcome {
                Ok((code, Some(due))) => {
                    retained.push(due);
                    code
                }
                Ok((code, None)) => code,
                Err(end) => return Some(end),
            };
        }
        for (i, f) in s.filters.iter().enumerate() {
            if let Some(&j) = last.get(&*f.filter)
                && j != i
            {
                codes[i] = codes[j];
            }
        }
        if !v5 {
            for c in &mut codes {
                if *c >= 0x80 {
                    *c = reason::v3::SUBACK_FAILURE;
                }
            }
        }
        self.write_packet(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes,
            properties: Properties::default(),
        }));
        for (filter, opts) in retained {
            self.send_initial(&filter, &opts);
        }
        None
    }

    /// One filter of a SUBSCRIBE: the v5 reason code (mapped for 3.1.1 by
    /// the caller) and, when retained messages are due, the filter and
    /// options to send them with.
    fn subscribe_one(
        &mut self,
        f: &SubscribeFilter,
        sub_id: u32,
    ) -> Result<(u8, Option<(String, SubOptions)>), End> {
        // `?pubStates=1` rides on the filter; any other option is refused.
        let (parsed, topic_opts) = match starling_model::topic::parse_with_options(&f.filter) {
            Ok(p) => p,
            Err(_) => return Ok((reason::TOPIC_FILTER_INVALID, None)),
        };
        // The session knows a subscription by its filter without options:
        // `a/b` and `a/b?pubStates=1` are the same subscription.
        let key_len = f.filter.find('?').unwrap_or(f.filter.len());
        let key = &f.filter[..key_len];
        if let Err(e) = self.shared.check_filter(parsed.filter, &self.limits) {
            if matches!(e, TopicError::TooManyLevels { .. }) {
                self.shared.metrics.limit_hit(Limit::TopicLevels);
            }
            return Ok((reason::TOPIC_FILTER_INVALID, None));
        }
        if parsed.share_group.is_some() && f.no_local && self.version.is_v5() {
            return Err(self
                .protocol_error("no-local on a shared subscription")
                .unwrap_or(End::Server(reason::PROTOCOL_ERROR)));
        }
        let grant = self.principal.grant_subscribe(parsed.filter);
        if !grant.allowed() {
            metrics::inc(&self.shared.metrics.acl_refusals);
            tracing::debug!(peer = %self.peer, token = ?self.principal.name(), filter = %Shown(&f.filter), "subscription refused by ACL");
            return Ok((reason::NOT_AUTHORIZED, None));
        }
        let opts = SubOptions {
            qos: f.qos,
            no_local: f.no_local,
            retain_as_published: f.retain_as_published,
            retain_handling: f.retain_handling,
            sub_id,
            check_read: grant == Grant::Filtered,
            pub_states: topic_opts.pub_states,
        };
        // Checked and applied under the session lock: a connection that was
        // taken over meanwhile must not add subscriptions to the session
        // (or to the router, for a session already dropped).
        let mut st = self.session.lock();
        if !st.owned_by(&self.link) {
            return Err(End::Server(reason::SESSION_TAKEN_OVER));
        }
        let existing = st.subscriptions.contains_key(key);
        if !existing && st.subscriptions.len() >= self.shared.limits().max_subscriptions_per_session
        {
            drop(st);
            self.shared.metrics.limit_hit(Limit::Subscriptions);
            return Ok((reason::QUOTA_EXCEEDED, None));
        }
        let is_new = match self.shared.router.subscribe(
            &self.session,
            parsed.filter,
            parsed.share_group,
            opts,
        ) {
            Ok(n) => n,
            Err(GroupsFull) => return Ok((reason::QUOTA_EXCEEDED, None)),
        };
        st.subscriptions.insert(ByteString::from(key), opts);
        drop(st);
        // The SUBACK waits for the subscription to be stored.
        let t = self.session.store_subscription(key, &opts);
        self.work.gate.note(t);
        let send_retained = parsed.share_group.is_none()
            && (opts.pub_states
                || match f.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                });
        Ok((
            f.qos as u8,
            send_retained.then(|| (parsed.filter.to_owned(), opts)),
        ))
    }

    /// What a new subscription gets first: the last values of its topics
    /// with `?pubStates=1`, the retained messages otherwise.
    pub(super) fn send_initial(&mut self, filter: &str, opts: &SubOptions) {
        let router = &self.shared.router;
        if opts.pub_states {
            router.deliver_last_values(&self.session, filter, opts, &mut self.work.gate);
        } else {
            router.deliver_retained(&self.session, filter, opts, &mut self.work.gate);
        }
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) -> Option<End> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            let raw = &raw[..raw.find('?').unwrap_or(raw.len())];
            let mut st = self.session.lock();
            if !st.owned_by(&self.link) {
                return Some(End::Server(reason::SESSION_TAKEN_OVER));
            }
            let existed = st.subscriptions.remove(raw).is_some();
            if existed && let Ok(p) = starling_model::topic::parse_subscription(raw) {
                self.shared
                    .router
                    .unsubscribe(self.session.key, p.filter, p.share_group);
            }
            drop(st);
            if existed {
                let t = self.session.unstore_subscription(raw);
                self.work.gate.note(t);
            }
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        if !self.version.is_v5() {
            codes.clear();
        }
        self.write_packet(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            codes,
            properties: Properties::default(),
        }));
        None
    }
}

//! Packets to the client: draining the session queue into the write buffer
//! within the inflight window, topic aliases towards the client, the
//! client's maximum packet size, and resending after a reconnect.

use starling_codec::{self as codec, Packet, PubResp, PublishRef, QoS};
use tokio::time::Instant;

use super::connection::{Connection, WRITE_BATCH};
use super::state::Inflight;
use crate::metrics::{self, DropReason};
use crate::router::Delivery;

impl Connection {
    pub(super) fn window_open(&self) -> bool {
        self.session.lock().inflight.len() < usize::from(self.agreed.send_window)
    }

    /// After a reconnect: messages the client never acknowledged go again,
    /// with DUP set (or PUBREL for QoS 2 already received).
    pub(super) fn resend_inflight(&mut self) {
        let pending: Vec<Inflight> = self.session.lock().inflight.iter().cloned().collect();
        for i in pending {
            if i.released {
                self.write_packet(&Packet::PubRel(PubResp::new(i.pkid, 0)));
            } else {
                self.encode_delivery(i.pkid, &i.delivery, true);
            }
        }
    }

    /// Moves queued deliveries into the write buffer while the inflight
    /// window has room. The session lock is held only to pop; encoding
    /// happens outside it so publishers are not held up.
    pub(super) fn drain(&mut self) {
        let window = usize::from(self.agreed.send_window);
        let mut batch = std::mem::take(&mut self.work.batch);
        let mut bytes = 0;
        {
            let mut st = self.session.lock();
            if !st.owned_by(&self.link) {
                // Taken over: the queue is the new connection's now. Draining
                // it here would put messages in flight on a dead socket,
                // where they block the new connection's window.
                return;
            }
            while bytes < WRITE_BATCH && st.inflight.len() < window {
                let Some(d) = st.pop_queued() else { break };
                bytes += d.cost() + 16;
                let pkid = if d.qos == QoS::AtMostOnce {
                    0
                } else {
                    let id = st.next_pkid();
                    if d.qos == QoS::ExactlyOnce {
                        // The id is stored before the PUBLISH goes, so a
                        // restart resends it under the same id and the
                        // client can tell it is a duplicate.
                        let t = self.session.delivery_stored(&d, id, false);
                        self.work.gate.note(t);
                    }
                    st.inflight.push_back(Inflight {
                        pkid: id,
                        delivery: d.clone(),
                        released: false,
                    });
                    id
                };
                batch.push((pkid, d));
            }
            self.session.after_drain(&st);
        }
        // One allocation for the whole batch (the buffer is released after
        // each flush).
        self.work.wbuf.reserve(bytes + 64);
        let now = Instant::now();
        for (pkid, d) in batch.drain(..) {
            if d.msg.is_expired(now) {
                self.shared
                    .metrics
                    .dropped(d.qos as usize, DropReason::Expired);
                if pkid != 0 {
                    self.session.lock().take_inflight(pkid);
                }
                self.session.dequeue_stored(&d);
                continue;
            }
            if !self.encode_delivery(pkid, &d, false) {
                if pkid != 0 {
                    self.session.lock().take_inflight(pkid);
                }
                self.session.dequeue_stored(&d);
            }
        }
        self.work.batch = batch;
    }

    /// Encodes one PUBLISH; false if it had to be dropped (too large for
    /// the client).
    pub(super) fn encode_delivery(&mut self, pkid: u16, d: &Delivery, dup: bool) -> bool {
        let v5 = self.version.is_v5();
        let msg = &d.msg;
        let mut topic: &str = &msg.topic;
        let mut alias = None;
        if v5 && self.agreed.client_alias_max > 0 {
            match self.aliases_out.get(&msg.topic) {
                Some(&a) => {
                    alias = Some(a);
                    topic = "";
                }
                None => {
                    // Assigned 1..=Topic Alias Maximum, then no more (u16
                    // arithmetic would wrap to the invalid alias 0).
                    let used = self.aliases_out.len();
                    if used < usize::from(self.agreed.client_alias_max) {
                        let next = u16::try_from(used + 1).unwrap_or(u16::MAX);
                        self.aliases_out.insert(msg.topic.clone(), next);
                        alias = Some(next);
                    }
                }
            }
        }
        let p = PublishRef {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            pkid,
            payload: &msg.payload,
            properties: msg.properties.as_deref(),
            topic_alias: alias,
            subscription_identifiers: d.sub_ids.as_slice(),
            message_expiry_interval: msg.remaining_expiry(Instant::now()),
        };
        if let Some(max) = self.agreed.client_max_packet
            && codec::publish_encoded_len(&p, self.version) > max as usize
        {
            // MQTT-3.1.2-25: too large for the client: discard as if sent.
            self.shared
                .metrics
                .dropped(d.qos as usize, DropReason::TooLarge);
            if alias.is_some() && !topic.is_empty() {
                self.aliases_out.remove(&msg.topic);
            }
            return false;
        }
        codec::encode_publish(&p, self.version, &mut self.work.wbuf);
        metrics::inc(&self.shared.metrics.messages_out[d.qos as usize]);
        metrics::inc(&self.session.messages_sent);
        true
    }

    pub(super) fn write_packet(&mut self, p: &Packet) {
        if let Err(e) = codec::encode(p, self.version, &mut self.work.wbuf) {
            tracing::warn!(error = %e, "could not encode a packet for the client");
        }
    }
}

//! Startup: the store's snapshot back into the registry and the router.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Snapshot, StoredRef, records};
use crate::router::{Delivery, Message};
use crate::server::Shared;
use crate::session::state::{Inflight, QueueLimits};

/// What was restored, for the startup log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub sessions: usize,
    pub queued: usize,
    pub retained: usize,
    pub last_values: usize,
    pub expired: usize,
    pub unreadable: usize,
}

/// Rebuilds sessions (subscriptions, queues, in-flight QoS 2 state,
/// incoming QoS 2 ids), retained messages and last values. Wills of
/// clients that were connected when the broker stopped without a
/// goodbye are published, after their delay, as for a lost connection.
pub fn restore(shared: &Arc<Shared>, snap: Snapshot) -> Restored {
    let mut r = Restored {
        expired: snap.expired,
        unreadable: snap.unreadable,
        ..Restored::default()
    };
    for m in &snap.retained {
        shared.router.restore_retained(m);
        r.retained += 1;
    }
    for m in &snap.last_values {
        shared.router.lvc.record(m);
        r.last_values += 1;
    }
    let limits = &shared.config.limits;
    let now_ms = records::now_ms();
    for s in snap.sessions {
        let rec = &s.record;
        let gone_ms = rec
            .disconnected_at_ms
            .map_or(0, |at| now_ms.saturating_sub(at));
        let disconnected_at = Instant::now()
            .checked_sub(Duration::from_millis(gone_ms))
            .unwrap_or_else(Instant::now);
        let session = shared.registry.restore(
            s.id.clone(),
            rec.owner.as_deref().map(Arc::from),
            QueueLimits {
                max_messages: limits.max_queued_messages,
                max_bytes: limits.max_queued_bytes,
            },
            Duration::from_secs(rec.expiry_secs),
            disconnected_at,
        );
        session.persist_in(&shared.router.store);
        for sub in &s.subscriptions {
            let (Ok(opts), Ok(p)) = (
                sub.options(),
                starling_model::topic::parse_subscription(&sub.filter),
            ) else {
                tracing::warn!(client_id = %s.id, filter = %sub.filter, "a stored subscription is no longer valid; dropped");
                continue;
            };
            if shared
                .router
                .subscribe(&session, p.filter, p.share_group, opts)
                .is_ok()
            {
                session
                    .lock()
                    .subscriptions
                    .insert(sub.filter.as_str().into(), opts);
            }
        }
        {
            let mut st = session.lock();
            for (seq, entry, msg) in s.queue {
                st.next_seq = st.next_seq.max(seq + 1);
                let d = Delivery {
                    msg,
                    qos: entry.qos,
                    retain: entry.retain,
                    sub_ids: entry.sub_ids,
                    stored: Some(StoredRef {
                        seq,
                        payload: entry.payload,
                    }),
                };
                if entry.pkid != 0 {
                    st.inflight.push_back(Inflight {
                        pkid: entry.pkid,
                        delivery: d,
                        released: entry.released,
                    });
                } else {
                    st.queued_bytes += d.cost();
                    st.queue.push_back(d);
                }
                r.queued += 1;
            }
            for pkid in s.incoming_qos2 {
                st.incoming_qos2.insert(pkid, ());
            }
            st.stored_will = rec.will.clone().map(Box::new);
        }
        if let Some(w) = &rec.will {
            schedule_will(
                shared,
                &session,
                w,
                rec.disconnected_at_ms.is_none(),
                gone_ms,
            );
        }
        r.sessions += 1;
    }
    r
}

/// A stored will: a client connected at the crash lost its connection
/// then (the delay runs from now); one already gone had a delayed will
/// pending (the rest of the delay runs).
fn schedule_will(
    shared: &Arc<Shared>,
    session: &Arc<crate::session::Session>,
    w: &super::StoredWill,
    was_connected: bool,
    gone_ms: u64,
) {
    let Ok(Some(msg)) = records::decode_message(&w.message, records::now_ms()) else {
        return;
    };
    let expiry = session.lock().expiry;
    let delay = Duration::from_secs(w.delay_secs).min(expiry);
    let left = if was_connected {
        delay
    } else {
        delay.saturating_sub(Duration::from_millis(gone_ms))
    };
    let shared = shared.clone();
    let session = session.clone();
    tokio::spawn(async move {
        tokio::time::sleep(left).await;
        let reconnected = session.is_online()
            || shared
                .registry
                .current_key(&session.client_id)
                .is_some_and(|k| k != session.key);
        if !reconnected {
            publish_will(&shared, &session, msg);
        }
    });
}

fn publish_will(shared: &Shared, session: &crate::session::Session, msg: Message) {
    session.lock().stored_will = None;
    session.save();
    shared.router.publish(msg, &mut Vec::new());
}

//! What the admin APIs show about clients and subscriptions, taken from the
//! registry in one pass. Every API style (NanoMQ, EMQX, HiveMQ) maps these
//! to its own field names, so the three can never disagree.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::server::Shared;
use crate::session::Session;

/// One client (a session, online or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    pub client_id: String,
    pub username: Option<String>,
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    pub keepalive: u16,
    pub connected: bool,
    pub peer: Option<String>,
    pub clean_start: bool,
    /// Seconds since the Unix epoch.
    pub connected_at: Option<u64>,
    pub session_expiry: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
}

/// One subscription of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionView {
    pub client_id: String,
    /// As the client sent it, `$share/<group>/` included.
    pub topic: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// The client id as the client sent it (with `client_ids = "per_token"`
/// the registry key is `<token>\0<id>`).
pub fn client_id(s: &Session) -> String {
    s.client_id
        .rsplit('\0')
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub fn client(s: &Session) -> ClientView {
    let info = s.info();
    let st = s.lock();
    ClientView {
        client_id: client_id(s),
        username: info.username,
        protocol: info.protocol,
        keepalive: info.keepalive,
        connected: st.link.is_some(),
        peer: info.peer.map(|p| p.to_string()),
        clean_start: info.clean_start,
        connected_at: info
            .connected_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        session_expiry: st.expiry.as_secs(),
        messages_received: s
            .messages_received
            .load(std::sync::atomic::Ordering::Relaxed),
        messages_sent: s.messages_sent.load(std::sync::atomic::Ordering::Relaxed),
        subscriptions: st.subscriptions.len(),
        queued: st.queue.len(),
        inflight: st.inflight.len(),
    }
}

pub fn subscriptions(s: &Session) -> Vec<SubscriptionView> {
    let st = s.lock();
    let mut v: Vec<SubscriptionView> = st
        .subscriptions
        .iter()
        .map(|(topic, o)| SubscriptionView {
            client_id: client_id(s),
            topic: topic.to_string(),
            qos: o.qos as u8,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
        })
        .collect();
    v.sort_by(|a, b| a.topic.cmp(&b.topic));
    v
}

/// Every session in the registry, sorted by client id (stable paging).
pub fn sessions(shared: &Shared) -> Vec<Arc<Session>> {
    let mut all = shared.registry.all();
    all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    all
}

/// The session of the client that calls itself `id` (as the client sent
/// it): the registry key directly, or, with per-token client ids, the one
/// session whose shown id matches.
pub fn find(shared: &Shared, id: &str) -> Option<Arc<Session>> {
    shared.registry.get(id).or_else(|| {
        shared
            .registry
            .all()
            .into_iter()
            .find(|s| s.client_id.contains('\0') && client_id(s) == id)
    })
}

/// The connection attached to a session, if it is online.
pub fn link(s: &Session) -> Option<Arc<crate::session::ConnLink>> {
    s.lock().link.clone()
}

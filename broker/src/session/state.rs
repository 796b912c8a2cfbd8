//! Per-session state that outlives a connection: the outbound queue, the
//! outgoing inflight window, QoS 2 receive state and the subscription list.
//!
//! Publishers push into a subscriber's queue under its own mutex (no global
//! lock on the delivery path) and wake the one connection task attached to
//! the session through its [`ConnLink`].

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use starling_codec::{ByteString, QoS};
use starling_model::acl::Principal;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lazy_map::LazyMap;
use crate::metrics::{DropReason, Metrics};
use crate::router::{Delivery, SubOptions};
use crate::store::{
    Op, QueueEntry, Routing, SessionRecord, StateStore, StoredRef, StoredSub, StoredWill, Ticket,
};

/// The wake-up line between publishers (and the registry) and the one
/// connection task currently serving a session — or, while the connection
/// is parked (no task: see `super::park`), the parker's queue.
#[derive(Debug, Default)]
pub struct ConnLink {
    pub wake: Notify,
    /// Non-zero: the connection must close, sending this v5 reason code
    /// (0x8E session taken over, 0x8B server shutting down, 0x87 not authorized…).
    kicked: AtomicU8,
    /// Set when the auth bundle changed or a token expired: the connection
    /// must re-check its token and subscriptions.
    recheck: AtomicBool,
    /// The parker's key of the connection while it is parked, 0 while it
    /// is not: wakes go to `parker` too. Read before anything else so that
    /// a delivery to a running connection pays a load, not a
    /// read-modify-write.
    parked: AtomicU64,
    /// The parker's queue, for a link whose connection may be parked. A
    /// queue rather than a waker: a waker per parked connection would be
    /// one more allocation each.
    parker: Option<Arc<super::park::Ready>>,
}

impl ConnLink {
    /// A link for a connection the parker may hold (`parker`: its queue;
    /// `None` when there is no parker).
    pub fn parkable(parker: Option<Arc<super::park::Ready>>) -> ConnLink {
        ConnLink {
            parker,
            ..ConnLink::default()
        }
    }

    /// Whether [`ConnLink::park`] may be used.
    pub fn parks(&self) -> bool {
        self.parker.is_some()
    }

    /// Wakes the connection: its task, or the parker holding it.
    pub fn notify(&self) {
        self.wake.notify_one();
        // SeqCst pairs with `park`: either this load sees the key, or the
        // parker's check of `wake` after setting it sees this permit.
        let key = self.parked.load(Ordering::SeqCst);
        if key != 0
            && let Some(parker) = &self.parker
        {
            parker.push(key);
        }
    }

    /// Routes wakes to the parker's queue as `key` (non-zero) until
    /// [`ConnLink::unpark`]; only for a link that [`parks`](Self::parks).
    /// Returns whether a wake was already pending (then it is consumed:
    /// the caller resumes the connection, which must be told again).
    pub fn park(&self, key: u64) -> bool {
        debug_assert!(key != 0 && self.parks());
        self.parked.store(key, Ordering::SeqCst);
        let pending = std::pin::pin!(self.wake.notified());
        pending
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    }

    pub fn unpark(&self) {
        self.parked.store(0, Ordering::SeqCst);
    }

    pub fn kick(&self, reason: u8) {
        self.kicked.store(reason.max(1), Ordering::Release);
        self.notify();
    }

    pub fn request_recheck(&self) {
        self.recheck.store(true, Ordering::Release);
        self.notify();
    }

    pub fn take_recheck(&self) -> bool {
        self.recheck.swap(false, Ordering::AcqRel)
    }

    pub fn kicked(&self) -> Option<u8> {
        match self.kicked.load(Ordering::Acquire) {
            0 => None,
            r => Some(r),
        }
    }
}

/// Caps on what one session may hold.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// An outgoing QoS 1/2 message the client has not finished acknowledging.
#[derive(Debug, Clone)]
pub struct Inflight {
    pub pkid: u16,
    pub delivery: Delivery,
    /// QoS 2 only: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    pub released: bool,
}

#[derive(Debug)]
pub struct SessionState {
    pub queue: VecDeque<Delivery>,
    pub queued_bytes: usize,
    pub inflight: VecDeque<Inflight>,
    next_pkid: u16,
    /// QoS 2 packet ids received (PUBREC sent) and not yet released: a
    /// re-sent PUBLISH with one of these ids is a duplicate and not routed again.
    pub incoming_qos2: LazyMap<u16, ()>,
    /// Raw filter as the client sent it (with any `$share/g/` prefix) → options.
    /// Lazy: many devices only publish.
    pub subscriptions: LazyMap<ByteString, SubOptions>,
    pub link: Option<Arc<ConnLink>>,
    /// Session expiry interval; zero means the session ends with its connection.
    pub expiry: Duration,
    pub disconnected_at: Option<Instant>,
    pub limits: QueueLimits,
    /// Next sequence number of the stored queue (persistent sessions).
    pub next_seq: u64,
    /// The will as stored with the session record (persistent sessions):
    /// the connected client's, or a delayed one still pending.
    pub stored_will: Option<Box<StoredWill>>,
}

/// What became of a delivery handed to [`Session::enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// Queued; the queue is filling up (half its cap or more): the publisher
    /// should give the subscriber's task a turn before routing more.
    Busy,
    /// Queued, but the session is over its cap: the publisher should pause
    /// until [`Session::wait_for_room`] sees room (backpressure for QoS 1/2).
    Congested,
    Dropped,
}

/// A client session, keyed by client id in the registry.
#[derive(Debug)]
pub struct Session {
    /// Unique per session instance (a clean start makes a new one), used as
    /// the subscriber key in the topic index and for no-local.
    pub key: u64,
    pub client_id: Arc<str>,
    /// Mirrors `state.link.is_some()` so shared-subscription selection can
    /// prefer online members without taking each member's lock.
    online: AtomicBool,
    /// Set when a QoS 1/2 delivery went over the queue cap; cleared (and
    /// `space` signalled) once the connection has drained below it.
    congested: AtomicBool,
    /// Publishers paused by backpressure wait here. Made by the first one
    /// that waits: most sessions never see backpressure, and every session
    /// would otherwise carry 32 bytes.
    space: OnceLock<Box<Notify>>,
    /// The token that made the session (`None`: anonymous). With tokens, a
    /// client id belongs to its owner: another token may not take it over.
    pub owner: Option<Arc<str>>,
    /// Counted against `max_persistent_sessions` (registry bookkeeping).
    pub counted_persistent: AtomicBool,
    state: Mutex<SessionState>,
    /// The rules filtered subscriptions check each message against, with
    /// the verdict per topic. Its own lock: only filtered deliveries take it.
    reader: Mutex<Reader>,
    /// Who the latest client is, for the admin API. Written at CONNECT only.
    info: Mutex<ClientInfo>,
    /// PUBLISH packets received from / sent to this session's clients.
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Set for persistent sessions when the broker persists state: every
    /// change that must survive a restart is written there.
    store: OnceLock<Arc<dyn StateStore>>,
}

/// What the admin API shows about a session's client.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub username: Option<String>,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    pub protocol: u8,
    pub keepalive: u16,
    pub peer: Option<std::net::SocketAddr>,
    pub clean_start: bool,
    /// When the client connected (or, offline, last connected).
    pub connected_at: Option<std::time::SystemTime>,
}

/// The reading rights of the session's (latest) client.
#[derive(Debug, Default)]
struct Reader {
    principal: Option<Arc<Principal>>,
    cache: LazyMap<ByteString, bool>,
}

/// Topics whose read verdict a session remembers; past it the cache starts over.
const READ_CACHE: usize = 1024;

impl Session {
    pub fn new(key: u64, client_id: Arc<str>, limits: QueueLimits) -> Self {
        Self::owned(key, client_id, limits, None)
    }

    pub fn owned(
        key: u64,
        client_id: Arc<str>,
        limits: QueueLimits,
        owner: Option<Arc<str>>,
    ) -> Self {
        Session {
            key,
            client_id,
            online: AtomicBool::new(false),
            congested: AtomicBool::new(false),
            space: OnceLock::new(),
            owner,
            counted_persistent: AtomicBool::new(false),
            reader: Mutex::new(Reader::default()),
            info: Mutex::new(ClientInfo::default()),
            messages_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            store: OnceLock::new(),
            state: Mutex::new(SessionState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                inflight: VecDeque::new(),
                next_pkid: 0,
                incoming_qos2: LazyMap::default(),
                subscriptions: LazyMap::default(),
                link: None,
                expiry: Duration::ZERO,
                disconnected_at: None,
                limits,
                next_seq: 0,
                stored_will: None,
            }),
        }
    }

    /// Makes this session persistent in `store` (no-op for memory-only).
    pub fn persist_in(&self, store: &Arc<dyn StateStore>) {
        if store.persists() {
            let _ = self.store.set(store.clone());
        }
    }

    /// The store, if this session is persisted.
    pub fn store(&self) -> Option<&Arc<dyn StateStore>> {
        self.store.get()
    }

    /// Writes the session record (subscriptions, expiry, will, connected
    /// or not) if this session is persisted.
    pub fn save(&self) -> Ticket {
        let Some(store) = self.store() else { return 0 };
        let st = self.lock();
        let record = self.record_of(&st);
        store.submit(Op::Session {
            id: self.client_id.clone(),
            record: Arc::new(record),
        })
    }

    fn record_of(&self, st: &SessionState) -> SessionRecord {
        let now = crate::store::records::now_ms();
        SessionRecord {
            owner: self.owner.as_deref().map(str::to_owned),
            expiry_secs: st.expiry.as_secs(),
            disconnected_at_ms: st.disconnected_at.map(|at| {
                let ago = Instant::now().saturating_duration_since(at);
                now.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))
            }),
            will: st.stored_will.as_deref().cloned(),
        }
    }

    /// A subscription was added or changed (persisted sessions).
    pub fn store_subscription(&self, filter: &str, opts: &SubOptions) -> Ticket {
        match self.store() {
            Some(store) => store.submit(Op::Subscribe {
                session: self.client_id.clone(),
                sub: StoredSub::new(filter, opts),
            }),
            None => 0,
        }
    }

    /// A subscription was removed (persisted sessions).
    pub fn unstore_subscription(&self, filter: &str) -> Ticket {
        match self.store() {
            Some(store) => store.submit(Op::Unsubscribe {
                session: self.client_id.clone(),
                filter: filter.to_owned(),
            }),
            None => 0,
        }
    }

    /// The session is over: its record and stored queue go.
    pub fn forget_stored(&self) -> Ticket {
        match self.store() {
            Some(store) => store.submit(Op::EndSession {
                id: self.client_id.clone(),
            }),
            None => 0,
        }
    }

    /// A stored delivery is finished (acknowledged, expired or dropped).
    pub fn dequeue_stored(&self, d: &Delivery) {
        if let (Some(store), Some(r)) = (self.store(), d.stored) {
            store.submit(Op::Dequeue {
                session: self.client_id.clone(),
                seq: r.seq,
                payload: r.payload,
            });
        }
    }

    /// A stored QoS 2 delivery went out with `pkid` (or was released):
    /// written so that a restart resends it with the same id.
    pub fn delivery_stored(&self, d: &Delivery, pkid: u16, released: bool) -> Ticket {
        match (self.store(), d.stored) {
            (Some(store), Some(r)) => store.submit(Op::Delivery {
                session: self.client_id.clone(),
                seq: r.seq,
                entry: QueueEntry {
                    payload: r.payload,
                    qos: d.qos,
                    retain: d.retain,
                    sub_ids: d.sub_ids.clone(),
                    pkid,
                    released,
                },
            }),
            _ => 0,
        }
    }

    /// An incoming QoS 2 packet id was PUBRECed or released.
    pub fn qos2_stored(&self, pkid: u16, present: bool) -> Ticket {
        match self.store() {
            Some(store) => store.submit(Op::Qos2In {
                session: self.client_id.clone(),
                pkid,
                present,
            }),
            None => 0,
        }
    }

    /// Locks the state. A panic while holding the lock cannot leave the
    /// state half-updated in a way that matters more than losing the
    /// session, so a poisoned lock is simply taken over.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the rules filtered subscriptions are checked against: the
    /// principal of the client now attached, or refreshed after a bundle
    /// change. Forgets the verdicts made under the old rules.
    pub fn set_reader(&self, p: Arc<Principal>) {
        let mut r = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        r.principal = Some(p);
        r.cache.clear();
    }

    /// May this session's client read `topic`? For deliveries through
    /// filtered subscriptions only. With no principal set, nothing passes.
    pub fn may_read(&self, topic: &ByteString) -> bool {
        let mut r = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&v) = r.cache.get(topic) {
            return v;
        }
        let Some(p) = &r.principal else {
            return false;
        };
        let v = p.may_receive(topic);
        if r.cache.len() >= READ_CACHE {
            r.cache.clear();
        }
        // Its own copy: a slice would pin the publisher's read buffer.
        r.cache.insert(ByteString::from(&**topic), v);
        v
    }

    pub fn set_info(&self, info: ClientInfo) {
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
    }

    pub fn info(&self) -> ClientInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Attaches a connection, kicking the previous one (session takeover).
    pub fn attach(&self, link: Arc<ConnLink>, expiry: Duration) {
        let mut st = self.lock();
        if let Some(old) = st.link.replace(link) {
            old.kick(starling_codec::reason::SESSION_TAKEN_OVER);
        }
        st.expiry = expiry;
        st.disconnected_at = None;
        self.online.store(true, Ordering::Relaxed);
    }

    /// Detaches `link` if it is still the attached one. Returns false when
    /// another connection has taken the session over meanwhile.
    pub fn detach(&self, link: &Arc<ConnLink>, expiry: Duration) -> bool {
        let mut st = self.lock();
        match &st.link {
            Some(cur) if Arc::ptr_eq(cur, link) => {
                st.link = None;
                st.expiry = expiry;
                st.disconnected_at = Some(Instant::now());
                // QoS 0 messages are not kept for offline sessions.
                st.queue.retain(|d| d.qos != QoS::AtMostOnce);
                st.queued_bytes = st.queue.iter().map(Delivery::cost).sum();
                self.online.store(false, Ordering::Relaxed);
                drop(st);
                // Nobody drains an offline session: publishers must not wait on it.
                self.release_publishers();
                true
            }
            _ => false,
        }
    }

    /// Queues a delivery for this session. Offline sessions keep only QoS 1/2;
    /// a full queue drops the new message (counted), like mosquitto's
    /// `max_queued_messages`, so a slow or absent subscriber never grows
    /// broker memory without bound.
    ///
    /// QoS 1/2 messages for a connected client may use a second allowance
    /// above the cap, and report [`Queued::Congested`] so the publisher
    /// pauses: a burst from fast publishers is slowed down instead of lost,
    /// and memory stays bounded by twice the cap.
    pub fn enqueue(&self, d: Delivery, metrics: &Metrics, routing: &mut Routing) -> Queued {
        self.enqueue_with(d, metrics, true, routing)
    }

    /// Like [`Session::enqueue`] without the second allowance: for work the
    /// broker makes on its own (retained messages on subscribe), which must
    /// stop at the cap rather than pause anyone.
    pub fn enqueue_within_cap(
        &self,
        d: Delivery,
        metrics: &Metrics,
        routing: &mut Routing,
    ) -> Queued {
        self.enqueue_with(d, metrics, false, routing)
    }

    fn enqueue_with(
        &self,
        mut d: Delivery,
        metrics: &Metrics,
        may_exceed: bool,
        routing: &mut Routing,
    ) -> Queued {
        let mut st = self.lock();
        let qos = d.qos as usize;
        let online = st.link.is_some();
        if !online && d.qos == QoS::AtMostOnce {
            metrics.dropped(qos, DropReason::Offline);
            return Queued::Dropped;
        }
        let reliable = online && d.qos != QoS::AtMostOnce;
        let allowance = if reliable && may_exceed { 2 } else { 1 };
        let cost = d.cost();
        if st.queue.len() >= st.limits.max_messages * allowance
            || st.queued_bytes + cost > st.limits.max_bytes * allowance
        {
            metrics.dropped(qos, DropReason::QueueFull);
            return Queued::Dropped;
        }
        if d.qos != QoS::AtMostOnce
            && let Some(store) = self.store()
        {
            // Under the session lock, so the op is submitted before the
            // connection can drain, acknowledge and dequeue it.
            let first = routing.payload.is_none();
            let payload = *routing.payload.get_or_insert_with(|| store.payload_id());
            let seq = st.next_seq;
            st.next_seq += 1;
            d.stored = Some(StoredRef { seq, payload });
            let t = store.submit(Op::Enqueue {
                session: self.client_id.clone(),
                seq,
                entry: QueueEntry {
                    payload,
                    qos: d.qos,
                    retain: d.retain,
                    sub_ids: d.sub_ids.clone(),
                    pkid: 0,
                    released: false,
                },
                msg: first.then(|| d.msg.clone()),
            });
            routing.span.note(t);
        }
        st.queued_bytes += cost;
        st.queue.push_back(d);
        if let Some(link) = &st.link {
            link.notify();
        }
        if reliable && st.over_cap() {
            self.congested.store(true, Ordering::Release);
            Queued::Congested
        } else if online && st.queue.len() * 2 >= st.limits.max_messages {
            Queued::Busy
        } else {
            Queued::Yes
        }
    }

    /// Still over the cap (and connected)? Checked by a paused publisher
    /// after registering its wait, so a wake-up cannot slip between.
    pub fn is_congested(&self) -> bool {
        let st = self.lock();
        st.link.is_some() && st.over_cap()
    }

    /// Waits until this (congested) session has room again (true) or
    /// `deadline` passes (false): how a QoS 1/2 publisher of any protocol
    /// pauses for a subscriber over its queue cap.
    pub async fn wait_for_room(&self, deadline: Instant) -> bool {
        let notified = self.space.get_or_init(Box::default).notified();
        tokio::pin!(notified);
        // Registered before the check, so a drain in between is not missed.
        notified.as_mut().enable();
        if !self.is_congested() {
            return true;
        }
        tokio::time::timeout_at(deadline, notified).await.is_ok()
    }

    /// Called by the connection after it drained the queue.
    pub fn after_drain(&self, st: &SessionState) {
        if !st.over_cap() && self.congested.load(Ordering::Acquire) {
            self.release_publishers();
        }
    }

    fn release_publishers(&self) {
        self.congested.store(false, Ordering::Release);
        if let Some(space) = self.space.get() {
            space.notify_waiters();
        }
    }
}

impl SessionState {
    /// Is `link` the connection attached to this session? Only that one may
    /// drain the queue or change subscriptions: a connection that was taken
    /// over is still running until it notices its kick.
    pub fn owned_by(&self, link: &Arc<ConnLink>) -> bool {
        self.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link))
    }

    fn over_cap(&self) -> bool {
        self.queue.len() >= self.limits.max_messages || self.queued_bytes > self.limits.max_bytes
    }

    /// Next free outgoing packet id (1..=65535, skipping ids in flight).
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                self.next_pkid = 1;
            }
            let id = self.next_pkid;
            if !self.inflight.iter().any(|i| i.pkid == id) {
                return id;
            }
        }
    }

    pub fn pop_queued(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(d.cost());
        Some(d)
    }

    pub fn take_inflight(&mut self, pkid: u16) -> Option<Inflight> {
        let pos = self.inflight.iter().position(|i| i.pkid == pkid)?;
        self.inflight.remove(pos)
    }
}

//! One client connection: CONNECT, then a loop that reads packets, acts on
//! them and writes everything owed to the client in one batch per wake-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use starling_codec::{
    self as codec, ByteString, Connect, DecodeError, Disconnect, LastWill, Packet, Properties,
    ProtocolVersion, reason,
};
use tokio::time::{Instant, sleep_until, timeout};

use super::handshake::{self, Terms};
use super::lazy_map::LazyMap;
use super::park::PARK_AFTER;
use super::registry::{OpenError, OpenRequest};
use super::state::{ConnLink, QueueLimits, Session};
use crate::listen::slots::Slot;
use crate::listen::transport::Transport;
use crate::logging::{Shown, shown};
use crate::metrics::{self, Limit};
use crate::router::{Delivery, SubEntry};
use crate::server::Shared;
use crate::store::{StoredWill, TicketSpan, records};
use starling_model::acl::Principal;
use starling_model::config::ClientIds;

/// Stop filling the write buffer past this; it is flushed and the drain resumes.
pub(super) const WRITE_BATCH: usize = 64 * 1024;
/// Largest write buffer a parkable connection keeps between batches.
const KEPT_WRITE_BUFFER: usize = 4096;
/// A client that takes longer than this to accept one batch is stalled.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Longest wait for the last bytes (acks, DISCONNECT) when closing.
const CLOSE_WRITE_DEADLINE: Duration = Duration::from_secs(2);
/// Packets one connection handles before it lets the other tasks on its
/// worker thread run: bounds how long a flood can starve its neighbours
/// whatever each packet costs.
const FAIR_SHARE: u32 = 1024;
/// Longest pause of a publisher for one congested subscriber. A subscriber
/// that frees no room in this time is treated as stalled and ...
pub(crate) const BACKPRESSURE_WAIT: Duration = Duration::from_secs(1);
/// ... not waited for again for this long (its excess is dropped instead).
const BACKPRESSURE_SKIP: Duration = Duration::from_secs(5);
/// Store ops waiting to be written past which a publisher waits for its
/// own before reading more: retained QoS 0 publishes wait for no
/// acknowledgement, and must not outrun the disk without bound.
const STORE_BACKLOG: usize = 64 * 1024;

/// Why a connection ended; decides the will message and the v5 DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// DISCONNECT from the client; `will` is true for v5 reason 0x04.
    ClientDisconnect { will: bool },
    /// Socket closed or failed without DISCONNECT.
    Lost,
    /// The broker closes the connection with this v5 reason code.
    Server(u8),
}

/// Serves one accepted connection until it ends, as one `mqtt connection`
/// span when spans are exported (created, recorded into and closed here;
/// never entered, so the packet loop pays nothing for it). `slot` is the
/// socket's admission, held as long as the socket is.
pub async fn serve<T: Transport>(
    shared: Arc<Shared>,
    mut t: T,
    peer: SocketAddr,
    listener: metrics::Listener,
    slot: Option<Slot>,
) {
    let span = if crate::otel::connection_spans() {
        tracing::info_span!(
            "mqtt connection",
            otel.kind = "server",
            listener = listener.label(),
            peer = %peer,
            client_id = tracing::field::Empty,
            protocol = tracing::field::Empty,
            reason = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let mut open = shared.metrics.open_connection(listener);
    let mut rbuf = BytesMut::new();
    match connect(&shared, &mut t, &mut rbuf, peer, &span).await {
        Ok(conn) => {
            open.connected(conn.version);
            let live = Box::new(Live {
                conn,
                t,
                rbuf,
                // Boxed: without an exporter there is no span, and a parked
                // connection should not carry an empty one.
                span: (!span.is_none()).then(|| Box::new(span)),
                _open: open,
                _slot: slot,
            });
            drive(live).await;
        }
        Err(why) => {
            span.record("reason", why.as_ref());
            // Closed before the connection stops counting: shutdown waits
            // for the count to reach zero and then flushes the spans.
            drop(span);
            drop(open);
        }
    }
}

/// A connected client between wake-ups: everything its task needs, and
/// what the parker holds while it has no task. Fields drop in order: the
/// span closes before the connection stops counting (shutdown waits for
/// the count to reach zero and then flushes the spans).
pub(super) struct Live<T> {
    pub(super) conn: Connection,
    pub(super) t: T,
    pub(super) rbuf: BytesMut,
    pub(super) span: Option<Box<tracing::Span>>,
    pub(super) _open: metrics::OpenConnection,
    pub(super) _slot: Option<Slot>,
}

/// The keep-alive interval the broker holds a client to that asked for
/// `seconds` (1.5 × that, MQTT-3.1.2-24); zero for none.
pub(super) fn keepalive(seconds: u16) -> Duration {
    Duration::from_millis(u64::from(seconds) * 1500)
}

/// Runs a connected client's packet loop until the connection ends, or
/// until it has been quiet long enough to be parked (then this task ends
/// and the parker starts a new one when the client needs it again).
pub(super) async fn drive<T: Transport>(mut live: Box<Live<T>>) {
    loop {
        let Live { conn, t, rbuf, .. } = &mut *live;
        match conn.run(t, rbuf).await {
            Some(end) => {
                Box::pin(conn.finish(t, end)).await;
                if let Some(span) = &live.span {
                    span.record("reason", end.describe().as_ref());
                }
                return;
            }
            None => match offer_to_parker(live) {
                None => return,
                Some(back) => live = back,
            },
        }
    }
}

/// Parks `live` if its transport can be parked (plain TCP) and the parker
/// takes it; hands it back otherwise.
fn offer_to_parker<T: Transport>(live: Box<Live<T>>) -> Option<Box<Live<T>>> {
    let mut cell = Some(live);
    if let Some(tcp) = (&mut cell as &mut dyn std::any::Any)
        .downcast_mut::<Option<Box<Live<crate::listen::transport::TcpTransport>>>>()
        && let Some(l) = tcp.take()
    {
        let shared = l.conn.shared.clone();
        *tcp = shared.parker.park(l);
    }
    cell
}

/// Reads the CONNECT, decides on it and sends the CONNACK: the connected
/// client, or why there is none (the span's `reason`).
async fn connect<T: Transport>(
    shared: &Arc<Shared>,
    t: &mut T,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    span: &tracing::Span,
) -> Result<Connection, std::borrow::Cow<'static, str>> {
    let m = &shared.metrics;
    // The client is unknown until CONNECT is decoded: keep what it may make
    // the broker buffer small.
    let (max_connect, connect_timeout) = {
        let l = shared.limits();
        (
            l.max_connect_packet_size.min(l.max_packet_size) as usize,
            l.connect_timeout,
        )
    };
    // The connect and start phases are boxed: a task's future is as large
    // as its largest state, and every connection's task pays for it.
    let connect = Box::pin(timeout(
        Duration::from_secs(connect_timeout),
        read_connect(t, rbuf, max_connect),
    ))
    .await;
    match connect {
        Ok(Ok(boxed)) => {
            span.record(
                "protocol",
                metrics::PROTOCOLS[metrics::protocol_index(boxed.protocol)],
            );
            span.record("client_id", crate::logging::cut(&boxed.client_id));
            // The CONNECT is unboxed inside the boxed start: as a local of
            // the task's future it would take its size in every task.
            let tr = &mut *t;
            let start = async move {
                let c = *boxed;
                Connection::start(shared, tr, c, peer).await
            };
            match Box::pin(start).await {
                Some(conn) => {
                    // An assigned id replaces the empty one the client sent.
                    span.record("client_id", crate::logging::cut(conn.client_id()));
                    Ok(conn)
                }
                None => {
                    metrics::inc(&m.connections_refused);
                    // Linger so the client reads its CONNACK refusal.
                    t.close(true).await;
                    Err("CONNECT refused".into())
                }
            }
        }
        Ok(Err(ConnectError::Decode(DecodeError::UnsupportedProtocol))) => {
            // MQTT-3.1.2-2: answer an unknown level with return code 0x01.
            metrics::inc(&m.protocol_errors);
            metrics::inc(&m.connections_refused);
            let _ = t
                .write_all(&[0x20, 0x02, 0x00, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION])
                .await;
            t.close(true).await;
            Err("unsupported protocol version".into())
        }
        Ok(Err(ConnectError::Decode(DecodeError::PacketTooLarge { size, max }))) => {
            metrics::inc(&m.connections_refused);
            shared.metrics.limit_hit(crate::metrics::Limit::ConnectSize);
            tracing::debug!(%peer, size, max, "CONNECT over max_connect_packet_size; closing");
            // No lingering: that would read the oversized body after all.
            t.close(false).await;
            Err("CONNECT over max_connect_packet_size".into())
        }
        Ok(Err(e)) => {
            metrics::inc(&m.connections_refused);
            if !matches!(e, ConnectError::Closed) {
                metrics::inc(&m.protocol_errors);
                tracing::debug!(%peer, error = %e, "refused connection before CONNECT");
            }
            t.close(true).await;
            Err(e.to_string().into())
        }
        Err(_) => {
            metrics::inc(&m.connections_refused);
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
            t.close(true).await;
            Err("no CONNECT within the connect timeout".into())
        }
    }
}

impl End {
    /// The span's `reason`.
    fn describe(self) -> std::borrow::Cow<'static, str> {
        match self {
            End::ClientDisconnect { will: false } => "client disconnected".into(),
            End::ClientDisconnect { will: true } => "client disconnected with will".into(),
            End::Lost => "connection lost".into(),
            End::Server(code) => format!("closed by the broker (reason code 0x{code:02X})").into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connection closed before CONNECT")]
    Closed,
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error(transparent)]
    Decode(DecodeError),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

async fn read_connect<T: Transport>(
    t: &mut T,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Box<Connect>, ConnectError> {
    loop {
        match codec::decode(rbuf, ProtocolVersion::V311, max_packet) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(ConnectError::NotConnect),
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Decode(e)),
        }
        if t.read_into(rbuf).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}

pub(super) struct Connection {
    pub(super) shared: Arc<Shared>,
    pub(super) session: Arc<Session>,
    pub(super) link: Arc<ConnLink>,
    pub(super) version: ProtocolVersion,
    pub(super) agreed: Terms,
    /// Boxed: most connections have none, and it is large.
    pub(super) will: Option<Box<LastWill>>,
    /// The token this connection authenticated with (or anonymous).
    pub(super) principal: Arc<Principal>,
    /// Publish decisions per topic for the principal above; cleared when
    /// the principal is refreshed after a bundle change.
    pub(super) acl_cache: LazyMap<ByteString, bool>,
    pub(super) peer: SocketAddr,
    pub(super) last_rx: Instant,
    /// Inbound topic aliases (client → broker).
    pub(super) aliases_in: LazyMap<u16, ByteString>,
    /// Outbound topic aliases (broker → client).
    pub(super) aliases_out: LazyMap<ByteString, u16>,
    /// The limits in force when the client connected.
    pub(super) limits: Arc<starling_model::config::Limits>,
    /// Park as soon as there is nothing to do, without waiting for
    /// [`PARK_AFTER`] of quiet: just connected, or resumed after a long
    /// park (a client that speaks every few seconds would otherwise keep a
    /// task and a timer for most of its life).
    pub(super) park_when_idle: bool,
    /// What only the running task uses; a parked connection has none of it.
    pub(super) work: Work,
}

/// The part of a connection that exists only while a task runs it, made
/// empty again when a parked connection is resumed (see `dormant`).
#[derive(Default)]
pub(super) struct Work {
    pub(super) wbuf: BytesMut,
    /// Reused for routing and draining so the hot path does not allocate.
    pub(super) scratch: Vec<SubEntry>,
    pub(super) batch: Vec<(u16, Delivery)>,
    /// A subscriber over its queue cap that this publisher waits for (and
    /// until when) before reading more: QoS 1/2 backpressure.
    pub(super) blocked: Option<(Arc<Session>, Instant)>,
    /// A subscriber that did not make room in time, not waited for until
    /// then. Forgotten when parked: that costs at most one more wait of a
    /// publisher quiet for a second.
    pub(super) skip: Option<(u64, Instant)>,
    /// A subscriber this connection feeds is filling up: stop decoding and
    /// let other tasks run before going on.
    pub(super) yield_soon: bool,
    /// Packets handled since this task last gave the worker thread up.
    pub(super) handled: u32,
    /// Store tickets the write buffer's acknowledgements depend on: it is
    /// written only once they are durable.
    pub(super) gate: TicketSpan,
    /// Batches written: the quiet check's sign of outgoing traffic.
    pub(super) flushes: u32,
    /// Set by CONNECT only: a new connection may park as soon as its
    /// CONNACK is out, where a resumed one first handles what woke it.
    pub(super) just_connected: bool,
}

impl Connection {
    /// Decides on CONNECT, opens the session and sends CONNACK.
    async fn start<T: Transport>(
        shared: &Arc<Shared>,
        t: &mut T,
        c: Connect,
        peer: SocketAddr,
    ) -> Option<Connection> {
        let v = c.protocol;
        // Agreed with this client now: kept for the whole connection.
        let limits = shared.limits();
        let refuse = |code: u8| {
            Packet::ConnAck(codec::ConnAck {
                session_present: false,
                code,
                properties: Properties::default(),
            })
        };
        let mut out = BytesMut::new();
        if c.properties.authentication_method.is_some() {
            // Enhanced authentication (AUTH exchanges) is not offered.
            let _ = codec::encode(&refuse(reason::BAD_AUTHENTICATION_METHOD), v, &mut out);
            let _ = t.write_all(&out).await;
            return None;
        }
        let principal = match shared.auth.authenticate(
            c.username.as_deref(),
            c.password.as_deref(),
            peer.ip(),
            &shared.metrics,
        ) {
            Ok(p) => p,
            Err(e) => {
                // The reason is logged, never the secret; client values are
                // cut and escaped, and the line is rate-limited.
                if let Some(suppressed) = shared.refusal_log.take(std::time::Instant::now()) {
                    tracing::info!(%peer, client_id = %Shown(&c.client_id), username = %shown(c.username.as_deref()), reason = %e, suppressed, "authentication failed");
                }
                let code = handshake::refusal_code(v, &e);
                let _ = codec::encode(&refuse(code), v, &mut out);
                let _ = t.write_all(&out).await;
                return None;
            }
        };
        let agreed = match handshake::negotiate(&c, &limits, || shared.assign_client_id()) {
            Ok(a) => a,
            Err(handshake::Refused(code)) => {
                let code = if v.is_v5() {
                    reason::CLIENT_IDENTIFIER_NOT_VALID
                } else {
                    code
                };
                let _ = codec::encode(&refuse(code), v, &mut out);
                let _ = t.write_all(&out).await;
                return None;
            }
        };
        if let Some(w) = &c.will
            && shared.check_topic(&w.topic, &limits).is_err()
        {
            let code = if v.is_v5() {
                reason::TOPIC_NAME_INVALID
            } else {
                reason::v3::NOT_AUTHORIZED
            };
            let _ = codec::encode(&refuse(code), v, &mut out);
            let _ = t.write_all(&out).await;
            return None;
        }
        let link = Arc::new(ConnLink::parkable(shared.parker.ready()));
        let owner: Option<Arc<str>> = principal.name().map(Arc::from);
        let key = match (&owner, shared.config.auth.client_ids) {
            // NUL cannot occur in an MQTT string, so keys cannot collide.
            (Some(token), ClientIds::PerToken) => format!("{token}\0{}", agreed.client_id),
            _ => agreed.client_id.clone(),
        };
        let opened = shared.registry.open(OpenRequest {
            key: &key,
            owner,
            clean_start: c.clean_start,
            expiry: agreed.session_expiry,
            link: link.clone(),
            limits: QueueLimits {
                max_messages: limits.max_queued_messages,
                max_bytes: limits.max_queued_bytes,
            },
            max_persistent: limits.max_persistent_sessions,
        });
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                let (limit, code) = match e {
                    OpenError::NotOwner => (
                        Limit::ClientIdOwner,
                        if v.is_v5() {
                            reason::CLIENT_IDENTIFIER_NOT_VALID
                        } else {
                            reason::v3::IDENTIFIER_REJECTED
                        },
                    ),
                    OpenError::PersistentFull => (
                        Limit::PersistentSessions,
                        if v.is_v5() {
                            reason::QUOTA_EXCEEDED
                        } else {
                            reason::v3::SERVER_UNAVAILABLE
                        },
                    ),
                };
                shared.metrics.limit_hit(limit);
                if let Some(suppressed) = shared.refusal_log.take(std::time::Instant::now()) {
                    tracing::info!(%peer, client_id = %Shown(&agreed.client_id), token = ?principal.name(), reason = %e, suppressed, "connection refused");
                }
                let _ = codec::encode(&refuse(code), v, &mut out);
                let _ = t.write_all(&out).await;
                return None;
            }
        };
        let mut gate = TicketSpan::default();
        if let Some(old) = &opened.replaced {
            shared.router.drop_session(old);
            gate.note(old.forget_stored());
        }
        if !agreed.session_expiry.is_zero() {
            opened.session.persist_in(&shared.router.store);
        }
        let ack = handshake::connack(v, &agreed, opened.present, &limits);
        let mut conn = Connection {
            shared: shared.clone(),
            session: opened.session,
            link,
            version: v,
            agreed: Terms::from(&agreed),
            will: c.will.map(|mut w| {
                // Kept for the whole connection: not a slice of the CONNECT.
                w.topic = ByteString::from(&*w.topic);
                w.payload = bytes::Bytes::copy_from_slice(&w.payload);
                w.properties.detach();
                Box::new(w)
            }),
            principal,
            acl_cache: LazyMap::default(),
            peer,
            last_rx: Instant::now(),
            aliases_in: LazyMap::default(),
            aliases_out: LazyMap::default(),
            limits,
            park_when_idle: true,
            work: Work {
                gate,
                just_connected: true,
                ..Work::default()
            },
        };
        conn.session.set_reader(conn.principal.clone());
        conn.session.set_info(super::state::ClientInfo {
            username: c.username.as_deref().map(str::to_owned),
            protocol: if v.is_v5() { 5 } else { 4 },
            keepalive: conn.agreed.keep_alive,
            peer: Some(peer),
            clean_start: c.clean_start,
            connected_at: Some(std::time::SystemTime::now()),
        });
        if opened.present {
            conn.prune_unauthorized();
        }
        if conn.session.store().is_some() {
            // The session record first, then the CONNACK that promises it.
            let will = conn.stored_will();
            conn.session.lock().stored_will = will;
            let t = conn.session.save();
            conn.work.gate.note(t);
        }
        conn.write_packet(&Packet::ConnAck(ack));
        conn.resend_inflight();
        if opened.present {
            // `?pubStates=1` promises the current values again on every
            // resume (EVRYTHNG: "if the connection is being recovered").
            let again: Vec<(String, crate::router::SubOptions)> = conn
                .session
                .lock()
                .subscriptions
                .iter()
                .filter(|(_, o)| o.pub_states)
                .filter_map(|(raw, o)| {
                    let p = starling_model::topic::parse_subscription(raw).ok()?;
                    p.share_group.is_none().then(|| (p.filter.to_owned(), *o))
                })
                .collect();
            for (filter, opts) in again {
                conn.send_initial(&filter, &opts);
            }
        }
        tracing::debug!(%peer, client_id = %conn.client_id(), version = ?v, present = opened.present, "connected");
        Some(conn)
    }

    /// The client's id, as it sent it (or was assigned it): the session's
    /// key less the token it may be namespaced by (see `start`; NUL
    /// cannot occur in a client id).
    pub(super) fn client_id(&self) -> &str {
        let key = &*self.session.client_id;
        key.rsplit_once('\0').map_or(key, |(_, id)| id)
    }

    /// The keep-alive interval the broker holds the client to (1.5 × what
    /// it asked for, MQTT-3.1.2-24); zero for none.
    pub(super) fn keepalive(&self) -> Duration {
        keepalive(self.agreed.keep_alive)
    }

    /// Whether nothing is in progress that only this task would notice:
    /// then the connection can be parked, and a readable socket or a wake
    /// resumes it.
    fn parkable(&self) -> bool {
        self.work.wbuf.is_empty()
            && self.work.gate.is_empty()
            && self.work.blocked.is_none()
            && !self.work.yield_soon
            && (!self.window_open() || self.session.lock().queue.is_empty())
    }

    /// Gives back the buffers a busy connection keeps between batches.
    fn shed_buffers(&mut self) {
        self.work.wbuf = BytesMut::new();
        self.work.scratch = Vec::new();
        self.work.batch = Vec::new();
    }

    /// Handles packets and deliveries until the connection ends (`Some`),
    /// or, over a parkable transport, until it has been quiet for
    /// [`PARK_AFTER`] (`None`).
    async fn run<T: Transport>(&mut self, t: &mut T, rbuf: &mut BytesMut) -> Option<End> {
        // Shutdown reaches a running connection as a kick on its link (see
        // `BrokerHandle::shutdown`): one waiter fewer to register on every
        // turn of the loop. A connection that attached after the kicks, or
        // that the parker resumed, sees the flag here.
        if *self.shared.shutdown.borrow() {
            return Some(End::Server(reason::SERVER_SHUTTING_DOWN));
        }
        let ka = self.keepalive();
        // One timer for the keep-alive and the quiet check, re-armed only
        // when it fires (not per packet).
        let next_check = |last_rx: Instant, now: Instant| {
            let lapse = if ka.is_zero() {
                now + Duration::from_secs(86400 * 365)
            } else {
                last_rx + ka
            };
            if T::PARKS {
                lapse.min(now + PARK_AFTER)
            } else {
                lapse
            }
        };
        let keepalive = sleep_until(next_check(self.last_rx, Instant::now()));
        tokio::pin!(keepalive);
        let mut flushes_seen = self.work.flushes;
        // Whatever woke a resumed connection is handled before it may park
        // again (a new one has handled its CONNECT already).
        let mut turned = std::mem::take(&mut self.work.just_connected);
        // Anything already buffered after CONNECT is processed before reading again.
        if let Some(end) = self.process(rbuf) {
            return Some(end);
        }
        if rbuf.is_empty() {
            *rbuf = BytesMut::new();
        }
        loop {
            if self.work.yield_soon && self.work.blocked.is_none() {
                self.work.yield_soon = false;
                self.work.handled = 0;
                // Flush acks first, then let the subscribers' tasks drain.
                if !self.work.wbuf.is_empty()
                    && let Some(end) = self.flush(t).await
                {
                    return Some(end);
                }
                tokio::task::yield_now().await;
                if let Some(end) = self.process(rbuf) {
                    return Some(end);
                }
                continue;
            }
            self.drain();
            if !self.work.wbuf.is_empty() {
                if let Some(end) = self.flush(t).await {
                    return Some(end);
                }
                // The drain stopped at the batch size: keep going first.
                if !self.session.lock().queue.is_empty() && self.window_open() {
                    continue;
                }
            }
            if !self.work.gate.is_empty()
                && self.shared.router.store.backlog() > STORE_BACKLOG
                && !self.gate_settled()
                && let Some(end) = Box::pin(self.settle(WRITE_STALL)).await
            {
                return Some(end);
            }
            if T::PARKS && turned && self.park_when_idle && self.parkable() {
                self.park_when_idle = false;
                // Just connected (a burst of connections never holds a task
                // each), or a sparse client done with its wake-up.
                self.shed_buffers();
                return None;
            }
            let blocked = self.work.blocked.clone();
            tokio::select! {
                biased;
                _ = self.link.wake.notified() => {
                    if let Some(r) = self.link.kicked() {
                        return Some(End::Server(r));
                    }
                    if self.link.take_recheck()
                        && let Some(end) = self.reauthorize() {
                            return Some(end);
                        }
                }
                room = async {
                    match &blocked {
                        Some((s, deadline)) => Box::pin(s.wait_for_room(*deadline)).await,
                        None => std::future::pending().await,
                    }
                }, if blocked.is_some() => {
                    if let (false, Some((s, _))) = (room, &blocked) {
                        self.work.skip = Some((s.key, Instant::now() + BACKPRESSURE_SKIP));
                    }
                    self.work.blocked = None;
                    // Packets read before the pause are handled first.
                    if let Some(end) = self.process(rbuf) {
                        return Some(end);
                    }
                }
                n = t.read_into(rbuf), if blocked.is_none() => {
                    match n {
                        Ok(0) | Err(_) => return Some(End::Lost),
                        Ok(n) => {
                            metrics::add(&self.shared.metrics.bytes_in, n as u64);
                            self.last_rx = Instant::now();
                            if let Some(end) = self.process(rbuf) {
                                return Some(end);
                            }
                            if rbuf.is_empty() {
                                // Frozen payload slices keep the block alive for
                                // subscribers; this connection lets go of it.
                                *rbuf = BytesMut::new();
                            }
                        }
                    }
                }
                _ = &mut keepalive => {
                    let now = Instant::now();
                    if !ka.is_zero() && now >= self.last_rx + ka {
                        metrics::inc(&self.shared.metrics.keepalive_timeouts);
                        tracing::debug!(peer = %self.peer, client_id = %self.client_id(), "keepalive timeout");
                        return Some(End::Server(reason::KEEP_ALIVE_TIMEOUT));
                    }
                    let quiet = self.work.flushes == flushes_seen && now >= self.last_rx + PARK_AFTER;
                    if T::PARKS && quiet && self.parkable() {
                        self.shed_buffers();
                        return None;
                    }
                    flushes_seen = self.work.flushes;
                    keepalive.as_mut().reset(next_check(self.last_rx, now));
                }
            }
            turned = true;
        }
    }

    /// Writes the batch. A client that does not read can hold this for up
    /// to [`WRITE_STALL`], so it also listens for a kick: a takeover (or
    /// revocation) of a stalled connection takes effect at once, not when
    /// the stall times out. Abandoning the write is fine then: the
    /// connection is ending.
    async fn flush<T: Transport>(&mut self, t: &mut T) -> Option<End> {
        // Boxed, and only when there is something to wait for: the wait
        // would otherwise be part of every idle connection's task.
        if !self.gate_settled()
            && let Some(end) = Box::pin(self.settle(WRITE_STALL)).await
        {
            return Some(end);
        }
        let n = self.work.wbuf.len();
        let link = self.link.clone();
        let mut woken = false;
        let result = {
            let write = timeout(WRITE_STALL, t.write_all(&self.work.wbuf));
            tokio::pin!(write);
            loop {
                tokio::select! {
                    biased;
                    r = &mut write => break Some(r),
                    _ = link.wake.notified() => {
                        if link.kicked().is_some() {
                            break None;
                        }
                        woken = true;
                    }
                }
            }
        };
        if woken {
            // The wake-up was for the run loop (queued messages, a bundle
            // re-check): hand it back.
            link.wake.notify_one();
        }
        match result {
            None => Some(End::Server(
                link.kicked().unwrap_or(reason::UNSPECIFIED_ERROR),
            )),
            Some(Ok(Ok(()))) => {
                metrics::add(&self.shared.metrics.bytes_out, n as u64);
                self.work.flushes = self.work.flushes.wrapping_add(1);
                if T::PARKS && self.work.wbuf.capacity() <= KEPT_WRITE_BUFFER {
                    // Kept for the next batch: a connection trading a few
                    // packets per wake-up reuses it, and gives it back when
                    // it is parked.
                    self.work.wbuf.clear();
                } else {
                    // Released rather than kept: a busy subscriber's batch
                    // buffer is large, and thousands of them would hold it.
                    self.work.wbuf = BytesMut::new();
                }
                None
            }
            Some(Ok(Err(_))) => Some(End::Lost),
            Some(Err(_)) => {
                tracing::info!(peer = %self.peer, client_id = %self.client_id(), "client stalled: not reading");
                self.work.wbuf.clear();
                Some(End::Lost)
            }
        }
    }

    /// Waits until the store has written what the buffered acknowledgements
    /// promise. If it could not, they are not sent: the connection closes
    /// (v5: DISCONNECT 0x97) and the client resends what it has not had
    /// acknowledged.
    async fn settle(&mut self, within: Duration) -> Option<End> {
        let gate = std::mem::take(&mut self.work.gate);
        let store = &self.shared.router.store;
        match timeout(within, store.durable(gate)).await {
            Ok(Ok(())) => None,
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the store did not write in time".to_owned(),
                };
                tracing::warn!(peer = %self.peer, client_id = %self.client_id(), error = %why, "acknowledgements withheld: the store could not write them; closing the connection");
                self.work.wbuf.clear();
                Some(End::Server(reason::QUOTA_EXCEEDED))
            }
        }
    }

    /// Nothing buffered waits for the store (the common case: no store,
    /// or its writes already durable). Clears the gate when so.
    fn gate_settled(&mut self) -> bool {
        let store = &self.shared.router.store;
        let settled =
            self.work.gate.is_empty() || store.is_durable(self.work.gate.last) && store.healthy();
        if settled {
            self.work.gate = TicketSpan::default();
        }
        settled
    }

    /// The will as stored with a persistent session's record.
    fn stored_will(&self) -> Option<Box<StoredWill>> {
        let w = self.will.as_ref()?;
        let delay = w.properties.will_delay_interval.unwrap_or(0);
        let mut props = w.properties.clone();
        props.will_delay_interval = None;
        let msg = self.message_from(w.topic.clone(), w.payload.clone(), w.qos, w.retain, props);
        Some(Box::new(StoredWill {
            message: records::encode_message(&msg),
            delay_secs: u64::from(delay),
        }))
    }

    /// Decodes and handles every complete packet in `rbuf`.
    fn process(&mut self, rbuf: &mut BytesMut) -> Option<End> {
        let max = self.limits.max_packet_size as usize;
        loop {
            match codec::decode(rbuf, self.version, max) {
                Ok(Some(p)) => {
                    if let Some(end) = self.handle(p) {
                        return Some(end);
                    }
                    self.work.handled += 1;
                    if self.work.handled >= FAIR_SHARE {
                        // A flood of small packets would otherwise keep the
                        // worker thread for the whole read buffer and every
                        // read after it (tokio's budget counts reads, not
                        // packets): the neighbours on this thread wait.
                        self.work.yield_soon = true;
                    }
                    if self.work.blocked.is_some() || self.work.yield_soon {
                        // Backpressure: the rest stays buffered until the
                        // subscriber has had its turn (or has room).
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    metrics::inc(&self.shared.metrics.protocol_errors);
                    tracing::debug!(peer = %self.peer, client_id = %self.client_id(), error = %e, "protocol violation");
                    return Some(End::Server(e.reason_code()));
                }
            }
        }
    }

    /// Sends what is owed and the v5 DISCONNECT if the broker is closing,
    /// hands the session back and handles the will — all before the socket
    /// is closed, so a peer that stops reading cannot delay any of it — and
    /// then closes the socket within a deadline.
    async fn finish<T: Transport>(&mut self, t: &mut T, end: End) {
        if let End::Server(code) = end {
            if code == reason::SERVER_SHUTTING_DOWN {
                // Flush what is queued before saying goodbye.
                self.drain();
            }
            if self.version.is_v5() {
                self.write_packet(&Packet::Disconnect(Disconnect {
                    reason: code,
                    properties: Properties::default(),
                }));
            }
        }
        if !self.work.wbuf.is_empty() && !matches!(end, End::Lost) {
            // Acknowledgements the store has not written are not sent.
            if !self.gate_settled()
                && Box::pin(self.settle(CLOSE_WRITE_DEADLINE)).await.is_some()
                && self.version.is_v5()
                && matches!(end, End::Server(_))
            {
                self.write_packet(&Packet::Disconnect(Disconnect {
                    reason: reason::QUOTA_EXCEEDED,
                    properties: Properties::default(),
                }));
            }
            let _ = timeout(CLOSE_WRITE_DEADLINE, t.write_all(&self.work.wbuf)).await;
        }
        self.hand_back(end);
        // Broker-initiated closes linger so the client reads the reason.
        t.close(matches!(end, End::Server(_))).await;
        tracing::debug!(peer = %self.peer, client_id = %self.client_id(), ?end, "disconnected");
    }

    /// Detaches the session (dropping it if it ends with the connection)
    /// and publishes or schedules the will.
    fn hand_back(&mut self, end: End) {
        let publish_will = match end {
            End::ClientDisconnect { will } => will,
            End::Lost => true,
            End::Server(code) => code != reason::SERVER_SHUTTING_DOWN,
        };
        let taken_over = matches!(end, End::Server(reason::SESSION_TAKEN_OVER));
        let still_ours = self.session.detach(&self.link, self.agreed.session_expiry);
        if still_ours
            && self.agreed.session_expiry.is_zero()
            && self.shared.registry.remove(&self.session)
        {
            self.shared.router.drop_session(&self.session);
            self.session.forget_stored();
        }
        let persisted = still_ours && self.session.store().is_some();
        if persisted {
            // The client is gone: its will is published now, pending
            // (set again below), or not at all.
            self.session.lock().stored_will = None;
        }
        let will = self.will.take().filter(|w| {
            let allowed = self.principal.may_publish(&w.topic);
            if publish_will && !allowed {
                metrics::inc(&self.shared.metrics.acl_refusals);
                tracing::debug!(peer = %self.peer, token = ?self.principal.name(), topic = %w.topic, "will refused by ACL");
            }
            publish_will && allowed
        });
        if let Some(mut will) = will {
            // Will Delay Interval is a CONNECT property, never a PUBLISH one.
            let delay = will
                .properties
                .will_delay_interval
                .take()
                .map(|d| Duration::from_secs(u64::from(d)).min(self.agreed.session_expiry))
                .unwrap_or_default();
            let msg = self.message_from(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
                will.properties,
            );
            let shared = self.shared.clone();
            if delay.is_zero() {
                shared.router.publish(msg, &mut self.work.scratch);
            } else if !taken_over {
                if persisted {
                    // Pending across a restart too.
                    self.session.lock().stored_will = Some(Box::new(StoredWill {
                        message: records::encode_message(&msg),
                        delay_secs: delay.as_secs(),
                    }));
                }
                let session = self.session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A new connection for the session within the delay cancels the will.
                    let reconnected = session.is_online()
                        || shared
                            .registry
                            .current_key(&session.client_id)
                            .is_some_and(|k| k != session.key);
                    if !reconnected {
                        if session.lock().stored_will.take().is_some() {
                            session.save();
                        }
                        shared.router.publish(msg, &mut Vec::new());
                    }
                });
            }
        }
        if persisted
            && self.shared.registry.current_key(&self.session.client_id) == Some(self.session.key)
        {
            self.session.save();
        }
    }
}

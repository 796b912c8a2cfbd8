//! One client connection: CONNECT, then a loop that reads packets, acts on
//! them and writes everything owed to the client in one batch per wake-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use starling_codec::{
    self as codec, ByteString, Connect, DecodeError, Disconnect, LastWill, Packet, Properties,
    ProtocolVersion, PubResp, Publish, PublishRef, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
    reason,
};
use tokio::time::{Instant, sleep_until, timeout};

use super::handshake::{self, Agreed};
use super::state::{ConnLink, Inflight, QueueLimits, Session};
use crate::listen::transport::Transport;
use crate::metrics;
use crate::router::{Delivery, Message, SubEntry, SubOptions};
use crate::server::Shared;
use starling_model::acl::Principal;

/// Stop filling the write buffer past this; it is flushed and the drain resumes.
const WRITE_BATCH: usize = 64 * 1024;
/// A client that takes longer than this to accept one batch is stalled.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Why a connection ended; decides the will message and the v5 DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client; `will` is true for v5 reason 0x04.
    ClientDisconnect { will: bool },
    /// Socket closed or failed without DISCONNECT.
    Lost,
    /// The broker closes the connection with this v5 reason code.
    Server(u8),
}

/// Serves one accepted connection until it ends.
pub async fn serve<T: Transport>(shared: Arc<Shared>, mut t: T, peer: SocketAddr) {
    let m = &shared.metrics;
    metrics::inc(&m.connections_total);
    metrics::inc(&m.connections_current);
    let mut rbuf = BytesMut::new();
    let limits = &shared.config.limits;
    let max_packet = limits.max_packet_size as usize;
    let connect = timeout(
        Duration::from_secs(limits.connect_timeout),
        read_connect(&mut t, &mut rbuf, max_packet),
    )
    .await;
    match connect {
        Ok(Ok(c)) => {
            let mut conn = match Connection::start(&shared, &mut t, *c, peer).await {
                Some(conn) => conn,
                None => {
                    metrics::inc(&m.connections_refused);
                    t.close().await;
                    metrics::dec(&m.connections_current);
                    return;
                }
            };
            let end = conn.run(&mut t, &mut rbuf).await;
            conn.finish(&mut t, end).await;
            metrics::dec(&m.connections_current);
            return;
        }
        Ok(Err(ConnectError::Decode(DecodeError::UnsupportedProtocol))) => {
            // MQTT-3.1.2-2: answer an unknown level with return code 0x01.
            metrics::inc(&m.protocol_errors);
            metrics::inc(&m.connections_refused);
            let _ = t
                .write_all(&[0x20, 0x02, 0x00, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION])
                .await;
        }
        Ok(Err(e)) => {
            metrics::inc(&m.connections_refused);
            if !matches!(e, ConnectError::Closed) {
                metrics::inc(&m.protocol_errors);
                tracing::debug!(%peer, error = %e, "refused connection before CONNECT");
            }
        }
        Err(_) => {
            metrics::inc(&m.connections_refused);
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
        }
    }
    t.close().await;
    metrics::dec(&m.connections_current);
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

struct Connection {
    shared: Arc<Shared>,
    session: Arc<Session>,
    link: Arc<ConnLink>,
    version: ProtocolVersion,
    agreed: Agreed,
    will: Option<LastWill>,
    /// The token this connection authenticated with (or anonymous).
    principal: Arc<Principal>,
    /// Publish decisions per topic for the principal above; cleared when
    /// the principal is refreshed after a bundle change.
    acl_cache: HashMap<ByteString, bool>,
    peer: SocketAddr,
    wbuf: BytesMut,
    last_rx: Instant,
    /// Inbound topic aliases (client → broker).
    aliases_in: HashMap<u16, ByteString>,
    /// Outbound topic aliases (broker → client).
    aliases_out: HashMap<ByteString, u16>,
    /// Reused for routing and draining so the hot path does not allocate.
    scratch: Vec<SubEntry>,
    batch: Vec<(u16, Delivery)>,
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
        let limits = &shared.config.limits;
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
                // The reason is logged, never the secret.
                tracing::info!(%peer, client_id = %c.client_id, username = ?c.username.as_deref(), reason = %e, "authentication failed");
                let code = handshake::refusal_code(v, &e);
                let _ = codec::encode(&refuse(code), v, &mut out);
                let _ = t.write_all(&out).await;
                return None;
            }
        };
        let agreed = match handshake::negotiate(&c, limits, || shared.assign_client_id()) {
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
            && shared.check_topic(&w.topic).is_err()
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
        let link = Arc::new(ConnLink::default());
        let opened = shared.registry.open(
            &agreed.client_id,
            c.clean_start,
            agreed.session_expiry,
            link.clone(),
            QueueLimits {
                max_messages: limits.max_queued_messages,
                max_bytes: limits.max_queued_bytes,
            },
        );
        if let Some(old) = &opened.replaced {
            shared.router.drop_session(old);
        }
        let ack = handshake::connack(v, &agreed, opened.present, limits);
        let mut conn = Connection {
            shared: shared.clone(),
            session: opened.session,
            link,
            version: v,
            agreed,
            will: c.will,
            principal,
            acl_cache: HashMap::new(),
            peer,
            wbuf: BytesMut::new(),
            last_rx: Instant::now(),
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            scratch: Vec::new(),
            batch: Vec::new(),
        };
        if opened.present {
            conn.prune_unauthorized();
        }
        conn.write_packet(&Packet::ConnAck(ack));
        conn.resend_inflight();
        tracing::debug!(%peer, client_id = %conn.agreed.client_id, version = ?v, present = opened.present, "connected");
        Some(conn)
    }

    async fn run<T: Transport>(&mut self, t: &mut T, rbuf: &mut BytesMut) -> End {
        let mut shutdown = self.shared.shutdown.subscribe();
        let ka = Duration::from_millis(u64::from(self.agreed.keep_alive) * 1500);
        let far = Duration::from_secs(86400 * 365);
        let keepalive = sleep_until(Instant::now() + if ka.is_zero() { far } else { ka });
        tokio::pin!(keepalive);
        // Anything already buffered after CONNECT is processed before reading again.
        if let Some(end) = self.process(rbuf) {
            return end;
        }
        loop {
            self.drain();
            if !self.wbuf.is_empty() {
                if let Some(end) = self.flush(t).await {
                    return end;
                }
                // The drain stopped at the batch size: keep going first.
                if !self.session.lock().queue.is_empty() && self.window_open() {
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return End::Server(reason::SERVER_SHUTTING_DOWN),
                _ = self.link.wake.notified() => {
                    if let Some(r) = self.link.kicked() {
                        return End::Server(r);
                    }
                    if self.link.take_recheck()
                        && let Some(end) = self.reauthorize() {
                            return end;
                        }
                }
                n = t.read_into(rbuf) => {
                    match n {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(n) => {
                            metrics::add(&self.shared.metrics.bytes_in, n as u64);
                            self.last_rx = Instant::now();
                            if let Some(end) = self.process(rbuf) {
                                return end;
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
                    let deadline = self.last_rx + ka;
                    if Instant::now() >= deadline {
                        metrics::inc(&self.shared.metrics.keepalive_timeouts);
                        tracing::debug!(peer = %self.peer, client_id = %self.agreed.client_id, "keepalive timeout");
                        return End::Server(reason::KEEP_ALIVE_TIMEOUT);
                    }
                    keepalive.as_mut().reset(deadline);
                }
            }
        }
    }

    /// Publish check with a per-connection cache (topics repeat; the ACL
    /// walk need not). The cache is bounded and dropped on bundle change.
    fn may_publish(&mut self, topic: &ByteString) -> bool {
        if let Some(&allowed) = self.acl_cache.get(topic) {
            return allowed;
        }
        let allowed = self.principal.may_publish(topic);
        if self.acl_cache.len() >= 1024 {
            self.acl_cache.clear();
        }
        self.acl_cache.insert(topic.clone(), allowed);
        allowed
    }

    /// After a bundle change or a token expiry: refresh the principal (or
    /// end the connection if its token is gone) and drop subscriptions the
    /// new rules no longer allow.
    fn reauthorize(&mut self) -> Option<End> {
        let state = self.shared.auth.current();
        match state.refresh(&self.principal, std::time::SystemTime::now()) {
            Ok(p) => {
                self.principal = p;
                self.acl_cache.clear();
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, client_id = %self.agreed.client_id, reason = %e, "closing connection: token no longer valid");
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
    fn prune_unauthorized(&mut self) {
        let subs: Vec<ByteString> = self.session.lock().subscriptions.keys().cloned().collect();
        for raw in subs {
            let Ok(parsed) = starling_model::topic::parse_subscription(&raw) else {
                continue;
            };
            if !self.principal.may_subscribe(parsed.filter) {
                self.session.lock().subscriptions.remove(&raw);
                self.shared
                    .router
                    .unsubscribe(self.session.key, parsed.filter, parsed.share_group);
                metrics::inc(&self.shared.metrics.acl_refusals);
                tracing::info!(peer = %self.peer, client_id = %self.agreed.client_id, filter = %raw, "subscription removed: no longer allowed");
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
            tracing::info!(peer = %self.peer, client_id = %self.agreed.client_id, dropped, "queued messages dropped: no longer allowed");
        }
    }

    fn window_open(&self) -> bool {
        self.session.lock().inflight.len() < usize::from(self.agreed.send_window)
    }

    async fn flush<T: Transport>(&mut self, t: &mut T) -> Option<End> {
        let n = self.wbuf.len();
        match timeout(WRITE_STALL, t.write_all(&self.wbuf)).await {
            Ok(Ok(())) => {
                metrics::add(&self.shared.metrics.bytes_out, n as u64);
                // Released rather than kept: an idle connection should hold
                // no buffers; a busy one pays one allocation per batch.
                self.wbuf = BytesMut::new();
                None
            }
            Ok(Err(_)) => Some(End::Lost),
            Err(_) => {
                tracing::info!(peer = %self.peer, client_id = %self.agreed.client_id, "client stalled: not reading");
                self.wbuf.clear();
                Some(End::Lost)
            }
        }
    }

    /// Decodes and handles every complete packet in `rbuf`.
    fn process(&mut self, rbuf: &mut BytesMut) -> Option<End> {
        let max = self.shared.config.limits.max_packet_size as usize;
        loop {
            match codec::decode(rbuf, self.version, max) {
                Ok(Some(p)) => {
                    if let Some(end) = self.handle(p) {
                        return Some(end);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    metrics::inc(&self.shared.metrics.protocol_errors);
                    tracing::debug!(peer = %self.peer, client_id = %self.agreed.client_id, error = %e, "protocol violation");
                    return Some(End::Server(e.reason_code()));
                }
            }
        }
    }

    fn protocol_error(&self, why: &str) -> Option<End> {
        metrics::inc(&self.shared.metrics.protocol_errors);
        tracing::debug!(peer = %self.peer, client_id = %self.agreed.client_id, why, "protocol violation");
        Some(End::Server(reason::PROTOCOL_ERROR))
    }

    fn handle(&mut self, p: Packet) -> Option<End> {
        match p {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(r) => {
                self.session.lock().take_inflight(r.pkid);
            }
            Packet::PubRec(r) => {
                let mut st = self.session.lock();
                let found = st.inflight.iter().position(|i| i.pkid == r.pkid);
                match found {
                    Some(pos) if r.reason >= 0x80 => {
                        st.inflight.remove(pos);
                    }
                    Some(pos) => {
                        if let Some(i) = st.inflight.get_mut(pos) {
                            i.released = true;
                        }
                        drop(st);
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
                let known = self.session.lock().incoming_qos2.remove(&r.pkid);
                let code = if known || !self.version.is_v5() {
                    0
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.write_packet(&Packet::PubComp(PubResp::new(r.pkid, code)));
            }
            Packet::PubComp(r) => {
                self.session.lock().take_inflight(r.pkid);
            }
            Packet::Subscribe(s) => return self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
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
                    let capped = e.min(self.shared.config.limits.max_session_expiry);
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

    fn on_publish(&mut self, mut p: Publish) -> Option<End> {
        metrics::inc(&self.shared.metrics.messages_in[p.qos as usize]);
        if self.version.is_v5() {
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > self.shared.config.limits.max_topic_aliases {
                    metrics::inc(&self.shared.metrics.protocol_errors);
                    return Some(End::Server(reason::TOPIC_ALIAS_INVALID));
                }
                if p.topic.is_empty() {
                    match self.aliases_in.get(&alias) {
                        Some(t) => p.topic = t.clone(),
                        None => return self.protocol_error("unknown topic alias"),
                    }
                } else {
                    self.aliases_in.insert(alias, p.topic.clone());
                }
            }
            if !p.properties.subscription_identifiers.is_empty() {
                return self.protocol_error("subscription identifier in PUBLISH");
            }
        }
        if p.topic.is_empty() {
            return self.protocol_error("empty topic");
        }
        if p.qos == QoS::ExactlyOnce {
            let mut st = self.session.lock();
            if st.incoming_qos2.contains(&p.pkid) {
                // Re-sent before our PUBREC arrived: already routed once.
                drop(st);
                self.write_packet(&Packet::PubRec(PubResp::new(p.pkid, 0)));
                return None;
            }
            if st.incoming_qos2.len() >= usize::from(self.shared.config.limits.max_inflight) {
                drop(st);
                metrics::inc(&self.shared.metrics.protocol_errors);
                return Some(End::Server(reason::RECEIVE_MAXIMUM_EXCEEDED));
            }
            st.incoming_qos2.insert(p.pkid);
        }
        let code = match self.shared.check_topic(&p.topic) {
            Err(_) => {
                metrics::inc(&self.shared.metrics.messages_dropped[p.qos as usize]);
                reason::TOPIC_NAME_INVALID
            }
            Ok(()) if !self.may_publish(&p.topic) => {
                metrics::inc(&self.shared.metrics.acl_refusals);
                metrics::inc(&self.shared.metrics.messages_dropped[p.qos as usize]);
                tracing::debug!(peer = %self.peer, token = ?self.principal.name(), topic = %p.topic, "publish refused by ACL");
                reason::NOT_AUTHORIZED
            }
            Ok(()) => {
                let msg = self.message_from(p.topic, p.payload, p.qos, p.retain, p.properties);
                let n = self.shared.router.publish(msg, &mut self.scratch);
                if n == 0 {
                    reason::NO_MATCHING_SUBSCRIBERS
                } else {
                    reason::SUCCESS
                }
            }
        };
        // v3.1.1 cannot refuse a publish: it is acknowledged (and counted as
        // dropped above) so the client does not resend it forever.
        let code = if self.version.is_v5() { code } else { 0 };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write_packet(&Packet::PubAck(PubResp::new(p.pkid, code))),
            QoS::ExactlyOnce => self.write_packet(&Packet::PubRec(PubResp::new(p.pkid, code))),
        }
        None
    }

    fn message_from(
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

    fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        let v5 = self.version.is_v5();
        let sub_id = s
            .properties
            .subscription_identifiers
            .first()
            .copied()
            .unwrap_or(0);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for f in &s.filters {
            let parsed = match starling_model::topic::parse_subscription(&f.filter) {
                Ok(p) if self.shared.check_topic(p.filter).is_ok() => p,
                _ => {
                    codes.push(if v5 {
                        reason::TOPIC_FILTER_INVALID
                    } else {
                        reason::v3::SUBACK_FAILURE
                    });
                    continue;
                }
            };
            if parsed.share_group.is_some() && f.no_local && v5 {
                return self.protocol_error("no-local on a shared subscription");
            }
            if !self.principal.may_subscribe(parsed.filter) {
                metrics::inc(&self.shared.metrics.acl_refusals);
                tracing::debug!(peer = %self.peer, token = ?self.principal.name(), filter = %f.filter, "subscription refused by ACL");
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::v3::SUBACK_FAILURE
                });
                continue;
            }
            let opts = SubOptions {
                qos: f.qos,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling: f.retain_handling,
                sub_id,
            };
            let is_new = self.shared.router.subscribe(
                &self.session,
                parsed.filter,
                parsed.share_group,
                opts,
            );
            self.session
                .lock()
                .subscriptions
                .insert(f.filter.clone(), opts);
            let send_retained = parsed.share_group.is_none()
                && match f.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
            if send_retained {
                retained.extend(self.shared.router.retained_for(parsed.filter, &opts));
            }
            codes.push(f.qos as u8);
        }
        self.write_packet(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes,
            properties: Properties::default(),
        }));
        for d in retained {
            self.session.enqueue(d, &self.shared.metrics);
        }
        None
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            let existed = self.session.lock().subscriptions.remove(raw).is_some();
            if existed && let Ok(p) = starling_model::topic::parse_subscription(raw) {
                self.shared
                    .router
                    .unsubscribe(self.session.key, p.filter, p.share_group);
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
    }

    /// After a reconnect: messages the client never acknowledged go again,
    /// with DUP set (or PUBREL for QoS 2 already received).
    fn resend_inflight(&mut self) {
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
    fn drain(&mut self) {
        let window = usize::from(self.agreed.send_window);
        let mut batch = std::mem::take(&mut self.batch);
        let mut bytes = 0;
        {
            let mut st = self.session.lock();
            while bytes < WRITE_BATCH && st.inflight.len() < window {
                let Some(d) = st.pop_queued() else { break };
                bytes += d.cost() + 16;
                let pkid = if d.qos == QoS::AtMostOnce {
                    0
                } else {
                    let id = st.next_pkid();
                    st.inflight.push_back(Inflight {
                        pkid: id,
                        delivery: d.clone(),
                        released: false,
                    });
                    id
                };
                batch.push((pkid, d));
            }
        }
        // One allocation for the whole batch (the buffer is released after
        // each flush).
        self.wbuf.reserve(bytes + 64);
        let now = Instant::now();
        for (pkid, d) in batch.drain(..) {
            if d.msg.is_expired(now) {
                metrics::inc(&self.shared.metrics.messages_dropped[d.qos as usize]);
                if pkid != 0 {
                    self.session.lock().take_inflight(pkid);
                }
                continue;
            }
            if !self.encode_delivery(pkid, &d, false) && pkid != 0 {
                self.session.lock().take_inflight(pkid);
            }
        }
        self.batch = batch;
    }

    /// Encodes one PUBLISH; false if it had to be dropped (too large for
    /// the client).
    fn encode_delivery(&mut self, pkid: u16, d: &Delivery, dup: bool) -> bool {
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
                    let next = self.aliases_out.len() as u16 + 1;
                    if next <= self.agreed.client_alias_max {
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
            metrics::inc(&self.shared.metrics.messages_dropped[d.qos as usize]);
            if alias.is_some() && !topic.is_empty() {
                self.aliases_out.remove(&msg.topic);
            }
            return false;
        }
        codec::encode_publish(&p, self.version, &mut self.wbuf);
        metrics::inc(&self.shared.metrics.messages_out[d.qos as usize]);
        true
    }

    fn write_packet(&mut self, p: &Packet) {
        if let Err(e) = codec::encode(p, self.version, &mut self.wbuf) {
            tracing::warn!(error = %e, "could not encode a packet for the client");
        }
    }

    /// Sends what is owed, the v5 DISCONNECT if the broker is closing, the
    /// will if the client vanished, and hands the session back.
    async fn finish<T: Transport>(mut self, t: &mut T, end: End) {
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
        if !self.wbuf.is_empty() {
            let _ = timeout(Duration::from_secs(2), t.write_all(&self.wbuf)).await;
        }
        t.close().await;
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
                shared.router.publish(msg, &mut self.scratch);
            } else if !taken_over {
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
                        shared.router.publish(msg, &mut Vec::new());
                    }
                });
            }
        }
        tracing::debug!(peer = %self.peer, client_id = %self.agreed.client_id, ?end, "disconnected");
    }
}

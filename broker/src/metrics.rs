//! Process-wide counters. Plain relaxed atomics: they are read by `/metrics`,
//! the OTLP exporter and tests, never used for decisions, so ordering does
//! not matter and the hot path pays one uncontended add.
//!
//! [`FAMILIES`] describes every counter and gauge once; `/metrics` (through
//! prometheus-client's OpenMetrics encoder) and the OTLP observable
//! instruments (`crate::otel`) both read the atomics through it, so the two
//! can neither drift nor count twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub messages_in: [AtomicU64; 3],
    pub messages_out: [AtomicU64; 3],
    pub messages_dropped: [AtomicU64; 3],
    /// Indexed by [`DropReason`]; every drop counts here and in
    /// `messages_dropped` (see [`Metrics::dropped`]).
    pub drop_reasons: [AtomicU64; DropReason::ALL.len()],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub subscriptions: AtomicU64,
    pub retained: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub auth_failures: AtomicU64,
    pub acl_refusals: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub bundle_reloads: AtomicU64,
    pub bundle_errors: AtomicU64,
    /// Indexed by [`Limit`].
    pub limit_refusals: [AtomicU64; Limit::ALL.len()],
    /// Open native WebSocket topic streams.
    pub ws_streams: AtomicU64,
    /// Group commits of the store, failed writes, bytes written, and QoS
    /// 1/2 publishes refused while it could not write.
    pub store_commits: AtomicU64,
    pub store_write_errors: AtomicU64,
    pub store_bytes_written: AtomicU64,
    pub store_refusals: AtomicU64,
    pub listeners: ListenerMetrics,
    pub http: HttpMetrics,
    pub admin: AdminMetrics,
}

/// A listener carrying MQTT (one label value each, the config's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Mqtt,
    Mqtts,
    /// MQTT over WebSocket on the plain HTTP listener.
    Http,
    /// MQTT over WebSocket on the TLS HTTP listener.
    Https,
}

impl Listener {
    pub const ALL: [Listener; 4] = [
        Listener::Mqtt,
        Listener::Mqtts,
        Listener::Http,
        Listener::Https,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Listener::Mqtt => "mqtt",
            Listener::Mqtts => "mqtts",
            Listener::Http => "http",
            Listener::Https => "https",
        }
    }
}

/// MQTT protocol versions as label values, indexed like
/// [`protocol_index`].
pub const PROTOCOLS: [&str; 3] = ["3.1", "3.1.1", "5.0"];

pub fn protocol_index(v: starling_codec::ProtocolVersion) -> usize {
    match v {
        starling_codec::ProtocolVersion::V31 => 0,
        starling_codec::ProtocolVersion::V311 => 1,
        starling_codec::ProtocolVersion::V5 => 2,
    }
}

/// Connections per listener, and MQTT clients (past CONNACK) per listener
/// and protocol version.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    pub open: [AtomicU64; Listener::ALL.len()],
    pub accepted: [AtomicU64; Listener::ALL.len()],
    pub clients: PerListenerProtocol,
    pub connects: PerListenerProtocol,
}

/// An open connection, counted from accept to drop (every way out of a
/// connection task releases it, so the gauges cannot leak).
#[must_use]
pub struct OpenConnection {
    /// Owned, not borrowed: a parked connection carries its guard outside
    /// any task (see `session::park`).
    metrics: Arc<Metrics>,
    listener: Listener,
    /// The protocol index once connected (a byte: every parked connection
    /// carries this guard).
    client: Option<u8>,
}

impl Metrics {
    /// Counts a connection accepted on `listener` until the guard drops.
    pub fn open_connection(self: &Arc<Self>, listener: Listener) -> OpenConnection {
        inc(&self.connections_total);
        inc(&self.connections_current);
        inc(&self.listeners.accepted[listener as usize]);
        inc(&self.listeners.open[listener as usize]);
        OpenConnection {
            metrics: self.clone(),
            listener,
            client: None,
        }
    }
}

impl OpenConnection {
    /// The connection's CONNECT was accepted with protocol `version`.
    pub fn connected(&mut self, version: starling_codec::ProtocolVersion) {
        let p = protocol_index(version);
        let l = &self.metrics.listeners;
        inc(&l.connects[self.listener as usize][p]);
        inc(&l.clients[self.listener as usize][p]);
        self.client = Some(p as u8);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let l = &self.metrics.listeners;
        if let Some(p) = self.client {
            dec(&l.clients[self.listener as usize][usize::from(p)]);
        }
        dec(&l.open[self.listener as usize]);
        dec(&self.metrics.connections_current);
    }
}

/// Why a message was dropped (one label value each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// QoS 0 for an offline session.
    Offline,
    /// The session's queue was at its message or byte cap.
    QueueFull,
    /// Its message expiry interval passed before delivery.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// The topic was invalid or too deep.
    InvalidTopic,
    /// The publisher may not publish there.
    NotAuthorized,
    /// The retained store was full.
    RetainedFull,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Offline,
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::InvalidTopic,
        DropReason::NotAuthorized,
        DropReason::RetainedFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Offline => "offline",
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::InvalidTopic => "invalid_topic",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::RetainedFull => "retained_full",
        }
    }
}

impl Metrics {
    /// Counts one dropped message of QoS `qos` (0..=2) for `reason`.
    pub fn dropped(&self, qos: usize, reason: DropReason) {
        if let Some(c) = self.messages_dropped.get(qos) {
            inc(c);
        }
        inc(&self.drop_reasons[reason as usize]);
    }
}

/// A route of the http/https listeners (one label value each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpRoute {
    Publish,
    Retrieve,
    Stream,
    MqttWs,
    Health,
    /// CORS preflights (OPTIONS), answered by the CORS layer.
    Preflight,
}

impl HttpRoute {
    pub const ALL: [HttpRoute; 6] = [
        HttpRoute::Publish,
        HttpRoute::Retrieve,
        HttpRoute::Stream,
        HttpRoute::MqttWs,
        HttpRoute::Health,
        HttpRoute::Preflight,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HttpRoute::Publish => "publish",
            HttpRoute::Retrieve => "retrieve",
            HttpRoute::Stream => "stream",
            HttpRoute::MqttWs => "mqtt_ws",
            HttpRoute::Health => "health",
            HttpRoute::Preflight => "preflight",
        }
    }
}

/// The statuses the HTTP interface answers with; anything else is "other".
/// A fixed set keeps the label space (and this struct) bounded.
const STATUSES: [u16; 13] = [
    101, 200, 204, 400, 401, 403, 404, 405, 408, 413, 429, 500, 503,
];
/// [`STATUSES`] as label values, then "other".
const STATUS_LABELS: [&str; STATUSES.len() + 1] = [
    "101", "200", "204", "400", "401", "403", "404", "405", "408", "413", "429", "500", "503",
    "other",
];
/// Duration histogram bucket bounds in seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len())
}

/// A duration histogram with [`BUCKETS`], lock-free.
#[derive(Debug, Default)]
struct Timings {
    /// Per bucket (not cumulative), last = +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Microseconds.
    sum_us: AtomicU64,
}

impl Timings {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bi = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        inc(&self.buckets[bi]);
        add(
            &self.sum_us,
            took.as_micros().min(u128::from(u64::MAX)) as u64,
        );
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            // prometheus-client's encoder writes f64::MAX as +Inf.
            .chain([f64::MAX])
            .zip(self.buckets.iter().map(load))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum: load(&self.sum_us) as f64 / 1e6,
            buckets,
        }
    }
}

/// Requests by route and status, and a duration histogram per route.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// [route][status index, last = other]
    requests: [[AtomicU64; STATUSES.len() + 1]; HttpRoute::ALL.len()],
    timings: [Timings; HttpRoute::ALL.len()],
}

impl HttpMetrics {
    pub fn observe(&self, route: HttpRoute, status: u16, took: Duration) {
        let r = route as usize;
        inc(&self.requests[r][status_index(status)]);
        self.timings[r].observe(took);
    }

    /// Requests answered so far on `route` with `status` (tests read this).
    pub fn count(&self, route: HttpRoute, status: u16) -> u64 {
        load(&self.requests[route as usize][status_index(status)])
    }
}

/// Admin API requests by route template, method and status, with a duration
/// histogram per route and method (HiveMQ's "REST API metrics"). Admin
/// traffic is light, so a map behind a mutex is fine here; the keys are
/// bounded by the route table, the methods axum accepts and
/// [`STATUS_LABELS`].
#[derive(Debug, Default)]
pub struct AdminMetrics {
    routes: Mutex<HashMap<(&'static str, &'static str), AdminRoute>>,
}

#[derive(Debug, Default)]
struct AdminRoute {
    statuses: [u64; STATUS_LABELS.len()],
    timings: Timings,
}

/// The route label of admin requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

impl AdminMetrics {
    /// `route` is the matched path template (e.g. `/api/v4/clients/{clientid}`),
    /// never the raw path, so client ids do not become label values.
    pub fn observe(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let r = routes.entry((route, method)).or_default();
        r.statuses[status_index(status)] += 1;
        r.timings.observe(took);
    }

    /// Requests answered so far on `route` and `method` with `status`.
    pub fn count(&self, route: &str, method: &str, status: u16) -> u64 {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .iter()
            .find(|((r, m), _)| *r == route && *m == method)
            .map_or(0, |(_, v)| v.statuses[status_index(status)])
    }

    fn each_count(&self, emit: Emit) {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<_> = routes.iter().collect();
        // A stable order makes scrapes diffable.
        sorted.sort_by_key(|(k, _)| *k);
        for ((route, method), r) in sorted {
            for (i, &n) in r.statuses.iter().enumerate() {
                if n > 0 {
                    emit(
                        &[
                            ("route", route),
                            ("method", method),
                            ("status", STATUS_LABELS[i]),
                        ],
                        n,
                    );
                }
            }
        }
    }
}

/// The last-value cache's size, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LvcStats {
    pub entries: usize,
    pub bytes: usize,
    pub evictions: u64,
}

/// Gauges read from the live state at scrape time rather than kept on the
/// hot path: summing the queues costs one lock per session per scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateGauges {
    pub sessions: u64,
    /// Messages waiting in session queues (online and offline).
    pub queued_messages: u64,
    pub queued_bytes: u64,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: u64,
    /// Idle connections parked without a task.
    pub parked: u64,
}

/// What a scrape reads from the live state besides the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub lvc: LvcStats,
    pub state: StateGauges,
}

/// A configured cap that refused something (one label value each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    TopicLevels,
    Subscriptions,
    Retained,
    PersistentSessions,
    SharedGroups,
    Connections,
    ConnectionsPerAddress,
    ConnectSize,
    ClientIdOwner,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::TopicLevels,
        Limit::Subscriptions,
        Limit::Retained,
        Limit::PersistentSessions,
        Limit::SharedGroups,
        Limit::Connections,
        Limit::ConnectionsPerAddress,
        Limit::ConnectSize,
        Limit::ClientIdOwner,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::TopicLevels => "max_topic_levels",
            Limit::Subscriptions => "max_subscriptions_per_session",
            Limit::Retained => "max_retained_messages",
            Limit::PersistentSessions => "max_persistent_sessions",
            Limit::SharedGroups => "max_shared_groups",
            Limit::Connections => "max_connections",
            Limit::ConnectionsPerAddress => "max_connections_per_address",
            Limit::ConnectSize => "max_connect_packet_size",
            Limit::ClientIdOwner => "client_id_owner",
        }
    }
}

impl Metrics {
    pub fn limit_hit(&self, l: Limit) {
        inc(&self.limit_refusals[l as usize]);
    }

    pub fn limit_count(&self, l: Limit) -> u64 {
        self.limit_refusals[l as usize].load(Ordering::Relaxed)
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

pub fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Receives one sample: its labels and value.
pub type Emit<'a> = &'a mut dyn FnMut(&[(&'static str, &str)], u64);

/// One metric family as every exporter sees it.
#[derive(Debug)]
pub struct Family {
    /// The Prometheus sample name (counters end in `_total`).
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Reads [`Live`] (the caller must compute it) rather than counters only.
    pub live: bool,
    read: fn(&Metrics, &Live, Emit),
}

impl Family {
    /// Emits every sample of this family.
    pub fn read(&self, m: &Metrics, live: &Live, emit: Emit) {
        (self.read)(m, live, emit)
    }

    /// The family's name without the `_total` sample suffix (OpenMetrics'
    /// and OpenTelemetry's view of a counter).
    pub fn base_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            Kind::Gauge => self.name,
        }
    }
}

macro_rules! family {
    ($name:literal, $kind:ident, $help:literal, |$m:ident, $l:ident, $e:ident| $body:expr) => {
        family!(@ $name, $kind, $help, false, |$m, $l, $e| $body)
    };
    (live $name:literal, $kind:ident, $help:literal, |$m:ident, $l:ident, $e:ident| $body:expr) => {
        family!(@ $name, $kind, $help, true, |$m, $l, $e| $body)
    };
    (@ $name:literal, $kind:ident, $help:literal, $live:expr, |$m:ident, $l:ident, $e:ident| $body:expr) => {
        Family {
            name: $name,
            help: $help,
            kind: Kind::$kind,
            live: $live,
            read: {
                #[allow(unused_variables)]
                fn read($m: &Metrics, $l: &Live, $e: Emit) {
                    $body
                }
                read
            },
        }
    };
}

/// One unlabelled value.
fn one(e: Emit, v: u64) {
    e(&[], v)
}

fn by_qos(e: Emit, arr: &[AtomicU64; 3]) {
    for (q, c) in ["0", "1", "2"].iter().zip(arr) {
        e(&[("qos", q)], load(c));
    }
}

fn by_listener(e: Emit, arr: &[AtomicU64; Listener::ALL.len()]) {
    for l in Listener::ALL {
        e(&[("listener", l.label())], load(&arr[l as usize]));
    }
}

type PerListenerProtocol = [[AtomicU64; PROTOCOLS.len()]; Listener::ALL.len()];

/// Only the combinations that ever connected (most brokers see one or two);
/// a gauge stays exported at 0 once its clients are gone.
fn by_listener_protocol(e: Emit, m: &Metrics, arr: &PerListenerProtocol) {
    for l in Listener::ALL {
        for (p, name) in PROTOCOLS.iter().enumerate() {
            if load(&m.listeners.connects[l as usize][p]) > 0 {
                e(
                    &[("listener", l.label()), ("protocol", name)],
                    load(&arr[l as usize][p]),
                );
            }
        }
    }
}

/// Every counter and gauge, in exposition order. Names and labels are a
/// stable interface (the chart's dashboard and scripts/chart-check.sh read
/// them from here).
pub static FAMILIES: &[Family] = &[
    family!(
        "starling_connections",
        Gauge,
        "Open client connections.",
        |m, l, e| one(e, load(&m.connections_current))
    ),
    family!(
        "starling_connections_accepted_total",
        Counter,
        "Accepted client connections.",
        |m, l, e| one(e, load(&m.connections_total))
    ),
    family!(
        "starling_connections_refused_total",
        Counter,
        "Connections refused (limits, auth, bad CONNECT).",
        |m, l, e| one(e, load(&m.connections_refused))
    ),
    family!(
        "starling_listener_connections",
        Gauge,
        "Open client connections, by listener.",
        |m, l, e| by_listener(e, &m.listeners.open)
    ),
    family!(
        "starling_listener_connections_accepted_total",
        Counter,
        "Accepted client connections, by listener.",
        |m, l, e| by_listener(e, &m.listeners.accepted)
    ),
    family!(
        "starling_mqtt_clients",
        Gauge,
        "Connected MQTT clients (CONNECT accepted), by listener and protocol version.",
        |m, l, e| by_listener_protocol(e, m, &m.listeners.clients)
    ),
    family!(
        "starling_mqtt_connects_total",
        Counter,
        "Accepted MQTT CONNECTs, by listener and protocol version.",
        |m, l, e| by_listener_protocol(e, m, &m.listeners.connects)
    ),
    family!(
        "starling_bytes_received_total",
        Counter,
        "Bytes read from clients.",
        |m, l, e| one(e, load(&m.bytes_in))
    ),
    family!(
        "starling_bytes_sent_total",
        Counter,
        "Bytes written to clients.",
        |m, l, e| one(e, load(&m.bytes_out))
    ),
    family!(
        "starling_subscriptions",
        Gauge,
        "Active subscriptions.",
        |m, l, e| one(e, load(&m.subscriptions))
    ),
    family!(
        "starling_retained_messages",
        Gauge,
        "Retained messages stored.",
        |m, l, e| one(e, load(&m.retained))
    ),
    family!(
        "starling_protocol_errors_total",
        Counter,
        "Connections closed for protocol violations.",
        |m, l, e| one(e, load(&m.protocol_errors))
    ),
    family!(
        "starling_auth_failures_total",
        Counter,
        "Failed authentications.",
        |m, l, e| one(e, load(&m.auth_failures))
    ),
    family!(
        "starling_acl_refusals_total",
        Counter,
        "Publishes and subscriptions refused by ACL.",
        |m, l, e| one(e, load(&m.acl_refusals))
    ),
    family!(
        "starling_keepalive_timeouts_total",
        Counter,
        "Connections closed by keepalive timeout.",
        |m, l, e| one(e, load(&m.keepalive_timeouts))
    ),
    family!(
        "starling_auth_bundle_reloads_total",
        Counter,
        "Auth bundles put in force by a reload.",
        |m, l, e| one(e, load(&m.bundle_reloads))
    ),
    family!(
        "starling_auth_bundle_errors_total",
        Counter,
        "Auth bundles rejected (the old one stayed in force).",
        |m, l, e| one(e, load(&m.bundle_errors))
    ),
    family!(
        "starling_messages_received_total",
        Counter,
        "PUBLISH packets received from clients.",
        |m, l, e| by_qos(e, &m.messages_in)
    ),
    family!(
        "starling_messages_sent_total",
        Counter,
        "PUBLISH packets sent to clients.",
        |m, l, e| by_qos(e, &m.messages_out)
    ),
    family!(
        "starling_messages_dropped_total",
        Counter,
        "Messages dropped (queue full, expired, too large, refused).",
        |m, l, e| by_qos(e, &m.messages_dropped)
    ),
    family!(
        "starling_messages_dropped_by_reason_total",
        Counter,
        "Messages dropped, by reason (the same drops as starling_messages_dropped_total).",
        |m, l, e| for r in DropReason::ALL {
            e(&[("reason", r.label())], load(&m.drop_reasons[r as usize]));
        }
    ),
    family!(
        "starling_limit_refusals_total",
        Counter,
        "Things refused because a configured limit was reached, by limit.",
        |m, l, e| for lim in Limit::ALL {
            e(&[("limit", lim.label())], m.limit_count(lim));
        }
    ),
    family!(live "starling_sessions", Gauge, "Sessions kept (connected, and offline persistent ones).",
        |m, l, e| one(e, l.state.sessions)),
    family!(live "starling_queued_messages", Gauge, "Messages waiting in session queues.",
        |m, l, e| one(e, l.state.queued_messages)),
    family!(live "starling_queued_bytes", Gauge, "Topic and payload bytes waiting in session queues.",
        |m, l, e| one(e, l.state.queued_bytes)),
    family!(live "starling_connections_parked", Gauge, "Idle plain-TCP connections parked without a task (also counted in starling_connections).",
        |m, l, e| one(e, l.state.parked)),
    family!(live "starling_inflight_messages", Gauge, "QoS 1/2 messages sent to clients and not yet acknowledged.",
        |m, l, e| one(e, l.state.inflight)),
    family!(
        "starling_ws_streams",
        Gauge,
        "Open native WebSocket topic streams.",
        |m, l, e| one(e, load(&m.ws_streams))
    ),
    family!(
        "starling_store_commits_total",
        Counter,
        "Group commits written by the store.",
        |m, l, e| one(e, load(&m.store_commits))
    ),
    family!(
        "starling_store_write_errors_total",
        Counter,
        "Store commits that failed (disk full or failing).",
        |m, l, e| one(e, load(&m.store_write_errors))
    ),
    family!(
        "starling_store_written_bytes_total",
        Counter,
        "Key and value bytes the store committed.",
        |m, l, e| one(e, load(&m.store_bytes_written))
    ),
    family!(
        "starling_store_refusals_total",
        Counter,
        "QoS 1/2 publishes refused because the store could not write.",
        |m, l, e| one(e, load(&m.store_refusals))
    ),
    family!(live "starling_lvc_entries", Gauge, "Topics in the last-value cache.",
        |m, l, e| one(e, l.lvc.entries as u64)),
    family!(live "starling_lvc_bytes", Gauge, "Topic and payload bytes in the last-value cache.",
        |m, l, e| one(e, l.lvc.bytes as u64)),
    family!(live "starling_lvc_evictions_total", Counter, "Topics evicted from the last-value cache by its caps.",
        |m, l, e| one(e, l.lvc.evictions)),
    family!(
        "starling_http_requests_total",
        Counter,
        "HTTP requests on the http/https listeners, by route and status.",
        |m, l, e| for route in HttpRoute::ALL {
            for (i, c) in m.http.requests[route as usize].iter().enumerate() {
                let v = load(c);
                if v > 0 {
                    e(&[("route", route.label()), ("status", STATUS_LABELS[i])], v);
                }
            }
        }
    ),
    family!(
        "starling_admin_requests_total",
        Counter,
        "Admin API requests, by route template, method and status.",
        |m, l, e| m.admin.each_count(e)
    ),
];

/// Histogram families: Prometheus only (OpenTelemetry has no observable
/// histogram; request durations travel as span durations there).
const HTTP_DURATION: &str = "starling_http_request_duration_seconds";
const HTTP_DURATION_HELP: &str =
    "Time to answer an HTTP request (for upgrades: until the 101), by route.";
const ADMIN_DURATION: &str = "starling_admin_request_duration_seconds";
const ADMIN_DURATION_HELP: &str =
    "Time to answer an admin API request, by route template and method.";

#[derive(Debug)]
struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

type Labels = Vec<(&'static str, String)>;
type HistogramSeries = Vec<(Labels, HistogramSnapshot)>;

/// The values of one scrape, copied out of the atomics so the encoder owns
/// them.
#[derive(Debug)]
struct Scrape {
    families: Vec<(&'static Family, Vec<(Labels, u64)>)>,
    /// (name, help, series)
    histograms: Vec<(&'static str, &'static str, HistogramSeries)>,
}

impl Scrape {
    fn take(m: &Metrics, live: &Live) -> Scrape {
        let families = FAMILIES
            .iter()
            .map(|f| {
                let mut samples = Vec::new();
                f.read(m, live, &mut |labels, v| {
                    let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
                    samples.push((labels, v));
                });
                (f, samples)
            })
            .collect();
        let http = HttpRoute::ALL
            .iter()
            .map(|r| {
                (
                    vec![("route", r.label().to_owned())],
                    m.http.timings[*r as usize].snapshot(),
                )
            })
            .collect();
        let admin = {
            let routes = m.admin.routes.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = routes
                .iter()
                .map(|((route, method), r)| {
                    (
                        vec![("route", route.to_string()), ("method", method.to_string())],
                        r.timings.snapshot(),
                    )
                })
                .collect();
            // A stable order makes scrapes diffable.
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        Scrape {
            families,
            histograms: vec![
                (HTTP_DURATION, HTTP_DURATION_HELP, http),
                (ADMIN_DURATION, ADMIN_DURATION_HELP, admin),
            ],
        }
    }
}

fn sample(kind: Kind, me: MetricEncoder, v: u64) -> std::fmt::Result {
    match kind {
        Kind::Counter => ConstCounter::new(v).encode(me),
        Kind::Gauge => ConstGauge::new(v).encode(me),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for (f, samples) in &self.families {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut me = encoder.encode_descriptor(f.base_name(), f.help, None, kind)?;
            match samples.as_slice() {
                [(labels, v)] if labels.is_empty() => sample(f.kind, me, *v)?,
                _ => {
                    for (labels, v) in samples {
                        sample(f.kind, me.encode_family(labels)?, *v)?;
                    }
                }
            }
        }
        for (name, help, series) in &self.histograms {
            let mut me = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, h) in series {
                me.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                    h.sum,
                    h.count,
                    &h.buckets,
                    None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                )?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self, lvc: LvcStats, state: StateGauges) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape::take(self, &Live { lvc, state })));
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_labels_and_values() {
        let m = Arc::new(Metrics::default());
        m.dropped(1, DropReason::QueueFull);
        m.dropped(0, DropReason::Expired);
        inc(&m.messages_in[2]);
        {
            let mut c = m.open_connection(Listener::Mqtts);
            c.connected(starling_codec::ProtocolVersion::V5);
            let text = m.render(LvcStats::default(), StateGauges::default());
            assert!(text.contains("\nstarling_connections 1\n"), "{text}");
            assert!(
                text.contains(r#"starling_listener_connections{listener="mqtts"} 1"#),
                "{text}"
            );
            assert!(
                text.contains(r#"starling_mqtt_clients{listener="mqtts",protocol="5.0"} 1"#),
                "{text}"
            );
        }
        m.http
            .observe(HttpRoute::Publish, 200, Duration::from_millis(3));
        m.admin.observe(
            "/api/v4/clients/{clientid}",
            "GET",
            404,
            Duration::from_millis(2),
        );
        m.admin.observe(
            "/api/v4/clients/{clientid}",
            "GET",
            404,
            Duration::from_secs(20),
        );
        let text = m.render(
            LvcStats::default(),
            StateGauges {
                sessions: 4,
                ..Default::default()
            },
        );
        for line in [
            "# TYPE starling_connections gauge",
            "starling_connections 0",
            "# TYPE starling_messages_dropped counter",
            r#"starling_messages_dropped_total{qos="1"} 1"#,
            r#"starling_messages_dropped_by_reason_total{reason="queue_full"} 1"#,
            r#"starling_messages_dropped_by_reason_total{reason="expired"} 1"#,
            r#"starling_messages_received_total{qos="2"} 1"#,
            r#"starling_listener_connections_accepted_total{listener="mqtts"} 1"#,
            r#"starling_listener_connections{listener="mqtts"} 0"#,
            r#"starling_mqtt_connects_total{listener="mqtts",protocol="5.0"} 1"#,
            r#"starling_mqtt_clients{listener="mqtts",protocol="5.0"} 0"#,
            "starling_sessions 4",
            r#"starling_http_requests_total{route="publish",status="200"} 1"#,
            r#"starling_http_request_duration_seconds_bucket{le="0.005",route="publish"} 1"#,
            r#"starling_admin_requests_total{route="/api/v4/clients/{clientid}",method="GET",status="404"} 2"#,
            r#"starling_admin_request_duration_seconds_count{route="/api/v4/clients/{clientid}",method="GET"} 2"#,
            r#"starling_admin_request_duration_seconds_bucket{le="10.0",route="/api/v4/clients/{clientid}",method="GET"} 1"#,
            r#"starling_admin_request_duration_seconds_bucket{le="+Inf",route="/api/v4/clients/{clientid}",method="GET"} 2"#,
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.admin.count("/api/v4/clients/{clientid}", "GET", 404), 2);
    }

    #[test]
    fn family_names_are_unique_and_typed_by_suffix() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(seen.insert(f.base_name()), "{} twice", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
        }
    }
}

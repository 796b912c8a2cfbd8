//! Process-wide counters. Plain relaxed atomics: they are read by `/metrics`
//! and tests, never used for decisions, so ordering does not matter and the
//! hot path pays one uncontended add.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub messages_in: [AtomicU64; 3],
    pub messages_out: [AtomicU64; 3],
    pub messages_dropped: [AtomicU64; 3],
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
    pub http: HttpMetrics,
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
/// Duration histogram bucket bounds in seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Requests by route and status, and a duration histogram per route.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// [route][status index, last = other]
    requests: [[AtomicU64; STATUSES.len() + 1]; HttpRoute::ALL.len()],
    /// [route][bucket, last = +Inf]
    buckets: [[AtomicU64; BUCKETS.len() + 1]; HttpRoute::ALL.len()],
    /// Microseconds, summed per route.
    sum_us: [AtomicU64; HttpRoute::ALL.len()],
}

impl HttpMetrics {
    pub fn observe(&self, route: HttpRoute, status: u16, took: Duration) {
        let r = route as usize;
        let si = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len());
        inc(&self.requests[r][si]);
        let secs = took.as_secs_f64();
        let bi = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        inc(&self.buckets[r][bi]);
        add(
            &self.sum_us[r],
            took.as_micros().min(u128::from(u64::MAX)) as u64,
        );
    }

    /// Requests answered so far on `route` with `status` (tests read this).
    pub fn count(&self, route: HttpRoute, status: u16) -> u64 {
        let si = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len());
        self.requests[route as usize][si].load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let name = "starling_http_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP requests on the http/https listeners, by route and status.\n# TYPE {name} counter"
        );
        for route in HttpRoute::ALL {
            for (i, c) in self.requests[route as usize].iter().enumerate() {
                let v = g(c);
                if v == 0 {
                    continue;
                }
                let status = STATUSES
                    .get(i)
                    .map_or_else(|| "other".to_string(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\",status=\"{status}\"}} {v}",
                    route.label()
                );
            }
        }
        let name = "starling_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to answer an HTTP request (for upgrades: until the 101), by route.\n# TYPE {name} histogram"
        );
        for route in HttpRoute::ALL {
            let r = route as usize;
            let mut cum = 0;
            for (i, c) in self.buckets[r].iter().enumerate() {
                cum += g(c);
                let le = BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{}\",le=\"{le}\"}} {cum}",
                    route.label()
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{route=\"{}\"}} {}\n{name}_count{{route=\"{}\"}} {cum}",
                route.label(),
                g(&self.sum_us[r]) as f64 / 1e6,
                route.label()
            );
        }
    }
}

/// The last-value cache's size, for `/metrics`.
#[derive(Debug, Clone, Copy)]
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

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self, lvc: LvcStats, state: StateGauges) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "starling_connections",
            "gauge",
            "Open client connections.",
            g(&self.connections_current),
        );
        one(
            "starling_connections_accepted_total",
            "counter",
            "Accepted client connections.",
            g(&self.connections_total),
        );
        one(
            "starling_connections_refused_total",
            "counter",
            "Connections refused (limits, auth, bad CONNECT).",
            g(&self.connections_refused),
        );
        one(
            "starling_bytes_received_total",
            "counter",
            "Bytes read from clients.",
            g(&self.bytes_in),
        );
        one(
            "starling_bytes_sent_total",
            "counter",
            "Bytes written to clients.",
            g(&self.bytes_out),
        );
        one(
            "starling_subscriptions",
            "gauge",
            "Active subscriptions.",
            g(&self.subscriptions),
        );
        one(
            "starling_retained_messages",
            "gauge",
            "Retained messages stored.",
            g(&self.retained),
        );
        one(
            "starling_protocol_errors_total",
            "counter",
            "Connections closed for protocol violations.",
            g(&self.protocol_errors),
        );
        one(
            "starling_auth_failures_total",
            "counter",
            "Failed authentications.",
            g(&self.auth_failures),
        );
        one(
            "starling_acl_refusals_total",
            "counter",
            "Publishes and subscriptions refused by ACL.",
            g(&self.acl_refusals),
        );
        one(
            "starling_keepalive_timeouts_total",
            "counter",
            "Connections closed by keepalive timeout.",
            g(&self.keepalive_timeouts),
        );
        one(
            "starling_auth_bundle_reloads_total",
            "counter",
            "Auth bundles put in force by a reload.",
            g(&self.bundle_reloads),
        );
        one(
            "starling_auth_bundle_errors_total",
            "counter",
            "Auth bundles rejected (the old one stayed in force).",
            g(&self.bundle_errors),
        );
        for (name, help, arr) in [
            (
                "starling_messages_received_total",
                "PUBLISH packets received from clients.",
                &self.messages_in,
            ),
            (
                "starling_messages_sent_total",
                "PUBLISH packets sent to clients.",
                &self.messages_out,
            ),
            (
                "starling_messages_dropped_total",
                "Messages dropped (queue full, expired, too large, refused).",
                &self.messages_dropped,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (q, c) in arr.iter().enumerate() {
                let _ = writeln!(out, "{name}{{qos=\"{q}\"}} {}", g(c));
            }
        }
        let name = "starling_limit_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Things refused because a configured limit was reached, by limit.\n# TYPE {name} counter"
        );
        for l in Limit::ALL {
            let _ = writeln!(
                out,
                "{name}{{limit=\"{}\"}} {}",
                l.label(),
                self.limit_count(l)
            );
        }
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "starling_sessions",
            "gauge",
            "Sessions kept (connected, and offline persistent ones).",
            state.sessions,
        );
        one(
            "starling_queued_messages",
            "gauge",
            "Messages waiting in session queues.",
            state.queued_messages,
        );
        one(
            "starling_queued_bytes",
            "gauge",
            "Topic and payload bytes waiting in session queues.",
            state.queued_bytes,
        );
        one(
            "starling_inflight_messages",
            "gauge",
            "QoS 1/2 messages sent to clients and not yet acknowledged.",
            state.inflight,
        );
        one(
            "starling_ws_streams",
            "gauge",
            "Open native WebSocket topic streams.",
            g(&self.ws_streams),
        );
        one(
            "starling_store_commits_total",
            "counter",
            "Group commits written by the store.",
            g(&self.store_commits),
        );
        one(
            "starling_store_write_errors_total",
            "counter",
            "Store commits that failed (disk full or failing).",
            g(&self.store_write_errors),
        );
        one(
            "starling_store_written_bytes_total",
            "counter",
            "Key and value bytes the store committed.",
            g(&self.store_bytes_written),
        );
        one(
            "starling_store_refusals_total",
            "counter",
            "QoS 1/2 publishes refused because the store could not write.",
            g(&self.store_refusals),
        );
        one(
            "starling_lvc_entries",
            "gauge",
            "Topics in the last-value cache.",
            lvc.entries as u64,
        );
        one(
            "starling_lvc_bytes",
            "gauge",
            "Topic and payload bytes in the last-value cache.",
            lvc.bytes as u64,
        );
        one(
            "starling_lvc_evictions_total",
            "counter",
            "Topics evicted from the last-value cache by its caps.",
            lvc.evictions,
        );
        self.http.render(&mut out);
        out
    }
}

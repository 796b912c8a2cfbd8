//! Process-wide counters. Plain relaxed atomics: they are read by `/metrics`
//! and tests, never used for decisions, so ordering does not matter and the
//! hot path pays one uncontended add.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
    pub fn render(&self) -> String {
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
            "starling_connections_total",
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
        out
    }
}

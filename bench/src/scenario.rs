//! The benchmark scenarios and the load they generate.
//!
//! Everything runs on one thread (a current-thread tokio runtime inside a
//! `LocalSet`), so all connections share one epoll instance and counters are
//! plain `Cell`s: no atomics, no locks, no allocation per message. Reads are
//! 64 KiB, all packets produced by one wake-up of a connection go out in one
//! write, and every socket has TCP_NODELAY.
//!
//! Every PUBLISH payload starts with a 20-byte header: send time (ns since the
//! run's base instant, little endian u64), publisher index (u32) and sequence
//! number (u64). Subscribers take the latency from it and count loss and
//! reordering per publisher.

use crate::mqtt::{self, Conn, PUBACK, PUBLISH, Version};
use crate::sys;
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

pub const PAYLOAD_HEADER: usize = 20;

/// What a scenario does.
#[derive(Clone, Debug)]
pub enum Spec {
    /// Publishers → subscribers. `fan_in`: each publisher has its own topic
    /// and subscribers use a `+` wildcard; otherwise all share one topic.
    PubSub {
        pubs: usize,
        subs: usize,
        qos: u8,
        payload: usize,
        /// Messages per second per publisher; None = as fast as possible.
        rate: Option<f64>,
        fan_in: bool,
        /// Subscribers read at most 64 KiB per 10 ms (~6 MB/s): an
        /// overload in which the broker must hold its memory.
        slow_sub: bool,
        /// Subscribers are persistent sessions (3.1.1 clean session 0, 5:
        /// clean start 0 with a session expiry), so that a broker with a
        /// store writes every QoS 1 delivery.
        persistent: bool,
    },
    /// `pubs` publishers at an unlimited rate, QoS 1, into one persistent
    /// session that is offline during the window (everything is queued,
    /// to the store where there is one); then the session reconnects and
    /// must receive every message that was PUBACKed.
    Queue { pubs: usize, payload: usize },
    /// `messages` QoS 1 messages (from `pubs` publishers) queued into one
    /// offline persistent session, then `kill -9`, restart on the same data
    /// directory, reconnect: restart time and loss. Starling with a store only.
    Restart {
        pubs: usize,
        messages: u64,
        payload: usize,
    },
    /// 1 publisher → `sessions` offline persistent sessions, QoS 1,
    /// `messages` messages: the store's written bytes per message. Starling
    /// with a store only.
    StoreBytes {
        sessions: usize,
        messages: u64,
        payload: usize,
    },
    /// Many publishers that each send little (issue 14: the shape most IoT
    /// brokers live in): `pubs` publishers at `rate` msg/s each, each on its
    /// own topic, → 1 subscriber on a `+` wildcard. Each publisher's sends
    /// are due at fixed times, offset by i/`pubs` of the period (1/`rate`)
    /// from publisher to publisher, so the load is spread evenly over the
    /// period; each is one message in one write. `sparse`: also the broker's
    /// RSS per connection (kind `sparse`; otherwise `latency`, as c-latency).
    Many {
        pubs: usize,
        qos: u8,
        payload: usize,
        rate: f64,
        sparse: bool,
    },
    /// Open `conns` connections, hold them idle, measure the broker's RSS.
    Idle { conns: usize },
    /// `workers` loops of connect / CONNACK / DISCONNECT.
    Connect { workers: usize },
    /// `clients` keep-alive HTTP/1.1 connections, each POSTing to
    /// `/broker/<topic>` and waiting for the response before the next
    /// request (closed loop, unlimited rate) → 1 MQTT subscriber. Reference
    /// (same run, fresh process, same load): the `http-anchor` hyper server.
    Http {
        clients: usize,
        qos: u8,
        payload: usize,
    },
    /// 1 MQTT publisher at a fixed rate → `subs` WebSocket topic streams
    /// (`ws://host/<topic>`). Reference (same run, fresh broker, same rate):
    /// the same publisher → `subs` MQTT subscribers.
    WsFanout {
        subs: usize,
        rate: f64,
        payload: usize,
    },
    /// `idle` MQTT connections held open, then the `c-latency-q1` load
    /// (10 publishers × 1,000 msg/s → 1 subscriber, QoS 1, 64 B) while
    /// `clients` keep-alive HTTP clients list every client through the
    /// admin API back to back (`GET /api/v4/clients`, paged by 1,000, and
    /// NanoMQ's `POST /api/v1` req 5). Reference (same run, fresh broker,
    /// same idle connections and MQTT load): no admin requests.
    AdminLatency { idle: usize, clients: usize },
}

/// Which measurement of a run: the scenario itself, or the reference some
/// scenarios take in the same run against a fresh process (see
/// [`Scenario::reference`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Reference,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub id: String,
    pub title: String,
    pub spec: Spec,
    /// Measured window, seconds.
    pub secs: f64,
}

impl Scenario {
    /// Connections the broker must accept (for Starling's limit env).
    pub fn connections(&self) -> usize {
        match self.spec {
            Spec::PubSub { pubs, subs, .. } => pubs + subs,
            Spec::Many { pubs, .. } => pubs + 1,
            Spec::Queue { pubs, .. } | Spec::Restart { pubs, .. } => pubs + 1,
            Spec::StoreBytes { sessions, .. } => sessions + 1,
            Spec::Idle { conns } => conns,
            Spec::Connect { workers } => workers,
            Spec::Http { clients, .. } => clients + 1,
            // Publisher, subscribers, and the connection that publishes
            // the retained readiness marker.
            Spec::WsFanout { subs, .. } => subs + 2,
            Spec::AdminLatency { idle, .. } => idle + ADMIN_PUBS + 1,
        }
    }

    /// Runs at a fixed rate, where latency is the point.
    pub fn latency_sensitive(&self) -> bool {
        matches!(
            self.spec,
            Spec::PubSub { rate: Some(_), .. }
                | Spec::Many { .. }
                | Spec::WsFanout { .. }
                | Spec::AdminLatency { .. }
        )
    }

    /// Whether `broker` has what the scenario needs: the HTTP interface and
    /// WebSocket topic streams are Starling's alone; a restart that keeps
    /// the queue and the store's byte counter need Starling's store. The
    /// memory-only Starling runs only the persistence scenarios that have
    /// something to compare (the reference for what the store costs), and
    /// rumqttd none of them.
    pub fn supports(&self, broker: crate::broker::Kind) -> bool {
        use crate::broker::Kind;
        match self.spec {
            Spec::Http { .. } | Spec::WsFanout { .. } | Spec::AdminLatency { .. } => {
                broker == Kind::Starling
            }
            Spec::Restart { .. } | Spec::StoreBytes { .. } => broker == Kind::Starling,
            Spec::PubSub {
                persistent: true, ..
            }
            | Spec::Queue { .. } => broker != Kind::Rumqttd,
            _ => broker != Kind::StarlingMem,
        }
    }

    /// Queue caps (messages, bytes) the scenario needs above the brokers'
    /// defaults, so that nothing it queues is dropped legitimately.
    pub fn queue_caps(&self) -> Option<(usize, usize)> {
        match self.spec {
            // Both fit mosquitto's int parsing as well.
            Spec::Queue { .. } | Spec::Restart { .. } => Some((20_000_000, 2_000_000_000)),
            Spec::StoreBytes { messages, .. } => {
                Some(((messages as usize).max(1000) * 2, 1_000_000_000))
            }
            _ => None,
        }
    }

    /// What the reference measurement of this scenario is, if it has one.
    pub fn reference(&self) -> Option<&'static str> {
        match self.spec {
            Spec::Http { .. } => Some("hyper anchor"),
            Spec::WsFanout { .. } => Some("MQTT subscribers"),
            Spec::AdminLatency { .. } => Some("no admin load"),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match &self.spec {
            Spec::PubSub { slow_sub: true, .. } => "overload",
            Spec::Queue { .. } => "queue",
            Spec::Restart { .. } => "restart",
            Spec::StoreBytes { .. } => "storebytes",
            Spec::PubSub { rate: None, .. } => "throughput",
            Spec::PubSub { fan_in: true, .. } => "latency",
            Spec::Many { sparse: true, .. } => "sparse",
            Spec::Many { .. } => "latency",
            Spec::PubSub { .. } => "fixed",
            Spec::Idle { .. } => "idle",
            Spec::Connect { .. } => "connect",
            Spec::Http { .. } => "http",
            Spec::WsFanout { .. } => "wsfanout",
            Spec::AdminLatency { .. } => "admin",
        }
    }
}

/// Keep-alive HTTP clients of `f-http`: enough that neither Starling nor
/// the anchor waits on the network between requests (each connection has
/// one request outstanding).
pub const HTTP_CLIENTS: usize = 32;

pub struct Durations {
    pub throughput: f64,
    pub latency: f64,
    pub connect: f64,
    /// Keep-alive connections of `f-http` (default [`HTTP_CLIENTS`]).
    pub http_clients: usize,
    /// Messages queued before the restart of `p-restart-1m`.
    pub restart_messages: u64,
    /// Messages of `p-fanout-1000-bytes`.
    pub store_bytes_messages: u64,
    /// Publishers of `i-many-q*` (default [`MANY_PUBS`]).
    pub many_pubs: usize,
    /// Connection counts of `i-sparse-*` (default [`SPARSE_CONNS`]; each
    /// run only if `ulimit -n` allows).
    pub sparse: Vec<usize>,
    /// Seconds between two messages of one `i-sparse` connection (default
    /// [`SPARSE_PERIOD`]).
    pub sparse_period: f64,
}

/// The full list (a–e), with the idle connection counts that fit `nofile`.
/// Returns the scenarios and notes about the ones left out.
pub fn all(d: &Durations, nofile: u64, idle_counts: &[usize]) -> (Vec<Scenario>, Vec<String>) {
    let mut v = Vec::new();
    let mut notes = Vec::new();
    for qos in [0u8, 1] {
        for (payload, pl) in [(64usize, "64B"), (1024, "1KiB")] {
            v.push(Scenario {
                id: format!("a-fanin-q{qos}-{pl}"),
                title: format!("a. fan-in 8→1 (wildcard), QoS {qos}, {pl}, unlimited"),
                spec: Spec::PubSub {
                    pubs: 8,
                    subs: 1,
                    qos,
                    payload,
                    rate: None,
                    fan_in: true,
                    slow_sub: false,
                    persistent: false,
                },
                secs: d.throughput,
            });
        }
    }
    // Fixed rate: 50,000 deliveries/s in both fan-outs, below every peer's
    // ceiling, so CPU per delivery and latency compare at equal load.
    for (subs, fixed) in [(100usize, 500.0), (1000, 50.0)] {
        for rate in [Some(fixed), None] {
            let (tag, what) = match rate {
                Some(r) => ("fixed", format!("{r} msg/s")),
                None => ("max", "unlimited".to_string()),
            };
            v.push(Scenario {
                id: format!("b-fanout-{subs}-{tag}"),
                title: format!("b. fan-out 1→{subs}, QoS 0, 64B, {what}"),
                spec: Spec::PubSub {
                    pubs: 1,
                    subs,
                    qos: 0,
                    payload: 64,
                    rate,
                    fan_in: false,
                    slow_sub: false,
                    persistent: false,
                },
                secs: d.throughput,
            });
        }
    }
    for qos in [0u8, 1] {
        v.push(Scenario {
            id: format!("c-latency-q{qos}"),
            title: format!("c. latency 10×1,000 msg/s→1, QoS {qos}, 64B"),
            spec: Spec::PubSub {
                pubs: 10,
                subs: 1,
                qos,
                payload: 64,
                rate: Some(1000.0),
                fan_in: true,
                slow_sub: false,
                persistent: false,
            },
            secs: d.latency,
        });
    }
    // Overload: a publisher much faster than its subscriber. QoS 0 may drop,
    // QoS 1 must push back on the publisher; neither may grow the broker's
    // memory without bound (broker RSS is sampled through the window).
    for qos in [0u8, 1] {
        v.push(Scenario {
            id: format!("o-overload-q{qos}"),
            title: format!(
                "o. overload: 1 publisher unlimited → 1 slow subscriber (~6 MB/s), QoS {qos}, 1KiB"
            ),
            spec: Spec::PubSub {
                pubs: 1,
                subs: 1,
                qos,
                payload: 1024,
                rate: None,
                fan_in: false,
                slow_sub: true,
                persistent: false,
            },
            secs: d.throughput * 1.5,
        });
    }
    for &n in idle_counts {
        // The generator holds n sockets, the broker n + a few.
        if (n as u64) + 200 > nofile {
            notes.push(format!(
                "d-idle-{}k skipped: `ulimit -n` hard limit {nofile} < {} connections + margin",
                n / 1000,
                n
            ));
            continue;
        }
        v.push(Scenario {
            id: if n % 1000 == 0 {
                format!("d-idle-{}k", n / 1000)
            } else {
                format!("d-idle-{n}")
            },
            title: format!("d. {n} idle connections"),
            spec: Spec::Idle { conns: n },
            secs: 2.0,
        });
    }
    v.push(Scenario {
        id: "e-connect".into(),
        title: "e. connection setup (16 loops of connect/CONNACK/DISCONNECT)".into(),
        spec: Spec::Connect { workers: 16 },
        secs: d.connect,
    });
    v.push(Scenario {
        id: "f-http".into(),
        title: format!(
            "f. HTTP: {} keep-alive clients POST /broker/<topic> → 1 MQTT subscriber, QoS 0, 64B, unlimited",
            d.http_clients
        ),
        spec: Spec::Http {
            clients: d.http_clients.max(1),
            qos: 0,
            payload: 64,
        },
        secs: d.throughput,
    });
    // Same load as b-fanout-100-fixed: 50,000 deliveries/s.
    v.push(Scenario {
        id: "g-ws-fanout".into(),
        title: "g. fan-out 1→100 WebSocket topic streams vs 100 MQTT subscribers, QoS 0, 64B, 500 msg/s"
            .into(),
        spec: Spec::WsFanout {
            subs: 100,
            rate: 500.0,
            payload: 64,
        },
        secs: d.throughput,
    });
    push_admin_latency(&mut v, &mut notes, d, nofile);
    push_many(&mut v, &mut notes, d, nofile);
    persistence(d, &mut v);
    (v, notes)
}

/// Idle connections of `h-admin-latency-q1` (issue 10: listing 10,000
/// connected clients); fewer where `ulimit -n` does not allow them.
pub const ADMIN_IDLE: usize = 10_000;
/// Keep-alive HTTP clients of the admin load, each one request at a time.
pub const ADMIN_CLIENTS: usize = 2;
/// Clients per `GET /api/v4/clients` page.
pub const ADMIN_PAGE: usize = 1000;
/// Publishers of the `c-latency-q1` load.
const ADMIN_PUBS: usize = 10;

fn push_admin_latency(v: &mut Vec<Scenario>, notes: &mut Vec<String>, d: &Durations, nofile: u64) {
    // As d-idle: the generator holds the connections, the broker as many
    // plus a few; leave room for both and the MQTT load.
    let fits = (nofile as usize).saturating_sub(500) / ADMIN_PAGE * ADMIN_PAGE;
    let idle = ADMIN_IDLE.min(fits);
    if idle == 0 {
        notes.push(format!(
            "h-admin-latency-q1 skipped: `ulimit -n` hard limit {nofile} leaves no room for idle connections"
        ));
        return;
    }
    if idle < ADMIN_IDLE {
        notes.push(format!(
            "h-admin-latency-q1 with {idle} idle clients instead of {ADMIN_IDLE}: `ulimit -n` hard limit {nofile}"
        ));
    }
    v.push(Scenario {
        id: "h-admin-latency-q1".into(),
        title: format!(
            "h. c-latency-q1 with {idle} idle clients, while {ADMIN_CLIENTS} HTTP clients list them (admin API) vs without"
        ),
        spec: Spec::AdminLatency {
            idle,
            clients: ADMIN_CLIENTS,
        },
        secs: d.latency,
    });
}

/// Publishers of `i-many-q*`, each at [`MANY_RATE`] msg/s.
pub const MANY_PUBS: usize = 1000;
pub const MANY_RATE: f64 = 20.0;
/// Connections of `i-sparse-*` (where `ulimit -n` allows), each publishing
/// one message every [`SPARSE_PERIOD`] seconds.
pub const SPARSE_CONNS: &str = "10000,50000";
pub const SPARSE_PERIOD: f64 = 5.0;

/// Many clients that each send little (issue 14, `i-`).
fn push_many(v: &mut Vec<Scenario>, notes: &mut Vec<String>, d: &Durations, nofile: u64) {
    for qos in [0u8, 1] {
        v.push(Scenario {
            id: format!("i-many-q{qos}"),
            title: format!(
                "i. many: {}×{MANY_RATE} msg/s (staggered)→1 (wildcard), QoS {qos}, 64B",
                grouped(d.many_pubs)
            ),
            spec: Spec::Many {
                pubs: d.many_pubs.max(1),
                qos,
                payload: 64,
                rate: MANY_RATE,
                sparse: false,
            },
            secs: d.latency,
        });
    }
    let period = d.sparse_period.max(0.01);
    for &n in d.sparse.iter().filter(|n| **n > 0) {
        let id = if n % 1000 == 0 {
            format!("i-sparse-{}k", n / 1000)
        } else {
            format!("i-sparse-{n}")
        };
        // As d-idle: the generator holds n sockets, the broker n + a few.
        if (n as u64) + 200 > nofile {
            notes.push(format!(
                "{id} skipped: `ulimit -n` hard limit {nofile} < {n} connections + margin"
            ));
            continue;
        }
        v.push(Scenario {
            id,
            title: format!(
                "i. sparse: {} connections × 1 msg / {period} s (staggered)→1 (wildcard), QoS 1, 64B",
                grouped(n)
            ),
            spec: Spec::Many {
                pubs: n,
                qos: 1,
                payload: 64,
                rate: 1.0 / period,
                sparse: true,
            },
            // Two periods: every connection publishes twice in the window.
            secs: d.latency.max(2.0 * period),
        });
    }
}

/// `50000` → `50,000`.
pub fn grouped(n: usize) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, ch) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The persistence scenarios of issue 13 (`p-`).
fn persistence(d: &Durations, v: &mut Vec<Scenario>) {
    v.push(Scenario {
        id: "p-fanin-q1-persistent".into(),
        title: "p. fan-in 8→1 (wildcard) into a persistent session, QoS 1, 64B, unlimited".into(),
        spec: Spec::PubSub {
            pubs: 8,
            subs: 1,
            qos: 1,
            payload: 64,
            rate: None,
            fan_in: true,
            slow_sub: false,
            persistent: true,
        },
        secs: d.throughput,
    });
    v.push(Scenario {
        id: "p-fanin-q1-offline".into(),
        title: "p. fan-in 8→1 into an offline persistent session (pure queueing), QoS 1, 64B, unlimited"
            .into(),
        spec: Spec::Queue {
            pubs: 8,
            payload: 64,
        },
        secs: d.throughput,
    });
    let n = d.restart_messages;
    v.push(Scenario {
        id: "p-restart-1m".into(),
        title: format!(
            "p. restart after kill -9 with {} QoS 1 messages (64B) queued for an offline session",
            crate::report::fmt_num(n as f64)
        ),
        spec: Spec::Restart {
            pubs: 8,
            messages: n,
            payload: 64,
        },
        // Publishing, restart and delivery are bounded by their own
        // deadlines; this is the window the run's overall limit adds to.
        secs: 60.0,
    });
    v.push(Scenario {
        id: "p-fanout-1000-bytes".into(),
        title: format!(
            "p. fan-out 1→1000 offline persistent sessions, QoS 1, 1KiB, {} messages: store bytes",
            d.store_bytes_messages
        ),
        spec: Spec::StoreBytes {
            sessions: 1000,
            messages: d.store_bytes_messages,
            payload: 1024,
        },
        secs: 30.0,
    });
}

/// Percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Lat {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One JSON line: one scenario, one broker, one repetition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub scenario: String,
    pub kind: String,
    pub title: String,
    pub broker: String,
    pub broker_version: String,
    pub rep: u32,
    pub unix_time: u64,
    pub mqtt: String,
    pub ok: bool,
    /// Measured window, seconds (wall clock).
    pub secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<usize>,
    /// Target publish rate, all publishers together, msg/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_target: Option<f64>,
    /// Publish rate achieved in the window, msg/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pub_per_s: Option<f64>,
    /// Deliveries (all subscribers) per second in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_per_s: Option<f64>,
    /// Messages the broker took responsibility for (QoS 0: written; QoS 1: PUBACKed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
    /// QoS 1 messages written but never PUBACKed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unacked: Option<u64>,
    /// published × subscribers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    /// Deliveries seen (new sequence numbers), whole run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    /// Messages the broker dropped: `gaps` (a later message of the same
    /// publisher arrived), plus, for QoS 1 and fixed rates, what never
    /// arrived once delivery stalled. QoS 0 at an unlimited rate: gaps only
    /// (what was still unread in socket buffers at the end is not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// Expected deliveries that had not arrived when the run ended
    /// (QoS 1 and fixed rates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undelivered: Option<u64>,
    /// How the drain after the window ended: complete (everything
    /// arrived), stalled (nothing moved for a while: the rest is lost),
    /// deadline (still delivering after 5 s: the rest is `undelivered`,
    /// not counted as lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
    /// Sequence numbers skipped, summed over subscribers and publishers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gaps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_pct: Option<f64>,
    /// Deliveries whose sequence number was not above the last seen one
    /// (duplicates or reordering).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_order: Option<u64>,
    /// Send → receive (pub/sub) or connect → CONNACK (connect), microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lat_us: Option<Lat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conns_failed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conns_alive: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn: Option<f64>,
    /// HTTP requests answered 200 per second in the window (`f-http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req_per_s: Option<f64>,
    /// HTTP requests answered with another status, or that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_failed: Option<u64>,
    /// Send → receive latency at the MQTT subscriber when `lat_us` is
    /// something else (`f-http`: `lat_us` is request → response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_lat_us: Option<Lat>,
    /// Staggered publishers (`i-`): how late each write was against its
    /// schedule (due time → write), microseconds, in the window. The
    /// generator kept its rate if this stays small (p99 ≤ 5 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Lat>,
    /// Fixed-rate runs: PUBLISH packets per publisher write, whole run
    /// (1 = one message per write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgs_per_write: Option<f64>,
    /// Admin API request → whole response (`h-admin-latency-q1`, over the
    /// whole time the admin load ran; `req_per_s` is its rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_lat_us: Option<Lat>,
    /// Set on a reference measurement: what it is (`hyper anchor`, `MQTT
    /// subscribers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// The reference measured in the same run (fresh process, same load),
    /// for scenarios that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Box<Record>>,
    /// This run ÷ its reference: `f-http` requests/s, `g-ws-fanout` broker
    /// CPU per delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_reference: Option<f64>,
    /// p-restart: from the restart's spawn to the `ready` banner line, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_ready_ms: Option<f64>,
    /// p-restart: from the restart's spawn to the last queued message at
    /// the reconnected subscriber; p-fanin-q1-offline: from its reconnect
    /// to the last message. Milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_drained_ms: Option<f64>,
    /// p-fanout-bytes: the store's written key and value bytes per
    /// published message (`starling_store_written_bytes_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_bytes_per_msg: Option<f64>,
    /// … ÷ the payload size (1 = the payload once, nothing else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_bytes_vs_payload: Option<f64>,
    /// … minus one payload, ÷ the number of sessions: each session's own
    /// entry per message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_bytes_per_session: Option<f64>,
    /// The broker's writes to disk per message (`/proc/<pid>/io`
    /// write_bytes: journal, flushes, compaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_msg: Option<f64>,
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU time / wall time (1.0 = one core busy).
    pub broker_cpu_util: Option<f64>,
    /// Broker CPU µs per delivered message (or per connection).
    pub broker_cpu_us_per_msg: Option<f64>,
    pub broker_rss_mib: Option<f64>,
    pub broker_peak_rss_mib: Option<f64>,
    pub broker_threads: Option<u64>,
    /// Largest broker RSS sampled in the window, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_window_max_mib: Option<f64>,
    /// Broker RSS growth over the second half of the window, MiB/s
    /// (≈ 0: memory levelled off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_growth_mib_s: Option<f64>,
    pub gen_cpu_s: f64,
    pub gen_cpu_util: f64,
    /// CPU used by other processes on the machine during the window, cores.
    pub others_cpu_util: Option<f64>,
    /// Busy share of the generator's / broker's CPU, all processes (when pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_core_busy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_core_busy: Option<f64>,
    /// What limited the run: generator | broker | fixed rate | neither.
    pub limit: String,
    pub pinning: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Where the run goes and what is measured around it.
pub struct Ctx {
    pub addr: SocketAddr,
    /// The HTTP listener (Starling's plain one, or the anchor's).
    pub http: Option<SocketAddr>,
    /// Starling's admin listener, from its banner (`h-admin-latency-q1`,
    /// and `/metrics` for `p-fanout-1000-bytes`).
    pub admin: Option<SocketAddr>,
    pub broker_pid: Option<u32>,
    pub v: Version,
    /// CPU cores the generator / broker can use (for the limit verdict).
    pub gen_cores: f64,
    pub broker_cores: f64,
    pub pinning: String,
    /// CPUs the generator and the broker are pinned to.
    pub gen_cpu: Option<usize>,
    pub broker_cpu: Option<usize>,
    /// Publisher window (QoS 1 messages not yet PUBACKed).
    pub window: usize,
    /// Most messages per write when publishing without a rate.
    pub batch: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Warmup,
    Measure,
    Drain,
    Stop,
}

struct Shared {
    base: Instant,
    phase: Cell<Phase>,
    sent: Cell<u64>,
    published: Cell<u64>,
    delivered: Cell<u64>,
    out_of_order: Cell<u64>,
    gaps: Cell<u64>,
    malformed: Cell<u64>,
    pubs_done: Cell<usize>,
    conns: Cell<u64>,
    failed: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    /// Request → response (`f-http`).
    req_hist: RefCell<Histogram<u64>>,
    /// Staggered publishers: due time → write, in the window.
    lag_hist: RefCell<Histogram<u64>>,
    /// Publisher writes (each one or more PUBLISH packets).
    writes: Cell<u64>,
    /// Woken when the window ends (staggered publishers sleep up to a
    /// whole period between sends).
    drain: tokio::sync::Notify,
    errors: RefCell<Vec<String>>,
}

impl Shared {
    fn new() -> Result<Rc<Shared>> {
        Ok(Rc::new(Shared {
            base: Instant::now(),
            phase: Cell::new(Phase::Warmup),
            sent: Cell::new(0),
            published: Cell::new(0),
            delivered: Cell::new(0),
            out_of_order: Cell::new(0),
            gaps: Cell::new(0),
            malformed: Cell::new(0),
            pubs_done: Cell::new(0),
            conns: Cell::new(0),
            failed: Cell::new(0),
            hist: RefCell::new(
                Histogram::new_with_bounds(1, 120_000_000_000, 3).context("histogram")?,
            ),
            req_hist: RefCell::new(
                Histogram::new_with_bounds(1, 120_000_000_000, 3).context("histogram")?,
            ),
            lag_hist: RefCell::new(
                Histogram::new_with_bounds(1, 120_000_000_000, 3).context("histogram")?,
            ),
            writes: Cell::new(0),
            drain: tokio::sync::Notify::new(),
            errors: RefCell::new(Vec::new()),
        }))
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn add(c: &Cell<u64>, n: u64) {
        c.set(c.get() + n);
    }

    fn error(&self, what: String) {
        let mut e = self.errors.borrow_mut();
        if e.len() < 5 {
            e.push(what);
        }
    }

    fn stopping(&self) -> bool {
        self.phase.get() == Phase::Stop
    }
}

/// CPU and wall clock at one instant.
struct Meter {
    t: Instant,
    gen_cpu: Duration,
    broker_cpu: Option<Duration>,
    machine: Option<Vec<(u64, u64)>>,
}

fn meter(ctx: &Ctx) -> Meter {
    Meter {
        t: Instant::now(),
        gen_cpu: sys::self_cpu(),
        broker_cpu: ctx.broker_pid.and_then(|p| sys::proc_cpu(p).ok()),
        machine: sys::machine_cpu(),
    }
}

/// Fill the CPU fields of `rec` from two meters; returns the wall time.
fn account(ctx: &Ctx, a: &Meter, b: &Meter, rec: &mut Record) -> f64 {
    let wall = (b.t - a.t).as_secs_f64().max(1e-9);
    let gen_cpu = (b.gen_cpu.saturating_sub(a.gen_cpu)).as_secs_f64();
    rec.secs = wall;
    rec.gen_cpu_s = gen_cpu;
    rec.gen_cpu_util = gen_cpu / wall;
    let broker = match (a.broker_cpu, b.broker_cpu) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x).as_secs_f64()),
        _ => None,
    };
    rec.broker_cpu_s = broker;
    rec.broker_cpu_util = broker.map(|c| c / wall);
    if let (Some(x), Some(y)) = (&a.machine, &b.machine) {
        let busy = |i: usize| -> Option<f64> {
            let (b0, t0) = *x.get(i)?;
            let (b1, t1) = *y.get(i)?;
            let total = t1.saturating_sub(t0);
            (total > 0).then(|| b1.saturating_sub(b0) as f64 / total as f64)
        };
        if let (Some(&(b0, _)), Some(&(b1, _))) = (x.first(), y.first()) {
            let all = sys::jiffies_to_secs(b1.saturating_sub(b0));
            rec.others_cpu_util = Some(((all - gen_cpu - broker.unwrap_or(0.0)) / wall).max(0.0));
        }
        rec.gen_core_busy = ctx.gen_cpu.and_then(|c| busy(c + 1));
        rec.broker_core_busy = ctx.broker_cpu.and_then(|c| busy(c + 1));
    }
    rec.pinning = ctx.pinning.clone();
    wall
}

/// Generator or broker: whichever was close to its CPU capacity. A pinned
/// core that was saturated by the generator/broker together with other
/// processes (a shared machine) counts as a limit too, and says so.
pub fn verdict(rec: &Record, gen_cores: f64, broker_cores: f64, rate_met: Option<bool>) -> String {
    let g = rec.gen_cpu_util / gen_cores;
    let b = rec.broker_cpu_util.unwrap_or(0.0) / broker_cores;
    // Busy share of each pinned core, counting every process on it.
    let gc = rec.gen_core_busy.unwrap_or(g).max(g) >= 0.92;
    let bc = rec.broker_core_busy.unwrap_or(b).max(b) >= 0.92;
    let (own_g, own_b) = (g >= 0.85, b >= 0.85);
    if own_g && own_b {
        return if (g - b).abs() < 0.05 {
            "both".into()
        } else if g > b {
            "generator".into()
        } else {
            "broker".into()
        };
    }
    if own_g {
        return "generator".into();
    }
    if own_b {
        return "broker".into();
    }
    let busy = if gc || bc {
        " (CPUs shared with other processes)"
    } else {
        ""
    };
    match rate_met {
        Some(true) => format!("fixed rate{busy}"),
        _ if gc && bc => "other processes (both cores busy)".into(),
        _ if gc => "generator (core shared with other processes)".into(),
        _ if bc => "broker (core shared with other processes)".into(),
        Some(false) => "rate missed".into(),
        None => "neither (flow control)".into(),
    }
}

/// Least-squares slope (MiB/s) of RSS over the second half of the window.
fn growth(samples: &[(f64, f64)]) -> Option<f64> {
    let half = &samples[samples.len() / 2..];
    if half.len() < 3 {
        return None;
    }
    let n = half.len() as f64;
    let mx = half.iter().map(|s| s.0).sum::<f64>() / n;
    let my = half.iter().map(|s| s.1).sum::<f64>() / n;
    let sxx: f64 = half.iter().map(|s| (s.0 - mx).powi(2)).sum();
    let sxy: f64 = half.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn put_payload(buf: &mut Vec<u8>, ts: u64, publisher: u32, seq: u64, len: usize) {
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(&publisher.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.resize(buf.len() + len.saturating_sub(PAYLOAD_HEADER), 0);
}

fn get_payload(p: &[u8]) -> Option<(u64, usize, u64)> {
    let ts = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let publisher = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
    let seq = u64::from_le_bytes(p.get(12..20)?.try_into().ok()?);
    Some((ts, publisher as usize, seq))
}

/// Run `make(i)` for i in 0..n with at most `limit` at once; results in order.
async fn bounded<T, F, Fut>(n: usize, limit: usize, mut make: F) -> Vec<Result<T>>
where
    T: 'static,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T>> + 'static,
{
    let mut out: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    loop {
        while next < n && set.len() < limit {
            let fut = make(next);
            let i = next;
            set.spawn_local(async move { (i, fut.await) });
            next += 1;
        }
        match set.join_next().await {
            None => break,
            Some(Ok((i, r))) => out[i] = Some(r),
            Some(Err(e)) => {
                return vec![Err(anyhow!("connection task failed: {e}"))];
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err(anyhow!("connection task lost"))))
        .collect()
}

/// Connect from a given loopback source address (127.0.0.1 unless many
/// thousands of connections need more source ports).
async fn tcp_from(addr: SocketAddr, src: Ipv4Addr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4().context("socket")?;
    if src != Ipv4Addr::LOCALHOST {
        sock.bind(SocketAddr::from((src, 0)))
            .with_context(|| format!("bind {src}"))?;
    }
    sock.connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))
}

async fn open(ctx_addr: SocketAddr, v: Version, id: String, rbuf: usize) -> Result<Conn> {
    let s = tcp_from(ctx_addr, Ipv4Addr::LOCALHOST).await?;
    tokio::time::timeout(Duration::from_secs(15), Conn::open(s, v, &id, 300, rbuf))
        .await
        .with_context(|| format!("{id}: no CONNACK within 15 s"))?
        .with_context(|| format!("{id}: connect"))
}

/// A persistent session (3.1.1: clean session 0; 5: clean start 0 and a
/// one-hour session expiry); also returns CONNACK's Session Present.
async fn open_persistent(
    addr: SocketAddr,
    v: Version,
    id: &str,
    rbuf: usize,
) -> Result<(Conn, bool)> {
    let s = tcp_from(addr, Ipv4Addr::LOCALHOST).await?;
    let o = mqtt::ConnectOpts {
        client_id: id.as_bytes(),
        keepalive: 300,
        clean: false,
        session_expiry: Some(3600),
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(15), Conn::open_with(s, v, &o, rbuf))
        .await
        .with_context(|| format!("{id}: no CONNACK within 15 s"))?
        .with_context(|| format!("{id}: connect"))
}

/// A persistent session that subscribes `filter` at QoS 1 and leaves
/// (DISCONNECT, close): from then on the broker queues for it.
async fn park_session(addr: SocketAddr, v: Version, id: String, filter: String) -> Result<()> {
    let (mut c, _) = open_persistent(addr, v, &id, 4096).await?;
    tokio::time::timeout(Duration::from_secs(15), c.subscribe(1, &filter, 1))
        .await
        .with_context(|| format!("{id}: no SUBACK within 15 s"))??;
    let mut out = Vec::with_capacity(2);
    mqtt::disconnect(&mut out);
    c.stream
        .write_all(&out)
        .await
        .with_context(|| format!("{id}: send DISCONNECT"))?;
    // The broker closes once it has read the DISCONNECT: wait for that, so
    // the session is offline before anything is published.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while c.rb.fill(&c.stream).await.is_ok() {
            while c.rb.next_frame().ok().flatten().is_some() {}
        }
    })
    .await;
    Ok(())
}

/// One QoS 1 publisher per topic, each with [`publisher`], counting into
/// `sh`; `limit`: messages per publisher.
async fn spawn_publishers(
    ctx: &Ctx,
    tasks: &mut JoinSet<()>,
    sh: &Rc<Shared>,
    tag: &str,
    topics: Vec<String>,
    payload: usize,
    limit: Option<u64>,
) -> Result<()> {
    let (addr, v) = (ctx.addr, ctx.v);
    let n = topics.len();
    let pubs = bounded(n, 128, |i| {
        open(addr, v, format!("sb-{tag}-p{i}"), mqtt::READ_SIZE)
    })
    .await
    .into_iter()
    .collect::<Result<Vec<Conn>>>()
    .context("publishers")?;
    for (i, (c, topic)) in pubs.into_iter().zip(topics).enumerate() {
        let cfg = PubCfg {
            id: i as u32,
            topic: topic.into_bytes(),
            qos: 1,
            payload,
            rate: None,
            window: ctx.window,
            batch: ctx.batch,
            limit,
            sched: None,
        };
        let sh = sh.clone();
        tasks.spawn_local(async move {
            if let Err(e) = publisher(c, &cfg, &sh).await
                && !sh.stopping()
            {
                sh.error(format!("publisher {}: {e:#}", cfg.id));
            }
            sh.pubs_done.set(sh.pubs_done.get() + 1);
        });
    }
    Ok(())
}

/// Wait until every publisher is done (all PUBACKs in), bounded.
async fn await_publishers(sh: &Shared, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while sh.pubs_done.get() < n {
        ensure!(
            Instant::now() < deadline,
            "publishers not done {} s after the window ({} of {} sent messages PUBACKed)",
            limit.as_secs(),
            sh.published.get(),
            sh.sent.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Reconnect the persistent session `id` (Session Present required), read
/// until `want` messages have arrived, nothing arrived for `quiet`, or
/// `limit` passed; returns how the drain ended and how long it took.
async fn collect_queue(
    addr: SocketAddr,
    v: Version,
    id: &str,
    sh: &Rc<Shared>,
    npubs: usize,
    want: u64,
    (quiet, limit): (Duration, Duration),
) -> Result<(&'static str, Duration)> {
    let t = Instant::now();
    let (c, present) = open_persistent(addr, v, id, mqtt::READ_SIZE).await?;
    ensure!(
        present,
        "{id}: the broker did not keep the session (CONNACK Session Present 0)"
    );
    let task = {
        let sh = sh.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = subscriber(c, &sh, npubs, false).await
                && !sh.stopping()
            {
                sh.error(format!("reconnected subscriber: {e:#}"));
            }
        })
    };
    let deadline = t + limit;
    let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
    let how = loop {
        let got = sh.delivered.get();
        if got >= want {
            break "complete";
        }
        if got != last {
            last = got;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > quiet {
            break "stalled";
        }
        if Instant::now() > deadline {
            break "deadline";
        }
        if task.is_finished() {
            break "subscriber ended";
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = t.elapsed();
    sh.phase.set(Phase::Stop);
    task.abort();
    let _ = task.await;
    Ok((how, took))
}

/// Loss fields for `published` acknowledged messages into one session.
fn queue_loss(sh: &Shared, rec: &mut Record, drain: &str) {
    let published = sh.published.get();
    let delivered = sh.delivered.get();
    let gaps = sh.gaps.get();
    rec.published = Some(published);
    rec.unacked = Some(sh.sent.get() - published);
    rec.expected = Some(published);
    rec.delivered = Some(delivered);
    rec.gaps = Some(gaps);
    rec.undelivered = Some(published.saturating_sub(delivered + gaps));
    let lost = published.saturating_sub(delivered);
    rec.lost = Some(lost);
    rec.lost_pct = Some(if published > 0 {
        100.0 * lost as f64 / published as f64
    } else {
        0.0
    });
    rec.out_of_order = Some(sh.out_of_order.get());
    rec.drain = Some(drain.into());
    if sh.malformed.get() > 0 {
        sh.error(format!(
            "{} deliveries without a valid benchmark header",
            sh.malformed.get()
        ));
    }
    rec.errors.extend(sh.errors.borrow().iter().cloned());
}

/// `p-fanin-q1-offline`: publishers into an offline persistent session for
/// the window (PUBACKed msg/s = what the store takes), then the session
/// comes back for everything.
async fn run_queue(
    ctx: &Ctx,
    pubs: usize,
    payload: usize,
    secs: f64,
    rec: &mut Record,
) -> Result<()> {
    let sh = Shared::new()?;
    let tag = run_tag();
    let filter = format!("bench/{tag}/in/+");
    let sub_id = format!("sb-{tag}-q");
    rec.qos = Some(1);
    rec.payload = Some(payload);
    rec.publishers = Some(pubs);
    rec.subscribers = Some(1);
    park_session(ctx.addr, ctx.v, sub_id.clone(), filter)
        .await
        .context("offline persistent subscriber")?;
    let mut tasks = JoinSet::new();
    let topics = (0..pubs).map(|i| format!("bench/{tag}/in/{i}")).collect();
    spawn_publishers(ctx, &mut tasks, &sh, &tag, topics, payload, None).await?;
    let warm = (secs / 5.0).clamp(0.2, 1.0);
    tokio::time::sleep(Duration::from_secs_f64(warm)).await;
    let m0 = meter(ctx);
    let p0 = sh.published.get();
    sh.phase.set(Phase::Measure);
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(m) = ctx.broker_pid.and_then(|p| sys::proc_mem(p).ok()) {
            samples.push((m0.t.elapsed().as_secs_f64(), m.rss as f64 / 1048576.0));
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
    sh.phase.set(Phase::Drain);
    let m1 = meter(ctx);
    let p1 = sh.published.get();
    rec.rss_window_max_mib = samples.iter().map(|s| s.1).reduce(f64::max);
    rec.rss_growth_mib_s = growth(&samples);
    let wall = account(ctx, &m0, &m1, rec);
    let acked = p1 - p0;
    rec.pub_per_s = Some(acked as f64 / wall);
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (acked > 0).then(|| c * 1e6 / acked as f64);
    }
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, None);
    await_publishers(&sh, pubs, Duration::from_secs(30)).await?;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let want = sh.published.get();
    let (how, took) = collect_queue(
        ctx.addr,
        ctx.v,
        &sub_id,
        &sh,
        pubs,
        want,
        (Duration::from_secs(3), Duration::from_secs(90)),
    )
    .await?;
    rec.msg_per_s = Some(sh.delivered.get() as f64 / took.as_secs_f64().max(1e-9));
    rec.restart_drained_ms = Some(took.as_secs_f64() * 1e3);
    queue_loss(&sh, rec, how);
    Ok(())
}

/// `p-fanout-1000-bytes`: `sessions` offline persistent sessions on one
/// topic, `messages` QoS 1 messages from one publisher; the store's
/// written bytes (admin `/metrics`) and the broker's disk writes
/// (`/proc/<pid>/io`) per message.
async fn run_store_bytes(
    ctx: &Ctx,
    sessions: usize,
    messages: u64,
    payload: usize,
    rec: &mut Record,
) -> Result<()> {
    let admin = ctx
        .admin
        .context("no admin listener known (Starling's `listener admin` banner line)")?;
    let sh = Shared::new()?;
    let tag = run_tag();
    let topic = format!("bench/{tag}/out");
    rec.qos = Some(1);
    rec.payload = Some(payload);
    rec.publishers = Some(1);
    rec.subscribers = Some(sessions);
    let (addr, v) = (ctx.addr, ctx.v);
    bounded(sessions, 128, |i| {
        park_session(addr, v, format!("sb-{tag}-s{i}"), topic.clone())
    })
    .await
    .into_iter()
    .collect::<Result<Vec<()>>>()
    .context("offline persistent sessions")?;
    // The session records are written by now (SUBACK and DISCONNECT seen);
    // let a last commit pass so that they are not counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b0 = store_written_bytes(admin).await?;
    let io0 = ctx.broker_pid.and_then(sys::proc_write_bytes);
    let m0 = meter(ctx);
    sh.phase.set(Phase::Measure);
    let mut tasks = JoinSet::new();
    let topics = vec![topic.clone()];
    spawn_publishers(ctx, &mut tasks, &sh, &tag, topics, payload, Some(messages)).await?;
    await_publishers(&sh, 1, Duration::from_secs(120)).await?;
    let m1 = meter(ctx);
    let b1 = store_written_bytes(admin).await?;
    let io1 = ctx.broker_pid.and_then(sys::proc_write_bytes);
    sh.phase.set(Phase::Stop);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let wall = account(ctx, &m0, &m1, rec);
    let published = sh.published.get();
    rec.published = Some(published);
    rec.unacked = Some(sh.sent.get() - published);
    rec.pub_per_s = Some(published as f64 / wall);
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (published > 0).then(|| c * 1e6 / published as f64);
    }
    ensure!(published > 0, "no message PUBACKed");
    let per_msg = (b1 - b0) / published as f64;
    rec.store_bytes_per_msg = Some(per_msg);
    rec.store_bytes_vs_payload = Some(per_msg / payload as f64);
    rec.store_bytes_per_session = Some((per_msg - payload as f64) / sessions as f64);
    if let (Some(a), Some(b)) = (io0, io1) {
        rec.disk_bytes_per_msg = Some(b.saturating_sub(a) as f64 / published as f64);
    }
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, None);
    rec.errors.extend(sh.errors.borrow().iter().cloned());
    Ok(())
}

/// `starling_store_written_bytes_total` from Starling's admin `/metrics`.
async fn store_written_bytes(admin: SocketAddr) -> Result<f64> {
    let body = http_get(admin, "/metrics").await?;
    body.lines()
        .find_map(|l| {
            l.strip_prefix("starling_store_written_bytes_total")
                .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                .and_then(|rest| rest.rsplit(' ').next())
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .context("no starling_store_written_bytes_total in /metrics (a broker without a store?)")
}

/// A GET with `Connection: close`; the body (any status but 200 is an error).
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.context("send request")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.context("read response")?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("response without a header end")?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        ensure!(status == "200", "GET {path}: status {status}");
        anyhow::Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("GET {path} timed out"))?
}

/// `p-restart-1m`: `messages` QoS 1 messages into an offline persistent
/// session of a broker with a store, `kill -9`, restart on the same data
/// directory (`opts.dir`), reconnect: the time to `ready` and to the last
/// message, and that every PUBACKed message arrived.
pub async fn run_restart(
    ctx: &Ctx,
    sc: &Scenario,
    rec: &mut Record,
    b: &mut crate::broker::Broker,
    opts: &crate::broker::StartOpts<'_>,
) -> Result<()> {
    let Spec::Restart {
        pubs,
        messages,
        payload,
    } = sc.spec
    else {
        bail!("{} is not a restart scenario", sc.id);
    };
    let payload = payload.max(PAYLOAD_HEADER);
    rec.scenario = sc.id.clone();
    rec.title = sc.title.clone();
    rec.kind = sc.kind().into();
    rec.mqtt = match ctx.v {
        Version::V311 => "3.1.1".into(),
        Version::V5 => "5".into(),
    };
    rec.qos = Some(1);
    rec.payload = Some(payload);
    rec.publishers = Some(pubs);
    rec.subscribers = Some(1);
    let sh = Shared::new()?;
    let tag = run_tag();
    let filter = format!("bench/{tag}/in/+");
    let sub_id = format!("sb-{tag}-r");
    park_session(ctx.addr, ctx.v, sub_id.clone(), filter)
        .await
        .context("offline persistent subscriber")?;
    let per_pub = messages.div_ceil(pubs.max(1) as u64);
    let mut tasks = JoinSet::new();
    let topics = (0..pubs).map(|i| format!("bench/{tag}/in/{i}")).collect();
    let m0 = meter(ctx);
    sh.phase.set(Phase::Measure);
    spawn_publishers(ctx, &mut tasks, &sh, &tag, topics, payload, Some(per_pub)).await?;
    await_publishers(&sh, pubs, Duration::from_secs(300)).await?;
    let m1 = meter(ctx);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let wall = account(ctx, &m0, &m1, rec);
    let published = sh.published.get();
    rec.pub_per_s = Some(published as f64 / wall);
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (published > 0).then(|| c * 1e6 / published as f64);
    }
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, None);
    if let Ok(m) = sys::proc_mem(b.pid) {
        rec.rss_window_max_mib = Some(m.hwm as f64 / 1048576.0);
    }
    ensure!(
        published == sh.sent.get(),
        "{} of {} messages PUBACKed before the kill",
        published,
        sh.sent.get()
    );
    // The crash: everything PUBACKed must be on disk now.
    b.kill9();
    let t_spawn = Instant::now();
    *b = crate::broker::Broker::start(b.kind, opts)
        .await
        .context("restart on the same data directory")?;
    rec.restart_ready_ms = b.ready_after.map(|d| d.as_secs_f64() * 1e3);
    let (how, took) = collect_queue(
        b.addr,
        ctx.v,
        &sub_id,
        &sh,
        pubs,
        published,
        (Duration::from_secs(5), Duration::from_secs(120)),
    )
    .await?;
    rec.restart_drained_ms = Some(t_spawn.elapsed().as_secs_f64() * 1e3);
    rec.msg_per_s = Some(sh.delivered.get() as f64 / took.as_secs_f64().max(1e-9));
    queue_loss(&sh, rec, how);
    Ok(())
}

fn run_tag() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{:x}", t % 0xffff_ffff)
}

fn lat_from(h: &Histogram<u64>) -> Lat {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    Lat {
        n: h.len(),
        p50: us(h.value_at_quantile(0.50)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
    }
}

pub async fn run_scenario(ctx: &Ctx, sc: &Scenario, part: Part, rec: &mut Record) -> Result<()> {
    rec.scenario = sc.id.clone();
    rec.title = sc.title.clone();
    rec.kind = sc.kind().into();
    rec.mqtt = match ctx.v {
        Version::V311 => "3.1.1".into(),
        Version::V5 => "5".into(),
    };
    match &sc.spec {
        Spec::PubSub {
            pubs,
            subs,
            qos,
            payload,
            rate,
            fan_in,
            slow_sub,
            persistent,
        } => {
            let p = PubSubParams {
                pubs: *pubs,
                subs: *subs,
                qos: *qos,
                payload: (*payload).max(PAYLOAD_HEADER),
                rate: *rate,
                fan_in: *fan_in,
                slow_sub: *slow_sub,
                persistent: *persistent,
                ws: false,
                many: false,
            };
            run_pubsub(ctx, &p, sc.secs, rec).await
        }
        Spec::Many {
            pubs,
            qos,
            payload,
            rate,
            sparse: _,
        } => {
            let p = PubSubParams {
                pubs: *pubs,
                subs: 1,
                qos: *qos,
                payload: (*payload).max(PAYLOAD_HEADER),
                rate: Some(*rate),
                fan_in: true,
                slow_sub: false,
                persistent: false,
                ws: false,
                many: true,
            };
            run_pubsub(ctx, &p, sc.secs, rec).await
        }
        Spec::Idle { conns } => run_idle(ctx, *conns, sc.secs, rec).await,
        Spec::Connect { workers } => run_connect(ctx, *workers, sc.secs, rec).await,
        Spec::Http {
            clients,
            qos,
            payload,
        } => {
            let h = HttpParams {
                clients: *clients,
                qos: *qos,
                payload: (*payload).max(PAYLOAD_HEADER),
                subscriber: part == Part::Main,
            };
            run_http(ctx, &h, sc.secs, rec).await
        }
        Spec::WsFanout {
            subs,
            rate,
            payload,
        } => {
            let p = PubSubParams {
                pubs: 1,
                subs: *subs,
                qos: 0,
                payload: (*payload).max(PAYLOAD_HEADER),
                rate: Some(*rate),
                fan_in: false,
                slow_sub: false,
                persistent: false,
                ws: part == Part::Main,
                many: false,
            };
            run_pubsub(ctx, &p, sc.secs, rec).await
        }
        Spec::AdminLatency { idle, clients } => {
            let load = (part == Part::Main).then_some(*clients);
            run_admin_latency(ctx, *idle, load, sc.secs, rec).await
        }
        Spec::Queue { pubs, payload } => {
            run_queue(ctx, *pubs, (*payload).max(PAYLOAD_HEADER), sc.secs, rec).await
        }
        Spec::Restart { .. } => {
            bail!("p-restart needs the broker itself (run by `compare` and `smoke` only)")
        }
        Spec::StoreBytes {
            sessions,
            messages,
            payload,
        } => {
            run_store_bytes(
                ctx,
                *sessions,
                *messages,
                (*payload).max(PAYLOAD_HEADER),
                rec,
            )
            .await
        }
    }
}

struct PubSubParams {
    pubs: usize,
    subs: usize,
    qos: u8,
    payload: usize,
    rate: Option<f64>,
    fan_in: bool,
    slow_sub: bool,
    persistent: bool,
    /// Subscribers are WebSocket topic streams on the HTTP listener
    /// instead of MQTT sessions.
    ws: bool,
    /// Many small publishers (`i-`, needs `rate`): sends staggered over the
    /// period (see [`PubCfg::sched`]); publishers connect as d-idle's
    /// connections do (several source addresses, small buffers, a reset
    /// connection retried); warm-up at least one period; the broker's RSS
    /// per publisher connection (before they connect → end of window).
    many: bool,
}

async fn run_pubsub(ctx: &Ctx, p: &PubSubParams, secs: f64, rec: &mut Record) -> Result<()> {
    let sh = Shared::new()?;
    let tag = run_tag();
    let (filter, topic_of): (String, Box<dyn Fn(usize) -> String>) = if p.fan_in {
        let t = tag.clone();
        (
            format!("bench/{tag}/in/+"),
            Box::new(move |i| format!("bench/{t}/in/{i}")),
        )
    } else {
        let t = format!("bench/{tag}/out");
        (t.clone(), Box::new(move |_| t.clone()))
    };
    rec.qos = Some(p.qos);
    rec.payload = Some(p.payload);
    rec.publishers = Some(p.pubs);
    rec.subscribers = Some(p.subs);
    rec.rate_target = p.rate.map(|r| r * p.pubs as f64);

    // Subscribers first, each confirmed by its SUBACK (MQTT) or by the
    // retained readiness marker, the first frame a stream gets once the
    // broker has subscribed it (WebSocket: the 101 comes before that).
    let (addr, v, qos) = (ctx.addr, ctx.v, p.qos);
    let subs: Vec<SubConn> = if p.ws {
        let http = ctx
            .http
            .context("no HTTP listener known (Starling's `listener http` banner line)")?;
        mark_retained(addr, v, &format!("sb-{tag}-m"), &filter)
            .await
            .context("retained readiness marker")?;
        bounded(p.subs, 128, |_| ws_open(http, filter.clone()))
            .await
            .into_iter()
            .map(|r| r.map(|w| SubConn::Ws(Box::new(w))))
            .collect::<Result<Vec<SubConn>>>()
            .context("WebSocket stream subscribers")?
    } else {
        let persistent = p.persistent;
        bounded(p.subs, 128, |i| {
            let filter = filter.clone();
            let id = format!("sb-{tag}-s{i}");
            async move {
                let mut c = if persistent {
                    open_persistent(addr, v, &id, mqtt::READ_SIZE).await?.0
                } else {
                    open(addr, v, id, mqtt::READ_SIZE).await?
                };
                tokio::time::timeout(Duration::from_secs(15), c.subscribe(1, &filter, qos))
                    .await
                    .context("no SUBACK within 15 s")??;
                Ok(SubConn::Mqtt(c))
            }
        })
        .await
        .into_iter()
        .collect::<Result<Vec<SubConn>>>()
        .context("subscribers")?
    };
    // Many publishers: the broker's RSS per connection, from before they
    // connect to the end of the window (all connected, each having
    // published for at least one period).
    let rss = || ctx.broker_pid.and_then(|p| sys::proc_mem(p).ok());
    let rss_before = if p.many {
        tokio::time::sleep(Duration::from_millis(300)).await;
        rss()
    } else {
        None
    };
    let pubs = if p.many {
        let (res, retries) = open_many(addr, v, p.pubs, &format!("sb-{tag}-p"), 256).await;
        if retries > 0 {
            rec.errors
                .push(format!("{retries} connection attempts retried"));
        }
        res.into_iter()
            .collect::<Result<Vec<Conn>>>()
            .context("publishers")?
    } else {
        bounded(p.pubs, 128, |i| {
            open(addr, v, format!("sb-{tag}-p{i}"), mqtt::READ_SIZE)
        })
        .await
        .into_iter()
        .collect::<Result<Vec<Conn>>>()
        .context("publishers")?
    };
    if p.many {
        rec.conns = Some(pubs.len() as u64);
    }

    let mut tasks = JoinSet::new();
    for c in subs {
        let sh = sh.clone();
        let npubs = p.pubs;
        let slow = p.slow_sub;
        tasks.spawn_local(async move {
            let r = match c {
                SubConn::Mqtt(c) => subscriber(c, &sh, npubs, slow).await,
                SubConn::Ws(w) => ws_subscriber(*w, &sh, npubs).await,
            };
            if let Err(e) = r
                && !sh.stopping()
            {
                sh.error(format!("subscriber: {e:#}"));
            }
        });
    }
    // Staggered: publisher i's sends are due i/pubs of a period after
    // publisher 0's.
    let start = Instant::now();
    let period = p.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    for (i, c) in pubs.into_iter().enumerate() {
        let sched = period
            .filter(|_| p.many)
            .map(|t| (start, t.mul_f64(i as f64 / p.pubs as f64)));
        let cfg = PubCfg {
            id: i as u32,
            topic: topic_of(i).into_bytes(),
            qos: p.qos,
            payload: p.payload,
            rate: p.rate,
            window: ctx.window,
            batch: ctx.batch,
            limit: None,
            sched,
        };
        let sh = sh.clone();
        tasks.spawn_local(async move {
            if let Err(e) = publisher(c, &cfg, &sh).await
                && !sh.stopping()
            {
                sh.error(format!("publisher {}: {e:#}", cfg.id));
            }
            sh.pubs_done.set(sh.pubs_done.get() + 1);
        });
    }

    // Warm-up (many publishers: at least one period, so that each has
    // published before the window), then the measured window.
    let mut warm = (secs / 5.0).clamp(0.2, 1.0);
    if let Some(t) = period.filter(|_| p.many) {
        warm = warm.max(t.as_secs_f64());
    }
    tokio::time::sleep(Duration::from_secs_f64(warm)).await;
    let m0 = meter(ctx);
    let (d0, p0) = (sh.delivered.get(), sh.published.get());
    sh.phase.set(Phase::Measure);
    // Broker RSS through the window, to see whether it levels off.
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(m) = ctx.broker_pid.and_then(|p| sys::proc_mem(p).ok()) {
            samples.push(((m0.t.elapsed()).as_secs_f64(), m.rss as f64 / 1048576.0));
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
    sh.phase.set(Phase::Drain);
    sh.drain.notify_waiters();
    let m1 = meter(ctx);
    let (d1, p1) = (sh.delivered.get(), sh.published.get());
    if let (Some(a), Some(b)) = (rss_before, rss().filter(|_| p.many))
        && p.pubs > 0
    {
        rec.rss_per_conn = Some((b.rss as f64 - a.rss as f64) / p.pubs as f64);
    }
    rec.rss_growth_mib_s = growth(&samples);
    rec.rss_window_max_mib = samples.iter().map(|s| s.1).reduce(f64::max);
    let wall = account(ctx, &m0, &m1, rec);

    // Drain: publishers collect their PUBACKs, subscribers what is in flight.
    // QoS 0 at an unlimited rate leaves seconds of messages in the kernel's
    // socket buffers; its loss is counted from sequence gaps instead, so it
    // stops at once.
    let (max_drain, quiet) = match (p.qos, p.rate) {
        (0, None) => (0.3, 0.3),
        (0, Some(_)) => (3.0, 0.5),
        _ => (5.0, 1.0),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(max_drain);
    let mut last = (u64::MAX, u64::MAX);
    let mut quiet_since = Instant::now();
    let drain = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = (sh.delivered.get(), sh.published.get());
        let done = sh.pubs_done.get() == p.pubs;
        if done && now.0 >= now.1 * p.subs as u64 {
            break "complete";
        }
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs_f64(quiet) {
            break "stalled";
        }
        if Instant::now() > deadline {
            break "deadline";
        }
    };
    sh.phase.set(Phase::Stop);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let published = sh.published.get();
    let expected = published * p.subs as u64;
    let delivered = sh.delivered.get();
    let gaps = sh.gaps.get();
    let undelivered = expected.saturating_sub(delivered + gaps);
    let (lost, base) = if p.qos == 0 && p.rate.is_none() {
        // The tail may still sit unread in socket buffers: gaps only.
        (gaps, delivered + gaps)
    } else if drain == "deadline" {
        // Still delivering when the drain time ran out: not lost (yet).
        (gaps, expected)
    } else {
        (gaps + undelivered, expected)
    };
    rec.gaps = Some(gaps);
    rec.undelivered = (p.qos > 0 || p.rate.is_some()).then_some(undelivered);
    rec.drain = Some(drain.into());
    rec.published = Some(published);
    rec.unacked = (p.qos > 0).then(|| sh.sent.get() - published);
    rec.expected = Some(expected);
    rec.delivered = Some(delivered);
    rec.lost = Some(lost);
    rec.lost_pct = Some(if base > 0 {
        100.0 * lost as f64 / base as f64
    } else {
        0.0
    });
    rec.out_of_order = Some(sh.out_of_order.get());
    let dw = d1 - d0;
    rec.msg_per_s = Some(dw as f64 / wall);
    rec.pub_per_s = Some((p1 - p0) as f64 / wall);
    rec.lat_us = Some(lat_from(&sh.hist.borrow()));
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (dw > 0).then(|| c * 1e6 / dw as f64);
    }
    if sh.malformed.get() > 0 {
        sh.error(format!(
            "{} deliveries without a valid benchmark header",
            sh.malformed.get()
        ));
    }
    if p.rate.is_some() && sh.writes.get() > 0 {
        rec.msgs_per_write = Some(sh.sent.get() as f64 / sh.writes.get() as f64);
    }
    // Staggered publishers: late sends mean the generator fell behind its
    // schedule even if the rate averaged out.
    let lag = p.many.then(|| lat_from(&sh.lag_hist.borrow()));
    let late = lag.as_ref().is_some_and(|l| l.p99 > SEND_LAG_LIMIT_US);
    if let Some(l) = lag.as_ref().filter(|_| late) {
        sh.error(format!(
            "generator behind its schedule: send lag p99 {} µs (max {} µs) > {} µs",
            l.p99, l.max, SEND_LAG_LIMIT_US
        ));
    }
    rec.send_lag_us = lag;
    let rate_met = rec
        .rate_target
        .map(|t| rec.pub_per_s.unwrap_or(0.0) >= 0.95 * t && !late);
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, rate_met);
    rec.errors.extend(sh.errors.borrow().iter().cloned());
    Ok(())
}

async fn subscriber(mut c: Conn, sh: &Shared, npubs: usize, slow: bool) -> Result<()> {
    let mut next = vec![0u64; npubs];
    let mut out = Vec::with_capacity(4096);
    // A session that reconnects may get its queue in the CONNACK's read:
    // those frames are in the buffer already.
    let mut buffered = true;
    loop {
        if !buffered {
            c.rb.fill(&c.stream).await?;
        }
        buffered = false;
        let now = sh.now_ns();
        let measuring = sh.phase.get() == Phase::Measure;
        let (mut new, mut ooo, mut bad, mut gaps) = (0u64, 0u64, 0u64, 0u64);
        {
            let mut hist = sh.hist.borrow_mut();
            while let Some(f) = c.rb.next_frame()? {
                if f.kind != PUBLISH {
                    continue;
                }
                let p = mqtt::parse_publish(c.v, f.flags, f.body)?;
                match p.qos {
                    0 => {}
                    1 => mqtt::puback(&mut out, p.pid),
                    _ => bail!("unexpected QoS {} delivery", p.qos),
                }
                let header = if p.topic.is_empty() {
                    None
                } else {
                    get_payload(p.payload)
                };
                let Some((ts, publisher, seq)) = header else {
                    bad += 1;
                    continue;
                };
                let Some(n) = next.get_mut(publisher) else {
                    bad += 1;
                    continue;
                };
                if seq >= *n {
                    new += 1;
                    gaps += seq - *n;
                    *n = seq + 1;
                } else {
                    ooo += 1;
                }
                if measuring {
                    hist.saturating_record(now.saturating_sub(ts).max(1));
                }
            }
        }
        Shared::add(&sh.delivered, new);
        Shared::add(&sh.out_of_order, ooo);
        Shared::add(&sh.malformed, bad);
        Shared::add(&sh.gaps, gaps);
        if !out.is_empty() {
            c.stream.write_all(&out).await.context("send PUBACKs")?;
            out.clear();
        }
        if slow {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct PubCfg {
    id: u32,
    topic: Vec<u8>,
    qos: u8,
    payload: usize,
    rate: Option<f64>,
    window: usize,
    batch: usize,
    /// Stop after this many messages (None: until the window ends).
    limit: Option<u64>,
    /// A staggered schedule (with `rate`): (start, offset); message k is
    /// due at start + offset + k / rate, and the publisher sleeps until
    /// then (woken early by PUBACKs and the window's end), so 1,000 or
    /// 50,000 publishers cost a wake-up per message, not per millisecond.
    /// None: a 1 ms ticker paces the publisher, message k due (k + 1) /
    /// rate after its own start (`b-`, `c-`, `g-`, `h-`: all publishers in
    /// the same millisecond).
    sched: Option<(Instant, Duration)>,
}

/// Messages of a staggered schedule due `elapsed` after its start:
/// message k is due at `offset + k × period`.
fn due_count(elapsed: Duration, offset: Duration, period: Duration) -> u64 {
    match elapsed.checked_sub(offset) {
        None => 0,
        Some(e) => (e.as_nanos() / period.as_nanos().max(1)) as u64 + 1,
    }
}

/// When message `k` of a staggered schedule is due.
fn due_at(start: Instant, offset: Duration, period: Duration, k: u64) -> Instant {
    let ns = (period.as_nanos() as u64).saturating_mul(k);
    start + offset + Duration::from_nanos(ns)
}

/// A staggered send is late if its due time passed this long before the
/// write (p99 over the window): then the generator did not keep the rate.
pub const SEND_LAG_LIMIT_US: f64 = 5000.0;

/// Count PUBACKs in the read buffer.
fn take_acks(c: &mut Conn) -> Result<u64> {
    let mut n = 0;
    while let Some(f) = c.rb.next_frame()? {
        if f.kind == PUBACK {
            mqtt::puback_pid(f.body)?;
            n += 1;
        }
    }
    Ok(n)
}

async fn publisher(mut c: Conn, cfg: &PubCfg, sh: &Shared) -> Result<()> {
    // Fixed rates write one message per wake-up: a small buffer.
    let cap = match cfg.rate {
        None => mqtt::READ_SIZE + 2048,
        Some(_) => 4 * (cfg.payload + 64),
    };
    let mut w: Vec<u8> = Vec::with_capacity(cap);
    let (mut seq, mut acked, mut pid) = (0u64, 0u64, 0u16);
    let mut ticker = match (cfg.rate, cfg.sched) {
        (Some(_), None) => {
            let mut t = tokio::time::interval(Duration::from_millis(1));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            Some(t)
        }
        _ => None,
    };
    let period = Duration::from_secs_f64(1.0 / cfg.rate.unwrap_or(1.0));
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let t0 = Instant::now();
    let per_write = cfg.batch.min((mqtt::READ_SIZE / (cfg.payload + 32)).max(1));
    while sh.phase.get() < Phase::Drain && cfg.limit.is_none_or(|l| seq < l) {
        let mut n = match (cfg.rate, cfg.sched) {
            (None, _) => per_write,
            (Some(r), None) => {
                ((t0.elapsed().as_secs_f64() * r) as u64).saturating_sub(seq) as usize
            }
            (Some(_), Some((start, off))) => {
                due_count(start.elapsed(), off, period).saturating_sub(seq) as usize
            }
        }
        .min(4096);
        if let Some(l) = cfg.limit {
            n = n.min((l - seq) as usize);
        }
        if cfg.qos > 0 {
            n = n.min(cfg.window.saturating_sub((seq - acked) as usize));
        }
        if n > 0 {
            let ts = sh.now_ns();
            if let Some((start, off)) = cfg.sched
                && sh.phase.get() == Phase::Measure
            {
                // How late the first of these was against its due time.
                let due = due_at(start, off, period, seq);
                let late = Instant::now().saturating_duration_since(due);
                sh.lag_hist
                    .borrow_mut()
                    .saturating_record((late.as_nanos() as u64).max(1));
            }
            for _ in 0..n {
                if cfg.qos > 0 {
                    pid = pid.wrapping_add(1).max(1);
                }
                mqtt::publish_header(&mut w, c.v, &cfg.topic, cfg.qos, pid, cfg.payload);
                put_payload(&mut w, ts, cfg.id, seq, cfg.payload);
                seq += 1;
            }
            c.stream.write_all(&w).await.context("send PUBLISH")?;
            w.clear();
            Shared::add(&sh.sent, n as u64);
            Shared::add(&sh.writes, 1);
            if cfg.qos == 0 {
                Shared::add(&sh.published, n as u64);
            }
        }
        if let Some((start, off)) = cfg.sched {
            // Sleep until the next message is due, the window ends or
            // (QoS 1) a PUBACK arrives. The phase may have changed while
            // the write waited: no await from this check to the
            // registration of `notified` below.
            if sh.phase.get() >= Phase::Drain {
                continue;
            }
            sleep.as_mut().reset(due_at(start, off, period, seq).into());
            if cfg.qos == 0 {
                tokio::select! {
                    _ = &mut sleep => {}
                    _ = sh.drain.notified() => {}
                }
            } else {
                tokio::select! {
                    _ = &mut sleep => {}
                    _ = sh.drain.notified() => {}
                    r = c.stream.readable() => {
                        r.context("wait readable")?;
                        c.rb.try_fill(&c.stream)?;
                    }
                }
                let a = take_acks(&mut c)?;
                acked += a;
                Shared::add(&sh.published, a);
            }
            continue;
        }
        match (cfg.qos, ticker.as_mut()) {
            (0, None) => tokio::task::yield_now().await,
            (0, Some(t)) => {
                t.tick().await;
            }
            (_, None) => {
                if (seq - acked) as usize >= cfg.window {
                    c.rb.fill(&c.stream).await?;
                } else {
                    c.rb.try_fill(&c.stream)?;
                    tokio::task::yield_now().await;
                }
                let a = take_acks(&mut c)?;
                acked += a;
                Shared::add(&sh.published, a);
            }
            (_, Some(t)) => {
                tokio::select! {
                    _ = t.tick() => {}
                    r = c.stream.readable() => {
                        r.context("wait readable")?;
                        c.rb.try_fill(&c.stream)?;
                    }
                }
                let a = take_acks(&mut c)?;
                acked += a;
                Shared::add(&sh.published, a);
            }
        }
    }
    // Drain: wait for the PUBACKs still owed.
    while cfg.qos > 0 && acked < seq && !sh.stopping() {
        c.rb.fill(&c.stream).await?;
        let a = take_acks(&mut c)?;
        acked += a;
        Shared::add(&sh.published, a);
    }
    Ok(())
}

/// Source address for the i-th of many connections: 127.0.0.1 for the first
/// 20,000, then 127.0.0.2, … (each has its own ephemeral port range).
fn source_for(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i / 20_000) as u8)
}

/// Open `n` connections (client ids `prefix` + index, read buffers of
/// `rbuf` bytes), 256 at a time, from [`source_for`] addresses. These
/// scenarios measure the many connections, not connection storms: a
/// connection the broker reset (e.g. a full accept backlog) is retried,
/// twice at most; returns the results in order and the retries.
async fn open_many(
    addr: SocketAddr,
    v: Version,
    n: usize,
    prefix: &str,
    rbuf: usize,
) -> (Vec<Result<Conn>>, u64) {
    let retries = Rc::new(Cell::new(0u64));
    let res = bounded(n, 256, |i| {
        let id = format!("{prefix}{i}");
        let retries = retries.clone();
        async move {
            let mut attempt = 0;
            loop {
                let r = async {
                    let s = tcp_from(addr, source_for(i)).await?;
                    tokio::time::timeout(Duration::from_secs(20), Conn::open(s, v, &id, 300, rbuf))
                        .await
                        .context("no CONNACK within 20 s")?
                }
                .await;
                attempt += 1;
                match r {
                    Err(_) if attempt < 3 => {
                        retries.set(retries.get() + 1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => return r,
                }
            }
        }
    })
    .await;
    let retried = retries.get();
    (res, retried)
}

async fn run_idle(ctx: &Ctx, n: usize, settle: f64, rec: &mut Record) -> Result<()> {
    let pid = ctx.broker_pid;
    let rss = || pid.and_then(|p| sys::proc_mem(p).ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss();
    let m0 = meter(ctx);
    let tag = run_tag();
    let t = Instant::now();
    let (res, retries) = open_many(ctx.addr, ctx.v, n, &format!("sb-{tag}-i"), 256).await;
    if retries > 0 {
        rec.errors
            .push(format!("{retries} connection attempts retried"));
    }
    let took = t.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(n);
    for r in res {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                rec.conns_failed = Some(rec.conns_failed.unwrap_or(0) + 1);
                if rec.errors.len() < 5 {
                    rec.errors.push(format!("{e:#}"));
                }
            }
        }
    }
    let ok = conns.len() as u64;
    rec.conns = Some(ok);
    rec.conn_per_s = Some(ok as f64 / took.max(1e-9));
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let m1 = meter(ctx);
    let after = rss();
    account(ctx, &m0, &m1, rec);
    if let (Some(a), Some(b)) = (before, after)
        && ok > 0
    {
        rec.rss_per_conn = Some((b.rss as f64 - a.rss as f64) / ok as f64);
    }
    if let Some(c) = rec.broker_cpu_s
        && ok > 0
    {
        rec.broker_cpu_us_per_msg = Some(c * 1e6 / ok as f64);
    }
    // Are they all still there? One PINGREQ each, expect a PINGRESP.
    let alive = Rc::new(Cell::new(0u64));
    let conns: Vec<Rc<RefCell<Option<Conn>>>> = conns
        .into_iter()
        .map(|c| Rc::new(RefCell::new(Some(c))))
        .collect();
    let _ = bounded(conns.len(), 512, |i| {
        let cell = conns[i].clone();
        let alive = alive.clone();
        async move {
            let Some(mut c) = cell.borrow_mut().take() else {
                return Ok(());
            };
            let mut out = Vec::new();
            mqtt::pingreq(&mut out);
            let res = tokio::time::timeout(Duration::from_secs(10), async {
                c.stream.write_all(&out).await?;
                loop {
                    while let Some(f) = c.rb.next_frame()? {
                        if f.kind == mqtt::PINGRESP {
                            return anyhow::Ok(());
                        }
                    }
                    c.rb.fill(&c.stream).await?;
                }
            })
            .await;
            if matches!(res, Ok(Ok(()))) {
                alive.set(alive.get() + 1);
            }
            *cell.borrow_mut() = Some(c);
            Ok(())
        }
    })
    .await;
    rec.conns_alive = Some(alive.get());
    rec.limit = "n/a (memory)".into();
    drop(conns);
    Ok(())
}

async fn connect_once(addr: SocketAddr, v: Version, id: &str) -> Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    // No TCP_NODELAY here: each side writes one packet per round trip.
    let mut out = Vec::with_capacity(64);
    mqtt::connect(&mut out, v, id.as_bytes(), 60, true);
    s.write_all(&out).await.context("send CONNECT")?;
    let mut rb = mqtt::ReadBuf::with_capacity(256);
    let fut = async {
        loop {
            s.readable().await.context("wait readable")?;
            if rb.try_fill(&s)?.is_none() {
                continue;
            }
            if let Some(f) = rb.next_frame()? {
                anyhow::ensure!(f.kind == mqtt::CONNACK, "expected CONNACK, got {}", f.kind);
                let code = mqtt::connack_code(f.body)?;
                anyhow::ensure!(code == 0, "CONNACK refused ({code:#x})");
                return anyhow::Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("no CONNACK within 10 s")??;
    let took = t.elapsed();
    out.clear();
    mqtt::disconnect(&mut out);
    s.write_all(&out).await.context("send DISCONNECT")?;
    // Close right away (the kernel reuses TIME_WAIT ports on loopback).
    Ok(took)
}

async fn run_connect(ctx: &Ctx, workers: usize, secs: f64, rec: &mut Record) -> Result<()> {
    let sh = Shared::new()?;
    let tag = run_tag();
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let sh = sh.clone();
        let (addr, v) = (ctx.addr, ctx.v);
        let tag = tag.clone();
        tasks.spawn_local(async move {
            let mut k = 0u64;
            while !sh.stopping() {
                k += 1;
                let id = format!("sb-{tag}-c{w}-{k}");
                match connect_once(addr, v, &id).await {
                    Ok(d) => {
                        Shared::add(&sh.conns, 1);
                        if sh.phase.get() == Phase::Measure {
                            sh.hist.borrow_mut().saturating_record(d.as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        Shared::add(&sh.failed, 1);
                        sh.error(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64((secs / 5.0).clamp(0.2, 1.0))).await;
    let m0 = meter(ctx);
    let (c0, f0) = (sh.conns.get(), sh.failed.get());
    sh.phase.set(Phase::Measure);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    sh.phase.set(Phase::Drain);
    let m1 = meter(ctx);
    let (c1, f1) = (sh.conns.get(), sh.failed.get());
    sh.phase.set(Phase::Stop);
    // Let the loops finish their current connection (bounded by timeouts).
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let wall = account(ctx, &m0, &m1, rec);
    let n = c1 - c0;
    rec.conns = Some(n);
    rec.conns_failed = Some(f1 - f0);
    rec.conn_per_s = Some(n as f64 / wall);
    rec.lat_us = Some(lat_from(&sh.hist.borrow()));
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (n > 0).then(|| c * 1e6 / n as f64);
    }
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, None);
    rec.errors.extend(sh.errors.borrow().iter().cloned());
    Ok(())
}

// --- WebSocket topic streams (g-ws-fanout) ---------------------------------

type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A subscriber of a pub/sub run: an MQTT session or a WebSocket stream.
enum SubConn {
    Mqtt(Conn),
    Ws(Box<WsStream>),
}

/// Payload of the retained message that tells a new stream it is
/// subscribed (shorter than a benchmark header, so never counted).
const READY_MARKER: &[u8] = b"starling-bench ready";

/// Publish [`READY_MARKER`] retained on `topic` at QoS 1 and wait for the
/// PUBACK (the broker has stored it by then).
async fn mark_retained(addr: SocketAddr, v: Version, id: &str, topic: &str) -> Result<()> {
    let mut c = open(addr, v, id.to_string(), 4096).await?;
    let mut out = Vec::with_capacity(64);
    mqtt::publish_header_flags(
        &mut out,
        v,
        topic.as_bytes(),
        1,
        true,
        1,
        READY_MARKER.len(),
    );
    out.extend_from_slice(READY_MARKER);
    c.stream.write_all(&out).await.context("send PUBLISH")?;
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            while let Some(f) = c.rb.next_frame()? {
                if f.kind == PUBACK {
                    return anyhow::Ok(());
                }
            }
            c.rb.fill(&c.stream).await?;
        }
    })
    .await
    .context("no PUBACK within 15 s")??;
    out.clear();
    mqtt::disconnect(&mut out);
    let _ = c.stream.write_all(&out).await;
    Ok(())
}

fn ws_bytes(m: &tokio_tungstenite::tungstenite::Message) -> Option<&[u8]> {
    use tokio_tungstenite::tungstenite::Message;
    match m {
        Message::Text(t) => Some(t.as_str().as_bytes()),
        Message::Binary(b) => Some(b),
        _ => None,
    }
}

/// Read buffer of the generator's WebSocket clients.
const WS_READ_BUFFER: usize = 16 * 1024;

/// Open a topic stream on `filter` and wait until the broker has
/// subscribed it (the retained marker arrived).
async fn ws_open(http: SocketAddr, filter: String) -> Result<WsStream> {
    let s = tcp_from(http, Ipv4Addr::LOCALHOST).await?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    let url = format!("ws://{http}/{filter}");
    // tungstenite zero-fills `read_buffer_size` bytes before every read
    // (snapview/tungstenite-rs#547), 128 KiB by default: 16 KiB still holds
    // a batch of ~190 benchmark frames and keeps the generator light.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::client_async_with_config(url.as_str(), s, Some(config)),
    )
    .await
    .context("no WebSocket handshake within 15 s")?
    .with_context(|| format!("WebSocket handshake with {url}"))?;
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if ws_bytes(&m) == Some(READY_MARKER) => return anyhow::Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("WebSocket read"),
                None => bail!("stream closed before the readiness marker"),
            }
        }
    })
    .await
    .context("no readiness marker within 15 s")??;
    Ok(ws)
}

/// The WebSocket twin of [`subscriber`]: one frame is one delivery.
async fn ws_subscriber(mut ws: WsStream, sh: &Shared, npubs: usize) -> Result<()> {
    let mut next = vec![0u64; npubs];
    while let Some(m) = ws.next().await {
        let m = m.context("WebSocket read")?;
        if let tokio_tungstenite::tungstenite::Message::Close(c) = &m {
            bail!("stream closed by the broker: {c:?}");
        }
        let Some(p) = ws_bytes(&m) else {
            continue;
        };
        let now = sh.now_ns();
        let Some((ts, publisher, seq)) = get_payload(p) else {
            if p != READY_MARKER {
                Shared::add(&sh.malformed, 1);
            }
            continue;
        };
        let Some(n) = next.get_mut(publisher) else {
            Shared::add(&sh.malformed, 1);
            continue;
        };
        if seq >= *n {
            Shared::add(&sh.delivered, 1);
            Shared::add(&sh.gaps, seq - *n);
            *n = seq + 1;
        } else {
            Shared::add(&sh.out_of_order, 1);
        }
        if sh.phase.get() == Phase::Measure {
            sh.hist
                .borrow_mut()
                .saturating_record(now.saturating_sub(ts).max(1));
        }
    }
    bail!("stream ended")
}

// --- HTTP publishing (f-http) -----------------------------------------------

struct HttpParams {
    clients: usize,
    qos: u8,
    payload: usize,
    /// An MQTT subscriber receives what is POSTed (Starling); the anchor
    /// has none.
    subscriber: bool,
}

/// `(status, bytes used)` of the first complete response in `buf`.
fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf).context("malformed HTTP response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let mut len = None;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked HTTP responses are not supported by the generator");
        }
    }
    let len = len.context("HTTP response without Content-Length")?;
    let code = r.code.context("HTTP response without status")?;
    Ok((buf.len() >= head + len).then_some((code, head + len)))
}

/// One keep-alive connection: POST, wait for the whole response, repeat.
/// A request is one write (head and body), a response usually one read.
async fn http_client(
    mut s: TcpStream,
    id: u32,
    head: &[u8],
    payload: usize,
    sh: &Shared,
) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut w = Vec::with_capacity(head.len() + payload);
    let mut rb = vec![0u8; 4096];
    let (mut start, mut end) = (0usize, 0usize);
    let mut seq = 0u64;
    while sh.phase.get() < Phase::Drain {
        w.clear();
        w.extend_from_slice(head);
        let ts = sh.now_ns();
        put_payload(&mut w, ts, id, seq, payload);
        s.write_all(&w).await.context("send request")?;
        Shared::add(&sh.sent, 1);
        let status = loop {
            if let Some((status, used)) = parse_response(&rb[start..end])? {
                start += used;
                if start == end {
                    (start, end) = (0, 0);
                }
                break status;
            }
            if end == rb.len() {
                if start > 0 {
                    rb.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                } else {
                    ensure!(rb.len() < 1 << 20, "HTTP response over 1 MiB");
                    rb.resize(rb.len() * 2, 0);
                }
            }
            let n = s.read(&mut rb[end..]).await.context("read response")?;
            ensure!(n > 0, "connection closed by the server");
            end += n;
        };
        if status == 200 {
            // Only a published message takes a sequence number, so a
            // refused one is not counted as lost by the subscriber.
            seq += 1;
            Shared::add(&sh.published, 1);
            if sh.phase.get() == Phase::Measure {
                sh.req_hist
                    .borrow_mut()
                    .saturating_record(sh.now_ns().saturating_sub(ts).max(1));
            }
        } else {
            Shared::add(&sh.failed, 1);
            sh.error(format!("HTTP {status} from POST"));
        }
    }
    Ok(())
}

async fn run_http(ctx: &Ctx, p: &HttpParams, secs: f64, rec: &mut Record) -> Result<()> {
    let http = ctx
        .http
        .context("no HTTP listener known (Starling's `listener http` banner line)")?;
    let sh = Shared::new()?;
    let tag = run_tag();
    let topic = format!("bench/{tag}/http");
    rec.qos = Some(p.qos);
    rec.payload = Some(p.payload);
    rec.publishers = Some(p.clients);
    rec.subscribers = Some(usize::from(p.subscriber));
    let sub = if p.subscriber {
        let mut c = open(ctx.addr, ctx.v, format!("sb-{tag}-s0"), mqtt::READ_SIZE).await?;
        tokio::time::timeout(Duration::from_secs(15), c.subscribe(1, &topic, p.qos))
            .await
            .context("no SUBACK within 15 s")??;
        Some(c)
    } else {
        None
    };
    let conns = bounded(p.clients, 64, |_| async move {
        let s = tcp_from(http, Ipv4Addr::LOCALHOST).await?;
        s.set_nodelay(true).context("TCP_NODELAY")?;
        Ok(s)
    })
    .await
    .into_iter()
    .collect::<Result<Vec<TcpStream>>>()
    .context("HTTP clients")?;
    let query = if p.qos > 0 {
        format!("?qos={}", p.qos)
    } else {
        String::new()
    };
    let head: Rc<[u8]> = format!(
        "POST /broker/{topic}{query} HTTP/1.1\r\nHost: {http}\r\nContent-Length: {}\r\n\r\n",
        p.payload
    )
    .into_bytes()
    .into();

    let mut tasks = JoinSet::new();
    if let Some(c) = sub {
        let sh = sh.clone();
        let n = p.clients;
        tasks.spawn_local(async move {
            if let Err(e) = subscriber(c, &sh, n, false).await
                && !sh.stopping()
            {
                sh.error(format!("subscriber: {e:#}"));
            }
        });
    }
    for (i, s) in conns.into_iter().enumerate() {
        let sh = sh.clone();
        let head = head.clone();
        let payload = p.payload;
        tasks.spawn_local(async move {
            if let Err(e) = http_client(s, i as u32, &head, payload, &sh).await
                && !sh.stopping()
            {
                sh.error(format!("HTTP client {i}: {e:#}"));
            }
            sh.pubs_done.set(sh.pubs_done.get() + 1);
        });
    }

    let warm = (secs / 5.0).clamp(0.2, 1.0);
    tokio::time::sleep(Duration::from_secs_f64(warm)).await;
    let m0 = meter(ctx);
    let (d0, p0) = (sh.delivered.get(), sh.published.get());
    sh.phase.set(Phase::Measure);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    sh.phase.set(Phase::Drain);
    let m1 = meter(ctx);
    let (d1, p1) = (sh.delivered.get(), sh.published.get());
    let wall = account(ctx, &m0, &m1, rec);

    // Drain: each client finishes its request in flight; the subscriber
    // gets what was published.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = u64::MAX;
    let mut quiet_since = Instant::now();
    let drain = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = sh.pubs_done.get() == p.clients;
        let d = sh.delivered.get();
        if done && (!p.subscriber || d >= sh.published.get()) {
            break "complete";
        }
        if d != last {
            last = d;
            quiet_since = Instant::now();
        } else if done && quiet_since.elapsed() > Duration::from_secs(1) {
            break "stalled";
        }
        if Instant::now() > deadline {
            break "deadline";
        }
    };
    sh.phase.set(Phase::Stop);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let published = sh.published.get();
    let n = p1 - p0;
    rec.published = Some(published);
    rec.requests_failed = Some(sh.failed.get());
    rec.req_per_s = Some(n as f64 / wall);
    rec.lat_us = Some(lat_from(&sh.req_hist.borrow()));
    rec.drain = Some(drain.into());
    if p.subscriber {
        let delivered = sh.delivered.get();
        let gaps = sh.gaps.get();
        let undelivered = published.saturating_sub(delivered + gaps);
        let lost = if drain == "deadline" {
            gaps
        } else {
            gaps + undelivered
        };
        rec.expected = Some(published);
        rec.delivered = Some(delivered);
        rec.gaps = Some(gaps);
        rec.undelivered = Some(undelivered);
        rec.lost = Some(lost);
        rec.lost_pct = Some(if published > 0 {
            100.0 * lost as f64 / published as f64
        } else {
            0.0
        });
        rec.out_of_order = Some(sh.out_of_order.get());
        rec.msg_per_s = Some((d1 - d0) as f64 / wall);
        rec.delivery_lat_us = Some(lat_from(&sh.hist.borrow()));
    }
    rec.pub_per_s = rec.req_per_s;
    if let Some(c) = rec.broker_cpu_s {
        rec.broker_cpu_us_per_msg = (n > 0).then(|| c * 1e6 / n as f64);
    }
    if sh.malformed.get() > 0 {
        sh.error(format!(
            "{} deliveries without a valid benchmark header",
            sh.malformed.get()
        ));
    }
    rec.limit = verdict(rec, ctx.gen_cores, ctx.broker_cores, None);
    rec.errors.extend(sh.errors.borrow().iter().cloned());
    Ok(())
}

// --- Admin API under load (h-admin-latency-q1) -------------------------------

/// Open `n` idle MQTT connections (as `d-idle`: bounded concurrency, source
/// addresses beyond 20,000, a reset connection retried twice). Failures are
/// counted in `rec`; the connections are held by the caller.
async fn open_idle(ctx: &Ctx, n: usize, rec: &mut Record) -> Vec<Conn> {
    let tag = run_tag();
    let (addr, v) = (ctx.addr, ctx.v);
    let retries = Rc::new(Cell::new(0u64));
    let res = bounded(n, 256, |i| {
        let id = format!("sb-{tag}-i{i}");
        let retries = retries.clone();
        async move {
            let mut attempt = 0;
            loop {
                let r = async {
                    let s = tcp_from(addr, source_for(i)).await?;
                    tokio::time::timeout(Duration::from_secs(20), Conn::open(s, v, &id, 300, 256))
                        .await
                        .context("no CONNACK within 20 s")?
                }
                .await;
                attempt += 1;
                match r {
                    Err(_) if attempt < 3 => {
                        retries.set(retries.get() + 1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => return r,
                }
            }
        }
    })
    .await;
    if retries.get() > 0 {
        rec.errors.push(format!(
            "{} idle connection attempts retried",
            retries.get()
        ));
    }
    let mut conns = Vec::with_capacity(n);
    for r in res {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                rec.conns_failed = Some(rec.conns_failed.unwrap_or(0) + 1);
                if rec.errors.len() < 5 {
                    rec.errors.push(format!("idle connection: {e:#}"));
                }
            }
        }
    }
    conns
}

/// `idle` connections held, then the `c-latency-q1` load, with (`admin`:
/// that many HTTP clients) or without the admin load running throughout.
async fn run_admin_latency(
    ctx: &Ctx,
    idle: usize,
    admin: Option<usize>,
    secs: f64,
    rec: &mut Record,
) -> Result<()> {
    let conns = open_idle(ctx, idle, rec).await;
    rec.conns = Some(conns.len() as u64);
    ensure!(
        conns.len() * 10 >= idle * 9,
        "only {} of {idle} idle connections opened",
        conns.len()
    );
    let load = match admin {
        Some(clients) => {
            let addr = ctx
                .admin
                .context("no admin listener known (Starling's `listener admin` banner line)")?;
            let load = AdminLoad::start(addr, clients, conns.len())?;
            load.wait_first().await?;
            Some(load)
        }
        None => None,
    };
    let p = PubSubParams {
        pubs: ADMIN_PUBS,
        subs: 1,
        qos: 1,
        payload: 64,
        rate: Some(1000.0),
        fan_in: true,
        slow_sub: false,
        ws: false,
        persistent: false,
        many: false,
    };
    let res = run_pubsub(ctx, &p, secs, rec).await;
    if let Some(load) = load {
        let t = load.finish().await?;
        rec.req_per_s = Some(t.ok as f64 / t.secs.max(1e-9));
        rec.requests_failed = Some(t.failed);
        rec.admin_lat_us = Some(lat_from(&t.hist));
        rec.errors.extend(t.errors);
        ensure!(t.ok > 0, "no admin API request completed");
    }
    drop(conns);
    res
}

/// `Authorization` of the admin listener's default credentials
/// (`admin:public`, base64).
const ADMIN_AUTH: &str = "Basic YWRtaW46cHVibGlj";

/// What the admin load did, summed over its clients.
struct AdminTally {
    ok: u64,
    failed: u64,
    /// Seconds from the load's start to its stop.
    secs: f64,
    hist: Histogram<u64>,
    errors: Vec<String>,
}

impl AdminTally {
    fn new() -> Result<AdminTally> {
        Ok(AdminTally {
            ok: 0,
            failed: 0,
            secs: 0.0,
            hist: Histogram::new_with_bounds(1, 120_000_000_000, 3).context("histogram")?,
            errors: Vec::new(),
        })
    }

    fn error(&mut self, what: String) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(what);
        }
    }
}

/// The admin load: its own thread (its own runtime, SCHED_OTHER), so that
/// reading and checking multi-megabyte responses never delays the
/// generator's MQTT timestamps; on the generator's CPU, where the
/// SCHED_FIFO generator preempts it.
struct AdminLoad {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<AdminTally>>,
}

impl AdminLoad {
    fn start(addr: SocketAddr, clients: usize, expect: usize) -> Result<AdminLoad> {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), completed.clone());
        let thread = std::thread::Builder::new()
            .name("admin-load".into())
            .spawn(move || admin_thread(addr, clients.max(1), expect, &s, &c))
            .context("start the admin load thread")?;
        Ok(AdminLoad {
            stop,
            completed,
            thread,
        })
    }

    /// Until the first admin request has completed (the load is running).
    async fn wait_first(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.completed.load(Ordering::Relaxed) == 0 {
            ensure!(
                !self.thread.is_finished(),
                "the admin load stopped before its first request completed"
            );
            ensure!(
                Instant::now() < deadline,
                "no admin request completed within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stop after the requests in flight; the tally.
    async fn finish(self) -> Result<AdminTally> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(40);
        while !self.thread.is_finished() {
            ensure!(
                Instant::now() < deadline,
                "the admin load did not stop within 40 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the admin load thread panicked"),
        }
    }
}

fn admin_thread(
    addr: SocketAddr,
    clients: usize,
    expect: usize,
    stop: &AtomicBool,
    completed: &AtomicU64,
) -> Result<AdminTally> {
    // Threads inherit SCHED_FIFO from the generator's: not this one.
    sys::set_fifo(None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("admin load runtime")?;
    rt.block_on(async {
        let t0 = Instant::now();
        let parts = futures_util::future::join_all(
            (0..clients).map(|i| admin_client(addr, i, expect, stop, completed)),
        )
        .await;
        let mut all = AdminTally::new()?;
        all.secs = t0.elapsed().as_secs_f64();
        for p in parts {
            let p = p?;
            all.ok += p.ok;
            all.failed += p.failed;
            all.hist.add(&p.hist).context("merge histograms")?;
            for e in p.errors {
                if all.errors.len() < 5 {
                    all.errors.push(e);
                }
            }
        }
        Ok(all)
    })
}

/// The requests of one listing cycle: every `GET /api/v4/clients` page of
/// `expect` clients, then NanoMQ's req 5 (the whole list in one answer).
fn admin_cycle(addr: SocketAddr, expect: usize, seq: u64) -> Vec<(String, AdminCheck)> {
    let pages = expect.div_ceil(ADMIN_PAGE).max(1);
    let mut v: Vec<(String, AdminCheck)> = (1..=pages)
        .map(|page| {
            let full = expect.min(page * ADMIN_PAGE) - (page - 1) * ADMIN_PAGE;
            (
                format!(
                    "GET /api/v4/clients?_page={page}&_limit={ADMIN_PAGE} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {ADMIN_AUTH}\r\n\r\n"
                ),
                AdminCheck {
                    what: "GET /api/v4/clients",
                    key: b"\"clientid\":",
                    at_least: full,
                },
            )
        })
        .collect();
    let body = format!("{{\"req\":5,\"seq\":{seq}}}");
    v.push((
        format!(
            "POST /api/v1 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {ADMIN_AUTH}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        AdminCheck {
            what: "POST /api/v1 req 5",
            key: b"\"client_id\":",
            at_least: expect,
        },
    ));
    v
}

/// What an admin answer must hold: 200, `"code":0`, and at least
/// `at_least` entries (occurrences of `key`).
struct AdminCheck {
    what: &'static str,
    key: &'static [u8],
    at_least: usize,
}

impl AdminCheck {
    fn check(&self, status: u16, resp: &[u8]) -> Result<()> {
        ensure!(status == 200, "{}: HTTP {status}", self.what);
        let body = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| &resp[i + 4..])
            .context("response without a header end")?;
        ensure!(
            body.windows(8).take(64).any(|w| w == b"\"code\":0"),
            "{}: no \"code\":0 at the start of the answer",
            self.what
        );
        let n = count(body, self.key);
        ensure!(
            n >= self.at_least,
            "{}: {n} clients listed, expected at least {}",
            self.what,
            self.at_least
        );
        Ok(())
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    let (mut n, mut i) = (0, 0);
    while let Some(p) = hay
        .get(i..)
        .and_then(|h| h.windows(needle.len()).position(|w| w == needle))
    {
        n += 1;
        i += p + needle.len();
    }
    n
}

/// One keep-alive admin client: the listing cycle, back to back, until
/// `stop`. A failed connection is reopened after 100 ms.
async fn admin_client(
    addr: SocketAddr,
    id: usize,
    expect: usize,
    stop: &AtomicBool,
    completed: &AtomicU64,
) -> Result<AdminTally> {
    use tokio::io::AsyncReadExt;
    let mut t = AdminTally::new()?;
    let base = Instant::now();
    let mut rb = vec![0u8; 64 * 1024];
    let mut seq = (id as u64) << 32;
    let mut conn: Option<TcpStream> = None;
    'outer: while !stop.load(Ordering::Relaxed) {
        seq += 1;
        for (req, check) in admin_cycle(addr, expect, seq) {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            if conn.is_none() {
                match tcp_from(addr, Ipv4Addr::LOCALHOST).await {
                    Ok(s) => {
                        s.set_nodelay(true).context("TCP_NODELAY")?;
                        conn = Some(s);
                    }
                    Err(e) => {
                        t.error(format!("admin client {id}: {e:#}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'outer;
                    }
                }
            }
            let Some(s) = conn.as_mut() else {
                continue 'outer;
            };
            let t0 = base.elapsed();
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                s.write_all(req.as_bytes()).await.context("send request")?;
                let mut end = 0usize;
                loop {
                    if let Some((status, used)) = parse_response(&rb[..end])? {
                        ensure!(used == end, "bytes after the response");
                        return check.check(status, &rb[..end]);
                    }
                    if end == rb.len() {
                        ensure!(rb.len() < 256 << 20, "admin response over 256 MiB");
                        rb.resize(rb.len() * 2, 0);
                    }
                    let n = s.read(&mut rb[end..]).await.context("read response")?;
                    ensure!(n > 0, "connection closed by the broker");
                    end += n;
                }
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("no whole response within 30 s")));
            match r {
                Ok(()) => {
                    t.ok += 1;
                    completed.fetch_add(1, Ordering::Relaxed);
                    let ns = (base.elapsed() - t0).as_nanos() as u64;
                    t.hist.saturating_record(ns.max(1));
                }
                Err(e) => {
                    t.error(format!("admin client {id}: {e:#}"));
                    // The connection may hold half a response: a new one.
                    conn = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Ok(t)
}

/// A run against its reference: `f-http` requests/s ÷ the anchor's (↑),
/// `g-ws-fanout` broker CPU per delivery WebSocket ÷ MQTT (↓).
pub fn vs_reference(main: &Record, reference: &Record) -> Option<f64> {
    if !main.ok || !reference.ok {
        return None;
    }
    let (a, b) = match main.kind.as_str() {
        "http" => (main.req_per_s?, reference.req_per_s?),
        "admin" => (main.lat_us.as_ref()?.p99, reference.lat_us.as_ref()?.p99),
        _ => (
            main.broker_cpu_us_per_msg?,
            reference.broker_cpu_us_per_msg?,
        ),
    };
    (b > 0.0).then(|| a / b)
}

/// Did the run do what a smoke test asks: deliver, and lose nothing at QoS 1?
pub fn smoke_check(rec: &Record) -> Result<()> {
    if !rec.ok {
        bail!("run failed: {}", rec.errors.join("; "));
    }
    if let Some(r) = &rec.reference {
        let what = r.part.as_deref().unwrap_or("reference");
        if !r.ok {
            bail!("{what} run failed: {}", r.errors.join("; "));
        }
        if r.kind == "http" && r.req_per_s.unwrap_or(0.0) <= 0.0 {
            bail!("{what}: no request answered");
        }
        if r.kind != "http" && r.delivered.unwrap_or(0) == 0 {
            bail!("{what}: delivered nothing");
        }
    }
    if rec.kind == "http" && rec.req_per_s.unwrap_or(0.0) <= 0.0 {
        bail!("no HTTP request answered 200");
    }
    if rec.kind == "admin" {
        let failed = rec.requests_failed.unwrap_or(0);
        if failed > 0 {
            bail!(
                "{failed} admin API request(s) failed: {}",
                rec.errors.join("; ")
            );
        }
        if rec.req_per_s.unwrap_or(0.0) <= 0.0 {
            bail!("no admin API request completed");
        }
    }
    match rec.kind.as_str() {
        "idle" => {
            let c = rec.conns.unwrap_or(0);
            if c == 0 || rec.conns_alive.unwrap_or(0) < c {
                bail!(
                    "idle: {c} connected, {} answered PINGREQ",
                    rec.conns_alive.unwrap_or(0)
                );
            }
        }
        "connect" => {
            if rec.conns.unwrap_or(0) == 0 {
                bail!("connect: no connection completed");
            }
        }
        "storebytes" => {
            if rec.published.unwrap_or(0) == 0 || rec.unacked.unwrap_or(0) > 0 {
                bail!(
                    "{} messages PUBACKed, {} not acknowledged",
                    rec.published.unwrap_or(0),
                    rec.unacked.unwrap_or(0)
                );
            }
            if rec.store_bytes_per_msg.unwrap_or(0.0) <= 0.0 {
                bail!("the store wrote nothing for the queued messages");
            }
        }
        _ => {
            if rec.delivered.unwrap_or(0) == 0 || rec.msg_per_s.unwrap_or(0.0) <= 0.0 {
                bail!("delivered nothing");
            }
            let (lost, unacked, undelivered) = (
                rec.lost.unwrap_or(0),
                rec.unacked.unwrap_or(0),
                rec.undelivered.unwrap_or(0),
            );
            if rec.qos == Some(1) && lost + unacked + undelivered > 0 {
                bail!(
                    "QoS 1 loss: {lost} lost, {undelivered} not delivered, {unacked} not acknowledged, of {} expected",
                    rec.expected.unwrap_or(0)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-second windows (latency windows of `latency` s), the default
    /// client counts, and both `i-sparse` sizes.
    fn test_durations(latency: f64) -> Durations {
        Durations {
            throughput: 1.0,
            latency,
            connect: 1.0,
            http_clients: HTTP_CLIENTS,
            restart_messages: 1000,
            store_bytes_messages: 10,
            many_pubs: MANY_PUBS,
            sparse: vec![10_000, 50_000],
            sparse_period: SPARSE_PERIOD,
        }
    }

    #[test]
    fn payload_header_round_trip() {
        let mut b = Vec::new();
        put_payload(&mut b, 123, 7, 99, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(get_payload(&b), Some((123, 7, 99)));
        assert_eq!(get_payload(&b[..10]), None);
    }

    #[test]
    fn scenario_list_respects_fd_limit() {
        let d = test_durations(1.0);
        let (v, notes) = all(&d, 20_000, &[10_000, 50_000]);
        assert!(v.iter().any(|s| s.id == "d-idle-10k"));
        assert!(!v.iter().any(|s| s.id == "d-idle-50k"));
        assert!(notes.iter().any(|n| n.contains("50k")));
        assert!(
            v.iter()
                .any(|s| s.id == "f-http" && s.reference().is_some())
        );
        assert!(
            v.iter()
                .any(|s| s.id == "g-ws-fanout" && s.latency_sensitive())
        );
        assert!(
            !v.iter()
                .find(|s| s.id == "f-http")
                .unwrap()
                .supports(crate::broker::Kind::Mosquitto)
        );
        assert!(v.iter().any(|s| s.kind() == "overload"));
        // Persistence: the memory-only Starling only where it compares,
        // restart and store bytes need the store.
        use crate::broker::Kind;
        let by = |id: &str| v.iter().find(|s| s.id == id).unwrap();
        let fanin = by("p-fanin-q1-persistent");
        assert!(fanin.supports(Kind::Starling) && fanin.supports(Kind::StarlingMem));
        assert!(fanin.supports(Kind::Mosquitto) && !fanin.supports(Kind::Rumqttd));
        assert!(by("p-fanin-q1-offline").queue_caps().is_some());
        for id in ["p-restart-1m", "p-fanout-1000-bytes"] {
            assert!(by(id).supports(Kind::Starling));
            assert!(!by(id).supports(Kind::StarlingMem) && !by(id).supports(Kind::Mosquitto));
        }
        assert!(!by("a-fanin-q1-64B").supports(Kind::StarlingMem));
    }

    #[test]
    fn http_responses() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"matched\":1}";
        assert_eq!(parse_response(r).unwrap(), Some((200, r.len())));
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        assert_eq!(parse_response(&r[..20]).unwrap(), None);
        let two = [&r[..], &r[..]].concat();
        assert_eq!(parse_response(&two).unwrap(), Some((200, r.len())));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn admin_scenario_fits_the_fd_limit() {
        let d = test_durations(1.0);
        let (v, notes) = all(&d, 20_000, &[]);
        let h = v.iter().find(|s| s.id == "h-admin-latency-q1").unwrap();
        assert!(matches!(h.spec, Spec::AdminLatency { idle: 10_000, .. }));
        assert!(h.reference().is_some() && h.latency_sensitive());
        assert!(!h.supports(crate::broker::Kind::Mosquitto));
        assert!(!notes.iter().any(|n| n.starts_with("h-")));
        let (v, notes) = all(&d, 4096, &[]);
        let h = v.iter().find(|s| s.id == "h-admin-latency-q1").unwrap();
        assert!(matches!(h.spec, Spec::AdminLatency { idle: 3000, .. }));
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("h-admin-latency-q1 with 3000"))
        );
    }

    #[test]
    fn admin_cycle_and_checks() {
        let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let c = admin_cycle(addr, 10_000, 7);
        assert_eq!(c.len(), 11);
        assert!(
            c[9].0
                .starts_with("GET /api/v4/clients?_page=10&_limit=1000 ")
        );
        assert_eq!(c[9].1.at_least, 1000);
        let post = &c[10].0;
        assert!(post.starts_with("POST /api/v1 ") && post.contains(ADMIN_AUTH));
        assert!(post.ends_with("\r\nContent-Length: 17\r\n\r\n{\"req\":5,\"seq\":7}"));
        assert_eq!(admin_cycle(addr, 1500, 1)[1].1.at_least, 500);

        let check = |n| AdminCheck {
            what: "GET",
            key: b"\"clientid\":",
            at_least: n,
        };
        let ok = b"HTTP/1.1 200 OK\r\n\r\n{\"code\":0,\"data\":[{\"clientid\":\"a\"},{\"clientid\":\"b\"}]}";
        assert!(check(2).check(200, ok).is_ok());
        assert!(check(3).check(200, ok).is_err());
        assert!(check(1).check(401, ok).is_err());
        let refused = b"HTTP/1.1 200 OK\r\n\r\n{\"code\":104,\"data\":[]}";
        assert!(check(0).check(200, refused).is_err());
        assert_eq!(count(b"ababa", b"aba"), 1);
        assert_eq!(count(b"xyxyxy", b"xy"), 3);
    }

    #[test]
    fn many_scenarios() {
        let d = test_durations(6.0);
        let (v, notes) = all(&d, 20_000, &[]);
        let by = |id: &str| v.iter().find(|s| s.id == id);
        for q in ["i-many-q0", "i-many-q1"] {
            let s = by(q).unwrap();
            assert_eq!(s.kind(), "latency");
            assert!(s.latency_sensitive());
            assert_eq!(s.connections(), MANY_PUBS + 1);
            assert!(s.supports(crate::broker::Kind::Mosquitto));
            assert!(!s.supports(crate::broker::Kind::StarlingMem));
        }
        assert!(by("i-many-q1").unwrap().title.contains("1,000×20 msg/s"));
        let sparse = by("i-sparse-10k").unwrap();
        assert_eq!(sparse.kind(), "sparse");
        assert!(matches!(
            sparse.spec,
            Spec::Many {
                pubs: 10_000,
                qos: 1,
                sparse: true,
                ..
            }
        ));
        assert_eq!(sparse.secs, 10.0);
        assert!(by("i-sparse-50k").is_none());
        assert!(notes.iter().any(|n| n.starts_with("i-sparse-50k skipped")));
        let (v, notes) = all(&d, 262_144, &[]);
        assert!(v.iter().any(|s| s.id == "i-sparse-50k"));
        assert!(!notes.iter().any(|n| n.starts_with("i-")));
    }

    #[test]
    fn staggered_schedule() {
        let period = Duration::from_millis(50);
        let off = Duration::from_millis(20);
        let ms = Duration::from_millis;
        assert_eq!(due_count(ms(0), off, period), 0);
        assert_eq!(due_count(ms(19), off, period), 0);
        assert_eq!(due_count(ms(20), off, period), 1);
        assert_eq!(due_count(ms(69), off, period), 1);
        assert_eq!(due_count(ms(70), off, period), 2);
        let t = Instant::now();
        // Sleeping until message k is due makes exactly k + 1 due.
        for k in [0u64, 1, 7, 1000] {
            let at = due_at(t, off, period, k);
            assert_eq!(due_count(at - t, off, period), k + 1);
        }
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(50_000), "50,000");
        assert_eq!(grouped(999), "999");
    }

    #[test]
    fn growth_is_a_slope() {
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0)).collect();
        assert_eq!(growth(&flat), Some(0.0));
        let up: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 2.0 * i as f64)).collect();
        assert!((growth(&up).unwrap() - 2.0).abs() < 1e-9);
    }
}

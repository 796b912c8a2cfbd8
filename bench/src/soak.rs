//! `starling-bench soak`: a long mixed load against one Starling broker
//! whose auth bundle keeps changing, checked for broken delivery promises
//! and for leaks.
//!
//! Load (moderate: well under a core each for generator and broker):
//! QoS 0, 1 and 2 publishers on their own topics, one QoS 1 publisher of
//! retained messages over a fixed set of topics, subscribers on plain and
//! wildcard filters that stay connected, persistent-session subscribers
//! (MQTT 5 session expiry and 3.1.1 clean session = 0) that go away and come
//! back (DISCONNECT, a dropped socket, or a takeover by a new connection),
//! and short-lived connections (connect/disconnect, a retained-message
//! check, a QoS 1 publish, a refused subscription). Every few seconds the
//! bundle file is replaced (write to a temporary file + rename) with a
//! harmless change: spare tokens added and removed, their labels and ACL
//! changed. The two tokens the clients use never change.
//!
//! Every payload carries the publisher's index and a sequence number, and
//! each subscriber keeps a bitmap per publisher, so at the end:
//! - QoS 1 and 2: every message the broker acknowledged (PUBACK / PUBREC)
//!   reached every subscriber whose filter matches it — the persistent ones
//!   included, for what was published while they were offline (the queue
//!   cap is raised so that nothing may be dropped legitimately);
//! - QoS 2 (effective QoS 2: published and subscribed at 2): no message
//!   reached the application twice;
//! - broker RSS is flat after warm-up: least-squares slope over the samples
//!   after the first 20 % of the run, extrapolated over the whole run;
//! - open file descriptors are back to their start value;
//! - the broker counted a bundle reload for (nearly) every rewrite, and
//!   rejected none;
//! - a retained subscription always returned, for every topic, the message
//!   acknowledged last before it (or a later one).

use crate::broker::{Broker, Kind, StartOpts};
use crate::mqtt::{self, Conn, ConnectOpts, Version};
use crate::sys;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

pub struct Opts {
    pub bin: PathBuf,
    pub secs: f64,
    /// Seconds between table rows (RSS and fds are sampled every second).
    pub report_every: f64,
    /// Seconds between bundle rewrites.
    pub reload_every: f64,
    /// Multiplier of the publish rates (1.0 ≈ 970 msg/s in, 3,800 msg/s
    /// delivered).
    pub rate: f64,
    /// Short-lived connections per second.
    pub short_rate: f64,
    pub out: PathBuf,
    /// RSS growth allowed over the run, MiB (the larger of this and
    /// `rss_limit_pct` applies).
    pub rss_limit_mib: f64,
    /// … or this share of the post-warm-up RSS, percent.
    pub rss_limit_pct: f64,
    /// Open fds allowed above the start value once every client is gone.
    pub fd_slack: u64,
    pub command: String,
    /// Keep the work directory (bundle, broker logs) even after a pass.
    pub keep: bool,
}

/// Token names the load uses; both stay valid throughout.
const CLIENT_TOKEN: &str = "soak-client";
const SHORT_TOKEN: &str = "soak-short";
/// Spare tokens added to and removed from the bundle by the rewrites.
const SPARES: usize = 3;
const RETAINED_TOPICS: usize = 16;
const KEEPALIVE: u16 = 30;
const PING_EVERY: Duration = Duration::from_secs(10);
/// QoS 1/2 messages a publisher keeps unacknowledged.
const WINDOW: usize = 16;
/// Session expiry the MQTT 5 persistent subscriber asks for, seconds.
const SESSION_EXPIRY: u32 = 600;
/// Raised queue cap: a persistent subscriber offline for 1.5 s at most
/// misses ~700 QoS 1/2 messages at rate 1.0; this leaves room for 100×.
const QUEUE_CAP: usize = 100_000;
const QUEUE_BYTES: usize = 256 * 1024 * 1024;
const PAYLOAD_HEADER: usize = 20;
/// Share of the run treated as warm-up for the RSS slope.
const WARMUP_SHARE: f64 = 0.2;

// ---------------------------------------------------------------------------
// What runs

struct PubDef {
    name: &'static str,
    v: Version,
    qos: u8,
    retain: bool,
    topics: Vec<String>,
    /// Messages per second.
    rate: f64,
    payload: usize,
}

struct SubDef {
    name: &'static str,
    v: Version,
    persistent: bool,
    filters: Vec<(String, u8)>,
}

fn publishers(rate: f64) -> Vec<PubDef> {
    let one = |name, v, qos, topic: &str, r: f64, payload| PubDef {
        name,
        v,
        qos,
        retain: false,
        topics: vec![topic.to_string()],
        rate: r * rate,
        payload,
    };
    vec![
        one("q0-a", Version::V311, 0, "soak/q0/0", 250.0, 64),
        one("q0-b", Version::V5, 0, "soak/q0/1", 250.0, 64),
        one("q1-a", Version::V311, 1, "soak/q1/0", 150.0, 128),
        one("q1-b", Version::V5, 1, "soak/q1/1", 150.0, 128),
        one("q2-a", Version::V311, 2, "soak/q2/0", 75.0, 256),
        one("q2-b", Version::V5, 2, "soak/q2/1", 75.0, 256),
        PubDef {
            name: "retained",
            v: Version::V5,
            qos: 1,
            retain: true,
            topics: (0..RETAINED_TOPICS)
                .map(|k| format!("soak/retained/{k}"))
                .collect(),
            rate: 20.0 * rate,
            payload: 100,
        },
    ]
}

/// Index of the retained publisher in [`publishers`].
const RETAINED_PUB: usize = 6;

fn subscribers() -> Vec<SubDef> {
    let f = |v: &[(&str, u8)]| v.iter().map(|(t, q)| (t.to_string(), *q)).collect();
    vec![
        SubDef {
            name: "plain",
            v: Version::V311,
            persistent: false,
            filters: f(&[("soak/q0/0", 0), ("soak/q1/0", 1), ("soak/q2/0", 2)]),
        },
        SubDef {
            name: "wild-plus",
            v: Version::V5,
            persistent: false,
            filters: f(&[("soak/+/+", 2)]),
        },
        SubDef {
            name: "wild-hash",
            v: Version::V311,
            persistent: false,
            filters: f(&[("soak/#", 1)]),
        },
        SubDef {
            name: "persist-v5",
            v: Version::V5,
            persistent: true,
            filters: f(&[("soak/q1/+", 2), ("soak/q2/+", 2), ("soak/retained/+", 1)]),
        },
        SubDef {
            name: "persist-311",
            v: Version::V311,
            persistent: true,
            filters: f(&[("soak/#", 2)]),
        },
    ]
}

/// MQTT topic filter matching (no `$` topics here).
fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// QoS a subscriber should get a publisher's messages at (None: not at all).
fn effective_qos(s: &SubDef, p: &PubDef) -> Option<u8> {
    s.filters
        .iter()
        .filter(|(f, _)| p.topics.iter().any(|t| matches(f, t)))
        .map(|(_, q)| *q)
        .max()
        .map(|q| q.min(p.qos))
}

// ---------------------------------------------------------------------------
// Bookkeeping

/// A growable bitmap of sequence numbers.
#[derive(Default, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; true if it was not set before.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Bits set in `want` but not here.
    fn missing_from(&self, want: &Bits) -> u64 {
        want.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !self.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

#[derive(Default)]
struct PubState {
    sent: u64,
    /// QoS 1: PUBACKed; QoS 2: PUBRECed (the broker owns the message).
    acked: Bits,
    acked_n: u64,
    completed: u64,
    refused: u64,
    /// Retained publisher: highest acknowledged sequence number per topic.
    last_acked: Vec<Option<u64>>,
    done: bool,
}

#[derive(Default)]
struct SubState {
    /// Per publisher: QoS at which its messages should arrive.
    expect: Vec<Option<u8>>,
    seen: Vec<Bits>,
    /// Unique deliveries and duplicates, by delivered QoS.
    new: [u64; 3],
    dup: [u64; 3],
    /// QoS 2 PUBLISH re-sent for a packet id still awaiting PUBREL (not
    /// given to the application again; the receiver's job).
    qos2_resent: u64,
    /// Deliveries at another QoS than expected, or from a publisher whose
    /// topic the filters do not match.
    wrong_qos: u64,
    unexpected: u64,
    /// RETAIN set on a delivery for an established subscription.
    retain_live: u64,
    /// Deliveries with DUP set (re-sent after a reconnect), and repeated
    /// deliveries without it.
    dup_flagged: u64,
    dup_unflagged: u64,
    malformed: u64,
    /// QoS 2 packet ids received and PUBRECed, waiting for PUBREL: client
    /// session state, kept across reconnects of a persistent session.
    pending: HashSet<u16>,
    /// Subscriptions had to be made again (the session was lost).
    resubscribed: bool,
    reconnects: u64,
    takeovers: u64,
    online: bool,
}

#[derive(Default)]
struct ShortStats {
    ok: u64,
    failed: u64,
    retained_checks: u64,
    retained_bad: u64,
    denied_ok: u64,
}

struct Shared {
    addr: SocketAddr,
    t0: Instant,
    pubs: Vec<PubDef>,
    subs: Vec<SubDef>,
    pub_state: RefCell<Vec<PubState>>,
    sub_state: RefCell<Vec<SubState>>,
    short: RefCell<ShortStats>,
    subscribed: Cell<usize>,
    /// Load over: publishers drain and stop, persistent subscribers come
    /// back online and stay, short-lived connections and rewrites stop.
    stop: Cell<bool>,
    /// Drain over: subscribers end their sessions and disconnect.
    finish: Cell<bool>,
    bundle_writes: Cell<u64>,
    errors: RefCell<Vec<String>>,
    error_count: Cell<u64>,
    client_secret: String,
    short_secret: String,
}

impl Shared {
    fn error(&self, e: String) {
        self.error_count.set(self.error_count.get() + 1);
        let mut v = self.errors.borrow_mut();
        if v.len() < 20 {
            eprintln!(
                "soak: error at {:.1} s: {e}",
                self.t0.elapsed().as_secs_f64()
            );
            v.push(e);
        }
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// QoS 1/2 acknowledged deliveries not (yet) seen, summed over
    /// subscribers, by effective QoS.
    fn missing(&self) -> [u64; 3] {
        let ps = self.pub_state.borrow();
        let ss = self.sub_state.borrow();
        let mut m = [0u64; 3];
        for s in ss.iter() {
            for (p, q) in s.expect.iter().enumerate() {
                if let Some(q) = *q
                    && q > 0
                {
                    m[q as usize] += s.seen[p].missing_from(&ps[p].acked);
                }
            }
        }
        m
    }
}

fn put_payload(buf: &mut Vec<u8>, ts: u64, publisher: u32, seq: u64, len: usize) {
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(&publisher.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.resize(buf.len() + len.saturating_sub(PAYLOAD_HEADER), 0xa5);
}

fn get_payload(p: &[u8]) -> Option<(usize, u64)> {
    let publisher = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
    let seq = u64::from_le_bytes(p.get(12..20)?.try_into().ok()?);
    Some((publisher as usize, seq))
}

// ---------------------------------------------------------------------------
// Connections

async fn connect(
    sh: &Shared,
    v: Version,
    id: &str,
    token: &str,
    clean: bool,
    expiry: Option<u32>,
) -> Result<(Conn, bool)> {
    let secret = if token == SHORT_TOKEN {
        &sh.short_secret
    } else {
        &sh.client_secret
    };
    let o = ConnectOpts {
        client_id: id.as_bytes(),
        keepalive: KEEPALIVE,
        clean,
        username: Some(token.as_bytes()),
        password: Some(secret.as_bytes()),
        session_expiry: expiry,
    };
    let s = TcpStream::connect(sh.addr).await.context("connect")?;
    tokio::time::timeout(
        Duration::from_secs(10),
        Conn::open_with(s, v, &o, 64 * 1024),
    )
    .await
    .with_context(|| format!("{id}: no CONNACK within 10 s"))?
    .with_context(|| format!("{id}: connect"))
}

async fn publisher(sh: Rc<Shared>, i: usize) -> Result<()> {
    let d = &sh.pubs[i];
    let id = format!("soak-pub-{}", d.name);
    let (mut c, _) = connect(&sh, d.v, &id, CLIENT_TOKEN, true, None).await?;
    // pid → (seq, PUBREC received)
    let mut inflight: HashMap<u16, (u64, bool)> = HashMap::new();
    let (mut pid, mut seq) = (0u16, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut last_ping = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut out = Vec::with_capacity(16 * 1024);
    let ntopics = d.topics.len() as u64;
    loop {
        if sh.stop.get() {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if inflight.is_empty() {
                break;
            }
            ensure!(
                at.elapsed() < Duration::from_secs(15),
                "{} QoS {} messages still unacknowledged 15 s after the load stopped",
                inflight.len(),
                d.qos
            );
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = c.stream.readable() => {
                r.context("wait readable")?;
                c.rb.try_fill(&c.stream)?;
            }
        }
        {
            let mut ps = sh.pub_state.borrow_mut();
            let st = &mut ps[i];
            while let Some(f) = c.rb.next_frame()? {
                match f.kind {
                    mqtt::PUBACK if d.qos == 1 => {
                        let (p, code) = mqtt::ack_fields(f.body)?;
                        let Some((s, _)) = inflight.remove(&p) else {
                            bail!("PUBACK for packet id {p}, which is not in flight");
                        };
                        if code >= 0x80 {
                            st.refused += 1;
                            sh.error(format!("{id}: PUBACK refused message {s} ({code:#x})"));
                            continue;
                        }
                        st.acked.set(s);
                        st.acked_n += 1;
                        st.completed += 1;
                        if d.retain {
                            let k = (s % ntopics) as usize;
                            st.last_acked[k] = Some(st.last_acked[k].map_or(s, |x| x.max(s)));
                        }
                    }
                    mqtt::PUBREC if d.qos == 2 => {
                        let (p, code) = mqtt::ack_fields(f.body)?;
                        match inflight.get_mut(&p) {
                            Some((s, rel)) if !*rel => {
                                if code >= 0x80 {
                                    st.refused += 1;
                                    sh.error(format!(
                                        "{id}: PUBREC refused message {s} ({code:#x})"
                                    ));
                                    inflight.remove(&p);
                                    continue;
                                }
                                *rel = true;
                                st.acked.set(*s);
                                st.acked_n += 1;
                                mqtt::pubrel(&mut out, p);
                            }
                            // A repeated PUBREC: PUBREL again.
                            Some(_) => mqtt::pubrel(&mut out, p),
                            None => bail!("PUBREC for packet id {p}, which is not in flight"),
                        }
                    }
                    mqtt::PUBCOMP if d.qos == 2 => {
                        let (p, _) = mqtt::ack_fields(f.body)?;
                        match inflight.remove(&p) {
                            Some((_, true)) => st.completed += 1,
                            Some((s, false)) => {
                                bail!("PUBCOMP before PUBREC for packet id {p} (message {s})")
                            }
                            None => bail!("PUBCOMP for packet id {p}, which is not in flight"),
                        }
                    }
                    mqtt::PINGRESP => {}
                    mqtt::DISCONNECT => bail!("DISCONNECT from the broker {:02x?}", f.body),
                    k => bail!("unexpected packet type {k} on a QoS {} publisher", d.qos),
                }
            }
            if !sh.stop.get() {
                let due = ((start.elapsed().as_secs_f64() * d.rate) as u64).saturating_sub(seq);
                let room = if d.qos > 0 {
                    WINDOW.saturating_sub(inflight.len()) as u64
                } else {
                    u64::MAX
                };
                let n = due.min(room).min(256);
                let ts = sh.now_ns();
                for _ in 0..n {
                    let topic = &d.topics[(seq % ntopics) as usize];
                    if d.qos > 0 {
                        loop {
                            pid = pid.wrapping_add(1).max(1);
                            if !inflight.contains_key(&pid) {
                                break;
                            }
                        }
                        inflight.insert(pid, (seq, false));
                    }
                    mqtt::publish_header_flags(
                        &mut out,
                        d.v,
                        topic.as_bytes(),
                        d.qos,
                        d.retain,
                        pid,
                        d.payload,
                    );
                    put_payload(&mut out, ts, i as u32, seq, d.payload);
                    seq += 1;
                }
                st.sent += n;
            }
        }
        if last_ping.elapsed() >= PING_EVERY {
            mqtt::pingreq(&mut out);
            last_ping = Instant::now();
        }
        if !out.is_empty() {
            c.stream.write_all(&out).await.context("send")?;
            out.clear();
        }
    }
    out.clear();
    mqtt::disconnect(&mut out);
    let _ = c.stream.write_all(&out).await;
    Ok(())
}

/// Handles what arrived on a subscriber's connection; answers go to `out`.
fn on_frames(sh: &Shared, s: usize, c: &mut Conn, out: &mut Vec<u8>) -> Result<()> {
    let mut ss = sh.sub_state.borrow_mut();
    let st = &mut ss[s];
    let v = c.v;
    while let Some(f) = c.rb.next_frame()? {
        match f.kind {
            mqtt::PUBLISH => {
                let p = mqtt::parse_publish(v, f.flags, f.body)?;
                let fresh = match p.qos {
                    0 => true,
                    1 => {
                        mqtt::puback(out, p.pid);
                        true
                    }
                    _ => {
                        mqtt::pubrec(out, p.pid);
                        st.pending.insert(p.pid)
                    }
                };
                if !fresh {
                    st.qos2_resent += 1;
                    continue;
                }
                let Some((publisher, seq)) = get_payload(p.payload) else {
                    st.malformed += 1;
                    continue;
                };
                if publisher >= st.expect.len() {
                    st.malformed += 1;
                    continue;
                }
                if p.retain {
                    if st.resubscribed {
                        // Sent for a new subscription: not part of the stream.
                        continue;
                    }
                    st.retain_live += 1;
                }
                match st.expect[publisher] {
                    None => st.unexpected += 1,
                    Some(q) if q != p.qos => st.wrong_qos += 1,
                    Some(_) => {}
                }
                st.dup_flagged += u64::from(p.dup);
                if st.seen[publisher].set(seq) {
                    st.new[p.qos as usize] += 1;
                } else {
                    st.dup[p.qos as usize] += 1;
                    st.dup_unflagged += u64::from(!p.dup);
                }
            }
            mqtt::PUBREL => {
                let (pid, _) = mqtt::ack_fields(f.body)?;
                st.pending.remove(&pid);
                mqtt::pubcomp(out, pid);
            }
            mqtt::PINGRESP | mqtt::SUBACK => {}
            mqtt::DISCONNECT => bail!("DISCONNECT from the broker {:02x?}", f.body),
            k => bail!("unexpected packet type {k} on a subscriber"),
        }
    }
    Ok(())
}

/// Serves subscriber `s` on `c` until `until` (or `finish`, or `stop` when
/// `leave_on_stop`).
async fn serve(
    sh: &Shared,
    s: usize,
    c: &mut Conn,
    until: Option<Instant>,
    leave_on_stop: bool,
) -> Result<()> {
    let mut out = Vec::with_capacity(4096);
    let mut last_ping = Instant::now();
    loop {
        if sh.finish.get()
            || (leave_on_stop && sh.stop.get())
            || until.is_some_and(|u| Instant::now() >= u)
        {
            return Ok(());
        }
        // Cancelling `fill` loses nothing: it only waits for readiness.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), c.rb.fill(&c.stream)).await
        {
            r?;
        }
        on_frames(sh, s, c, &mut out)?;
        if last_ping.elapsed() >= PING_EVERY {
            mqtt::pingreq(&mut out);
            last_ping = Instant::now();
        }
        if !out.is_empty() {
            c.stream.write_all(&out).await.context("send acks")?;
            out.clear();
        }
    }
}

async fn subscribe_all(sh: &Shared, s: usize, c: &mut Conn) -> Result<()> {
    for (k, (f, q)) in sh.subs[s].filters.iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(10), c.subscribe(k as u16 + 1, f, *q))
            .await
            .context("no SUBACK within 10 s")??;
    }
    Ok(())
}

async fn subscriber(sh: Rc<Shared>, s: usize) -> Result<()> {
    let d = &sh.subs[s];
    let id = format!("soak-sub-{}", d.name);
    let (mut c, _) = connect(&sh, d.v, &id, CLIENT_TOKEN, true, None).await?;
    subscribe_all(&sh, s, &mut c).await?;
    sh.sub_state.borrow_mut()[s].online = true;
    sh.subscribed.set(sh.subscribed.get() + 1);
    serve(&sh, s, &mut c, None, false).await?;
    let mut out = Vec::new();
    mqtt::disconnect(&mut out);
    let _ = c.stream.write_all(&out).await;
    Ok(())
}

/// Sleep up to `d`, cut short when the load stops.
async fn nap(sh: &Shared, d: Duration) {
    let until = Instant::now() + d;
    while !sh.stop.get() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn persistent(sh: Rc<Shared>, s: usize) -> Result<()> {
    let d = &sh.subs[s];
    let id = format!("soak-sub-{}", d.name);
    let v5 = d.v == Version::V5;
    let expiry = v5.then_some(SESSION_EXPIRY);
    // A fresh session first, then resumes. MQTT 5: clean start with an
    // expiry keeps the session; 3.1.1: clean session = 1 would end it with
    // the connection, so the first CONNECT already asks for a persistent
    // one (the broker is new: there is nothing to resume).
    let (mut c, _) = connect(&sh, d.v, &id, CLIENT_TOKEN, v5, expiry).await?;
    subscribe_all(&sh, s, &mut c).await?;
    sh.sub_state.borrow_mut()[s].online = true;
    sh.subscribed.set(sh.subscribed.get() + 1);
    let mut k = 0u64;
    // Two subscribers: offset their cycles.
    let phase = s as u64;
    loop {
        let online = Duration::from_millis(4000 + 1000 * ((k + phase) % 4));
        serve(&sh, s, &mut c, Some(Instant::now() + online), true).await?;
        if sh.stop.get() {
            break;
        }
        let offline = Duration::from_millis(500 + 500 * ((k + phase) % 3));
        let takeover = (k + phase) % 3 == 2;
        if takeover {
            // A new connection for the same session while the old one is
            // still open: the broker must hand the session over.
            let (nc, present) = connect(&sh, d.v, &id, CLIENT_TOKEN, false, expiry).await?;
            drop(std::mem::replace(&mut c, nc));
            resumed(&sh, s, &mut c, present, true).await?;
        } else {
            if (k + phase).is_multiple_of(3) {
                let mut out = Vec::new();
                mqtt::disconnect(&mut out);
                c.stream.write_all(&out).await.context("send DISCONNECT")?;
            }
            // Otherwise the socket is just dropped (no DISCONNECT).
            drop(c);
            sh.sub_state.borrow_mut()[s].online = false;
            nap(&sh, offline).await;
            let (nc, present) = connect(&sh, d.v, &id, CLIENT_TOKEN, false, expiry).await?;
            c = nc;
            resumed(&sh, s, &mut c, present, false).await?;
        }
        k += 1;
    }
    // Stay for the drain, then end the session so the broker can free it.
    serve(&sh, s, &mut c, None, false).await?;
    let mut out = Vec::new();
    if d.v == Version::V5 {
        mqtt::disconnect_v5_expiry(&mut out, 0);
        let _ = c.stream.write_all(&out).await;
    } else {
        mqtt::disconnect(&mut out);
        let _ = c.stream.write_all(&out).await;
        drop(c);
        let (mut c, _) = connect(&sh, d.v, &id, CLIENT_TOKEN, true, None).await?;
        let _ = c.stream.write_all(&out).await;
    }
    Ok(())
}

/// After a reconnect of a persistent subscriber: the session must still be
/// there (Session Present); if not, record it and subscribe again.
async fn resumed(sh: &Shared, s: usize, c: &mut Conn, present: bool, takeover: bool) -> Result<()> {
    {
        let mut ss = sh.sub_state.borrow_mut();
        let st = &mut ss[s];
        st.online = true;
        st.reconnects += 1;
        st.takeovers += u64::from(takeover);
    }
    if !present {
        sh.error(format!(
            "{}: session not present after a reconnect{}",
            sh.subs[s].name,
            if takeover { " (takeover)" } else { "" }
        ));
        sh.sub_state.borrow_mut()[s].resubscribed = true;
        subscribe_all(sh, s, c).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Short-lived connections

async fn short_loop(sh: Rc<Shared>, rate: f64) {
    let mut set = JoinSet::new();
    let every = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut k = 0u64;
    while !sh.stop.get() {
        while set.try_join_next().is_some() {}
        if set.len() < 16 {
            let sh2 = sh.clone();
            set.spawn_local(async move {
                let r = tokio::time::timeout(Duration::from_secs(15), short_one(&sh2, k)).await;
                let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("took over 15 s")));
                match r {
                    Ok(()) => sh2.short.borrow_mut().ok += 1,
                    Err(e) => {
                        sh2.short.borrow_mut().failed += 1;
                        sh2.error(format!("short-lived connection {k}: {e:#}"));
                    }
                }
            });
            k += 1;
        }
        tokio::time::sleep(every).await;
    }
    while set.join_next().await.is_some() {}
}

async fn short_one(sh: &Shared, k: u64) -> Result<()> {
    let v = if k.is_multiple_of(2) {
        Version::V311
    } else {
        Version::V5
    };
    let id = format!("soak-short-{k}");
    let (mut c, _) = connect(sh, v, &id, SHORT_TOKEN, true, None).await?;
    let mut out = Vec::new();
    match k % 4 {
        0 => {
            mqtt::disconnect(&mut out);
            c.stream.write_all(&out).await?;
        }
        1 => retained_check(sh, &mut c).await?,
        2 => {
            let topic = format!("short/{}", k % 8);
            mqtt::publish_header(&mut out, v, topic.as_bytes(), 1, 1, 32);
            put_payload(&mut out, sh.now_ns(), u32::MAX, k, 32);
            c.stream.write_all(&out).await?;
            loop {
                if let Some(f) = c.rb.next_frame()? {
                    ensure!(f.kind == mqtt::PUBACK, "expected PUBACK, got {}", f.kind);
                    let (pid, code) = mqtt::ack_fields(f.body)?;
                    ensure!(pid == 1 && code < 0x80, "PUBACK {pid} code {code:#x}");
                    break;
                }
                c.rb.fill(&c.stream).await?;
            }
            out.clear();
            mqtt::disconnect(&mut out);
            c.stream.write_all(&out).await?;
        }
        _ => {
            let code = c.subscribe_code(1, "soak-denied/#", 1).await?;
            ensure!(
                code >= 0x80,
                "subscription to soak-denied/# granted ({code:#x})"
            );
            sh.short.borrow_mut().denied_ok += 1;
            mqtt::publish_header(&mut out, v, b"short/q0", 0, 0, 24);
            put_payload(&mut out, sh.now_ns(), u32::MAX, k, 24);
            c.stream.write_all(&out).await?;
            // Dropped without DISCONNECT.
        }
    }
    Ok(())
}

/// Subscribes to the retained topics: each must come back with the message
/// acknowledged last before the SUBSCRIBE, or a later one.
async fn retained_check(sh: &Shared, c: &mut Conn) -> Result<()> {
    let before: Vec<Option<u64>> = sh.pub_state.borrow()[RETAINED_PUB].last_acked.clone();
    let want = before.iter().filter(|s| s.is_some()).count();
    let code = c.subscribe_code(1, "soak/retained/+", 1).await?;
    ensure!(code < 0x80, "retained subscription refused ({code:#x})");
    let mut got: Vec<Option<u64>> = vec![None; RETAINED_TOPICS];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut bad = Vec::new();
    while got.iter().filter(|g| g.is_some()).count() < want {
        while let Some(f) = c.rb.next_frame()? {
            if f.kind != mqtt::PUBLISH {
                continue;
            }
            let p = mqtt::parse_publish(c.v, f.flags, f.body)?;
            if p.qos == 1 {
                mqtt::puback(&mut out, p.pid);
            }
            if !p.retain {
                continue;
            }
            let topic = std::str::from_utf8(p.topic).unwrap_or("");
            let Some(k) = topic
                .strip_prefix("soak/retained/")
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| *k < RETAINED_TOPICS)
            else {
                bad.push(format!("retained message on unexpected topic {topic:?}"));
                continue;
            };
            let Some((publisher, seq)) = get_payload(p.payload) else {
                bad.push(format!("{topic}: malformed retained payload"));
                continue;
            };
            if publisher != RETAINED_PUB || seq % RETAINED_TOPICS as u64 != k as u64 {
                bad.push(format!("{topic}: retained message {seq} belongs elsewhere"));
            }
            if got[k].is_some() {
                bad.push(format!("{topic}: two retained messages"));
            }
            got[k] = Some(seq);
            if let Some(b) = before[k]
                && seq < b
            {
                bad.push(format!(
                    "{topic}: retained message {seq} is older than {b}, acknowledged before the SUBSCRIBE"
                ));
            }
        }
        if !out.is_empty() {
            c.stream.write_all(&out).await?;
            out.clear();
        }
        if got.iter().filter(|g| g.is_some()).count() >= want {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let missing: Vec<usize> = (0..RETAINED_TOPICS)
                .filter(|k| before[*k].is_some() && got[*k].is_none())
                .collect();
            bad.push(format!(
                "no retained message within 5 s for soak/retained/{missing:?}"
            ));
            break;
        }
        let _ = tokio::time::timeout(left, c.rb.fill(&c.stream)).await;
    }
    let mut st = sh.short.borrow_mut();
    st.retained_checks += 1;
    if !bad.is_empty() {
        st.retained_bad += 1;
        drop(st);
        bail!("{}", bad.join("; "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The auth bundle

struct Bundle {
    path: PathBuf,
    base: Value,
    client: Value,
    short: Value,
    spares: Vec<Value>,
}

impl Bundle {
    /// Tokens made by the broker's own CLI (`token new --bundle … --json`),
    /// so the hashes use the bundle's key exactly as the broker expects.
    fn create(bin: &Path, dir: &Path) -> Result<(Bundle, String, String)> {
        let path = dir.join("bundle.json");
        let mut secrets = HashMap::new();
        let mut names = vec![CLIENT_TOKEN.to_string(), SHORT_TOKEN.to_string()];
        names.extend((0..SPARES).map(|i| format!("soak-spare-{i}")));
        for n in &names {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(["token", "new", "--name", n, "--bundle"])
                .arg(&path)
                .arg("--json");
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("STARLING_") {
                    cmd.env_remove(&k);
                }
            }
            let o = cmd
                .output()
                .with_context(|| format!("run {} token new", bin.display()))?;
            ensure!(
                o.status.success(),
                "`starling-broker token new --name {n}` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let v: Value = serde_json::from_slice(&o.stdout).context("token new --json output")?;
            let secret = v["secret"]
                .as_str()
                .context("no secret in token new output")?;
            secrets.insert(n.clone(), secret.to_string());
        }
        let base: Value = serde_json::from_slice(&std::fs::read(&path)?).context("bundle")?;
        let tokens = base["tokens"].as_array().context("bundle without tokens")?;
        let by = |n: &str| {
            tokens
                .iter()
                .find(|t| t["name"] == n)
                .cloned()
                .with_context(|| format!("token {n} not in the bundle"))
        };
        let client = by(CLIENT_TOKEN)?;
        let mut short = by(SHORT_TOKEN)?;
        short["labels"] = json!({ "role": "short" });
        let spares = (0..SPARES)
            .map(|i| by(&format!("soak-spare-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let b = Bundle {
            path,
            base,
            client,
            short,
            spares,
        };
        b.write(0)?;
        Ok((
            b,
            secrets[CLIENT_TOKEN].clone(),
            secrets[SHORT_TOKEN].clone(),
        ))
    }

    /// Revision `rev`: the two tokens in use unchanged; spares present or
    /// not, relabelled; the spares' ACL changed.
    fn render(&self, rev: u64) -> Value {
        let mut b = self.base.clone();
        let mut tokens = vec![self.client.clone(), self.short.clone()];
        for (j, sp) in self.spares.iter().enumerate() {
            if !(rev + j as u64).is_multiple_of(3) {
                let mut t = sp.clone();
                t["labels"] = json!({ "role": "spare", "rev": rev.to_string() });
                tokens.push(t);
            }
        }
        b["tokens"] = Value::Array(tokens);
        b["default_policy"] = json!("deny");
        b["acls"] = json!([
            {
                "name": "soak-clients",
                "tokens": [CLIENT_TOKEN],
                "rules": [
                    { "topics": ["soak/#"], "actions": ["publish", "subscribe"], "effect": "allow" },
                    { "topics": ["soak-denied/#"], "actions": ["publish", "subscribe"], "effect": "deny" }
                ]
            },
            {
                "name": "soak-short",
                "selector": { "match_labels": { "role": "short" } },
                "rules": [
                    { "topics": ["soak/retained/+"], "actions": ["subscribe"], "effect": "allow" },
                    { "topics": ["short/#"], "actions": ["publish"], "effect": "allow" }
                ]
            },
            {
                "name": "spares",
                "selector": { "match_labels": { "role": "spare" } },
                "rules": [
                    { "topics": [format!("spare/{rev}/#")], "actions": ["publish", "subscribe"], "effect": "allow" }
                ]
            }
        ]);
        b
    }

    /// Write beside, then rename: the broker never reads half a file.
    fn write(&self, rev: u64) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.render(rev))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("rename to {}", self.path.display()))
    }
}

async fn bundle_loop(sh: Rc<Shared>, b: Bundle, every: f64) {
    let mut rev = 0;
    loop {
        let until = Instant::now() + Duration::from_secs_f64(every);
        while Instant::now() < until {
            if sh.stop.get() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rev += 1;
        match b.write(rev) {
            Ok(()) => sh.bundle_writes.set(sh.bundle_writes.get() + 1),
            Err(e) => sh.error(format!("bundle rewrite: {e:#}")),
        }
    }
}

// ---------------------------------------------------------------------------
// Broker observation

/// `/metrics` of the admin listener: `name{labels}` → value.
async fn scrape(admin: SocketAddr) -> Result<HashMap<String, f64>> {
    let fut = async {
        let mut s = TcpStream::connect(admin).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: starling\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .context("/metrics timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(
        head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
        "/metrics answered {:?}",
        head.lines().next().unwrap_or("")
    );
    let mut m = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next())
            && let Ok(v) = v.parse::<f64>()
        {
            m.insert(k.to_string(), v);
        }
    }
    Ok(m)
}

fn metric(m: &HashMap<String, f64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0.0) as u64
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Open fds by kind (`socket`, `pipe`, `anon_inode:[eventpoll]`, a path).
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            let t = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            let kind = match t.split_once(":[") {
                Some((k, _)) if k == "socket" || k == "pipe" => k.to_string(),
                _ => t,
            };
            *m.entry(kind).or_insert(0) += 1;
        }
    }
    m
}

#[derive(Clone, serde::Serialize)]
struct Sample {
    t: f64,
    rss_mib: f64,
    fds: u64,
}

#[derive(Clone, serde::Serialize)]
struct Row {
    t: f64,
    rss_mib: f64,
    fds: u64,
    connections: u64,
    sent: [u64; 3],
    received: [u64; 3],
    reconnects: u64,
    short_conns: u64,
    bundle_writes: u64,
    reloads: u64,
    dropped: [u64; 3],
}

fn totals(sh: &Shared) -> ([u64; 3], [u64; 3], u64) {
    let mut sent = [0u64; 3];
    for (d, st) in sh.pubs.iter().zip(sh.pub_state.borrow().iter()) {
        sent[d.qos as usize] += st.sent;
    }
    let mut recv = [0u64; 3];
    let mut rec = 0;
    for st in sh.sub_state.borrow().iter() {
        for (r, n) in recv.iter_mut().zip(st.new) {
            *r += n;
        }
        rec += st.reconnects;
    }
    (sent, recv, rec)
}

fn print_header() {
    println!(
        "{:>6} {:>8} {:>4} {:>5} {:>22} {:>24} {:>6} {:>6} {:>8} {:>8}",
        "t s",
        "RSS MiB",
        "fds",
        "conns",
        "sent q0/q1/q2",
        "received q0/q1/q2",
        "reconn",
        "short",
        "rewrites",
        "reloads"
    );
}

fn print_row(r: &Row) {
    let f = |a: [u64; 3]| format!("{}/{}/{}", a[0], a[1], a[2]);
    println!(
        "{:>6.0} {:>8.2} {:>4} {:>5} {:>22} {:>24} {:>6} {:>6} {:>8} {:>8}",
        r.t,
        r.rss_mib,
        r.fds,
        r.connections,
        f(r.sent),
        f(r.received),
        r.reconnects,
        r.short_conns,
        r.bundle_writes,
        r.reloads
    );
}

/// Least-squares slope of (t, y).
fn slope(s: &[(f64, f64)]) -> Option<f64> {
    if s.len() < 3 {
        return None;
    }
    let n = s.len() as f64;
    let mx = s.iter().map(|p| p.0).sum::<f64>() / n;
    let my = s.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = s.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = s.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

// ---------------------------------------------------------------------------
// The run

pub async fn run(o: Opts) -> Result<()> {
    let work = std::env::temp_dir().join(format!("starling-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let res = run_in(&o, &work).await;
    if res.is_ok() && !o.keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("soak: bundle and broker logs kept in {}", work.display());
    }
    res
}

async fn run_in(o: &Opts, work: &Path) -> Result<()> {
    let (bundle, client_secret, short_secret) = Bundle::create(&o.bin, work)?;
    let env = vec![
        (
            "STARLING_AUTH_BUNDLE".to_string(),
            bundle.path.display().to_string(),
        ),
        (
            "STARLING_LIMITS_MAX_QUEUED_MESSAGES".into(),
            QUEUE_CAP.to_string(),
        ),
        (
            "STARLING_LIMITS_MAX_QUEUED_BYTES".into(),
            QUEUE_BYTES.to_string(),
        ),
    ];
    let opts = StartOpts {
        bin: &o.bin,
        pin_cpu: None,
        taskset: None,
        fifo: None,
        max_connections: 1000,
        dir: work.join("broker"),
        env,
        queue: None,
    };
    let mut broker = Broker::start(Kind::Starling, &opts).await?;
    let admin = broker
        .admin
        .context("no `listener admin` line in the broker's banner")?;
    let pid = broker.pid;
    let m = sys::machine();
    // The source the broker most likely came from: HEAD when the run
    // started, marked dirty if the broker's crates had local changes.
    let commit = {
        let head = crate::shell("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
        let dirty = crate::shell(
            "git",
            &["status", "--porcelain", "--", "broker", "codec", "model"],
        )
        .is_some_and(|s| !s.is_empty());
        if dirty {
            format!("{head} (dirty)")
        } else {
            head
        }
    };
    // When the broker binary was built (its mtime), Unix seconds.
    let broker_built = std::fs::metadata(&o.bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    println!(
        "starling-bench soak: {} s, rate ×{}, {} short-lived conn/s, bundle rewritten every {} s; broker {} (pid {pid}); {} × {}",
        o.secs,
        o.rate,
        o.short_rate,
        o.reload_every,
        o.bin.display(),
        m.nproc,
        m.cpu_model
    );
    // Baseline: the readiness probe has gone, nothing else connected yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fd_start = fd_count(pid);
    let fd_kinds_start = fd_kinds(pid);
    let rss_start = sys::proc_mem(pid).map(|m| m.rss).unwrap_or(0) as f64 / 1048576.0;
    let m0 = scrape(admin).await.context("admin /metrics")?;
    ensure!(
        m0.contains_key("starling_auth_bundle_reloads_total"),
        "the broker's /metrics has no starling_auth_bundle_reloads_total"
    );

    let pubs = publishers(o.rate);
    let subs = subscribers();
    let sub_state = subs
        .iter()
        .map(|s| SubState {
            expect: pubs.iter().map(|p| effective_qos(s, p)).collect(),
            seen: vec![Bits::default(); pubs.len()],
            ..Default::default()
        })
        .collect();
    let pub_state = pubs
        .iter()
        .map(|p| PubState {
            last_acked: vec![None; p.topics.len()],
            ..Default::default()
        })
        .collect();
    let sh = Rc::new(Shared {
        addr: broker.addr,
        t0: Instant::now(),
        pubs,
        subs,
        pub_state: RefCell::new(pub_state),
        sub_state: RefCell::new(sub_state),
        short: RefCell::new(ShortStats::default()),
        subscribed: Cell::new(0),
        stop: Cell::new(false),
        finish: Cell::new(false),
        bundle_writes: Cell::new(0),
        errors: RefCell::new(Vec::new()),
        error_count: Cell::new(0),
        client_secret,
        short_secret,
    });

    // Subscribers first (all confirmed by SUBACK), then the publishers.
    let mut subs_set = JoinSet::new();
    for s in 0..sh.subs.len() {
        let sh2 = sh.clone();
        subs_set.spawn_local(async move {
            let r = if sh2.subs[s].persistent {
                persistent(sh2.clone(), s).await
            } else {
                subscriber(sh2.clone(), s).await
            };
            if let Err(e) = r {
                sh2.sub_state.borrow_mut()[s].online = false;
                sh2.error(format!("subscriber {}: {e:#}", sh2.subs[s].name));
            }
        });
    }
    let until = Instant::now() + Duration::from_secs(15);
    while sh.subscribed.get() < sh.subs.len() {
        ensure!(
            Instant::now() < until,
            "subscribers not ready within 15 s: {}",
            sh.errors.borrow().join("; ")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu0 = (Instant::now(), sys::self_cpu(), sys::proc_cpu(pid).ok());
    let machine0 = sys::machine_cpu();
    let mut pubs_set = JoinSet::new();
    for i in 0..sh.pubs.len() {
        let sh2 = sh.clone();
        pubs_set.spawn_local(async move {
            if let Err(e) = publisher(sh2.clone(), i).await {
                sh2.error(format!("publisher {}: {e:#}", sh2.pubs[i].name));
            }
            sh2.pub_state.borrow_mut()[i].done = true;
        });
    }
    let load_t0 = sh.secs();
    let mut aux = JoinSet::new();
    {
        let sh2 = sh.clone();
        let rate = o.short_rate;
        aux.spawn_local(async move {
            // Give the retained publisher a round over its topics first.
            tokio::time::sleep(Duration::from_secs(2)).await;
            short_loop(sh2, rate).await;
        });
    }
    aux.spawn_local(bundle_loop(sh.clone(), bundle, o.reload_every));

    // Sampling: RSS and fds every second, a table row every report_every.
    let mut samples: Vec<Sample> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut fd_peak = fd_start;
    print_header();
    let end = Instant::now() + Duration::from_secs_f64(o.secs);
    let mut next_row = Instant::now();
    let mut next_sample = Instant::now();
    let mut died = false;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            if !broker.alive() {
                died = true;
                break;
            }
            let rss = sys::proc_mem(pid).map(|m| m.rss).unwrap_or(0) as f64 / 1048576.0;
            let fds = fd_count(pid);
            fd_peak = fd_peak.max(fds);
            samples.push(Sample {
                t: sh.secs() - load_t0,
                rss_mib: rss,
                fds,
            });
            if now >= next_row || now >= end {
                next_row += Duration::from_secs_f64(o.report_every);
                let mm = scrape(admin).await.unwrap_or_default();
                let (sent, received, reconnects) = totals(&sh);
                let row = Row {
                    t: sh.secs() - load_t0,
                    rss_mib: rss,
                    fds,
                    connections: metric(&mm, "starling_connections"),
                    sent,
                    received,
                    reconnects,
                    short_conns: sh.short.borrow().ok,
                    bundle_writes: sh.bundle_writes.get(),
                    reloads: metric(&mm, "starling_auth_bundle_reloads_total"),
                    dropped: [0, 1, 2].map(|q| {
                        metric(
                            &mm,
                            &format!("starling_messages_dropped_total{{qos=\"{q}\"}}"),
                        )
                    }),
                };
                print_row(&row);
                rows.push(row);
            }
        }
        if now >= end {
            break;
        }
        tokio::time::sleep(
            next_sample
                .min(end)
                .saturating_duration_since(Instant::now()),
        )
        .await;
    }
    let load_secs = sh.secs() - load_t0;
    let rss_end = samples.last().map(|s| s.rss_mib).unwrap_or(0.0);
    let cpu1 = (Instant::now(), sys::self_cpu(), sys::proc_cpu(pid).ok());
    let machine1 = sys::machine_cpu();
    // Cores other processes used meanwhile (a shared machine).
    let others = match (&machine0, &machine1) {
        (Some(a), Some(b)) => {
            let busy = sys::jiffies_to_secs(b[0].0.saturating_sub(a[0].0));
            let own = cpu1.1.saturating_sub(cpu0.1)
                + match (cpu0.2, cpu1.2) {
                    (Some(x), Some(y)) => y.saturating_sub(x),
                    _ => Duration::ZERO,
                };
            let wall = (cpu1.0 - cpu0.0).as_secs_f64().max(1e-9);
            Some(((busy - own.as_secs_f64()) / wall).max(0.0))
        }
        _ => None,
    };

    // Stop the load; publishers collect their acknowledgements.
    sh.stop.set(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while pubs_set.join_next().await.is_some() {}
        while aux.join_next().await.is_some() {}
    })
    .await;
    pubs_set.abort_all();
    aux.abort_all();
    // Drain: every acknowledged QoS 1/2 message must reach every subscriber.
    let drain_t = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    let drain = loop {
        let m = sh.missing();
        let left = m[1] + m[2];
        let online = sh.sub_state.borrow().iter().all(|s| s.online);
        if left == 0 && online {
            break "complete";
        }
        if left != last.0 {
            last = (left, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break "stalled";
        }
        if drain_t.elapsed() > Duration::from_secs(30) || died {
            break "deadline";
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain_secs = drain_t.elapsed().as_secs_f64();
    let m_end = scrape(admin).await.unwrap_or_default();
    sh.finish.set(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while subs_set.join_next().await.is_some() {}
    })
    .await;
    subs_set.abort_all();

    // Everything disconnected: fds must come back down.
    let mut fd_after = fd_count(pid);
    let settle = Instant::now();
    while fd_after > fd_start && settle.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fd_after = fd_count(pid);
    }
    let fd_kinds_after = fd_kinds(pid);
    let mem_after = sys::proc_mem(pid).unwrap_or_default();
    let m_after = scrape(admin).await.unwrap_or_default();
    let alive = broker.alive() && !died;
    let log_tail = broker.log_tail();
    broker.stop();
    let stderr = std::fs::read_to_string(broker.dir.join("stderr.log")).unwrap_or_default();
    let broker_warnings: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .take(10)
        .map(|l| l.to_string())
        .collect();
    drop(broker);

    let ob = Observed {
        load_secs,
        samples,
        rows,
        fd_start,
        fd_peak,
        fd_after,
        fd_kinds_start,
        fd_kinds_after,
        rss_start,
        rss_end,
        mem_after,
        m0,
        m_end,
        m_after,
        drain,
        drain_secs,
        alive,
        log_tail,
        broker_warnings,
        cpu0,
        cpu1,
        others,
        load_before,
        commit,
        broker_built,
        m,
    };
    conclude(o, &sh, ob)
}

/// What the run measured, for [`conclude`].
struct Observed {
    load_secs: f64,
    samples: Vec<Sample>,
    rows: Vec<Row>,
    fd_start: u64,
    fd_peak: u64,
    fd_after: u64,
    fd_kinds_start: std::collections::BTreeMap<String, u64>,
    fd_kinds_after: std::collections::BTreeMap<String, u64>,
    rss_start: f64,
    rss_end: f64,
    mem_after: sys::Mem,
    m0: HashMap<String, f64>,
    m_end: HashMap<String, f64>,
    m_after: HashMap<String, f64>,
    drain: &'static str,
    drain_secs: f64,
    alive: bool,
    log_tail: String,
    broker_warnings: Vec<String>,
    cpu0: (Instant, Duration, Option<Duration>),
    cpu1: (Instant, Duration, Option<Duration>),
    others: Option<f64>,
    load_before: String,
    commit: String,
    broker_built: Option<u64>,
    m: sys::Machine,
}

/// Checks, summary table and JSON line; the first failed check is the error.
fn conclude(o: &Opts, sh: &Shared, ob: Observed) -> Result<()> {
    let Observed {
        load_secs,
        samples,
        rows,
        fd_start,
        fd_peak,
        fd_after,
        fd_kinds_start,
        fd_kinds_after,
        rss_start,
        rss_end,
        mem_after,
        m0,
        m_end,
        m_after,
        drain,
        drain_secs,
        alive,
        log_tail,
        broker_warnings,
        cpu0,
        cpu1,
        others,
        load_before,
        commit,
        broker_built,
        m,
    } = ob;
    let missing = sh.missing();
    let (sent, received, reconnects) = totals(sh);
    let mut acked = [0u64; 3];
    let mut refused = 0;
    for (d, st) in sh.pubs.iter().zip(sh.pub_state.borrow().iter()) {
        acked[d.qos as usize] += st.acked_n;
        refused += st.refused;
    }
    let mut dups = [0u64; 3];
    let mut q2_resent = 0;
    let (mut wrong_qos, mut unexpected, mut retain_live, mut malformed) = (0, 0, 0, 0);
    let mut takeovers = 0;
    let (mut dup_flagged, mut dup_unflagged) = (0, 0);
    let mut q0_expected = 0u64;
    let mut q0_seen = 0u64;
    let mut expected = [0u64; 3];
    {
        let ps = sh.pub_state.borrow();
        for st in sh.sub_state.borrow().iter() {
            for (d, n) in dups.iter_mut().zip(st.dup) {
                *d += n;
            }
            q2_resent += st.qos2_resent;
            wrong_qos += st.wrong_qos;
            unexpected += st.unexpected;
            retain_live += st.retain_live;
            malformed += st.malformed;
            takeovers += st.takeovers;
            dup_flagged += st.dup_flagged;
            dup_unflagged += st.dup_unflagged;
            for (p, q) in st.expect.iter().enumerate() {
                match q {
                    Some(0) => {
                        q0_expected += ps[p].sent;
                        q0_seen += st.seen[p].count();
                    }
                    Some(q) => expected[*q as usize] += ps[p].acked_n,
                    None => {}
                }
            }
        }
    }
    let q0_missed = q0_expected.saturating_sub(q0_seen);

    // RSS: slope after warm-up, extrapolated over the whole load.
    let warm = load_secs * WARMUP_SHARE;
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= warm)
        .map(|s| (s.t, s.rss_mib))
        .collect();
    let rss_slope = slope(&after).unwrap_or(0.0); // MiB/s
    let rss_growth = rss_slope * load_secs;
    let rss_warm = after.first().map(|s| s.1).unwrap_or(rss_start);
    let rss_mean = after.iter().map(|s| s.1).sum::<f64>() / after.len().max(1) as f64;
    let rss_limit = o.rss_limit_mib.max(rss_mean * o.rss_limit_pct / 100.0);
    let reloads = metric(&m_end, "starling_auth_bundle_reloads_total")
        .saturating_sub(metric(&m0, "starling_auth_bundle_reloads_total"));
    let bundle_errors = metric(&m_end, "starling_auth_bundle_errors_total")
        .saturating_sub(metric(&m0, "starling_auth_bundle_errors_total"));
    let dropped = [0, 1, 2].map(|q| {
        metric(
            &m_end,
            &format!("starling_messages_dropped_total{{qos=\"{q}\"}}"),
        )
    });
    let writes = sh.bundle_writes.get();
    let short = std::mem::take(&mut *sh.short.borrow_mut());
    let cpu_wall = (cpu1.0 - cpu0.0).as_secs_f64().max(1e-9);
    let gen_util = (cpu1.1.saturating_sub(cpu0.1)).as_secs_f64() / cpu_wall;
    let broker_util = match (cpu0.2, cpu1.2) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() / cpu_wall),
        _ => None,
    };

    // Checks, first failure = the reason.
    let mut failures: Vec<String> = Vec::new();
    if !alive {
        failures.push(format!("the broker exited during the soak\n{log_tail}"));
    }
    if missing[1] > 0 {
        failures.push(format!(
            "QoS 1 loss: {} of {} acknowledged deliveries never arrived (drain {drain})",
            missing[1], expected[1]
        ));
    }
    if missing[2] > 0 {
        failures.push(format!(
            "QoS 2 loss: {} of {} acknowledged deliveries never arrived (drain {drain})",
            missing[2], expected[2]
        ));
    }
    if dups[2] > 0 {
        failures.push(format!(
            "QoS 2 duplicates: {} messages reached a subscriber twice",
            dups[2]
        ));
    }
    if rss_growth > rss_limit {
        failures.push(format!(
            "broker RSS grew {:.0} KiB/min after warm-up, {:.2} MiB over the {:.0} s run (limit {:.2} MiB)",
            rss_slope * 60.0 * 1024.0,
            rss_growth,
            load_secs,
            rss_limit
        ));
    }
    if fd_after > fd_start + o.fd_slack {
        failures.push(format!(
            "broker fds did not come back: {fd_start} at the start, {fd_after} after every client left (slack {})",
            o.fd_slack
        ));
    }
    if writes == 0 {
        failures.push("the bundle was never rewritten (run too short?)".into());
    } else if reloads + 1 < writes {
        failures.push(format!(
            "the broker reloaded the bundle {reloads} times for {writes} rewrites"
        ));
    }
    if bundle_errors > 0 {
        failures.push(format!(
            "the broker rejected {bundle_errors} of the soak's bundle rewrites"
        ));
    }
    if dropped[1] + dropped[2] > 0 {
        failures.push(format!(
            "the broker dropped {} QoS 1 and {} QoS 2 messages (queue cap {QUEUE_CAP})",
            dropped[1], dropped[2]
        ));
    }
    if short.retained_bad > 0 {
        failures.push(format!(
            "{} of {} retained-message checks failed",
            short.retained_bad, short.retained_checks
        ));
    }
    if wrong_qos + unexpected + malformed + retain_live > 0 {
        failures.push(format!(
            "deliveries not as subscribed: {wrong_qos} at the wrong QoS, {unexpected} unmatched, {malformed} malformed, {retain_live} with RETAIN on a live subscription"
        ));
    }
    if refused > 0 {
        failures.push(format!("{refused} publishes refused by the broker"));
    }
    if sh.error_count.get() > 0 {
        failures.push(format!(
            "{} client errors, first: {}",
            sh.error_count.get(),
            sh.errors.borrow().first().cloned().unwrap_or_default()
        ));
    }
    let ok = failures.is_empty();

    // ----------------------------------------------------------------- summary
    // VmHWM is updated lazily by the kernel: the largest sample counts too.
    let rss_peak = samples
        .iter()
        .map(|s| s.rss_mib)
        .fold(mem_after.hwm as f64 / 1048576.0, f64::max);
    let rss_after = mem_after.rss as f64 / 1048576.0;
    println!();
    println!("soak summary ({load_secs:.0} s of load, drain {drain} in {drain_secs:.1} s)");
    println!(
        "  {:<5} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "QoS", "sent", "acked", "deliveries", "duplicates", "lost"
    );
    for q in 0..3 {
        println!(
            "  {:<5} {:>10} {:>10} {:>12} {:>10} {:>8}",
            q,
            sent[q],
            if q == 0 {
                "-".to_string()
            } else {
                acked[q].to_string()
            },
            received[q],
            dups[q],
            if q == 0 {
                format!("({q0_missed})")
            } else {
                missing[q].to_string()
            }
        );
    }
    println!(
        "  (deliveries: unique, by delivered QoS; lost: by effective QoS; QoS 0 not delivered in parentheses, allowed)"
    );
    println!(
        "  re-sent with DUP: {dup_flagged}, of which QoS 2 before PUBREL (suppressed by the receiver): {q2_resent}; repeated without DUP: {dup_unflagged}"
    );
    let line = |k: &str, v: String| println!("  {k:<30} {v}");
    line(
        "broker RSS MiB",
        format!(
            "start {rss_start:.2}, after warm-up {rss_warm:.2}, end of load {rss_end:.2}, after clients left {rss_after:.2}, peak {rss_peak:.2}"
        ),
    );
    line(
        "RSS slope after warm-up",
        format!(
            "{:+.0} KiB/min → {:+.3} MiB over the run (limit {:.2} MiB = max({} MiB, {}% of {:.2}))",
            rss_slope * 60.0 * 1024.0,
            rss_growth,
            rss_limit,
            o.rss_limit_mib,
            o.rss_limit_pct,
            rss_mean
        ),
    );
    line(
        "broker fds",
        format!(
            "start {fd_start}, peak {fd_peak}, after clients left {fd_after} (slack {})",
            o.fd_slack
        ),
    );
    if fd_after != fd_start {
        line(
            "broker fds by kind",
            format!("start {fd_kinds_start:?}, after {fd_kinds_after:?}"),
        );
    }
    line(
        "persistent reconnects",
        format!("{reconnects} ({takeovers} by takeover)"),
    );
    line(
        "short-lived connections",
        format!(
            "{} ok, {} failed; {} retained checks ({} bad), {} refused subscriptions as expected",
            short.ok, short.failed, short.retained_checks, short.retained_bad, short.denied_ok
        ),
    );
    line(
        "bundle",
        format!("{writes} rewrites, {reloads} reloads, {bundle_errors} rejected"),
    );
    line(
        "broker dropped (metric)",
        format!(
            "QoS 0 {} (offline persistent sessions), QoS 1 {}, QoS 2 {}",
            dropped[0], dropped[1], dropped[2]
        ),
    );
    let target: f64 = sh.pubs.iter().map(|p| p.rate).sum();
    let published: u64 = sent.iter().sum();
    let delivered: u64 = received.iter().sum::<u64>() + dups.iter().sum::<u64>();
    line(
        "load",
        format!(
            "{:.0} msg/s published (target {target:.0}), {:.0} deliveries/s",
            published as f64 / load_secs.max(1e-9),
            delivered as f64 / load_secs.max(1e-9)
        ),
    );
    line(
        "CPU during load",
        format!(
            "generator {:.0} %, broker {} of one core; other processes {} cores (load average before: {load_before})",
            gen_util * 100.0,
            broker_util.map_or("?".into(), |u| format!("{:.0} %", u * 100.0)),
            others.map_or("?".into(), |u| format!("{u:.2}"))
        ),
    );
    line(
        "broker after",
        format!(
            "{} connections, {} retained, {} subscriptions",
            metric(&m_after, "starling_connections"),
            metric(&m_after, "starling_retained_messages"),
            metric(&m_after, "starling_subscriptions")
        ),
    );
    if !broker_warnings.is_empty() {
        line(
            "broker log warnings",
            format!("{} (first: {})", broker_warnings.len(), broker_warnings[0]),
        );
    }

    let rec = json!({ "soak": {
        "date": crate::shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        "unix_time": crate::now_unix(),
        "command": o.command,
        "broker_bin": o.bin.display().to_string(),
        "commit": commit,
        "broker_built_unix": broker_built,
        "machine": format!("{} × {}, {}, Linux {}", m.nproc, m.cpu_model, m.mem_total, m.kernel),
        "ok": ok,
        "reason": failures.first(),
        "failures": failures,
        "secs": load_secs,
        "rate": o.rate,
        "short_rate": o.short_rate,
        "reload_every": o.reload_every,
        "queue_cap": QUEUE_CAP,
        "drain": drain,
        "drain_secs": drain_secs,
        "qos": (0..3).map(|q| json!({
            "qos": q,
            "sent": sent[q],
            "acked": acked[q],
            "delivered": received[q],
            "expected": if q == 0 { q0_expected } else { expected[q] },
            "duplicates": dups[q],
            "lost": if q == 0 { q0_missed } else { missing[q] },
        })).collect::<Vec<_>>(),
        "qos2_resent_suppressed": q2_resent,
        "dup_flagged": dup_flagged,
        "dup_unflagged": dup_unflagged,
        "rss_mib": {
            "start": rss_start, "after_warmup": rss_warm, "end": rss_end,
            "after": rss_after, "peak": rss_peak, "mean_after_warmup": rss_mean,
            "slope_kib_per_min": rss_slope * 60.0 * 1024.0,
            "growth_over_run": rss_growth, "limit": rss_limit,
        },
        "fds": {
            "start": fd_start, "peak": fd_peak, "after": fd_after, "slack": o.fd_slack,
            "kinds_start": fd_kinds_start, "kinds_after": fd_kinds_after,
        },
        "reconnects": reconnects,
        "takeovers": takeovers,
        "short": {
            "ok": short.ok, "failed": short.failed,
            "retained_checks": short.retained_checks, "retained_bad": short.retained_bad,
            "denied_ok": short.denied_ok,
        },
        "bundle": { "writes": writes, "reloads": reloads, "errors": bundle_errors },
        "dropped": dropped,
        "publish_rate_target": target,
        "publish_rate": published as f64 / load_secs.max(1e-9),
        "delivery_rate": delivered as f64 / load_secs.max(1e-9),
        "others_cpu_util": others,
        "load_before": load_before,
        "gen_cpu_util": gen_util,
        "broker_cpu_util": broker_util,
        "errors": sh.errors.borrow().clone(),
        "error_count": sh.error_count.get(),
        "broker_warnings": broker_warnings,
        "rows": rows,
        "samples": samples,
    }});
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.out)
        .with_context(|| format!("open {}", o.out.display()))?;
    crate::append_line(&mut f, &rec)?;
    println!("  results: {}", o.out.display());
    if let Some(first) = failures.first() {
        for f in &failures[1..] {
            eprintln!("soak: also: {f}");
        }
        bail!("soak failed: {first}");
    }
    println!("soak: ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt() {
        assert!(matches("soak/#", "soak/q0/1"));
        assert!(matches("soak/+/+", "soak/retained/3"));
        assert!(!matches("soak/+", "soak/q0/1"));
        assert!(matches("soak/q1/+", "soak/q1/0"));
        assert!(!matches("soak/q1/0", "soak/q1/1"));
        assert!(matches("a/#", "a"));
    }

    #[test]
    fn every_publisher_is_checked_somewhere() {
        let pubs = publishers(1.0);
        let subs = subscribers();
        assert_eq!(pubs[RETAINED_PUB].name, "retained");
        for p in &pubs {
            let q: Vec<Option<u8>> = subs.iter().map(|s| effective_qos(s, p)).collect();
            assert!(q.contains(&Some(p.qos)), "{}: {q:?}", p.name);
        }
        // QoS 2 reaches a persistent subscriber at QoS 2.
        assert_eq!(effective_qos(&subs[3], &pubs[4]), Some(2));
        assert_eq!(effective_qos(&subs[4], &pubs[5]), Some(2));
        // Downgraded by a QoS 1 subscription.
        assert_eq!(effective_qos(&subs[2], &pubs[4]), Some(1));
    }

    #[test]
    fn bitmaps() {
        let mut a = Bits::default();
        assert!(a.set(3));
        assert!(!a.set(3));
        assert!(a.set(200));
        let mut want = Bits::default();
        for i in [1, 3, 200, 300] {
            want.set(i);
        }
        assert_eq!(a.count(), 2);
        assert_eq!(a.missing_from(&want), 2);
        assert_eq!(want.missing_from(&a), 0);
    }

    #[test]
    fn slope_of_a_line() {
        let s: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 0.5 * i as f64)).collect();
        assert!((slope(&s).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(slope(&s[..2]), None);
    }
}

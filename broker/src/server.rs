//! Starting and stopping a broker: bind listeners, spawn accept loops, run
//! housekeeping, and shut down gracefully.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use starling_model::config::{BrokerConfig, Limits, ListenerConfig};
use starling_model::topic::{TopicError, TopicPolicy, check_levels};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::{self, AuthHub};
use crate::listen;
use crate::listen::slots::SocketCounter;
use crate::logging::LogBudget;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::Registry;
use crate::session::park::Parker;
use crate::store::{self, StateStore, memory::MemoryStore};
use crate::tls;

/// State every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub config: BrokerConfig,
    pub auth: AuthHub,
    pub router: Router,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Sender<bool>,
    /// Log lines clients can cause at line rate (failed CONNECTs, refused
    /// sockets): rate-limited together.
    pub refusal_log: LogBudget,
    /// Open sockets per source address on the client listeners.
    pub sockets: SocketCounter,
    /// Idle plain-TCP connections held without a task.
    pub parker: Arc<Parker>,
    /// `[web]`'s topic limits for `/broker/` and stream paths, built once.
    pub web_policy: TopicPolicy,
    topic_policy: Option<TopicPolicy>,
    client_seq: AtomicU64,
    /// `[limits]` in force: the startup values until the admin API changes
    /// them. Read where a limit is applied, so a change reaches what starts
    /// after it (a connection keeps the limits it was agreed with).
    limits: RwLock<Arc<Limits>>,
}

impl Shared {
    /// The gauges read from the live state (sessions, queues, the
    /// last-value cache) for a scrape or an OTLP export.
    pub fn live_metrics(&self) -> crate::metrics::Live {
        let mut g = crate::metrics::StateGauges::default();
        for s in self.registry.all() {
            let st = s.lock();
            g.sessions += 1;
            g.queued_messages += st.queue.len() as u64;
            g.queued_bytes += st.queued_bytes as u64;
            g.inflight += st.inflight.len() as u64;
        }
        g.parked = self.parker.len() as u64;
        crate::metrics::Live {
            lvc: self.router.lvc.stats(),
            state: g,
        }
    }

    pub fn new(config: BrokerConfig, auth: AuthHub) -> Arc<Shared> {
        Self::with_store(
            config,
            auth,
            Arc::new(Metrics::default()),
            Arc::new(MemoryStore),
        )
    }

    pub fn with_store(
        config: BrokerConfig,
        auth: AuthHub,
        metrics: Arc<Metrics>,
        store: Arc<dyn StateStore>,
    ) -> Arc<Shared> {
        let policy = config.topics.policy();
        Arc::new(Shared {
            auth,
            router: Router::new(metrics.clone(), &config.limits, &config.lvc, store),
            registry: Registry::default(),
            metrics,
            shutdown: watch::channel(false).0,
            refusal_log: LogBudget::new(10),
            sockets: SocketCounter::default(),
            parker: Arc::default(),
            topic_policy: (policy != TopicPolicy::default()).then_some(policy),
            web_policy: config.web.policy(),
            client_seq: AtomicU64::new(0),
            limits: RwLock::new(Arc::new(config.limits.clone())),
            config,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts new limits in force (validated by the caller). The retained
    /// store's caps change at once; the rest apply where they are next read.
    pub fn set_limits(&self, limits: Limits) {
        self.router.set_retained_limits(&limits);
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limits);
    }

    /// The level limit of `limits` (a connection's own, so the packet path
    /// reads no shared state), then the configured MQTT topic policy (none
    /// by default, as the spec says).
    pub fn check_topic(&self, topic: &str, limits: &Limits) -> Result<(), TopicError> {
        check_levels(topic, limits.max_topic_levels)?;
        match &self.topic_policy {
            Some(p) => p.check(topic),
            None => Ok(()),
        }
    }

    /// The same for a subscription filter (wildcards allowed), without its
    /// `$share/<group>/` prefix.
    pub fn check_filter(&self, filter: &str, limits: &Limits) -> Result<(), TopicError> {
        check_levels(filter, limits.max_topic_levels)?;
        match &self.topic_policy {
            Some(p) => p.check_filter(filter),
            None => Ok(()),
        }
    }

    pub fn assign_client_id(&self) -> String {
        let n = self.client_seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("starling-{nanos:08x}-{n}")
    }
}

/// A listener that is up.
#[derive(Debug, Clone)]
pub struct Bound {
    pub name: &'static str,
    pub scheme: &'static str,
    pub addr: SocketAddr,
    pub note: String,
}

/// A running broker.
pub struct BrokerHandle {
    pub shared: Arc<Shared>,
    pub listeners: Vec<Bound>,
    tasks: JoinSet<()>,
}

/// Namespace for starting a broker.
pub struct Broker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mqtt,
    Http,
    Admin,
}

impl Broker {
    /// Binds every enabled listener and starts serving.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<BrokerHandle> {
        let tls_resolver = tls_resolver(&config)?;
        let bundle_stamp = config.auth.bundle.as_deref().map(crate::file_stamp::stamp);
        let hub = match &config.auth.bundle {
            Some(path) => {
                let (bytes, state) = auth::watch::load(path)?;
                let hub = AuthHub::with_state(&config, state);
                hub.remember(&bytes);
                hub
            }
            None => AuthHub::open(&config),
        };
        let metrics = Arc::new(Metrics::default());
        let state = store::open(&config.storage, metrics.clone())?;
        let snapshot = state.load()?;
        let shared = Shared::with_store(config, hub, metrics, state);
        if shared.router.store.persists() {
            let r = store::restore::restore(&shared, snapshot);
            tracing::info!(
                sessions = r.sessions,
                queued = r.queued,
                retained = r.retained,
                last_values = r.last_values,
                expired = r.expired,
                unreadable = r.unreadable,
                "state restored from the store"
            );
        }
        let cfg = &shared.config;
        let mut tasks = JoinSet::new();
        let mut listeners = Vec::new();
        let tls_on = tls_resolver.is_some();
        let plan: [(&'static str, &ListenerConfig, bool, Kind); 5] = [
            ("mqtt", &cfg.mqtt, false, Kind::Mqtt),
            ("mqtts", &cfg.mqtts, true, Kind::Mqtt),
            ("http", &cfg.http, false, Kind::Http),
            ("https", &cfg.https, true, Kind::Http),
            ("admin", &cfg.admin, false, Kind::Admin),
        ];
        for (name, lc, wants_tls, kind) in plan {
            if !lc.runs(wants_tls, tls_on) {
                continue;
            }
            let tls_cfg = if wants_tls {
                let resolver = tls_resolver.clone().with_context(|| {
                    format!("{name} listener is on but no certificate is configured (set [tls] cert/key or --self-signed)")
                })?;
                let alpn: &[&[u8]] = if kind == Kind::Http {
                    &[b"h2", b"http/1.1"]
                } else {
                    &[b"mqtt"]
                };
                Some(tls::server_config(resolver, alpn)?)
            } else {
                None
            };
            let (listener, note) = bind(name, &lc.bind, kind == Kind::Http).await?;
            let addr = listener.local_addr()?;
            if kind == Kind::Admin && !addr.ip().is_loopback() && cfg.api.is_default() {
                anyhow::bail!(
                    "the admin listener is on {addr}, which is not loopback, with the default credentials admin/public; set [api] password (STARLING_API_PASSWORD) or [api] credentials_dir, or bind it to 127.0.0.1"
                );
            }
            let scheme = match (kind, wants_tls) {
                (Kind::Mqtt, false) => "mqtt",
                (Kind::Mqtt, true) => "mqtts",
                (Kind::Http, false) | (Kind::Admin, _) => "http",
                (Kind::Http, true) => "https",
            };
            let note = match kind {
                Kind::Http => format!(
                    "MQTT over WebSocket at /mqtt, HTTP API at /broker/, topic streams{note}"
                ),
                Kind::Admin => {
                    let creds = if cfg.api.is_default() {
                        " (admin API credentials admin/public: the local default)"
                    } else {
                        ""
                    };
                    format!("admin API at /api/v1, /metrics, /healthz, /readyz{creds}{note}")
                }
                Kind::Mqtt => format!("MQTT 3.1.1 and 5.0{note}"),
            };
            listeners.push(Bound {
                name,
                scheme,
                addr,
                note,
            });
            let s = shared.clone();
            match kind {
                Kind::Mqtt => {
                    tasks.spawn(listen::tcp::accept_loop(s, listener, tls_cfg));
                }
                Kind::Http => {
                    let app = listen::http::router(s.clone());
                    tasks.spawn(listen::http::serve(s, listener, tls_cfg, app, true));
                }
                Kind::Admin => {
                    let app = listen::admin::router(s.clone());
                    serve_admin_apart(s, listener, app)?;
                }
            }
        }
        tasks.spawn(reap_sessions(shared.clone()));
        tasks.spawn(shared.parker.clone().run(shared.shutdown.subscribe()));
        if shared.router.store.persists() {
            tasks.spawn(save_last_values(shared.clone()));
        }
        if let Some(path) = shared.config.auth.bundle.clone() {
            tasks.spawn(auth::watch::watch_file(
                shared.clone(),
                path,
                bundle_stamp.flatten(),
            ));
        }
        tasks.spawn(auth::watch::expiry_timer(shared.clone()));
        crate::apiserver::spawn(shared.clone(), tls_resolver.clone());
        Ok(BrokerHandle {
            shared,
            listeners,
            tasks,
        })
    }
}

fn tls_resolver(cfg: &BrokerConfig) -> anyhow::Result<Option<Arc<tls::ReloadingResolver>>> {
    match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(cert), Some(key)) => {
            let k = tls::load_pem(cert, key)?;
            let r = tls::ReloadingResolver::new(k);
            tls::watch(r.clone(), cert.clone(), key.clone(), Duration::from_secs(2));
            Ok(Some(r))
        }
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("[tls] needs both cert and key")
        }
        (None, None) if cfg.tls.self_signed => {
            Ok(Some(tls::ReloadingResolver::new(tls::self_signed()?)))
        }
        (None, None) => Ok(None),
    }
}

/// Binds `addr`. A taken port is a clear error, except for the local HTTP
/// listener, which moves to a free port (and says so) like shiftr Desktop.
async fn bind(name: &str, addr: &str, may_move: bool) -> anyhow::Result<(TcpListener, String)> {
    match listen_on(addr).await {
        Ok(l) => Ok((l, String::new())),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && may_move => {
            let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or("127.0.0.1");
            let l = listen_on(&format!("{host}:0")).await.with_context(|| {
                format!("{name} listener: {addr} is in use and no free port was found")
            })?;
            Ok((l, format!(" (port of {addr} was in use; moved)")))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "{name} listener: {addr} is already in use (is another MQTT broker running?). \
             Set STARLING_{}_BIND or [{name}] bind to another address.",
            name.to_ascii_uppercase()
        )),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("{name} listener: cannot bind {addr}")))
        }
    }
}

/// Pending connections the kernel queues per listener. The std default
/// (128) overflows in a reconnect storm: SYNs are dropped and clients wait
/// a second for the retry.
const LISTEN_BACKLOG: u32 = 1024;

async fn listen_on(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
    }))
}

/// Runs the admin listener on a thread and runtime of its own. Listing
/// every client is CPU work with no natural yield point; on the worker
/// threads it would hold up MQTT (issue 10's admin-load benchmark measured
/// a p99 thousands of times worse). Apart, the OS shares the CPU between
/// the two, and the MQTT worker, mostly asleep, preempts the admin thread
/// when a packet arrives. It stops with the broker's shutdown signal.
fn serve_admin_apart(
    shared: Arc<Shared>,
    listener: TcpListener,
    app: axum::Router,
) -> anyhow::Result<()> {
    let listener = listener
        .into_std()
        .context("admin listener: cannot hand the socket to its own thread")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("admin listener: cannot start its runtime")?;
    std::thread::Builder::new()
        .name("starling-admin".into())
        .spawn(move || {
            below_client_traffic();
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => listen::http::serve(shared, l, None, app, false).await,
                    Err(e) => {
                        tracing::error!(error = %e, "the admin listener could not start on its thread")
                    }
                }
            })
        })
        .context("admin listener: cannot start its thread")?;
    Ok(())
}

/// Puts the calling (admin) thread below the threads serving clients:
/// normal scheduling, even if the broker was started with a real-time
/// policy (`chrt`), which every thread inherits and under which a busy
/// admin thread would never give the CPU back; and nice 10, so that under
/// normal scheduling too a client's packet preempts a listing at once.
/// Best effort: a refusal leaves the thread as it was.
fn below_client_traffic() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system calls on the calling thread (id 0) with a
        // valid, initialised sched_param; no memory is shared with the kernel
        // beyond the call.
        let (policy, nice) = unsafe {
            (
                libc::sched_setscheduler(0, libc::SCHED_OTHER, &param),
                libc::setpriority(libc::PRIO_PROCESS, 0, 10),
            )
        };
        if policy != 0 || nice != 0 {
            tracing::debug!("the admin thread's priority could not be lowered");
        }
    }
}

/// Drops sessions whose expiry interval has passed since their client left.
async fn reap_sessions(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for s in shared.registry.take_expired(tokio::time::Instant::now()) {
            shared.router.drop_session(&s);
            s.forget_stored();
        }
        shared.router.purge_expired_retained();
    }
}

/// Writes the last-value cache's changes every `[storage] lvc_interval`
/// seconds: a cache, so losing the last interval on a crash is the price
/// of keeping the store off the QoS 0 path.
async fn save_last_values(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let every = Duration::from_secs(shared.config.storage.lvc_interval.max(1));
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                write_last_values(&shared, &mut seen);
                return;
            }
            _ = tokio::time::sleep(every) => write_last_values(&shared, &mut seen),
        }
    }
}

fn write_last_values(shared: &Shared, seen: &mut u64) {
    let lvc = &shared.router.lvc;
    let store = &shared.router.store;
    for topic in lvc.take_removed() {
        store.submit(store::Op::LastValue { topic, msg: None });
    }
    let (changed, newest) = lvc.changed_since(*seen);
    *seen = newest;
    for msg in changed {
        store.submit(store::Op::LastValue {
            topic: msg.topic.clone(),
            msg: Some(msg),
        });
    }
}

impl BrokerHandle {
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }

    /// Stops accepting, tells every client (v5: DISCONNECT 0x8B) after
    /// flushing what is queued for it, and waits up to `deadline` for the
    /// connections to close.
    pub async fn shutdown(mut self, deadline: Duration) {
        let _ = self.shared.shutdown.send(true);
        // Connections watch their link, not the shutdown signal: each
        // attached one is told there (those attaching after this see the
        // signal when their loop starts).
        for s in self.shared.registry.all() {
            let link = s.lock().link.clone();
            if let Some(link) = link {
                link.kick(starling_codec::reason::SERVER_SHUTTING_DOWN);
            }
        }
        let until = tokio::time::Instant::now() + deadline;
        while self
            .shared
            .metrics
            .connections_current
            .load(Ordering::Relaxed)
            > 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last-value cache's final write, then everything pending.
        write_last_values(&self.shared, &mut 0);
        self.tasks.abort_all();
        let store = self.shared.router.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

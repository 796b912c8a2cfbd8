//! Test fixture shared by the broker's integration tests: the real
//! `starling-broker` binary on ephemeral ports, rumqttc clients (v3.1.1 and
//! v5 behind one type), a test certificate authority and raw-socket helpers.
//!
//! Every wait is bounded: a broken broker fails a test in seconds instead of
//! hanging the suite.

#![allow(dead_code)]

pub mod scenarios;

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

/// Upper bound for any single expected event (CONNACK, SUBACK, a message…).
pub const STEP: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for, after the broker has already
/// routed what it would send (a PUBACK means routing is done).
pub const QUIET: Duration = Duration::from_millis(300);
/// Readiness bound for the broker process (debug build, busy CI machine).
const READY: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The broker process
// ---------------------------------------------------------------------------

/// A running `starling-broker` child process, killed on drop. When the test
/// is failing, its stdout/stderr are printed so the failure can be read
/// next to the broker's own account of it.
pub struct Broker {
    child: Child,
    listeners: HashMap<String, SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

#[derive(Default)]
pub struct BrokerBuilder {
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
}

impl BrokerBuilder {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn config(mut self, path: &Path) -> Self {
        self.config = Some(path.to_path_buf());
        self
    }

    /// Spawns the binary and waits (bounded) for its `ready` line.
    pub fn start(self) -> Broker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling-broker"));
        // Nothing from the developer's environment may leak into the broker.
        for (k, _) in std::env::vars() {
            if k.starts_with("STARLING_") || k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info,starling_broker=debug")
            .env("NO_COLOR", "1")
            .env("STARLING_MQTT_BIND", "127.0.0.1:0")
            .env("STARLING_HTTP_BIND", "127.0.0.1:0")
            .env("STARLING_ADMIN_BIND", "127.0.0.1:0");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning starling-broker");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std_mpsc::channel::<String>();
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        drain_lines(out, "out", log.clone(), Some(tx));
        drain_lines(err, "err", log.clone(), None);

        let mut listeners = HashMap::new();
        let deadline = std::time::Instant::now() + READY;
        let mut broker = Broker {
            child,
            listeners: HashMap::new(),
            log,
            exited: None,
        };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.trim() == "ready" => break,
                Ok(line) => {
                    if let Some((name, addr)) = parse_listener(&line) {
                        listeners.insert(name, addr);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "broker printed no `ready` line within {READY:?}\n{}",
                        broker.log()
                    )
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let status = broker.child.wait().ok();
                    broker.exited = status;
                    panic!(
                        "broker exited before `ready` ({status:?})\n{}",
                        broker.log()
                    )
                }
            }
        }
        broker.listeners = listeners;
        broker
    }
}

/// `  listener mqtt   mqtt://127.0.0.1:40000  MQTT 3.1.1 and 5.0`
fn parse_listener(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line.trim_start().strip_prefix("listener")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let url = words.next()?;
    let (_, addr) = url.split_once("://")?;
    Some((name.to_string(), addr.parse().ok()?))
}

fn drain_lines(
    r: impl Read + Send + 'static,
    tag: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    tx: Option<std_mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            {
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() < 20_000 {
                    l.push(format!("[{tag}] {line}"));
                }
            }
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

impl Broker {
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// A broker with the default configuration on ephemeral ports.
    pub fn start() -> Broker {
        Broker::builder().start()
    }

    /// The address of listener `name` (mqtt, mqtts, http, https, admin).
    pub fn addr(&self, name: &str) -> SocketAddr {
        match self.listeners.get(name) {
            Some(a) => *a,
            None => panic!(
                "no `{name}` listener in the banner (have {:?})",
                self.listeners
            ),
        }
    }

    pub fn has_listener(&self, name: &str) -> bool {
        self.listeners.contains_key(name)
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.addr("mqtt")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the broker printed so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Sends SIGTERM (through `kill(1)`, no libc needed).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait on the broker") {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- broker output ----\n{}\n---- end ----", self.log());
        }
    }
}

// ---------------------------------------------------------------------------
// Clients: rumqttc v3.1.1 and v5 behind one type
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

pub use Version::{V5, V311};

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// v5 Will Delay Interval (seconds).
    pub delay: Option<u32>,
}

/// Connection options for [`Client::connect`].
#[derive(Clone)]
pub struct Opts {
    pub version: Version,
    pub id: String,
    /// Host name for TCP/TLS, the full URL for WebSocket transports.
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    pub clean: bool,
    /// v5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    pub will: Option<Will>,
    /// v5 Topic Alias Maximum the client accepts from the broker.
    pub topic_alias_max: Option<u16>,
    /// v5 Receive Maximum.
    pub receive_max: Option<u16>,
    pub manual_acks: bool,
    /// MQTT username and password (see [`Opts::credentials`]).
    pub credentials: Option<(String, String)>,
}

impl Opts {
    pub fn new(version: Version, id: &str, addr: SocketAddr) -> Opts {
        Opts {
            version,
            id: id.into(),
            host: addr.ip().to_string(),
            port: addr.port(),
            transport: Transport::Tcp,
            clean: true,
            session_expiry: None,
            will: None,
            topic_alias_max: None,
            receive_max: None,
            manual_acks: false,
            credentials: None,
        }
    }

    /// MQTT over WebSocket (`ws://…/mqtt`) on the HTTP listener at `addr`.
    pub fn ws(version: Version, id: &str, addr: SocketAddr) -> Opts {
        let mut o = Opts::new(version, id, addr);
        o.host = format!("ws://{addr}/mqtt");
        o.transport = Transport::Ws;
        o
    }

    /// MQTT over TLS, trusting `tls`.
    pub fn tls(
        version: Version,
        id: &str,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Opts {
        let mut o = Opts::new(version, id, addr);
        o.transport = Transport::Tls(TlsConfiguration::Rustls(tls));
        o
    }

    /// MQTT over secure WebSocket (`wss://…/mqtt`), trusting `tls`.
    pub fn wss(
        version: Version,
        id: &str,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Opts {
        let mut o = Opts::new(version, id, addr);
        o.host = format!("wss://{addr}/mqtt");
        o.transport = Transport::Wss(TlsConfiguration::Rustls(tls));
        o
    }

    pub fn persistent(mut self, session_expiry: u32) -> Opts {
        self.clean = false;
        self.session_expiry = Some(session_expiry);
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Opts {
        self.will = Some(Will {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos,
            retain,
            delay: None,
        });
        self
    }
}

/// A received PUBLISH, as it came off the wire (for v5 the topic is empty
/// when the broker sent only a topic alias).
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub props: Option<p5::PublishProperties>,
    raw5: Option<p5::Publish>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn alias(&self) -> Option<u16> {
        self.props.as_ref().and_then(|p| p.topic_alias)
    }

    pub fn user_properties(&self) -> Vec<(String, String)> {
        self.props
            .as_ref()
            .map(|p| p.user_properties.clone())
            .unwrap_or_default()
    }

    pub fn sub_ids(&self) -> Vec<usize> {
        let mut ids = self
            .props
            .as_ref()
            .map(|p| p.subscription_identifiers.clone())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }
}

/// What a client's event loop saw, normalized across versions.
#[derive(Debug)]
pub enum Ev {
    ConnAck {
        session_present: bool,
        props: Option<Box<p5::ConnAckProperties>>,
    },
    Publish(Box<Msg>),
    /// Granted QoS per filter, or the refusal.
    SubAck(Vec<Result<u8, String>>),
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    UnsubAck,
    /// v5 DISCONNECT from the broker, with its reason code.
    Disconnect(u8),
    OutPublish(u16),
    OutDisconnect,
    Other,
    /// The event loop stopped with this error; nothing follows.
    Closed(String),
}

fn qos_u8_3(q: rumqttc::QoS) -> u8 {
    match q {
        rumqttc::QoS::AtMostOnce => 0,
        rumqttc::QoS::AtLeastOnce => 1,
        rumqttc::QoS::ExactlyOnce => 2,
    }
}

fn qos_u8_5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => 0,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => 1,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => 2,
    }
}

pub fn qos3(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => panic!("bad QoS {q}"),
    }
}

pub fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        2 => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        _ => panic!("bad QoS {q}"),
    }
}

fn ev3(e: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Packet};
    match e {
        Event::Incoming(Packet::ConnAck(a)) => Ev::ConnAck {
            session_present: a.session_present,
            props: None,
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Box::new(Msg {
            topic: p.topic,
            payload: p.payload,
            qos: qos_u8_3(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            props: None,
            raw5: None,
        })),
        Event::Incoming(Packet::SubAck(s)) => Ev::SubAck(
            s.return_codes
                .into_iter()
                .map(|c| match c {
                    rumqttc::SubscribeReasonCode::Success(q) => Ok(qos_u8_3(q)),
                    other => Err(format!("{other:?}")),
                })
                .collect(),
        ),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
        Event::Incoming(Packet::PubRec(a)) => Ev::PubRec(a.pkid),
        Event::Incoming(Packet::PubComp(a)) => Ev::PubComp(a.pkid),
        Event::Incoming(Packet::UnsubAck(_)) => Ev::UnsubAck,
        Event::Outgoing(Outgoing::Publish(id)) => Ev::OutPublish(id),
        Event::Outgoing(Outgoing::Disconnect) => Ev::OutDisconnect,
        _ => Ev::Other,
    }
}

fn ev5(e: rumqttc::v5::Event) -> Ev {
    use p5::Packet;
    use rumqttc::v5::Event;
    match e {
        Event::Incoming(Packet::ConnAck(a)) => Ev::ConnAck {
            session_present: a.session_present,
            props: a.properties.map(Box::new),
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Box::new(Msg {
            topic: String::from_utf8(p.topic.to_vec()).expect("UTF-8 topic"),
            payload: p.payload.clone(),
            qos: qos_u8_5(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            props: p.properties.clone(),
            raw5: Some(p),
        })),
        Event::Incoming(Packet::SubAck(s)) => Ev::SubAck(
            s.return_codes
                .into_iter()
                .map(|c| match c {
                    p5::SubscribeReasonCode::Success(q) => Ok(qos_u8_5(q)),
                    other => Err(format!("{other:?}")),
                })
                .collect(),
        ),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
        Event::Incoming(Packet::PubRec(a)) => Ev::PubRec(a.pkid),
        Event::Incoming(Packet::PubComp(a)) => Ev::PubComp(a.pkid),
        Event::Incoming(Packet::UnsubAck(_)) => Ev::UnsubAck,
        Event::Incoming(Packet::Disconnect(d)) => Ev::Disconnect(d.reason_code as u8),
        Event::Outgoing(Outgoing::Publish(id)) => Ev::OutPublish(id),
        Event::Outgoing(Outgoing::Disconnect) => Ev::OutDisconnect,
        _ => Ev::Other,
    }
}

enum Inner {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connected rumqttc client whose event loop runs in its own task and
/// reports into a channel. The task stops at the first error (no silent
/// reconnects), and aborting it drops the socket without DISCONNECT.
pub struct Client {
    inner: Inner,
    rx: mpsc::UnboundedReceiver<Ev>,
    pending: VecDeque<Msg>,
    task: JoinHandle<()>,
    pub id: String,
    pub session_present: bool,
    pub connack: Option<Box<p5::ConnAckProperties>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects and waits for a successful CONNACK; panics otherwise.
    pub async fn connect(o: Opts) -> Client {
        let id = o.id.clone();
        match Client::try_connect(o).await {
            Ok(c) => c,
            Err(e) => panic!("client {id} could not connect: {e}"),
        }
    }

    /// Connects; the error text if the connection or handshake failed.
    pub async fn try_connect(o: Opts) -> Result<Client, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (inner, task) = match o.version {
            V311 => {
                let mut m = rumqttc::MqttOptions::new(o.id.clone(), o.host.clone(), o.port);
                m.set_keep_alive(Duration::from_secs(30))
                    .set_clean_session(o.clean)
                    .set_transport(o.transport.clone())
                    .set_max_packet_size(1 << 20, 1 << 20)
                    .set_manual_acks(o.manual_acks);
                if let Some((user, pass)) = &o.credentials {
                    m.set_credentials(user.clone(), pass.clone());
                }
                if let Some(w) = &o.will {
                    m.set_last_will(rumqttc::LastWill::new(
                        w.topic.clone(),
                        w.payload.clone(),
                        qos3(w.qos),
                        w.retain,
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(m, 64);
                let task = tokio::spawn(async move {
                    loop {
                        match el.poll().await {
                            Ok(e) => {
                                let ev = ev3(e);
                                let stop = matches!(ev, Ev::OutDisconnect);
                                if tx.send(ev).is_err() || stop {
                                    break;
                                }
                            }
                            Err(e) => {
                                for e in el.state.events.drain(..) {
                                    let _ = tx.send(ev3(e));
                                }
                                let _ = tx.send(Ev::Closed(format!("{e:?}")));
                                break;
                            }
                        }
                    }
                });
                (Inner::V3(client), task)
            }
            V5 => {
                let mut m = rumqttc::v5::MqttOptions::new(o.id.clone(), o.host.clone(), o.port);
                m.set_keep_alive(Duration::from_secs(30))
                    .set_clean_start(o.clean)
                    .set_transport(o.transport.clone())
                    .set_max_packet_size(Some(1 << 20))
                    .set_session_expiry_interval(o.session_expiry)
                    .set_manual_acks(o.manual_acks);
                if let Some((user, pass)) = &o.credentials {
                    m.set_credentials(user.clone(), pass.clone());
                }
                if o.topic_alias_max.is_some() {
                    m.set_topic_alias_max(o.topic_alias_max);
                }
                if o.receive_max.is_some() {
                    m.set_receive_maximum(o.receive_max);
                }
                if let Some(w) = &o.will {
                    let props = w.delay.map(|d| p5::LastWillProperties {
                        delay_interval: Some(d),
                        payload_format_indicator: None,
                        message_expiry_interval: None,
                        content_type: None,
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                    });
                    m.set_last_will(p5::LastWill::new(
                        w.topic.clone(),
                        w.payload.clone(),
                        qos5(w.qos),
                        w.retain,
                        props,
                    ));
                }
                let (client, mut el) = rumqttc::v5::AsyncClient::new(m, 64);
                let task = tokio::spawn(async move {
                    loop {
                        match el.poll().await {
                            Ok(e) => {
                                let ev = ev5(e);
                                let stop = matches!(ev, Ev::OutDisconnect);
                                if tx.send(ev).is_err() || stop {
                                    break;
                                }
                            }
                            Err(e) => {
                                for e in el.state.events.drain(..) {
                                    let _ = tx.send(ev5(e));
                                }
                                let _ = tx.send(Ev::Closed(format!("{e:?}")));
                                break;
                            }
                        }
                    }
                });
                (Inner::V5(client), task)
            }
        };
        let mut c = Client {
            inner,
            rx,
            pending: VecDeque::new(),
            task,
            id: o.id.clone(),
            session_present: false,
            connack: None,
        };
        // rumqttc's own connection timeout is 5 s; leave it room to report.
        let first = timeout(STEP + Duration::from_secs(2), c.rx.recv()).await;
        match first {
            Ok(Some(Ev::ConnAck {
                session_present,
                props,
            })) => {
                c.session_present = session_present;
                c.connack = props;
                Ok(c)
            }
            Ok(Some(Ev::Closed(e))) => Err(e),
            Ok(Some(other)) => Err(format!("expected CONNACK first, got {other:?}")),
            Ok(None) => Err("event loop ended before CONNACK".into()),
            Err(_) => Err("no CONNACK in time".into()),
        }
    }

    pub fn v5(&self) -> &rumqttc::v5::AsyncClient {
        match &self.inner {
            Inner::V5(c) => c,
            Inner::V3(_) => panic!("{} is a v3.1.1 client", self.id),
        }
    }

    pub fn v3(&self) -> &rumqttc::AsyncClient {
        match &self.inner {
            Inner::V3(c) => c,
            Inner::V5(_) => panic!("{} is a v5 client", self.id),
        }
    }

    /// Waits (bounded) for the event `pick` accepts; publishes seen on the
    /// way are kept for [`Client::recv`].
    async fn wait<T>(&mut self, what: &str, mut pick: impl FnMut(Ev) -> Result<T, Ev>) -> T {
        let deadline = Instant::now() + STEP;
        loop {
            let ev = match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => panic!("{}: {what}: event loop already ended", self.id),
                Err(_) => panic!("{}: {what}: nothing within {STEP:?}", self.id),
            };
            match pick(ev) {
                Ok(t) => return t,
                Err(Ev::Publish(m)) => self.pending.push_back(*m),
                Err(Ev::Closed(e)) => panic!("{}: {what}: connection closed: {e}", self.id),
                Err(_) => {}
            }
        }
    }

    /// The next PUBLISH from the broker (bounded wait).
    pub async fn recv(&mut self) -> Msg {
        if let Some(m) = self.pending.pop_front() {
            return m;
        }
        self.wait("waiting for a PUBLISH", |ev| match ev {
            Ev::Publish(m) => Ok(*m),
            other => Err(other),
        })
        .await
    }

    /// The next `n` PUBLISHes (each wait bounded).
    pub async fn recv_n(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv().await);
        }
        out
    }

    /// Every PUBLISH arriving until none has come for `quiet` (bounded
    /// overall by a few seconds).
    pub async fn collect(&mut self, quiet: Duration) -> Vec<Msg> {
        let mut out: Vec<Msg> = self.pending.drain(..).collect();
        let hard = Instant::now() + STEP;
        loop {
            let until = (Instant::now() + quiet).min(hard);
            match timeout_at(until, self.rx.recv()).await {
                Ok(Some(Ev::Publish(m))) => out.push(*m),
                Ok(Some(Ev::Closed(_))) | Ok(None) | Err(_) => return out,
                Ok(Some(_)) => {}
            }
        }
    }

    /// Asserts that no PUBLISH arrives within `d`.
    pub async fn assert_silent(&mut self, d: Duration) {
        if let Some(m) = self.pending.front() {
            panic!("{}: expected no message, had {m:?}", self.id);
        }
        let until = Instant::now() + d;
        loop {
            match timeout_at(until, self.rx.recv()).await {
                Ok(Some(Ev::Publish(m))) => {
                    panic!("{}: expected no message, got {m:?}", self.id)
                }
                Ok(Some(Ev::Closed(_))) | Ok(None) | Err(_) => return,
                Ok(Some(_)) => {}
            }
        }
    }

    /// Subscribes to one filter and returns the SUBACK code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<u8, String> {
        match &self.inner {
            Inner::V3(c) => c.subscribe(filter, qos3(qos)).await.expect("subscribe"),
            Inner::V5(c) => c.subscribe(filter, qos5(qos)).await.expect("subscribe"),
        }
        let mut codes = self.suback().await;
        assert_eq!(codes.len(), 1, "{}: SUBACK codes {codes:?}", self.id);
        codes.remove(0)
    }

    /// Subscribes and asserts the broker granted exactly `qos`.
    pub async fn sub(&mut self, filter: &str, qos: u8) {
        let got = self.subscribe(filter, qos).await;
        assert_eq!(got, Ok(qos), "{}: SUBACK for {filter}", self.id);
    }

    /// v5 SUBSCRIBE with options and properties.
    pub async fn subscribe5(
        &mut self,
        filters: Vec<p5::Filter>,
        props: Option<p5::SubscribeProperties>,
    ) -> Vec<Result<u8, String>> {
        let c = self.v5().clone();
        match props {
            Some(p) => c.subscribe_many_with_properties(filters, p).await,
            None => c.subscribe_many(filters).await,
        }
        .expect("subscribe");
        self.suback().await
    }

    async fn suback(&mut self) -> Vec<Result<u8, String>> {
        self.wait("waiting for SUBACK", |ev| match ev {
            Ev::SubAck(codes) => Ok(codes),
            other => Err(other),
        })
        .await
    }

    pub async fn unsubscribe(&mut self, filter: &str) {
        match &self.inner {
            Inner::V3(c) => c.unsubscribe(filter).await.expect("unsubscribe"),
            Inner::V5(c) => c.unsubscribe(filter).await.expect("unsubscribe"),
        }
        self.wait("waiting for UNSUBACK", |ev| match ev {
            Ev::UnsubAck => Ok(()),
            other => Err(other),
        })
        .await
    }

    /// Publishes and waits until the exchange is complete: written (QoS 0),
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2). After that the broker has routed
    /// the message.
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        match &self.inner {
            Inner::V3(c) => c
                .publish(topic, qos3(qos), retain, payload.to_vec())
                .await
                .expect("publish"),
            Inner::V5(c) => c
                .publish(topic, qos5(qos), retain, payload.to_vec())
                .await
                .expect("publish"),
        }
        self.await_published(qos).await;
    }

    /// v5 PUBLISH with properties; waits like [`Client::publish`].
    pub async fn publish5(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
        props: p5::PublishProperties,
    ) {
        let c = self.v5().clone();
        c.publish_with_properties(topic, qos5(qos), retain, payload.to_vec(), props)
            .await
            .expect("publish");
        self.await_published(qos).await;
    }

    async fn await_published(&mut self, qos: u8) {
        match qos {
            0 => {
                self.wait("waiting for the PUBLISH to be written", |ev| match ev {
                    Ev::OutPublish(_) => Ok(()),
                    other => Err(other),
                })
                .await
            }
            1 => {
                self.wait("waiting for PUBACK", |ev| match ev {
                    Ev::PubAck(_) => Ok(()),
                    other => Err(other),
                })
                .await
            }
            _ => {
                self.wait("waiting for PUBCOMP", |ev| match ev {
                    Ev::PubComp(_) => Ok(()),
                    other => Err(other),
                })
                .await
            }
        }
    }

    /// Acknowledges a message (with manual acks on).
    pub async fn ack(&self, m: &Msg) {
        match &self.inner {
            Inner::V5(c) => c
                .ack(m.raw5.as_ref().expect("v5 message"))
                .await
                .expect("ack"),
            Inner::V3(c) => {
                let mut p = rumqttc::Publish::new(m.topic.clone(), qos3(m.qos), m.payload.to_vec());
                p.pkid = m.pkid;
                c.ack(&p).await.expect("ack")
            }
        }
    }

    /// Clean DISCONNECT, then the socket is closed.
    pub async fn disconnect(mut self) {
        match &self.inner {
            Inner::V3(c) => c.disconnect().await.expect("disconnect"),
            Inner::V5(c) => c.disconnect().await.expect("disconnect"),
        }
        self.wait("waiting for DISCONNECT to be sent", |ev| match ev {
            Ev::OutDisconnect => Ok(()),
            other => Err(other),
        })
        .await;
        // The loop task ends by itself right after sending DISCONNECT.
        let _ = timeout(STEP, &mut self.task).await;
    }

    /// Drops the network connection without DISCONNECT (as if the client
    /// crashed): the event loop task, which owns the socket, is aborted.
    pub async fn drop_connection(mut self) {
        self.task.abort();
        let _ = timeout(STEP, &mut self.task).await;
    }

    /// Waits until the broker closes the connection; returns the v5
    /// DISCONNECT reason code if one came, and the client's error text.
    pub async fn closed(&mut self) -> (Option<u8>, String) {
        let mut reason = None;
        let err = self
            .wait(
                "waiting for the broker to close the connection",
                |ev| match ev {
                    Ev::Disconnect(r) => {
                        reason = Some(r);
                        Err(Ev::Other)
                    }
                    Ev::Closed(e) => Ok(e),
                    other => Err(other),
                },
            )
            .await;
        (reason, err)
    }
}

/// Shorthand: connect a client with default options.
pub async fn connect(v: Version, id: &str, addr: SocketAddr) -> Client {
    Client::connect(Opts::new(v, id, addr)).await
}

// ---------------------------------------------------------------------------
// TLS: a test certificate authority
// ---------------------------------------------------------------------------

pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(p, key).expect("self-signing the CA"),
        }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
    pub fn server_cert(&self) -> (String, String) {
        let mut p =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = p.signed_by(&key, &self.issuer).expect("signing");
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls client configuration (ring provider) trusting only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("adding the CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

/// Writes `contents` to `path` atomically (write a sibling, then rename), so
/// a watcher never reads a half-written file.
pub fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("writing temp file");
    std::fs::rename(&tmp, path).expect("renaming into place");
}

// ---------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------

pub async fn raw_connect(addr: SocketAddr) -> TcpStream {
    timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("TCP connect timed out")
        .expect("TCP connect")
}

pub async fn raw_send(s: &mut TcpStream, bytes: &[u8]) {
    timeout(STEP, s.write_all(bytes))
        .await
        .expect("write timed out")
        .expect("write");
}

/// Reads exactly `n` bytes (bounded).
pub async fn raw_read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(STEP, s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

/// Reads one whole MQTT packet (bounded): (first byte, body).
pub async fn raw_read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let head = raw_read_exact(s, 1).await[0];
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = raw_read_exact(s, 1).await[0];
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        assert!(shift <= 21, "malformed remaining length from the broker");
    }
    (head, raw_read_exact(s, len).await)
}

/// Reads until the broker closes the socket; returns everything read and
/// how long it took. Panics if the socket is still open after `limit`.
pub async fn raw_read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match timeout_at(start + limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (all, start.elapsed()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {limit:?} (read so far: {all:02x?})"),
        }
    }
}

/// Encodes an MQTT remaining length.
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// An MQTT string (2-byte length prefix).
pub fn mqtt_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    v.extend(varint(body.len()));
    v.extend_from_slice(body);
    v
}

/// A v3.1.1 CONNECT (clean session, no will, no credentials).
pub fn connect_v311(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = mqtt_str("MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(mqtt_str(client_id));
    packet(0x10, &body)
}

/// A v5 CONNECT (clean start, no properties).
pub fn connect_v5(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = mqtt_str("MQTT");
    body.push(5);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0); // no properties
    body.extend(mqtt_str(client_id));
    packet(0x10, &body)
}

/// Decodes a v5 property block into (id, value bytes) pairs.
pub fn parse_props(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&id, rest)) = b.split_first() {
        let size = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => rest.iter().position(|x| x & 0x80 == 0).expect("varint") + 1,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]))
            }
            0x26 => {
                let k = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                k + 2 + usize::from(u16::from_be_bytes([rest[k], rest[k + 1]]))
            }
            other => panic!("unknown property id {other:#04x}"),
        };
        out.push((id, rest[..size].to_vec()));
        b = &rest[size..];
    }
    out
}

/// Reads a variable byte integer from the front of `b`: (value, bytes used).
pub fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut v = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("malformed variable byte integer {b:02x?}");
}

// ---------------------------------------------------------------------------
// Credentials (token authentication tests)
// ---------------------------------------------------------------------------

impl Opts {
    /// Connect with this MQTT username and password (a token secret).
    pub fn credentials(mut self, username: &str, password: &str) -> Opts {
        self.credentials = Some((username.into(), password.into()));
        self
    }
}

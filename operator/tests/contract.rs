//! Contract test: what the operator makes is what the real broker runs.
//!
//! The real operator (`app::run`) reconciles a Broker with two Tokens and two
//! ACLs against the in-memory API server. The ConfigMap (broker TOML), the
//! auth-bundle Secret, the TLS Secret and each Token's credentials Secret are
//! then read back from that API server — not taken from the builders — and
//! handed to the real `starling-broker` binary, as the kubelet would mount
//! them. The broker also reaches the same API server over HTTP, as a pod
//! does, and watches its bundle Secret there. Real MQTT clients connect over
//! TLS with each Token's credentials and must get exactly the access the
//! ACLs grant; deleting a Token closes its connections within 2 s through
//! operator → bundle Secret → broker watch, with the mounted file unchanged.
//!
//! The binary is `$STARLING_BIN`, else `target/debug/starling-broker` of this
//! workspace (built by `cargo build -p starling-broker`, or by any
//! workspace-wide `cargo test`); when it is missing the test fails.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ObjectMeta;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use starling_fake_apiserver::FakeApi;
use starling_model::bundle::AuthBundle;
use starling_operator::app::{self, Options};
use starling_operator::build::config::CONFIG_KEY;
use starling_operator::build::secret_keys;
use starling_operator::crd::acl::{
    AclAction, AclEffect, AclRule, AclSpec, TokenSelector, TopicFilter,
};
use starling_operator::crd::{Acl, Broker, BrokerRef, BrokerSpec, Token, TokenSpec};
use starling_operator::shutdown::Shutdown;

const NS: &str = "contract";
const STEP: Duration = Duration::from_secs(10);

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

fn acl(name: &str, tokens: &[&str], rules: Vec<AclRule>) -> Acl {
    Acl {
        metadata: meta(name, &[]),
        spec: AclSpec {
            anonymous: false,
            broker_ref: BrokerRef {
                name: "demo".into(),
            },
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            token_selector: None,
            rules,
        },
        status: None,
    }
}

fn rule(topics: &[&str], actions: &[AclAction], effect: AclEffect) -> AclRule {
    AclRule {
        topics: topics.iter().map(|t| TopicFilter(t.to_string())).collect(),
        actions: actions.to_vec(),
        effect,
    }
}

fn data(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

/// The broker binary. A missing binary fails the test: a contract test that
/// quietly passes without the broker would prove nothing.
fn broker_binary() -> PathBuf {
    let bin = std::env::var_os("STARLING_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/starling-broker")
        });
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build -p starling-broker` or set STARLING_BIN",
        bin.display()
    );
    bin
}

/// What the operator produced, read back from the API server and written
/// to files, plus the clients' view.
struct Deployment {
    _dir: tempfile::TempDir,
    config: PathBuf,
    bundle: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    data: PathBuf,
    kubeconfig: PathBuf,
    /// Token name → its credentials Secret.
    credentials: HashMap<String, Secret>,
}

/// Polls `f` until it yields, within the step timeout.
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bundle_tokens(s: &Secret) -> Vec<String> {
    AuthBundle::parse(data(s, secret_keys::BUNDLE).as_bytes())
        .map(|b| b.tokens.into_iter().map(|t| t.name).collect())
        .unwrap_or_default()
}

/// Creates the resources a user would `kubectl apply`, lets the real
/// operator reconcile them, and reads its output back.
async fn deploy(api: &FakeApi, server: &str) -> Deployment {
    let spec: BrokerSpec = serde_json::from_value(serde_json::json!({
        "tls": {"dnsNames": ["127.0.0.1"]},
        "auth": {"anonymous": "deny", "defaultPolicy": "deny"},
    }))
    .expect("spec");
    api.put(&Broker {
        metadata: meta("demo", &[]),
        spec,
        status: None,
    });
    for (name, team) in [("sensor", "devices"), ("dashboard", "apps")] {
        api.put(&Token {
            metadata: meta(name, &[("team", team)]),
            spec: TokenSpec {
                broker_ref: BrokerRef {
                    name: "demo".into(),
                },
                ..TokenSpec::default()
            },
            status: None,
        });
    }

    // sensor: publishes temperatures. dashboard (by label): reads all
    // sensors except the private ones, publishes nothing.
    let mut dashboards = acl(
        "dashboards",
        &[],
        vec![
            rule(&["sensors/#"], &[AclAction::Subscribe], AclEffect::Allow),
            rule(
                &["sensors/private/#"],
                &[AclAction::Subscribe],
                AclEffect::Deny,
            ),
            rule(&["#"], &[AclAction::Publish], AclEffect::Deny),
        ],
    );
    dashboards.spec.token_selector = Some(TokenSelector {
        match_labels: BTreeMap::from([("team".into(), "apps".into())]),
    });
    api.put(&acl(
        "sensors",
        &["sensor"],
        vec![rule(
            &["sensors/+/temp"],
            &[AclAction::Publish],
            AclEffect::Allow,
        )],
    ));
    api.put(&dashboards);

    let config_map = until("the broker ConfigMap", || {
        api.get::<ConfigMap>(NS, "demo-config")
    })
    .await;
    let bundle_secret = until("a bundle with both tokens", || {
        api.get::<Secret>(NS, "demo-auth")
            .filter(|s| bundle_tokens(s).len() == 2)
    })
    .await;
    let tls_secret = until("the TLS Secret", || api.get::<Secret>(NS, "demo-tls")).await;
    let mut credentials = HashMap::new();
    for name in ["sensor", "dashboard"] {
        let s = until("credentials", || {
            api.get::<Secret>(NS, &format!("{name}-credentials"))
                .filter(|s| {
                    s.data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(secret_keys::CA_CRT))
                })
        })
        .await;
        credentials.insert(name.to_string(), s);
    }
    let bundle = AuthBundle::parse(data(&bundle_secret, secret_keys::BUNDLE).as_bytes())
        .expect("the bundle the operator wrote parses");
    assert_eq!(bundle.acls.len(), 2, "{bundle:?}");

    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p
    };
    let config = write(
        "starling.toml",
        &config_map.data.as_ref().expect("config data")[CONFIG_KEY],
    );
    let bundle = write("bundle.json", &data(&bundle_secret, secret_keys::BUNDLE));
    let cert = write("tls.crt", &data(&tls_secret, secret_keys::TLS_CRT));
    let key = write("tls.key", &data(&tls_secret, secret_keys::TLS_KEY));
    let kubeconfig = write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
             users:\n- name: broker\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: broker\n\
             current-context: fake\n"
        ),
    );
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    Deployment {
        config,
        bundle,
        cert,
        key,
        data: data_dir,
        kubeconfig,
        credentials,
        _dir: dir,
    }
}

/// The real broker, killed on drop.
struct Running {
    child: Child,
    listeners: HashMap<String, SocketAddr>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &PathBuf, d: &Deployment) -> Running {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&d.config)
        .arg("--auth-bundle")
        .arg(&d.bundle)
        .arg("--data-dir")
        .arg(&d.data);
    // Keep only the in-cluster config; what differs on a workstation (free
    // ports on loopback, where the mounted Secret files are) comes through
    // the broker's documented STARLING_<SECTION>_<KEY> overrides.
    for (k, _) in std::env::vars() {
        if k.starts_with("STARLING_") {
            cmd.env_remove(k);
        }
    }
    for l in ["MQTTS", "HTTPS", "MQTT", "HTTP", "ADMIN"] {
        cmd.env(format!("STARLING_{l}_BIND"), "127.0.0.1:0");
    }
    cmd.env("STARLING_TLS_CERT", &d.cert)
        .env("STARLING_TLS_KEY", &d.key)
        // The pod's view of the API server: its namespace (downward API)
        // and a way to reach it.
        .env("POD_NAMESPACE", NS)
        .env("KUBECONFIG", &d.kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("broker starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut listeners = HashMap::new();
    let mut running = Running {
        child,
        listeners: HashMap::new(),
    };
    loop {
        let line = rx.recv_timeout(STEP).unwrap_or_else(|_| {
            panic!("broker printed no `ready` line; listeners so far: {listeners:?}")
        });
        if line.trim() == "ready" {
            break;
        }
        // `  listener NAME   SCHEME://ADDR  note`
        let mut words = line.split_whitespace();
        if words.next() == Some("listener")
            && let (Some(name), Some(url)) = (words.next(), words.next())
            && let Some((_, addr)) = url.split_once("://")
            && let Ok(addr) = addr.parse::<SocketAddr>()
        {
            listeners.insert(name.to_string(), addr);
        }
    }
    // Keep draining stdout so the broker never blocks on it.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    running.listeners = listeners;
    running
}

/// An MQTT 3.1.1 client over TLS that checks the server with the CA from
/// the credentials Secret.
struct Mqtt {
    client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<Packet, String>>,
}

async fn connect(
    addr: SocketAddr,
    id: &str,
    user: &str,
    password: &str,
    ca: &str,
) -> Result<Mqtt, String> {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, password);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca.as_bytes().to_vec(),
        alpn: None,
        client_auth: None,
    }));
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        break;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let msg = match e {
                        ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                        other => other.to_string(),
                    };
                    let _ = tx.send(Err(msg));
                    break;
                }
            }
        }
    });
    match tokio::time::timeout(STEP, rx.recv()).await {
        Ok(Some(Ok(Packet::ConnAck(_)))) => Ok(Mqtt { client, events: rx }),
        Ok(Some(Ok(other))) => Err(format!("unexpected first packet {other:?}")),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) => Err("event loop ended".into()),
        Err(_) => Err("no CONNACK in time".into()),
    }
}

impl Mqtt {
    /// The next packet matching `f`, within the step timeout.
    async fn next<T>(&mut self, mut f: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(p))) => {
                    if let Some(t) = f(&p) {
                        return Some(t);
                    }
                }
                _ => return None,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        self.next(|p| match p {
            Packet::SubAck(a) => a.return_codes.first().copied(),
            _ => None,
        })
        .await
        .unwrap_or_else(|| panic!("no SUBACK for {filter}"))
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("publish queued");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_output_runs_the_real_broker_with_exactly_the_acl_access() {
    let bin = broker_binary();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApi::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let _served = api.serve(listener);
    let shutdown = Shutdown::default();
    let operator = tokio::spawn(app::run(
        api.client(),
        Options {
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            namespace: None,
            leader_election: false,
            lease_namespace: NS.into(),
            lease_name: "starling-operator".into(),
            identity: "contract".into(),
        },
        shutdown.clone(),
    ));
    let d = deploy(&api, &server).await;
    let broker = start(&bin, &d);
    let addr = *broker
        .listeners
        .get("mqtts")
        .unwrap_or_else(|| panic!("no mqtts listener in {:?}", broker.listeners));

    let creds = |name: &str| {
        let s = &d.credentials[name];
        (
            data(s, secret_keys::USERNAME),
            data(s, secret_keys::PASSWORD),
            data(s, secret_keys::CA_CRT),
        )
    };
    let (sensor_user, sensor_pw, ca) = creds("sensor");
    let (dash_user, dash_pw, _) = creds("dashboard");
    assert_eq!(sensor_user, "sensor");
    assert!(
        data(&d.credentials["sensor"], secret_keys::MQTTS_URL)
            .starts_with("mqtts://demo.contract.svc:8883")
    );

    // No token, a wrong secret, or someone else's name: refused.
    assert!(
        connect(addr, "anon", "", "", &ca).await.is_err(),
        "anonymous must be refused"
    );
    assert!(
        connect(
            addr,
            "wrong",
            "sensor",
            "not-the-secret-not-the-secret",
            &ca
        )
        .await
        .is_err(),
        "a wrong secret must be refused"
    );
    assert!(
        connect(addr, "swap", "dashboard", &sensor_pw, &ca)
            .await
            .is_err(),
        "a secret is only valid with its own token name"
    );

    // The dashboard (matched by label) may read sensors but not the private
    // ones: a subscription is allowed when an allow rule covers it, refused
    // when a deny rule covers it, and filtered when a deny rule only
    // overlaps it (granted; the private topics are withheld).
    let mut dash = connect(addr, "dash", &dash_user, &dash_pw, &ca)
        .await
        .expect("dashboard connects with its credentials");
    let granted = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    let refused = SubscribeReasonCode::Failure;
    assert_eq!(dash.subscribe("sensors/lab/#").await, granted);
    assert_eq!(dash.subscribe("sensors/kitchen/temp").await, granted);
    // `+` could match `private`: granted, and filtered.
    assert_eq!(dash.subscribe("sensors/+/temp").await, granted);
    assert_eq!(dash.subscribe("sensors/#").await, granted);
    assert_eq!(dash.subscribe("sensors/private/#").await, refused);
    assert_eq!(dash.subscribe("other/#").await, refused);

    // The sensor may publish temperatures only; the broker's own name is an
    // accepted username too.
    let sensor = connect(addr, "sensor-1", "demo", &sensor_pw, &ca)
        .await
        .expect("sensor connects with the broker name as username");
    let mut sensor_sub = connect(addr, "sensor-2", &sensor_user, &sensor_pw, &ca)
        .await
        .expect("sensor connects with its token name");
    assert_eq!(sensor_sub.subscribe("sensors/#").await, refused);

    // Refused publishes (v3.1.1 QoS 0: dropped), then an allowed one as a marker.
    sensor
        .publish("sensors/lab/humidity", "denied-humidity")
        .await;
    dash.publish("sensors/lab/temp", "denied-from-dashboard")
        .await;
    // Allowed to publish, not to be read by the dashboard.
    sensor
        .publish("sensors/private/temp", "denied-private-read")
        .await;
    // Give a (wrongly) accepted publish time to arrive before the marker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sensor.publish("sensors/lab/temp", "21.5").await;
    let mut got = Vec::new();
    let marker = dash
        .next(|p| match p {
            Packet::Publish(p) => {
                let body = String::from_utf8_lossy(&p.payload).to_string();
                got.push((p.topic.clone(), body.clone()));
                (body == "21.5").then_some(p.topic.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(
        marker.as_deref(),
        Some("sensors/lab/temp"),
        "allowed publish delivered; saw {got:?}"
    );
    assert!(
        got.iter().all(|(_, b)| !b.starts_with("denied")),
        "refused publishes must not be delivered: {got:?}"
    );

    // `kubectl delete token sensor`: the operator rewrites the bundle
    // Secret, the broker sees it through its watch (the mounted file stays
    // as it was), and the sensor's connections close within 2 s.
    let mounted = std::fs::read(&d.bundle).expect("mounted bundle");
    let t0 = tokio::time::Instant::now();
    api.remove::<Token>(NS, "sensor");
    let closed =
        tokio::time::timeout(Duration::from_secs(2), sensor_sub.next(|_| None::<()>)).await;
    let took = t0.elapsed();
    assert!(
        closed.is_ok(),
        "the deleted token's connection was still open after {took:?}"
    );
    assert_eq!(
        std::fs::read(&d.bundle).expect("mounted bundle"),
        mounted,
        "the mounted file was not what revoked it"
    );
    assert!(
        connect(addr, "sensor-3", &sensor_user, &sensor_pw, &ca)
            .await
            .is_err(),
        "a deleted token connects no more"
    );
    assert!(
        bundle_tokens(&api.get::<Secret>(NS, "demo-auth").expect("bundle")) == ["dashboard"],
        "the operator removed the token from the bundle"
    );
    // The dashboard is untouched.
    assert_eq!(dash.subscribe("sensors/kitchen/temp").await, granted);
    shutdown.trigger();
    let _ = tokio::time::timeout(STEP, operator).await;
}

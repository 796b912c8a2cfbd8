//! TLS (with a test CA, untrusted CAs, certificate reload) and MQTT over
//! WebSocket (plain and TLS), each against the real broker binary and
//! crossing transports through the one router.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Broker, Client, Opts, STEP, TestCa, V5, V311, connect, write_atomic};
use tokio::time::Instant;

struct TlsBroker {
    broker: Broker,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

/// A broker with every listener on: plain from the environment, mqtts and
/// https from a config file whose [tls] cert/key are signed by `ca`.
fn tls_broker(ca: &TestCa) -> TlsBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    let (c, k) = ca.server_cert();
    write_atomic(&cert, &c);
    write_atomic(&key, &k);
    let config = dir.path().join("starling.toml");
    let text = format!(
        "[tls]\ncert = {}\nkey = {}\n[mqtts]\nbind = \"127.0.0.1:0\"\n[https]\nbind = \"127.0.0.1:0\"\n",
        toml_path(&cert),
        toml_path(&key)
    );
    std::fs::write(&config, text).expect("writing the config");
    let broker = Broker::builder().config(&config).start();
    for l in ["mqtt", "mqtts", "http", "https", "admin"] {
        assert!(
            broker.has_listener(l),
            "listener {l} missing from the banner"
        );
    }
    TlsBroker {
        broker,
        cert,
        key,
        _dir: dir,
    }
}

fn toml_path(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 temp path");
    assert!(!s.contains(['"', '\\']), "unexpected temp path {s}");
    format!("\"{s}\"")
}

#[tokio::test]
async fn tls_round_trip_and_untrusted_ca_is_refused() {
    let ca = TestCa::new("Starling test CA");
    let t = tls_broker(&ca);
    let b = &t.broker;
    let mqtts = b.addr("mqtts");

    let mut sub = Client::connect(Opts::tls(V311, "tls-sub", mqtts, ca.client_config())).await;
    sub.sub("tls/t", 1).await;
    let mut publ = Client::connect(Opts::tls(V5, "tls-pub", mqtts, ca.client_config())).await;
    publ.publish("tls/t", 1, false, b"secure").await;
    let m = sub.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str(), m.qos),
        ("tls/t", "secure", 1)
    );

    // Cross-transport: plain TCP publisher, TLS subscriber.
    let mut plain = connect(V311, "tls-plain", b.mqtt()).await;
    plain.publish("tls/t", 1, false, b"from-tcp").await;
    assert_eq!(sub.recv().await.text(), "from-tcp");

    // A client trusting another CA fails the handshake…
    let other = TestCa::new("Some other CA");
    let refused =
        Client::try_connect(Opts::tls(V311, "tls-bad", mqtts, other.client_config())).await;
    match refused {
        Ok(_) => panic!("a client trusting another CA must not connect"),
        Err(e) => assert!(
            e.contains("InvalidCertificate(UnknownIssuer)"),
            "handshake error should be about the certificate: {e}"
        ),
    }
    // …while good clients keep working.
    let mut again = Client::connect(Opts::tls(V5, "tls-again", mqtts, ca.client_config())).await;
    again.publish("tls/t", 1, false, b"still-fine").await;
    assert_eq!(sub.recv().await.text(), "still-fine");
}

/// Overwriting the cert/key files with a certificate from a second CA takes
/// effect for new handshakes within seconds, without a restart.
#[tokio::test]
async fn tls_certificate_reload() {
    let ca1 = TestCa::new("Starling test CA one");
    let ca2 = TestCa::new("Starling test CA two");
    let t = tls_broker(&ca1);
    let mqtts = t.broker.addr("mqtts");
    let only2 = ca2.client_config();
    assert!(
        Client::try_connect(Opts::tls(V311, "rl-early", mqtts, only2.clone()))
            .await
            .is_err(),
        "CA two is not in use yet"
    );
    let first = Client::connect(Opts::tls(V311, "rl-one", mqtts, ca1.client_config())).await;

    let (c, k) = ca2.server_cert();
    write_atomic(&t.key, &k);
    write_atomic(&t.cert, &c);

    let start = Instant::now();
    let mut attempt = 0;
    let mut c2 = loop {
        attempt += 1;
        let o = Opts::tls(V311, &format!("rl-two-{attempt}"), mqtts, only2.clone());
        match Client::try_connect(o).await {
            Ok(c) => break c,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                panic!(
                    "new certificate not served after {:?}: {e}",
                    start.elapsed()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // The new connection works end to end.
    c2.sub("rl/t", 1).await;
    let mut publ = connect(V5, "rl-pub", t.broker.mqtt()).await;
    publ.publish("rl/t", 1, false, b"after-reload").await;
    assert_eq!(c2.recv().await.text(), "after-reload");
    // New handshakes no longer get the old certificate.
    assert!(
        Client::try_connect(Opts::tls(V311, "rl-old", mqtts, ca1.client_config()))
            .await
            .is_err(),
        "the old certificate must no longer be served"
    );
    drop(first);
}

/// MQTT over WebSocket at ws://…/mqtt (v3.1.1 and v5), with TCP clients on
/// the other side in both directions.
#[tokio::test]
async fn websocket_cross_transport() {
    let b = Broker::start();
    let http = b.addr("http");

    let mut ws_sub = Client::connect(Opts::ws(V311, "ws-sub", http)).await;
    ws_sub.sub("ws/in", 2).await;
    let mut tcp_pub = connect(V5, "tcp-pub", b.mqtt()).await;
    tcp_pub.publish("ws/in", 1, false, b"from-tcp").await;
    let m = ws_sub.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str(), m.qos),
        ("ws/in", "from-tcp", 1)
    );

    let mut tcp_sub = connect(V311, "tcp-sub", b.mqtt()).await;
    tcp_sub.sub("ws/out", 2).await;
    let mut ws_pub = Client::connect(Opts::ws(V5, "ws-pub", http)).await;
    ws_pub.publish("ws/out", 2, false, b"from-ws").await;
    let m = tcp_sub.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str(), m.qos),
        ("ws/out", "from-ws", 2)
    );

    // A retained message set over WebSocket reaches a later TCP subscriber.
    ws_pub.publish("ws/kept", 1, true, b"kept").await;
    let mut late = connect(V5, "tcp-late", b.mqtt()).await;
    late.sub("ws/kept", 1).await;
    let m = late.recv().await;
    assert!(m.retain);
    assert_eq!(m.text(), "kept");
}

/// MQTT over secure WebSocket (wss://…/mqtt on the https listener) with
/// the test CA, against an mqtts client.
#[tokio::test]
async fn secure_websocket_round_trip() {
    let ca = TestCa::new("Starling test CA wss");
    let t = tls_broker(&ca);
    let https = t.broker.addr("https");
    let mqtts = t.broker.addr("mqtts");
    let cfg: Arc<rustls::ClientConfig> = ca.client_config();

    let mut wss = Client::connect(Opts::wss(V5, "wss-client", https, cfg.clone())).await;
    wss.sub("wss/in", 1).await;
    let mut tls = Client::connect(Opts::tls(V311, "mqtts-client", mqtts, cfg.clone())).await;
    tls.sub("wss/out", 1).await;

    tls.publish("wss/in", 1, false, b"to-wss").await;
    let m = wss.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str(), m.qos),
        ("wss/in", "to-wss", 1)
    );

    wss.publish("wss/out", 1, false, b"from-wss").await;
    let m = tls.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str()),
        ("wss/out", "from-wss")
    );

    // A wss client trusting another CA is refused.
    let other = TestCa::new("Some other CA");
    let refused = tokio::time::timeout(
        STEP * 2,
        Client::try_connect(Opts::wss(V311, "wss-bad", https, other.client_config())),
    )
    .await
    .expect("refusal within bounds");
    assert!(refused.is_err(), "untrusted wss handshake must fail");
}

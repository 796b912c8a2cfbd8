//! The HTTP interface under `/broker/` against the real broker binary:
//! requests are hand-written HTTP/1.1 over a tokio `TcpStream` (no HTTP
//! client dependency), the MQTT side is rumqttc v3.1.1 and v5. One router:
//! a POST reaches MQTT subscribers byte-exact, and what an MQTT client
//! published is what GET answers.

mod common;

use std::net::SocketAddr;

use common::{Broker, STEP, V5, V311, Version, connect, raw_connect, raw_send};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

/// A parsed HTTP/1.1 response.
struct Response {
    status: u16,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {:?} {:?}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// One request on its own connection (`Connection: close`); the response is
/// read to EOF, bounded by [`STEP`].
async fn request(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> Response {
    let mut s = raw_connect(addr).await;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    raw_send(&mut s, &req).await;
    let mut all = Vec::new();
    timeout(STEP, s.read_to_end(&mut all))
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no complete response within {STEP:?}"))
        .expect("reading the response");
    parse(&all)
}

fn parse(all: &[u8]) -> Response {
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(all)));
    let head = std::str::from_utf8(&all[..end]).expect("response head is not UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let raw = &all[end + 4..];
    let mut r = Response {
        status,
        headers,
        body: Vec::new(),
    };
    r.body = if r
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(raw)
    } else {
        if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().expect("Content-Length");
            assert_eq!(raw.len(), n, "body length vs Content-Length");
        }
        raw.to_vec()
    };
    r
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&b[..eol]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Every byte value, twice, in both directions: nothing may be re-encoded.
fn binary_payload() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

fn tag(v: Version) -> &'static str {
    match v {
        V311 => "v311",
        V5 => "v5",
    }
}

async fn post_arrives_byte_exact(v: Version) {
    let b = Broker::start();
    let http = b.addr("http");
    let topic = format!("http/{}/bin", tag(v));
    let mut sub = connect(v, &format!("http-sub-{}", tag(v)), b.mqtt()).await;
    sub.sub(&topic, 2).await;

    let payload = binary_payload();
    for qos in [0u8, 1, 2] {
        let r = request(
            http,
            "POST",
            &format!("/broker/{topic}?qos={qos}"),
            &payload,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, br#"{"matched":1}"#, "{r:?}");
        let m = sub.recv().await;
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.qos, m.retain),
            (topic.as_str(), &payload[..], qos, false),
            "POST ?qos={qos}"
        );
    }

    // A retained POST is retained for MQTT subscribers that come later.
    let retained = format!("{topic}/retained");
    let r = request(
        http,
        "POST",
        &format!("/broker/{retained}?retained=true&qos=1"),
        b"\x00\xffkept",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut late = connect(v, &format!("http-late-{}", tag(v)), b.mqtt()).await;
    late.sub(&retained, 1).await;
    let m = late.recv().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        (retained.as_str(), &b"\x00\xffkept"[..], true)
    );

    // A wildcard topic is a 400 and publishes nothing.
    let r = request(http, "POST", &format!("/broker/http/{}/@", tag(v)), b"no").await;
    assert_eq!(r.status, 400, "{r:?}");
    sub.assert_silent(common::QUIET).await;
}

async fn mqtt_publish_is_returned_by_get(v: Version) {
    let b = Broker::start();
    let http = b.addr("http");
    let base = format!("http/{}/get", tag(v));
    let topic = format!("{base}/value");
    let payload = binary_payload();
    let mut publ = connect(v, &format!("http-pub-{}", tag(v)), b.mqtt()).await;
    publ.publish(&topic, 1, false, &payload).await; // PUBACK: routed and cached

    let r = request(http, "GET", &format!("/broker/{topic}?wait=0"), b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, payload, "GET body is not the published payload");
    assert_eq!(r.header("mqtt-topic"), Some(topic.as_str()), "{r:?}");
    assert_eq!(r.header("mqtt-qos"), Some("1"), "{r:?}");
    assert_eq!(r.header("mqtt-retain"), Some("false"), "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/octet-stream"),
        "{r:?}"
    );

    // A filter (`@` is `#`) answers the most recent message across its topics.
    publ.publish(&format!("{base}/other"), 0, false, b"newer")
        .await;
    publ.publish(&format!("{base}/sync"), 1, false, b"sync")
        .await; // the QoS 0 one before it is routed too
    let r = request(http, "GET", &format!("/broker/{base}/*?wait=0"), b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body.as_slice(), r.header("mqtt-topic")),
        (&b"sync"[..], Some(format!("{base}/sync").as_str())),
        "{r:?}"
    );

    // Retained, with `?retained=true`: the latest retained, not the latest.
    publ.publish(&format!("{base}/r"), 1, true, b"kept").await;
    publ.publish(&format!("{base}/r"), 1, false, b"live").await;
    let r = request(http, "GET", &format!("/broker/{base}/r?wait=0"), b"").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"live"[..]), "{r:?}");
    let r = request(
        http,
        "GET",
        &format!("/broker/{base}/r?retained=true&wait=0"),
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("mqtt-retain")),
        (200, &b"kept"[..], Some("true")),
        "{r:?}"
    );

    // Nothing known and no wait: 204.
    let r = request(http, "GET", &format!("/broker/{base}/never?wait=0"), b"").await;
    assert_eq!(r.status, 204, "{r:?}");

    // v5: the content type travels to the Content-Type header.
    if v == V5 {
        let props = PublishProperties {
            content_type: Some("application/json".into()),
            ..PublishProperties::default()
        };
        publ.publish5(&format!("{base}/json"), 1, false, b"{\"t\":21.5}", props)
            .await;
        let r = request(http, "GET", &format!("/broker/{base}/json?wait=0"), b"").await;
        assert_eq!(
            (r.status, r.body.as_slice(), r.header("content-type")),
            (200, &b"{\"t\":21.5}"[..], Some("application/json")),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn post_binary_reaches_v311_subscriber_byte_exact() {
    post_arrives_byte_exact(V311).await;
}

#[tokio::test]
async fn post_binary_reaches_v5_subscriber_byte_exact() {
    post_arrives_byte_exact(V5).await;
}

#[tokio::test]
async fn v311_publish_is_returned_by_get() {
    mqtt_publish_is_returned_by_get(V311).await;
}

#[tokio::test]
async fn v5_publish_is_returned_by_get() {
    mqtt_publish_is_returned_by_get(V5).await;
}

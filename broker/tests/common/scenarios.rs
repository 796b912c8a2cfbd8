//! Behaviour both protocol versions share, written once and run by
//! `mqtt_v311.rs` and `mqtt_v5.rs` with rumqttc's v3.1.1 and v5 clients.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{Broker, Client, Opts, QUIET, V5, Version, connect};

/// QoS 0, 1 and 2 each arrive once, with topic, payload and QoS intact.
pub async fn qos_round_trips(v: Version) {
    let b = Broker::start();
    let mut sub = connect(v, "rt-sub", b.mqtt()).await;
    let mut publ = connect(v, "rt-pub", b.mqtt()).await;
    sub.sub("rt/topic", 2).await;
    for (qos, payload) in [(0u8, "zero"), (1, "one"), (2, "two")] {
        publ.publish("rt/topic", qos, false, payload.as_bytes())
            .await;
        let m = sub.recv().await;
        assert_eq!(m.topic, "rt/topic");
        assert_eq!(m.text(), payload);
        assert_eq!(m.qos, qos, "QoS of {payload}");
        assert!(!m.retain, "live message must not carry the retain flag");
        assert!(!m.dup, "first delivery must not be DUP");
    }
    // Exactly once: nothing is delivered twice.
    sub.assert_silent(QUIET).await;
}

/// Delivered QoS is min(publish QoS, subscription QoS), for all nine pairs.
pub async fn qos_downgrade(v: Version) {
    let b = Broker::start();
    let mut sub = connect(v, "dg-sub", b.mqtt()).await;
    let mut publ = connect(v, "dg-pub", b.mqtt()).await;
    for s in 0..=2u8 {
        sub.sub(&format!("dg/{s}"), s).await;
    }
    for s in 0..=2u8 {
        for p in 0..=2u8 {
            publ.publish(&format!("dg/{s}"), p, false, format!("p{p}").as_bytes())
                .await;
        }
    }
    let got = sub.recv_n(9).await;
    sub.assert_silent(QUIET).await;
    let seen: BTreeMap<(String, String), u8> = got
        .iter()
        .map(|m| ((m.topic.clone(), m.text()), m.qos))
        .collect();
    assert_eq!(got.len(), 9, "one delivery per publish: {got:?}");
    for s in 0..=2u8 {
        for p in 0..=2u8 {
            let key = (format!("dg/{s}"), format!("p{p}"));
            assert_eq!(
                seen.get(&key),
                Some(&p.min(s)),
                "publish QoS {p} to a QoS {s} subscription"
            );
        }
    }
}

/// Retained: set, replace, clear — and only an empty *retained* publish
/// clears.
pub async fn retained_set_replace_clear(v: Version) {
    let b = Broker::start();
    let mut publ = connect(v, "ret-pub", b.mqtt()).await;
    publ.publish("ret/a", 1, true, b"one").await;

    let mut s1 = connect(v, "ret-s1", b.mqtt()).await;
    s1.sub("ret/a", 1).await;
    let m = s1.recv().await;
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("ret/a", "one"));
    assert!(
        m.retain,
        "retained message on subscribe must have retain set"
    );
    assert_eq!(m.qos, 1);

    // Replace.
    publ.publish("ret/a", 1, true, b"two").await;
    let m = s1.recv().await;
    assert_eq!(m.text(), "two");
    assert!(!m.retain, "live delivery to an existing subscriber");

    let mut s2 = connect(v, "ret-s2", b.mqtt()).await;
    s2.sub("ret/+", 1).await;
    let m = s2.recv().await;
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("ret/a", "two"));
    assert!(m.retain);
    s2.assert_silent(QUIET).await;

    // An empty NON-retained publish is an ordinary message: delivered, and
    // the retained message stays.
    publ.publish("ret/a", 1, false, b"").await;
    let m = s1.recv().await;
    assert!(m.payload.is_empty());
    assert!(!m.retain);
    let mut s3 = connect(v, "ret-s3", b.mqtt()).await;
    s3.sub("ret/a", 0).await;
    let m = s3.recv().await;
    assert_eq!(
        m.text(),
        "two",
        "an empty non-retained publish must not clear the retained message"
    );
    assert!(m.retain);
    assert_eq!(m.qos, 0, "retained delivery at the subscription's QoS");

    // An empty retained publish clears it (and reaches live subscribers).
    publ.publish("ret/a", 1, true, b"").await;
    let m = s1.recv().await;
    assert!(m.payload.is_empty());
    let mut s4 = connect(v, "ret-s4", b.mqtt()).await;
    s4.sub("ret/#", 1).await;
    s4.assert_silent(QUIET).await;
}

/// The will is published when the connection drops without DISCONNECT,
/// and not after a clean DISCONNECT.
pub async fn will_on_abrupt_close_only(v: Version) {
    let b = Broker::start();
    let mut watcher = connect(v, "will-watch", b.mqtt()).await;
    watcher.sub("will/#", 2).await;

    let a =
        Client::connect(Opts::new(v, "will-a", b.mqtt()).will("will/a", b"a-gone", 1, false)).await;
    a.drop_connection().await;
    let m = watcher.recv().await;
    assert_eq!(m.topic, "will/a");
    assert_eq!(m.text(), "a-gone");
    assert_eq!(m.qos, 1);
    assert!(!m.retain);

    let c =
        Client::connect(Opts::new(v, "will-b", b.mqtt()).will("will/b", b"b-gone", 1, false)).await;
    c.disconnect().await;
    watcher.assert_silent(Duration::from_millis(500)).await;

    // A retained will is stored like any retained message.
    let d =
        Client::connect(Opts::new(v, "will-d", b.mqtt()).will("will/d", b"d-gone", 0, true)).await;
    d.drop_connection().await;
    let m = watcher.recv().await;
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("will/d", "d-gone"));
    let mut late = connect(v, "will-late", b.mqtt()).await;
    late.sub("will/d", 0).await;
    let m = late.recv().await;
    assert_eq!(m.text(), "d-gone");
    assert!(m.retain);
}

/// A persistent session keeps its subscription and the QoS 1/2 messages
/// published while it was offline, and says so with session_present.
pub async fn persistent_session(v: Version) {
    let b = Broker::start();
    let opts = Opts::new(v, "persist", b.mqtt()).persistent(300);
    let mut c = Client::connect(opts.clone()).await;
    assert!(!c.session_present, "first connect: no session yet");
    c.sub("ps/t", 2).await;
    c.disconnect().await;

    let mut publ = connect(v, "ps-pub", b.mqtt()).await;
    publ.publish("ps/t", 1, false, b"m1").await;
    publ.publish("ps/t", 2, false, b"m2").await;
    publ.publish("ps/t", 1, false, b"m3").await;

    let mut c = Client::connect(opts.clone()).await;
    assert!(c.session_present, "reconnect must resume the session");
    for (payload, qos) in [("m1", 1u8), ("m2", 2), ("m3", 1)] {
        let m = c.recv().await;
        assert_eq!(m.topic, "ps/t");
        assert_eq!(m.text(), payload);
        assert_eq!(m.qos, qos);
    }
    c.assert_silent(QUIET).await;
    // The subscription itself survived: live messages still arrive.
    publ.publish("ps/t", 1, false, b"live").await;
    assert_eq!(c.recv().await.text(), "live");
    c.disconnect().await;

    // A clean start throws the session away.
    let mut clean = opts.clone();
    clean.clean = true;
    clean.session_expiry = None;
    let mut c = Client::connect(clean).await;
    assert!(!c.session_present, "clean start must not resume");
    publ.publish("ps/t", 1, false, b"after-clean").await;
    c.assert_silent(QUIET).await;
}

/// A second connection with the same client id takes over: the first is
/// closed (v5: DISCONNECT 0x8E Session taken over), the second works.
pub async fn takeover(v: Version) {
    let b = Broker::start();
    let mut first = connect(v, "twin", b.mqtt()).await;
    first.sub("tk/t", 1).await;
    let mut second = connect(v, "twin", b.mqtt()).await;
    let (reason, err) = first.closed().await;
    match v {
        V5 => assert_eq!(
            reason,
            Some(0x8E),
            "v5 takeover must send DISCONNECT Session taken over ({err})"
        ),
        Version::V311 => assert_eq!(reason, None, "v3.1.1 has no server DISCONNECT"),
    }
    second.sub("tk/t", 1).await;
    let mut publ = connect(v, "tk-pub", b.mqtt()).await;
    publ.publish("tk/t", 1, false, b"to-second").await;
    assert_eq!(second.recv().await.text(), "to-second");
}

/// `+` and `#` match as the spec says, and neither matches a `$` topic at
/// the first level.
pub async fn wildcards_and_dollar_topics(v: Version) {
    let b = Broker::start();
    let filters = [
        "sport/+/player1",
        "sport/#",
        "#",
        "+/monitor/Clients",
        "$SYS/#",
        "+/+",
        "sport/tennis/+",
    ];
    let mut subs = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let mut c = connect(v, &format!("wc-{i}"), b.mqtt()).await;
        c.sub(f, 1).await;
        subs.push(c);
    }
    let topics = [
        "sport/tennis/player1",
        "sport",
        "sport/tennis/player2",
        "$SYS/monitor/Clients",
        "$SYS",
        "finance/monitor/Clients",
        "a/b",
        "sport/",
    ];
    let mut publ = connect(v, "wc-pub", b.mqtt()).await;
    for t in topics {
        publ.publish(t, 1, false, t.as_bytes()).await;
    }
    let expected: [&[&str]; 7] = [
        &["sport/tennis/player1"],
        &[
            "sport/tennis/player1",
            "sport",
            "sport/tennis/player2",
            "sport/",
        ],
        &[
            "sport/tennis/player1",
            "sport",
            "sport/tennis/player2",
            "finance/monitor/Clients",
            "a/b",
            "sport/",
        ],
        &["finance/monitor/Clients"],
        &["$SYS/monitor/Clients", "$SYS"],
        &["a/b", "sport/"],
        &["sport/tennis/player1", "sport/tennis/player2"],
    ];
    for ((c, f), want) in subs.iter_mut().zip(filters).zip(expected) {
        let got: Vec<String> = c
            .recv_n(want.len())
            .await
            .iter()
            .map(|m| m.topic.clone())
            .collect();
        c.assert_silent(QUIET).await;
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "filter {f}");
    }
}

/// `$share/g/t`: each message goes to exactly one member of the group, both
/// members get some, and an ordinary subscriber still gets every message.
pub async fn shared_subscription(v: Version) {
    let b = Broker::start();
    let mut m1 = connect(v, "sh-1", b.mqtt()).await;
    let mut m2 = connect(v, "sh-2", b.mqtt()).await;
    let mut plain = connect(v, "sh-plain", b.mqtt()).await;
    m1.sub("$share/g/sh/t", 1).await;
    m2.sub("$share/g/sh/t", 1).await;
    plain.sub("sh/t", 1).await;
    let mut publ = connect(v, "sh-pub", b.mqtt()).await;
    let n = 20;
    for i in 0..n {
        publ.publish("sh/t", 1, false, format!("{i}").as_bytes())
            .await;
    }
    // Collect from both members until all n arrived (bounded), then make
    // sure nothing more comes.
    let (mut a, mut c) = (Vec::new(), Vec::new());
    while a.len() + c.len() < n {
        tokio::select! {
            m = m1.recv() => a.push(m),
            m = m2.recv() => c.push(m),
        }
    }
    m1.assert_silent(QUIET).await;
    m2.assert_silent(QUIET).await;
    for m in a.iter().chain(&c) {
        assert_eq!(m.topic, "sh/t", "shared delivery carries the real topic");
    }
    assert!(
        !a.is_empty() && !c.is_empty(),
        "both members must get some: {} / {}",
        a.len(),
        c.len()
    );
    let all: Vec<String> = a.iter().chain(&c).map(|m| m.text()).collect();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), n, "each message to exactly one member: {all:?}");
    assert_eq!(distinct.len(), n, "no message twice: {all:?}");
    let p = plain.recv_n(n).await;
    let texts: Vec<String> = p.iter().map(|m| m.text()).collect();
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(
        texts, want,
        "the ordinary subscriber gets every message, in order"
    );
    plain.assert_silent(QUIET).await;
}

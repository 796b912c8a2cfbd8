//! MQTT 5 against the real broker binary, with rumqttc's v5 client (and
//! hand-written packets where the library would hide the wire).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Broker, Client, Opts, QUIET, STEP, V5, V311, connect, connect_v5, parse_props, raw_connect,
    raw_read_packet, raw_read_to_close, raw_send, read_varint, scenarios,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, SubscribeProperties};
use tokio::time::Instant;

#[tokio::test]
async fn qos_round_trips() {
    scenarios::qos_round_trips(V5).await;
}

#[tokio::test]
async fn qos_downgrade_to_min_of_publish_and_subscription() {
    scenarios::qos_downgrade(V5).await;
}

#[tokio::test]
async fn retained_set_replace_clear() {
    scenarios::retained_set_replace_clear(V5).await;
}

#[tokio::test]
async fn will_on_abrupt_close_only() {
    scenarios::will_on_abrupt_close_only(V5).await;
}

#[tokio::test]
async fn persistent_session_receives_offline_messages() {
    scenarios::persistent_session(V5).await;
}

#[tokio::test]
async fn takeover_sends_session_taken_over() {
    scenarios::takeover(V5).await;
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    scenarios::wildcards_and_dollar_topics(V5).await;
}

#[tokio::test]
async fn shared_subscription_distribution() {
    scenarios::shared_subscription(V5).await;
}

fn alias(a: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(a),
        ..Default::default()
    }
}

/// Client → broker aliases: a PUBLISH that sets alias 3 for a topic, then
/// PUBLISHes with an empty topic and alias 3, reach subscribers under the
/// real topic; an alias never set is a protocol error (DISCONNECT 0x82).
#[tokio::test]
async fn topic_alias_from_the_publisher() {
    let b = Broker::start();
    let mut sub = connect(V5, "ta-sub", b.mqtt()).await;
    sub.sub("ta/#", 1).await;
    let mut publ = connect(V5, "ta-pub", b.mqtt()).await;
    let granted = publ.connack.as_ref().and_then(|p| p.topic_alias_max);
    assert!(
        granted.is_some_and(|m| m >= 3),
        "CONNACK Topic Alias Maximum: {granted:?}"
    );
    publ.publish5("ta/x", 1, false, b"first", alias(3)).await;
    publ.publish5("", 1, false, b"second", alias(3)).await;
    publ.publish5("ta/y", 1, false, b"third", alias(3)).await; // re-map
    publ.publish5("", 1, false, b"fourth", alias(3)).await;
    let got: Vec<(String, String, Option<u16>)> = sub
        .recv_n(4)
        .await
        .into_iter()
        .map(|m| (m.topic.clone(), m.text(), m.alias()))
        .collect();
    let want = [
        ("ta/x", "first"),
        ("ta/x", "second"),
        ("ta/y", "third"),
        ("ta/y", "fourth"),
    ]
    .map(|(t, p)| (t.to_string(), p.to_string(), None));
    assert_eq!(got, want, "subscriber (no alias maximum) sees real topics");

    publ.v5()
        .publish_with_properties("", QoS::AtLeastOnce, false, "bad", alias(9))
        .await
        .expect("publish");
    let (reason, err) = publ.closed().await;
    assert_eq!(reason, Some(0x82), "unknown alias: protocol error ({err})");
    sub.assert_silent(QUIET).await;
}

/// Broker → client aliases: a client announcing Topic Alias Maximum gets
/// each topic once in full with an alias, then only the alias (empty
/// topic). rumqttc reports the packet as it came off the wire, so the test
/// resolves the aliases itself. A client without a maximum gets no aliases.
#[tokio::test]
async fn topic_alias_to_the_subscriber() {
    let b = Broker::start();
    let mut o = Opts::new(V5, "ta-aliased", b.mqtt());
    o.topic_alias_max = Some(5);
    let mut aliased = Client::connect(o).await;
    aliased.sub("tb/#", 1).await;
    let mut plain = connect(V5, "ta-plain", b.mqtt()).await;
    plain.sub("tb/#", 1).await;

    let mut publ = connect(V5, "tb-pub", b.mqtt()).await;
    let sequence = ["tb/a", "tb/b", "tb/a", "tb/b", "tb/a"];
    for (i, t) in sequence.iter().enumerate() {
        publ.publish(t, 1, false, format!("m{i}").as_bytes()).await;
    }

    let got = aliased.recv_n(sequence.len()).await;
    aliased.assert_silent(QUIET).await;
    assert_eq!(got.len(), sequence.len(), "{got:?}");
    let mut table = std::collections::HashMap::new();
    for (i, (m, want)) in got.iter().zip(sequence).enumerate() {
        assert_eq!(m.text(), format!("m{i}"));
        let a = m
            .alias()
            .unwrap_or_else(|| panic!("message {i} carries no topic alias: {m:?}"));
        assert!(
            (1..=5).contains(&a),
            "alias {a} beyond the client's maximum"
        );
        let first_time = !table.values().any(|t: &String| t == want);
        if first_time {
            assert_eq!(m.topic, want, "first use of an alias carries the topic");
            table.insert(a, m.topic.clone());
        } else {
            assert_eq!(m.topic, "", "repeat use sends the alias only: {m:?}");
        }
        assert_eq!(table.get(&a).map(String::as_str), Some(want), "alias {a}");
    }
    assert_eq!(table.len(), 2, "one alias per topic: {table:?}");

    let got = plain.recv_n(sequence.len()).await;
    plain.assert_silent(QUIET).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, sequence);
    assert!(got.iter().all(|m| m.alias().is_none()), "{got:?}");
}

/// User properties (order and duplicates kept) and the other publish
/// properties travel unchanged to v5 subscribers; v3.1.1 subscribers get
/// the message without them.
#[tokio::test]
async fn user_and_other_properties_pass_through() {
    let b = Broker::start();
    let mut sub = connect(V5, "up-sub", b.mqtt()).await;
    sub.sub("up/t", 1).await;
    let mut old = connect(V311, "up-v3", b.mqtt()).await;
    old.sub("up/t", 1).await;
    let user = vec![
        ("k1".to_string(), "v1".to_string()),
        ("k2".to_string(), "v2".to_string()),
        ("k1".to_string(), "v3".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("up/reply".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: user.clone(),
        ..Default::default()
    };
    let mut publ = connect(V5, "up-pub", b.mqtt()).await;
    publ.publish5("up/t", 1, false, b"hello", props).await;

    let m = sub.recv().await;
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("up/t", "hello"));
    let p = m.props.clone().expect("properties forwarded");
    assert_eq!(p.user_properties, user);
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.response_topic.as_deref(), Some("up/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-1"[..]));

    let m = old.recv().await;
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("up/t", "hello"));
}

fn sub_id(id: usize) -> Option<SubscribeProperties> {
    Some(SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    })
}

/// Subscription identifiers come back on the messages each subscription
/// matched; one delivery carries the ids of all matching subscriptions.
#[tokio::test]
async fn subscription_identifiers_are_delivered() {
    let b = Broker::start();
    let mut sub = connect(V5, "sid-sub", b.mqtt()).await;
    let codes = sub
        .subscribe5(vec![Filter::new("sid/+", QoS::AtLeastOnce)], sub_id(7))
        .await;
    assert_eq!(codes, vec![Ok(1)]);
    let codes = sub
        .subscribe5(vec![Filter::new("sid/#", QoS::AtLeastOnce)], sub_id(9))
        .await;
    assert_eq!(codes, vec![Ok(1)]);
    sub.sub("other/t", 1).await;

    let mut publ = connect(V5, "sid-pub", b.mqtt()).await;
    publ.publish("sid/a", 1, false, b"both").await;
    publ.publish("sid/a/b", 1, false, b"deep").await;
    publ.publish("other/t", 1, false, b"none").await;
    let got = sub.recv_n(3).await;
    sub.assert_silent(QUIET).await;
    let seen: Vec<(String, Vec<usize>)> = got.iter().map(|m| (m.text(), m.sub_ids())).collect();
    assert_eq!(
        seen,
        vec![
            ("both".to_string(), vec![7, 9]),
            ("deep".to_string(), vec![9]),
            ("none".to_string(), vec![]),
        ]
    );
}

/// No-local: a subscriber does not get its own messages back, but does get
/// everyone else's; without the option a client does get its own.
#[tokio::test]
async fn no_local_suppresses_own_messages() {
    let b = Broker::start();
    let mut me = connect(V5, "nl-me", b.mqtt()).await;
    let mut filter = Filter::new("nl/t", QoS::AtLeastOnce);
    filter.nolocal = true;
    assert_eq!(me.subscribe5(vec![filter], None).await, vec![Ok(1)]);
    let mut other = connect(V5, "nl-other", b.mqtt()).await;
    other.sub("nl/t", 1).await;

    me.publish("nl/t", 1, false, b"from-me").await;
    assert_eq!(other.recv().await.text(), "from-me");
    me.assert_silent(QUIET).await;

    other.publish("nl/t", 1, false, b"from-other").await;
    assert_eq!(me.recv().await.text(), "from-other");
    assert_eq!(
        other.recv().await.text(),
        "from-other",
        "without no-local a client gets its own message"
    );
}

/// Message expiry: a retained message whose expiry has passed is not
/// delivered to a later subscriber; one still alive is, with the remaining
/// lifetime as its expiry interval. (This test sleeps: expiry is time.)
#[tokio::test]
async fn message_expiry_of_retained_messages() {
    let b = Broker::start();
    // A subscriber already there gets both, live, with their expiry.
    let mut early = connect(V5, "exp-early", b.mqtt()).await;
    early.sub("exp/#", 1).await;
    let mut publ = connect(V5, "exp-pub", b.mqtt()).await;
    let expiring = |s: u32| PublishProperties {
        message_expiry_interval: Some(s),
        ..Default::default()
    };
    publ.publish5("exp/short", 1, true, b"short", expiring(1))
        .await;
    publ.publish5("exp/long", 1, true, b"long", expiring(60))
        .await;

    let mut got = early.recv_n(2).await;
    early.assert_silent(QUIET).await;
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    let summary: Vec<(String, Option<u32>)> = got
        .iter()
        .map(|m| {
            (
                m.topic.clone(),
                m.props.as_ref().and_then(|p| p.message_expiry_interval),
            )
        })
        .collect();
    assert_eq!(summary.len(), 2, "{summary:?}");
    assert_eq!(summary[0].0, "exp/long");
    assert!(
        summary[0].1.is_some_and(|s| (57..=60).contains(&s)),
        "{summary:?}"
    );
    assert_eq!(summary[1], ("exp/short".to_string(), Some(1)));

    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut late = connect(V5, "exp-late", b.mqtt()).await;
    late.sub("exp/#", 1).await;
    let got = late.recv_n(1).await;
    late.assert_silent(QUIET).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["exp/long"], "the expired retained message is gone");
    let left = got[0]
        .props
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        left.is_some_and(|s| (50..=58).contains(&s)),
        "remaining expiry forwarded, got {left:?}"
    );
}

/// Receive Maximum 2: the broker keeps at most two QoS 1 messages
/// unacknowledged; each PUBACK lets the next one through.
#[tokio::test]
async fn receive_maximum_is_respected() {
    let b = Broker::start();
    let mut o = Opts::new(V5, "rm-sub", b.mqtt());
    o.receive_max = Some(2);
    o.manual_acks = true;
    let mut sub = Client::connect(o).await;
    sub.sub("rm/t", 1).await;
    let mut publ = connect(V5, "rm-pub", b.mqtt()).await;
    for i in 1..=5 {
        publ.publish("rm/t", 1, false, format!("m{i}").as_bytes())
            .await;
    }
    let m1 = sub.recv().await;
    let m2 = sub.recv().await;
    assert_eq!((m1.text(), m2.text()), ("m1".into(), "m2".into()));
    sub.assert_silent(Duration::from_millis(500)).await;
    sub.ack(&m1).await;
    let m3 = sub.recv().await;
    assert_eq!(m3.text(), "m3");
    sub.assert_silent(QUIET).await;
    sub.ack(&m2).await;
    sub.ack(&m3).await;
    let m4 = sub.recv().await;
    let m5 = sub.recv().await;
    assert_eq!((m4.text(), m5.text()), ("m4".into(), "m5".into()));
    sub.ack(&m4).await;
    sub.ack(&m5).await;
    sub.assert_silent(QUIET).await;
}

/// The server caps keepalive (STARLING_LIMITS_MAX_KEEPALIVE=1): CONNACK
/// carries Server Keep Alive 1, and a silent client is disconnected with
/// 0x8D (Keep Alive timeout) after 1.5 s. Raw bytes, nothing hidden.
#[tokio::test]
async fn server_keep_alive_cap_and_keepalive_timeout() {
    let b = Broker::builder()
        .env("STARLING_LIMITS_MAX_KEEPALIVE", "1")
        .start();
    let mut s = raw_connect(b.mqtt()).await;
    raw_send(&mut s, &connect_v5("ka5", 30)).await;
    let (first, body) = raw_read_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK expected: {body:02x?}");
    assert_eq!(&body[..2], &[0x00, 0x00], "session present 0, success");
    let (len, used) = read_varint(&body[2..]);
    let props = parse_props(&body[2 + used..2 + used + len]);
    let ska = props
        .iter()
        .find(|(id, _)| *id == 0x13)
        .map(|(_, v)| v.clone());
    assert_eq!(
        ska,
        Some(vec![0x00, 0x01]),
        "Server Keep Alive: {props:02x?}"
    );

    let (rest, took) = raw_read_to_close(&mut s, STEP).await;
    assert!(
        rest.len() >= 3 && rest[0] == 0xE0 && rest[2] == 0x8D,
        "DISCONNECT 0x8D expected before the close, got {rest:02x?}"
    );
    assert!(took >= Duration::from_millis(1000), "closed after {took:?}");
}

/// Will delay: the will is published only after the delay, and not at all
/// if the client reconnects to its session within the delay.
#[tokio::test]
async fn will_delay_interval() {
    let b = Broker::start();
    let mut watcher = connect(V5, "wd-watch", b.mqtt()).await;
    watcher.sub("wd/#", 1).await;
    let delayed = |id: &str, topic: &str, delay: u32| {
        let mut o = Opts::new(V5, id, b.mqtt())
            .persistent(30)
            .will(topic, b"gone", 1, false);
        if let Some(w) = &mut o.will {
            w.delay = Some(delay);
        }
        o
    };
    let a = Client::connect(delayed("wd-a", "wd/a", 1)).await;
    let b1 = Client::connect(delayed("wd-b", "wd/b", 2)).await;
    let dropped = Instant::now();
    a.drop_connection().await;
    b1.drop_connection().await;
    // wd-b comes back within its 2 s delay.
    let mut again = Opts::new(V5, "wd-b", b.mqtt()).persistent(30);
    again.will = None;
    let b2 = Client::connect(again).await;
    assert!(b2.session_present);

    let m = watcher.recv().await;
    let after = dropped.elapsed();
    assert_eq!((m.topic.as_str(), m.text().as_str()), ("wd/a", "gone"));
    assert!(
        after >= Duration::from_millis(900),
        "will published {after:?} after the drop, before its 1 s delay"
    );
    // Past wd-b's delay too: its will is never published.
    let until = dropped + Duration::from_millis(2600);
    watcher
        .assert_silent(until.saturating_duration_since(Instant::now()))
        .await;
}

/// SIGTERM: connected v5 clients get DISCONNECT 0x8B (Server shutting
/// down), v3.1.1 clients a closed socket, and the process exits 0.
#[tokio::test]
async fn graceful_shutdown_on_sigterm() {
    let mut b = Broker::start();
    let mut c5 = connect(V5, "sd-v5", b.mqtt()).await;
    c5.sub("sd/t", 1).await;
    let mut c3 = connect(V311, "sd-v3", b.mqtt()).await;
    c3.sub("sd/t", 1).await;
    b.terminate();
    let (reason, err) = c5.closed().await;
    assert_eq!(reason, Some(0x8B), "v5 DISCONNECT reason ({err})");
    let (reason, _) = c3.closed().await;
    assert_eq!(reason, None);
    let status = b.wait_exit(Duration::from_secs(8)).await;
    match status {
        Some(s) => assert!(s.success(), "exit status {s}"),
        None => panic!("broker still running 8 s after SIGTERM"),
    }
}

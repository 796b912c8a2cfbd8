//! MQTT 3.1.1 against the real broker binary, with rumqttc's v3.1.1 client
//! and hand-written packets where a library would hide the wire.

mod common;

use std::time::Duration;

use common::{
    Broker, QUIET, V311, connect, connect_v311, packet, raw_connect, raw_read_exact,
    raw_read_packet, raw_read_to_close, raw_send, scenarios,
};
use tokio::time::Instant;

#[tokio::test]
async fn qos_round_trips() {
    scenarios::qos_round_trips(V311).await;
}

#[tokio::test]
async fn qos_downgrade_to_min_of_publish_and_subscription() {
    scenarios::qos_downgrade(V311).await;
}

#[tokio::test]
async fn retained_set_replace_clear() {
    scenarios::retained_set_replace_clear(V311).await;
}

#[tokio::test]
async fn will_on_abrupt_close_only() {
    scenarios::will_on_abrupt_close_only(V311).await;
}

#[tokio::test]
async fn persistent_session_receives_offline_messages() {
    scenarios::persistent_session(V311).await;
}

#[tokio::test]
async fn takeover_closes_the_first_connection() {
    scenarios::takeover(V311).await;
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    scenarios::wildcards_and_dollar_topics(V311).await;
}

#[tokio::test]
async fn shared_subscription_distribution() {
    scenarios::shared_subscription(V311).await;
}

/// A client that asked for keepalive 1 s and then says nothing is closed
/// after 1.5 × keepalive; one that pings keeps its connection.
#[tokio::test]
async fn keepalive_timeout_closes_a_silent_connection() {
    let b = Broker::start();
    let silent = async {
        let mut s = raw_connect(b.mqtt()).await;
        raw_send(&mut s, &connect_v311("ka-silent", 1)).await;
        assert_eq!(raw_read_exact(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
        let (rest, took) = raw_read_to_close(&mut s, Duration::from_secs(5)).await;
        assert!(
            rest.is_empty(),
            "v3.1.1: the broker just closes: {rest:02x?}"
        );
        assert!(
            took >= Duration::from_millis(1000),
            "closed after {took:?}, before 1.5 × keepalive"
        );
    };
    let pinging = async {
        let mut s = raw_connect(b.mqtt()).await;
        raw_send(&mut s, &connect_v311("ka-pinging", 1)).await;
        assert_eq!(raw_read_exact(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
        let start = Instant::now();
        // The client's side of keepalive: a PINGREQ every half second.
        while start.elapsed() < Duration::from_millis(2600) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            raw_send(&mut s, &[0xC0, 0x00]).await;
            assert_eq!(
                raw_read_exact(&mut s, 2).await,
                [0xD0, 0x00],
                "PINGRESP after {:?}",
                start.elapsed()
            );
        }
    };
    tokio::join!(silent, pinging);
}

/// QoS 2 exactly once: a PUBLISH re-sent (DUP) before PUBREL is not routed
/// again; after PUBCOMP the packet id is free for a new message.
#[tokio::test]
async fn qos2_duplicate_publish_is_delivered_once() {
    let b = Broker::start();
    let mut sub = connect(V311, "q2-sub", b.mqtt()).await;
    sub.sub("q2/t", 2).await;

    let mut s = raw_connect(b.mqtt()).await;
    raw_send(&mut s, &connect_v311("q2-raw", 30)).await;
    assert_eq!(raw_read_exact(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
    let publish = |first: u8, payload: &str| {
        let mut body = common::mqtt_str("q2/t");
        body.extend_from_slice(&[0x00, 0x07]);
        body.extend_from_slice(payload.as_bytes());
        packet(first, &body)
    };
    raw_send(&mut s, &publish(0x34, "once")).await;
    assert_eq!(raw_read_packet(&mut s).await, (0x50, vec![0x00, 0x07]));
    // Re-sent with DUP before the PUBREL.
    raw_send(&mut s, &publish(0x3C, "once")).await;
    assert_eq!(raw_read_packet(&mut s).await, (0x50, vec![0x00, 0x07]));
    raw_send(&mut s, &[0x62, 0x02, 0x00, 0x07]).await;
    assert_eq!(raw_read_packet(&mut s).await, (0x70, vec![0x00, 0x07]));

    let m = sub.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.text().as_str(), m.qos),
        ("q2/t", "once", 2)
    );
    sub.assert_silent(QUIET).await;

    // Same packet id, new message after the exchange completed.
    raw_send(&mut s, &publish(0x34, "again")).await;
    assert_eq!(raw_read_packet(&mut s).await, (0x50, vec![0x00, 0x07]));
    raw_send(&mut s, &[0x62, 0x02, 0x00, 0x07]).await;
    assert_eq!(raw_read_packet(&mut s).await, (0x70, vec![0x00, 0x07]));
    assert_eq!(sub.recv().await.text(), "again");
    sub.assert_silent(QUIET).await;
}

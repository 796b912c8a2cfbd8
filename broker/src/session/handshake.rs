//! CONNECT → decisions: who the client is, what it gets, and the CONNACK.
//! Pure functions over the packet and the limits, tested without sockets.

use std::net::IpAddr;
use std::time::Duration;

use starling_codec::{ByteString, ConnAck, Connect, Properties, ProtocolVersion, reason};
use starling_model::config::{Anonymous, Limits};

/// What the broker settled on for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    pub client_id: String,
    pub assigned_id: bool,
    /// Seconds; 0 = no keepalive.
    pub keep_alive: u16,
    pub keep_alive_capped: bool,
    pub session_expiry: Duration,
    pub session_expiry_capped: bool,
    /// QoS 1/2 messages the broker may have in flight towards the client.
    pub send_window: u16,
    /// Largest packet the client accepts (v5 Maximum Packet Size).
    pub client_max_packet: Option<u32>,
    /// Topic aliases the client accepts from the broker.
    pub client_alias_max: u16,
}

/// What a connection keeps of [`Agreed`] for its whole life: the client
/// id is its session's, and the rest served the CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// Seconds; 0 = no keepalive.
    pub keep_alive: u16,
    pub session_expiry: Duration,
    pub send_window: u16,
    pub client_max_packet: Option<u32>,
    pub client_alias_max: u16,
}

impl From<&Agreed> for Terms {
    fn from(a: &Agreed) -> Terms {
        Terms {
            keep_alive: a.keep_alive,
            session_expiry: a.session_expiry,
            send_window: a.send_window,
            client_max_packet: a.client_max_packet,
            client_alias_max: a.client_alias_max,
        }
    }
}

/// Refusal: the CONNACK code to send (already version-specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub u8);

pub fn negotiate(
    c: &Connect,
    limits: &Limits,
    make_id: impl FnOnce() -> String,
) -> Result<Agreed, Refused> {
    let v5 = c.protocol.is_v5();
    let (client_id, assigned_id) = if c.client_id.is_empty() {
        // 3.1.1 allows a server-assigned id only for clean sessions.
        if !v5 && !c.clean_start {
            return Err(Refused(reason::v3::IDENTIFIER_REJECTED));
        }
        (make_id(), true)
    } else {
        (c.client_id.to_string(), false)
    };
    let cap = limits.max_keepalive;
    let (keep_alive, keep_alive_capped) = if cap > 0 && (c.keep_alive == 0 || c.keep_alive > cap) {
        (cap, true)
    } else {
        (c.keep_alive, false)
    };
    let asked = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        // A 3.1.1 persistent session has no expiry of its own; the broker's cap applies.
        limits.max_session_expiry
    };
    let expiry = asked.min(limits.max_session_expiry);
    let send_window = c
        .properties
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(limits.max_inflight)
        .max(1);
    Ok(Agreed {
        client_id,
        assigned_id,
        keep_alive,
        keep_alive_capped,
        session_expiry: Duration::from_secs(u64::from(expiry)),
        session_expiry_capped: v5 && expiry != asked,
        send_window,
        client_max_packet: if v5 {
            c.properties.maximum_packet_size
        } else {
            None
        },
        client_alias_max: if v5 {
            c.properties.topic_alias_maximum.unwrap_or(0)
        } else {
            0
        },
    })
}

/// May this connection go on without credentials?
pub fn anonymous_allowed(mode: Anonymous, peer: IpAddr) -> bool {
    match mode {
        Anonymous::Allow => true,
        Anonymous::Deny => false,
        Anonymous::Loopback => peer.is_loopback() || peer.to_canonical().is_loopback(),
    }
}

/// CONNACK code for a failed authentication: 3.1.1 has only "not
/// authorized" (0x05) for all of them; v5 separates bad credentials (0x86),
/// no access (0x87) and too many attempts (0x9F).
pub fn refusal_code(version: ProtocolVersion, r: &crate::auth::Refusal) -> u8 {
    use crate::auth::Refusal;
    if !version.is_v5() {
        return reason::v3::NOT_AUTHORIZED;
    }
    match r {
        Refusal::BadToken(_) => reason::BAD_USER_NAME_OR_PASSWORD,
        Refusal::AnonymousNotAllowed => reason::NOT_AUTHORIZED,
        Refusal::RateLimited => reason::CONNECTION_RATE_EXCEEDED,
    }
}

pub fn connack(version: ProtocolVersion, a: &Agreed, present: bool, limits: &Limits) -> ConnAck {
    let mut properties = Properties::default();
    if version.is_v5() {
        properties.receive_maximum = Some(limits.max_inflight);
        properties.maximum_packet_size = Some(limits.max_packet_size);
        properties.topic_alias_maximum = Some(limits.max_topic_aliases);
        if a.keep_alive_capped {
            properties.server_keep_alive = Some(a.keep_alive);
        }
        if a.session_expiry_capped {
            properties.session_expiry_interval =
                Some(u32::try_from(a.session_expiry.as_secs()).unwrap_or(u32::MAX));
        }
        if a.assigned_id {
            properties.assigned_client_identifier = Some(ByteString::from(a.client_id.clone()));
        }
    }
    ConnAck {
        session_present: present,
        code: 0,
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(v: ProtocolVersion) -> Connect {
        Connect {
            protocol: v,
            clean_start: true,
            keep_alive: 60,
            client_id: ByteString::from_static("c1"),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    #[test]
    fn keepalive_is_capped_and_zero_means_cap() {
        let limits = Limits::default();
        let mut c = connect(ProtocolVersion::V5);
        c.keep_alive = 600;
        let a = negotiate(&c, &limits, String::new).unwrap();
        assert_eq!((a.keep_alive, a.keep_alive_capped), (120, true));
        c.keep_alive = 0;
        assert_eq!(negotiate(&c, &limits, String::new).unwrap().keep_alive, 120);
        c.keep_alive = 30;
        let a = negotiate(&c, &limits, String::new).unwrap();
        assert_eq!((a.keep_alive, a.keep_alive_capped), (30, false));
        let ack = connack(ProtocolVersion::V5, &a, false, &limits);
        assert_eq!(ack.properties.server_keep_alive, None);
    }

    #[test]
    fn empty_client_id() {
        let limits = Limits::default();
        let mut c = connect(ProtocolVersion::V311);
        c.client_id = ByteString::new();
        let a = negotiate(&c, &limits, || "auto-1".into()).unwrap();
        assert_eq!(a.client_id, "auto-1");
        c.clean_start = false;
        assert_eq!(
            negotiate(&c, &limits, || "x".into()),
            Err(Refused(reason::v3::IDENTIFIER_REJECTED))
        );
        let mut c5 = connect(ProtocolVersion::V5);
        c5.client_id = ByteString::new();
        c5.clean_start = false;
        let a = negotiate(&c5, &limits, || "auto-2".into()).unwrap();
        let ack = connack(ProtocolVersion::V5, &a, false, &limits);
        assert_eq!(
            ack.properties.assigned_client_identifier.as_deref(),
            Some("auto-2")
        );
    }

    #[test]
    fn session_expiry() {
        let limits = Limits {
            max_session_expiry: 100,
            ..Limits::default()
        };
        let mut c = connect(ProtocolVersion::V311);
        assert_eq!(
            negotiate(&c, &limits, String::new).unwrap().session_expiry,
            Duration::ZERO
        );
        c.clean_start = false;
        assert_eq!(
            negotiate(&c, &limits, String::new)
                .unwrap()
                .session_expiry
                .as_secs(),
            100
        );
        let mut c5 = connect(ProtocolVersion::V5);
        c5.properties.session_expiry_interval = Some(1000);
        let a = negotiate(&c5, &limits, String::new).unwrap();
        assert_eq!(
            (a.session_expiry.as_secs(), a.session_expiry_capped),
            (100, true)
        );
    }

    #[test]
    fn windows_follow_the_client() {
        let limits = Limits::default();
        let mut c = connect(ProtocolVersion::V5);
        c.properties.receive_maximum = Some(5);
        c.properties.maximum_packet_size = Some(1000);
        c.properties.topic_alias_maximum = Some(3);
        let a = negotiate(&c, &limits, String::new).unwrap();
        assert_eq!(
            (a.send_window, a.client_max_packet, a.client_alias_max),
            (5, Some(1000), 3)
        );
    }

    #[test]
    fn anonymous_modes() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let far: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(anonymous_allowed(Anonymous::Loopback, lo));
        assert!(anonymous_allowed(Anonymous::Loopback, lo6));
        assert!(!anonymous_allowed(Anonymous::Loopback, far));
        assert!(anonymous_allowed(Anonymous::Allow, far));
        assert!(!anonymous_allowed(Anonymous::Deny, lo));
    }
}

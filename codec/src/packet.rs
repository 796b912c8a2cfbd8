//! Packet types shared by both protocol versions.
//!
//! One set of types serves MQTT 3.1.1 and 5.0: fields that only exist in v5
//! (properties, reason codes on acks) are simply empty/zero for v3.1.1, and the
//! encoder leaves them out when writing v3.1.1.

use bytes::Bytes;
pub use bytestring::ByteString;

/// Protocol level from CONNECT. Level 3 ("MQIsdp", MQTT 3.1) is accepted and
/// spoken as 3.1.1, which is wire-compatible for everything a broker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    V31,
    V311,
    V5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 properties. One struct for every packet kind keeps the codec simple;
/// the decoder rejects (ProtocolError) a property that is not allowed on the
/// packet it arrived in and any property other than user properties and
/// subscription identifiers that appears twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    /// Variable byte integers 1..=268_435_455. PUBLISH from server may carry several.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<ByteString>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<ByteString>,
    pub server_reference: Option<ByteString>,
    pub reason_string: Option<ByteString>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Copies every borrowed string and binary field into its own
    /// allocation, so that properties kept after the packet (queued,
    /// retained) do not pin the whole read buffer they were sliced from.
    pub fn detach(&mut self) {
        fn s(v: &mut Option<ByteString>) {
            if let Some(x) = v {
                *x = ByteString::from(&**x);
            }
        }
        fn b(v: &mut Option<Bytes>) {
            if let Some(x) = v {
                *x = Bytes::copy_from_slice(x);
            }
        }
        s(&mut self.content_type);
        s(&mut self.response_topic);
        b(&mut self.correlation_data);
        s(&mut self.assigned_client_identifier);
        s(&mut self.authentication_method);
        b(&mut self.authentication_data);
        s(&mut self.response_information);
        s(&mut self.server_reference);
        s(&mut self.reason_string);
        for (k, v) in &mut self.user_properties {
            *k = ByteString::from(&**k);
            *v = ByteString::from(&**v);
        }
    }
}

/// Redacted: a CONNECT is the one packet that carries a secret.
impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("protocol", &self.protocol)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("properties", &self.properties)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (v5): will delay, message expiry, content type, etc.
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// "clean session" in 3.1.1, "clean start" in 5.0.
    pub clean_start: bool,
    pub keep_alive: u16,
    /// May be empty (server assigns one where the protocol allows).
    pub client_id: ByteString,
    pub will: Option<LastWill>,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// v5 reason code, or v3.1.1 return code (0..=5); see [`reason`].
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Validated UTF-8 without NUL. Empty only when a v5 topic alias is used.
    pub topic: ByteString,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResp {
    pub pkid: u16,
    /// v5 reason code; always 0 for v3.1.1.
    pub reason: u8,
    pub properties: Properties,
}

impl PubResp {
    pub fn new(pkid: u16, reason: u8) -> Self {
        PubResp {
            pkid,
            reason,
            properties: Properties::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Raw filter as sent (UTF-8 validated, may include `$share/...` and a
    /// `?option` suffix — interpreting it is the broker's job).
    pub filter: ByteString,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = send retained on subscribe, 1 = only if new subscription, 2 = never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<SubscribeFilter>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    /// Granted QoS (0..=2) or failure code (0x80 v3.1.1; v5 reason codes).
    pub codes: Vec<u8>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<ByteString>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub pkid: u16,
    /// v5 only (one per filter); empty for v3.1.1.
    pub codes: Vec<u8>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// v5 reason code; 0 for v3.1.1.
    pub reason: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

/// A PUBLISH to be written, borrowing everything, so the broker can encode one
/// shared message for many subscribers without building a `Publish` for each.
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Written as-is; pass "" when sending an established topic alias.
    pub topic: &'a str,
    pub pkid: u16,
    pub payload: &'a [u8],
    /// Message properties to forward (v5 only; ignored for v3.1.1). Its
    /// `topic_alias`, `subscription_identifiers` and `message_expiry_interval`
    /// are NOT written: the three fields below replace them, because they are
    /// per-subscriber.
    pub properties: Option<&'a Properties>,
    pub topic_alias: Option<u16>,
    pub subscription_identifiers: &'a [u32],
    pub message_expiry_interval: Option<u32>,
}

/// Reason codes (v5) and return codes (v3.1.1) the broker uses.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

    /// v3.1.1 CONNACK return codes.
    pub mod v3 {
        pub const ACCEPTED: u8 = 0x00;
        pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
        pub const IDENTIFIER_REJECTED: u8 = 0x02;
        pub const SERVER_UNAVAILABLE: u8 = 0x03;
        pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
        pub const NOT_AUTHORIZED: u8 = 0x05;
        /// SUBACK failure in 3.1.1.
        pub const SUBACK_FAILURE: u8 = 0x80;
    }
}

//! Broker configuration: the TOML file the operator writes into a ConfigMap
//! and `starling-broker --config` reads. Every field has a default, so an
//! empty file (or no file) is the local development setup from DESIGN.md.
//!
//! Sections are single words so that the environment override
//! `STARLING_<SECTION>_<KEY>` is unambiguous: the section is everything up to
//! the first `_` after the prefix, the key is the rest (`STARLING_LIMITS_MAX_CONNECTIONS`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::topic::TopicPolicy;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub broker: BrokerSection,
    /// Plain MQTT over TCP.
    pub mqtt: ListenerConfig,
    /// MQTT over TLS.
    pub mqtts: ListenerConfig,
    /// Plain HTTP: MQTT over WebSocket at `/mqtt`, `/broker/` and topic streams.
    pub http: ListenerConfig,
    /// The same over TLS.
    pub https: ListenerConfig,
    /// Admin REST API and `/metrics`.
    pub admin: ListenerConfig,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub topics: TopicsConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    /// The HTTP interface under `/broker/` and the native WebSocket topic
    /// streams (on the http and https listeners).
    pub web: WebConfig,
    /// The last-value cache behind HTTP GET and `?pubStates=1`.
    pub lvc: LvcConfig,
    /// The admin REST API on the admin listener.
    pub api: ApiConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// The broker's name: one of the accepted MQTT usernames for token auth,
    /// and the name shown by the admin API.
    pub name: String,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            name: "starling".into(),
        }
    }
}

/// When a listener runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enabled {
    /// Plain listeners: on. TLS listeners: on when a certificate is
    /// configured or `--self-signed` is given.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "auto")]
    pub enabled: Enabled,
    /// `host:port`. Port 0 picks a free port (printed in the banner).
    /// Empty: the local default for this listener.
    #[serde(default)]
    pub bind: String,
}

fn auto() -> Enabled {
    Enabled::Auto
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            enabled: Enabled::Auto,
            bind: String::new(),
        }
    }
}

impl ListenerConfig {
    /// Whether this listener runs: `auto` starts plain listeners always and
    /// TLS ones (`tls`) when a certificate is available.
    pub fn runs(&self, tls: bool, certificate: bool) -> bool {
        match self.enabled {
            Enabled::On => true,
            Enabled::Off => false,
            Enabled::Auto => !tls || certificate,
        }
    }

    fn on(bind: &str) -> Self {
        ListenerConfig {
            enabled: Enabled::Auto,
            bind: bind.into(),
        }
    }
}

/// Local defaults (loopback only). The operator writes in-cluster binds.
pub mod defaults {
    pub const MQTT: &str = "127.0.0.1:1883";
    pub const MQTTS: &str = "127.0.0.1:8883";
    pub const HTTP: &str = "127.0.0.1:1884";
    /// 443 needs privileges on a workstation; in-cluster configs set 0.0.0.0:443.
    pub const HTTPS: &str = "127.0.0.1:8443";
    pub const ADMIN: &str = "127.0.0.1:8081";
}

impl BrokerConfig {
    /// A certificate is configured (both files) or a self-signed one asked for.
    pub fn has_certificate(&self) -> bool {
        (self.tls.cert.is_some() && self.tls.key.is_some()) || self.tls.self_signed
    }

    /// Fills empty `bind` fields with the local defaults. Called after all
    /// layers (file, env, flags) are merged, so an explicit bind always wins.
    pub fn with_default_binds(mut self) -> Self {
        for (l, d) in [
            (&mut self.mqtt, defaults::MQTT),
            (&mut self.mqtts, defaults::MQTTS),
            (&mut self.http, defaults::HTTP),
            (&mut self.https, defaults::HTTPS),
            (&mut self.admin, defaults::ADMIN),
        ] {
            if l.bind.is_empty() {
                *l = ListenerConfig {
                    enabled: l.enabled,
                    ..ListenerConfig::on(d)
                };
            }
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; reloaded when the file changes.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate at startup (development only).
    pub self_signed: bool,
    /// In Kubernetes: the `kubernetes.io/tls` Secret the certificate comes
    /// from, watched through the API server in the pod's namespace (env
    /// `POD_NAMESPACE`), so a rotation applies in seconds; the mounted
    /// `cert`/`key` files stay the fallback.
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    /// Largest MQTT packet accepted or sent, in bytes (v5 Maximum Packet Size).
    pub max_packet_size: u32,
    /// Keepalive cap in seconds; clients asking for more (or 0) get this as
    /// v5 Server Keep Alive. 0 disables the cap.
    pub max_keepalive: u16,
    /// Receive Maximum: QoS 1/2 messages in flight per direction per client.
    pub max_inflight: u16,
    /// Messages queued per session beyond the inflight window (online or
    /// offline). Over the cap a new message is dropped and counted (as
    /// mosquitto's `max_queued_messages`); offline sessions queue QoS 1/2 only.
    pub max_queued_messages: usize,
    /// Bytes queued per session (payloads), a second cap beside the count.
    pub max_queued_bytes: usize,
    /// Topic aliases a v5 client may use towards the broker.
    pub max_topic_aliases: u16,
    /// Upper bound for v5 session expiry (seconds).
    pub max_session_expiry: u32,
    /// Seconds a new socket may take for TLS/WebSocket handshake and CONNECT.
    pub connect_timeout: u64,
    /// Largest CONNECT accepted, in bytes. Much smaller than
    /// `max_packet_size` because it is buffered before the client is known:
    /// unauthenticated sockets must not be able to park a megabyte each.
    /// The smaller of this and `max_packet_size` applies.
    pub max_connect_packet_size: u32,
    /// Levels (`/`-separated parts) allowed in a topic name or filter, like
    /// EMQX's `max_topic_levels`. Bounds every walk over topic levels.
    pub max_topic_levels: usize,
    /// Subscriptions one session may hold; more get SUBACK 0x97 (v5) / 0x80.
    pub max_subscriptions_per_session: usize,
    /// Retained messages stored in total; a retained publish on a new topic
    /// past it is refused (replacing an existing one is always allowed).
    pub max_retained_messages: usize,
    /// Bytes (topic + payload) of all retained messages, the second cap.
    pub max_retained_bytes: usize,
    /// Sessions with a non-zero expiry kept (online or offline); a CONNECT
    /// that would create one more is refused (v5 0x97, 3.1.1 0x03).
    pub max_persistent_sessions: usize,
    /// Distinct `$share/<group>/<filter>` groups in the broker.
    pub max_shared_groups: usize,
    /// Open sockets per source address on the client listeners, TLS
    /// handshakes included. 0 = no per-address cap.
    pub max_connections_per_address: usize,
}

/// Hard ceiling for [`Limits::max_topic_levels`]: the topic trie is walked
/// recursively to at most this depth, which fits any worker stack.
pub const TOPIC_LEVELS_CEILING: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1024 * 1024,
            max_keepalive: 120,
            max_inflight: 64,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            max_topic_aliases: 64,
            max_session_expiry: 7 * 24 * 3600,
            connect_timeout: 10,
            max_connect_packet_size: 64 * 1024,
            max_topic_levels: 128,
            max_subscriptions_per_session: 10_000,
            max_retained_messages: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            max_persistent_sessions: 100_000,
            max_shared_groups: 10_000,
            max_connections_per_address: 4096,
        }
    }
}

/// A setting that is well-formed but cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[{section}] {key} = {value}: {why}")]
pub struct InvalidSetting {
    pub section: &'static str,
    pub key: &'static str,
    pub value: String,
    pub why: String,
}

impl BrokerConfig {
    /// Checks values serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let l = &self.limits;
        let bad = |key: &'static str, value: String, why: String| InvalidSetting {
            section: "limits",
            key,
            value,
            why,
        };
        if !(1..=TOPIC_LEVELS_CEILING).contains(&l.max_topic_levels) {
            return Err(bad(
                "max_topic_levels",
                l.max_topic_levels.to_string(),
                format!("must be between 1 and {TOPIC_LEVELS_CEILING}"),
            ));
        }
        if l.max_connect_packet_size < 64 {
            return Err(bad(
                "max_connect_packet_size",
                l.max_connect_packet_size.to_string(),
                "must be at least 64 bytes".into(),
            ));
        }
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_460 {
            return Err(bad(
                "max_packet_size",
                l.max_packet_size.to_string(),
                "must be between 64 and 268435460 (the MQTT maximum)".into(),
            ));
        }
        let w = &self.web;
        let web = |key: &'static str, value: String, why: &str| InvalidSetting {
            section: "web",
            key,
            value,
            why: why.into(),
        };
        if !(1..=65535).contains(&w.max_topic_length) {
            return Err(web(
                "max_topic_length",
                w.max_topic_length.to_string(),
                "must be between 1 and 65535 (the MQTT maximum)",
            ));
        }
        if w.body_timeout == 0 {
            return Err(web("body_timeout", "0".into(), "must be at least 1 second"));
        }
        if w.allowed_chars.contains(['?', '\0']) {
            return Err(web(
                "allowed_chars",
                format!("{:?}", w.allowed_chars),
                "may not contain '?' (it starts the query) or NUL",
            ));
        }
        Ok(())
    }
}

/// Optional topic policy for MQTT (HTTP applies shiftr limits on its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    pub max_length: Option<usize>,
    /// Characters allowed besides ASCII letters and digits, e.g. "/-_.".
    pub allowed_chars: Option<String>,
}

impl TopicsConfig {
    pub fn policy(&self) -> TopicPolicy {
        TopicPolicy {
            max_len: self.max_length,
            allowed_extra: self.allowed_chars.clone(),
        }
    }
}

/// Who may connect without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Anonymous clients allowed from loopback addresses only.
    #[default]
    Loopback,
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub anonymous: Anonymous,
    /// Auth bundle file (tokens and ACLs); watched for changes.
    pub bundle: Option<PathBuf>,
    /// In Kubernetes: the Secret holding the bundle (key `bundle.json`),
    /// watched through the API server in the pod's namespace (env
    /// `POD_NAMESPACE`), so a deleted token bites in seconds rather than at
    /// the kubelet's next sync of the mounted file, which stays the fallback.
    pub bundle_secret: Option<String>,
    /// Failed authentications allowed per (source address, username) per
    /// minute; past it, that pair is refused without checking until the
    /// minute is over. Keyed on the pair so that one bad client behind a NAT
    /// or load balancer does not lock out every good one. 0 disables both
    /// limits.
    pub max_failures_per_minute: u32,
    /// Ceiling per source address over all usernames together, so guessing
    /// with a fresh username each time is limited too.
    pub max_failures_per_address_per_minute: u32,
    /// Who owns a client id when tokens are in use.
    pub client_ids: ClientIds,
}

/// Client id ownership between tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientIds {
    /// A client id belongs to the token (or anonymous client) that holds
    /// it: a CONNECT from another token with that id is refused (v5 0x85,
    /// 3.1.1 0x02), so one token cannot kick another's device or wipe its
    /// session. The same token may take its own session over.
    #[default]
    Exclusive,
    /// Client ids are namespaced per token: two tokens using the same id
    /// get two separate sessions.
    PerToken,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: Anonymous::default(),
            bundle: None,
            bundle_secret: None,
            max_failures_per_minute: 10,
            max_failures_per_address_per_minute: 100,
            client_ids: ClientIds::default(),
        }
    }
}

/// Where sessions, retained messages, queued QoS 1/2 messages and the
/// last-value cache are kept across restarts. Without a data directory
/// the broker is memory-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: Option<PathBuf>,
    /// When an acknowledged message is safe (see [`Durability`]).
    pub durability: Durability,
    /// Microseconds a commit waits for more writes to join it. Zero: a
    /// commit takes what arrived while the previous one was being written,
    /// which batches by itself under load and adds nothing at light load.
    pub commit_delay_us: u64,
    /// Most writes in one commit.
    pub max_batch: usize,
    /// Seconds between writes of the last-value cache's changed topics.
    pub lvc_interval: u64,
    /// Start even if the store is damaged: keep what is consistent, set
    /// the rest aside (`--recover-store`). Off: a damaged store refuses to
    /// start, so nothing is silently lost.
    pub recover: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: None,
            durability: Durability::default(),
            commit_delay_us: 0,
            max_batch: 4096,
            lvc_interval: 1,
            recover: false,
        }
    }
}

impl StorageConfig {
    /// Is anything written to disk?
    pub fn persists(&self) -> bool {
        self.data_dir.is_some() && self.durability != Durability::Off
    }
}

/// What a PUBACK/PUBREC (or an HTTP 200) for a stored message promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync per group commit: the message survives `kill -9` and power loss.
    #[default]
    Fsync,
    /// Written to the OS before the ack: survives `kill -9` of the broker,
    /// not a crash of the machine.
    Os,
    /// Nothing is written (memory-only, like no data directory).
    Off,
}

/// The HTTP interface and the native WebSocket streams. The topic limits
/// default to shiftr.io's, which the HTTP interface follows; MQTT has its
/// own, off by default (`[topics]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Longest topic (or filter) in a `/broker/` path or stream path, in characters.
    pub max_topic_length: usize,
    /// Characters allowed in those topics besides ASCII letters and digits.
    pub allowed_chars: String,
    /// Largest POST body in bytes; larger ones get 413 and publish nothing.
    pub max_body_bytes: usize,
    /// Seconds a POST body may take to arrive; a slower upload gets 408.
    pub body_timeout: u64,
    /// Milliseconds a GET waits for a first message when none is known
    /// and the request has no `?wait=`.
    pub default_wait_ms: u64,
    /// Longest `?wait=` a GET may ask for, in seconds.
    pub max_wait: u64,
    /// Origins allowed to call the HTTP interface from a web page (CORS),
    /// comma-separated, or `*` for any. Empty: no CORS headers (browsers
    /// then allow same-origin pages only).
    pub cors_origins: String,
    /// Seconds between WebSocket pings on a topic stream; a stream that
    /// answers none of two pings is closed. 0 disables pings.
    pub ping_interval: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            max_topic_length: 128,
            allowed_chars: ".,:;-_$/+#".into(),
            max_body_bytes: 64 * 1024,
            body_timeout: 10,
            default_wait_ms: 1000,
            max_wait: 60,
            cors_origins: String::new(),
            ping_interval: 30,
        }
    }
}

impl WebConfig {
    /// The topic policy `/broker/` paths and stream paths are checked against.
    pub fn policy(&self) -> TopicPolicy {
        TopicPolicy {
            max_len: Some(self.max_topic_length),
            allowed_extra: Some(self.allowed_chars.clone()),
        }
    }

    /// The configured CORS origins; `None` when CORS is off, `Some([])`
    /// never (a lone `*` is returned as itself).
    pub fn cors(&self) -> Option<Vec<String>> {
        let list: Vec<String> = self
            .cors_origins
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        (!list.is_empty()).then_some(list)
    }
}

/// The last-value cache: the latest message of each topic, whether retained
/// or not, so GET and `?pubStates=1` can answer without a retained flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LvcConfig {
    /// Topics kept; past it the least recently published topic is evicted
    /// (counted). 0 turns the cache off: GET then answers from the retained
    /// store and live messages only.
    pub max_entries: usize,
    /// Bytes (topic + payload) kept over all entries, the second cap.
    pub max_bytes: usize,
}

impl Default for LvcConfig {
    fn default() -> Self {
        LvcConfig {
            max_entries: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The admin API's credentials (HTTP Basic), as NanoMQ's and EMQX's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub username: String,
    pub password: String,
    /// A directory with `username` and `password` files (the mounted admin
    /// Secret in Kubernetes); when set they replace the two keys above and
    /// are re-read when they change.
    pub credentials_dir: Option<PathBuf>,
    /// HS256 key for JWT bearer tokens (`Authorization: Bearer <jwt>`, with
    /// an `exp` claim), as NanoMQ offers beside Basic. Empty: JWT off.
    pub jwt_secret: String,
}

/// The local default admin credentials, NanoMQ's: printed in the banner,
/// and refused on any address but loopback.
pub const DEFAULT_ADMIN_USERNAME: &str = "admin";
pub const DEFAULT_ADMIN_PASSWORD: &str = "public";

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            username: DEFAULT_ADMIN_USERNAME.into(),
            password: DEFAULT_ADMIN_PASSWORD.into(),
            credentials_dir: None,
            jwt_secret: String::new(),
        }
    }
}

impl ApiConfig {
    /// Are the well-known default credentials in force?
    pub fn is_default(&self) -> bool {
        self.credentials_dir.is_none() && self.password == DEFAULT_ADMIN_PASSWORD
    }
}

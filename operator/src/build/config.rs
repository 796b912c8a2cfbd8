//! Broker spec → `BrokerConfig` (the shared type) → ConfigMap with its TOML.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::ConfigMap;
use starling_model::config::{Anonymous, BrokerConfig, Enabled, ListenerConfig};

use super::listeners::Kind;
use super::{BrokerCtx, BuildError, short_hash};
use crate::crd::broker::AnonymousAccess;

/// Where the pod mounts each piece.
pub mod paths {
    pub const CONFIG_DIR: &str = "/etc/starling/config";
    pub const CONFIG_FILE: &str = "/etc/starling/config/starling.toml";
    pub const TLS_DIR: &str = "/etc/starling/tls";
    pub const AUTH_DIR: &str = "/etc/starling/auth";
    pub const BUNDLE_FILE: &str = "/etc/starling/auth/bundle.json";
    pub const ADMIN_DIR: &str = "/etc/starling/admin";
    pub const DATA_DIR: &str = "/var/lib/starling";
}

/// Key of the TOML file in the ConfigMap.
pub const CONFIG_KEY: &str = "starling.toml";

/// The broker configuration for this Broker. Everything here needs a restart
/// to change, which is why its hash goes on the pod template; tokens, ACLs and
/// certificates live in Secrets the broker reloads by itself.
pub fn broker_config(ctx: &BrokerCtx) -> Result<BrokerConfig, BuildError> {
    let spec = ctx.spec;
    let mut cfg = BrokerConfig::default();
    cfg.broker.name = ctx.name.clone();

    for l in &ctx.listeners.clients {
        let target = match l.kind {
            Kind::Mqtts => &mut cfg.mqtts,
            Kind::Https => &mut cfg.https,
            Kind::Mqtt => &mut cfg.mqtt,
            Kind::Http => &mut cfg.http,
        };
        *target = ListenerConfig {
            enabled: if l.enabled { Enabled::On } else { Enabled::Off },
            bind: format!("0.0.0.0:{}", l.container_port),
        };
    }
    // Probes come from the kubelet on the pod IP, so the admin listener cannot
    // stay on loopback; it is exposed through the headless Service only.
    cfg.admin = ListenerConfig {
        enabled: Enabled::On,
        bind: format!("0.0.0.0:{}", ctx.listeners.admin_port),
    };

    cfg.tls.cert = Some(PathBuf::from(format!("{}/tls.crt", paths::TLS_DIR)));
    cfg.tls.key = Some(PathBuf::from(format!("{}/tls.key", paths::TLS_DIR)));
    cfg.tls.self_signed = false;
    // The same Secrets, watched through the API server (the pods' Role lets
    // them read exactly these two), so changes apply in seconds.
    cfg.tls.secret = Some(super::tls::server_secret_name(ctx));
    cfg.auth.bundle_secret = Some(ctx.names.bundle_secret());
    // The admin Secret the pods mount: never the default credentials on the
    // pod's address (the broker refuses to start with them there).
    cfg.api.credentials_dir = Some(PathBuf::from(paths::ADMIN_DIR));

    let l = &spec.limits;
    set(
        &mut cfg.limits.max_connections,
        l.max_connections,
        "maxConnections",
    )?;
    set(
        &mut cfg.limits.max_packet_size,
        l.max_packet_size,
        "maxPacketSize",
    )?;
    set(
        &mut cfg.limits.max_keepalive,
        l.max_keepalive,
        "maxKeepalive",
    )?;
    set(&mut cfg.limits.max_inflight, l.max_inflight, "maxInflight")?;
    set(
        &mut cfg.limits.max_queued_messages,
        l.max_queued_messages,
        "maxQueuedMessages",
    )?;
    set(
        &mut cfg.limits.max_queued_bytes,
        l.max_queued_bytes,
        "maxQueuedBytes",
    )?;
    set(
        &mut cfg.limits.max_session_expiry,
        l.max_session_expiry,
        "maxSessionExpiry",
    )?;
    // Behind a Service, source addresses are often node or load-balancer
    // addresses shared by many clients: a per-address socket cap would
    // throttle whole fleets, so in-cluster brokers rely on max_connections.
    cfg.limits.max_connections_per_address = 0;
    if let Some(max) = l.max_topic_length {
        let mut v = 0usize;
        set(&mut v, Some(max), "maxTopicLength")?;
        cfg.topics.max_length = Some(v);
    }
    cfg.topics.allowed_chars = l.allowed_topic_chars.clone();

    cfg.auth.anonymous = match spec.auth.anonymous {
        AnonymousAccess::Deny => Anonymous::Deny,
        AnonymousAccess::Allow => Anonymous::Allow,
        AnonymousAccess::Loopback => Anonymous::Loopback,
    };
    Ok(cfg)
}

fn set<T, S>(target: &mut T, value: Option<S>, field: &str) -> Result<(), BuildError>
where
    T: TryFrom<S>,
    S: Copy + std::fmt::Display,
{
    if let Some(v) = value {
        *target = T::try_from(v)
            .map_err(|_| BuildError::InvalidSpec(format!("limits.{field}: {v} is out of range")))?;
    }
    Ok(())
}

/// The ConfigMap and the hash of its content (for the pod template).
pub fn config_map(ctx: &BrokerCtx, cfg: &BrokerConfig) -> Result<(ConfigMap, String), BuildError> {
    let toml = toml::to_string(cfg)
        .map_err(|e| BuildError::InvalidSpec(format!("broker config does not serialize: {e}")))?;
    let hash = short_hash(toml.as_bytes());
    let cm = ConfigMap {
        metadata: ctx.meta(ctx.names.config_map(), "config"),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), toml)])),
        ..ConfigMap::default()
    };
    Ok((cm, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::broker::{LimitsSpec, ListenerSpec};

    #[test]
    fn default_broker_config() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let cfg = broker_config(&ctx).unwrap();
        let mut expected = BrokerConfig::default();
        expected.broker.name = "demo".into();
        for (l, bind, on) in [
            (&mut expected.mqtts, "0.0.0.0:8883", Enabled::On),
            (&mut expected.https, "0.0.0.0:8443", Enabled::On),
            (&mut expected.mqtt, "0.0.0.0:1883", Enabled::Off),
            (&mut expected.http, "0.0.0.0:1884", Enabled::Off),
            (&mut expected.admin, "0.0.0.0:8081", Enabled::On),
        ] {
            *l = ListenerConfig {
                enabled: on,
                bind: bind.into(),
            };
        }
        expected.tls.cert = Some("/etc/starling/tls/tls.crt".into());
        expected.tls.key = Some("/etc/starling/tls/tls.key".into());
        expected.tls.secret = Some("demo-tls".into());
        expected.auth.bundle_secret = Some("demo-auth".into());
        expected.api.credentials_dir = Some("/etc/starling/admin".into());
        expected.auth.anonymous = Anonymous::Deny;
        expected.limits.max_connections_per_address = 0;
        assert_eq!(cfg, expected);
    }

    #[test]
    fn limits_and_listeners_reach_the_config() {
        let mut spec = crate::crd::BrokerSpec {
            limits: LimitsSpec {
                max_connections: Some(500),
                max_packet_size: Some(65536),
                max_keepalive: Some(60),
                max_topic_length: Some(128),
                allowed_topic_chars: Some("/-_".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        spec.listeners.mqtt = Some(ListenerSpec {
            enabled: Some(true),
            ..Default::default()
        });
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        let cfg = broker_config(&ctx).unwrap();
        assert_eq!(cfg.limits.max_connections, 500);
        assert_eq!(cfg.limits.max_packet_size, 65536);
        assert_eq!(cfg.limits.max_keepalive, 60);
        assert_eq!(cfg.topics.max_length, Some(128));
        assert_eq!(cfg.topics.allowed_chars.as_deref(), Some("/-_"));
        assert_eq!(cfg.mqtt.enabled, Enabled::On);

        let (cm, hash) = config_map(&ctx, &cfg).unwrap();
        // The TOML is the broker's own type, read back without loss.
        let toml = &cm.data.as_ref().unwrap()[CONFIG_KEY];
        let back: BrokerConfig = toml::from_str(toml).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(hash.len(), 16);
        // A different limit, a different hash: pods roll for it.
        let mut other = cfg.clone();
        other.limits.max_keepalive = 61;
        assert_ne!(config_map(&ctx, &other).unwrap().1, hash);
    }

    #[test]
    fn out_of_range_limits_are_spec_errors() {
        let spec = crate::crd::BrokerSpec {
            limits: LimitsSpec {
                max_keepalive: Some(70000),
                ..Default::default()
            },
            ..Default::default()
        };
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        assert!(
            matches!(broker_config(&ctx), Err(BuildError::InvalidSpec(m)) if m.contains("maxKeepalive"))
        );
    }

    #[test]
    fn config_map_snapshot() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let (mut cm, _) = config_map(&ctx, &broker_config(&ctx).unwrap()).unwrap();
        // The TOML body is checked above through the shared type (so new
        // broker settings with defaults do not break this test); the
        // snapshot covers the object around it.
        cm.data = None;
        assert_yaml(
            &cm,
            r#"
apiVersion: v1
kind: ConfigMap
metadata:
  labels:
    app.kubernetes.io/component: config
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-config
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
"#,
        );
    }
}

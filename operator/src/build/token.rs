//! Token → its credentials Secret (owned by the Token): everything an app
//! needs to connect, in one place to mount or `envFrom`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use super::listeners::Kind;
use super::{
    APP, BrokerCtx, BuildError, MANAGER, keys, secret_data, secret_keys, token_secret_name,
};
use crate::crd::Token;

/// What goes into the credentials Secret besides the Token itself.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub broker: String,
    pub secret: String,
    /// The client Service's in-cluster DNS name.
    pub host: Option<String>,
    /// The mqtts port on that Service.
    pub port: Option<i32>,
    pub mqtts_url: Option<String>,
    /// MQTT over secure WebSocket: `wss://host:port/mqtt` on the https listener.
    pub wss_url: Option<String>,
    pub https_url: Option<String>,
    pub ca_crt: Option<String>,
}

impl Credentials {
    /// Credentials for a Token of `broker`; the connection details come from
    /// the Broker's listeners when the Broker exists.
    pub fn new(
        broker: &str,
        secret: String,
        ctx: Option<&BrokerCtx>,
        ca_crt: Option<String>,
    ) -> Credentials {
        let mut c = Credentials {
            broker: broker.to_string(),
            secret,
            ca_crt,
            ..Credentials::default()
        };
        let Some(ctx) = ctx else { return c };
        let host = ctx.service_host();
        for l in ctx.listeners.enabled() {
            match l.kind {
                Kind::Mqtts => {
                    c.port = Some(l.port);
                    c.mqtts_url = Some(format!("mqtts://{host}:{}", l.port));
                }
                Kind::Https => {
                    c.https_url = Some(format!("https://{host}:{}", l.port));
                    c.wss_url = Some(format!("wss://{host}:{}/mqtt", l.port));
                }
                Kind::Mqtt | Kind::Http => {}
            }
        }
        c.host = Some(host);
        c
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("broker", &self.broker)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("mqtts_url", &self.mqtts_url)
            .field("wss_url", &self.wss_url)
            .field("https_url", &self.https_url)
            .finish_non_exhaustive()
    }
}

/// Owner reference and namespace of a Token (it must come from the API server).
pub fn token_owner(token: &Token) -> Result<(OwnerReference, String), BuildError> {
    let name = token.name_any();
    let ns = token
        .namespace()
        .ok_or_else(|| BuildError::NoNamespace(format!("Token {name}")))?;
    let owner = token
        .controller_owner_ref(&())
        .filter(|o| !o.uid.is_empty())
        .ok_or_else(|| BuildError::NoUid(format!("Token {name}")))?;
    Ok((owner, ns))
}

/// The credentials Secret `<token>-credentials`.
pub fn credentials_secret(token: &Token, c: &Credentials) -> Result<Secret, BuildError> {
    let (owner, namespace) = token_owner(token)?;
    let name = token.name_any();
    let labels = BTreeMap::from([
        (keys::NAME.to_string(), APP.to_string()),
        (keys::COMPONENT.to_string(), "token".to_string()),
        (keys::MANAGED_BY.to_string(), MANAGER.to_string()),
        (keys::BROKER.to_string(), c.broker.clone()),
        (keys::TOKEN.to_string(), name.clone()),
    ]);
    let mut data = vec![
        (secret_keys::USERNAME, name.clone()),
        (secret_keys::PASSWORD, c.secret.clone()),
        (secret_keys::BROKER, c.broker.clone()),
    ];
    let optional = [
        (secret_keys::HOST, c.host.clone()),
        (secret_keys::PORT, c.port.map(|p| p.to_string())),
        (secret_keys::MQTTS_URL, c.mqtts_url.clone()),
        (secret_keys::WSS_URL, c.wss_url.clone()),
        (secret_keys::HTTPS_URL, c.https_url.clone()),
    ];
    data.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
    if let Some(ca) = &c.ca_crt {
        data.push((secret_keys::CA_CRT, ca.clone()));
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(secret_data(data)),
        ..Secret::default()
    })
}

/// The password already in a credentials Secret, if any.
pub fn existing_secret(secret: Option<&Secret>) -> Option<String> {
    let bytes = secret?.data.as_ref()?.get(secret_keys::PASSWORD)?;
    String::from_utf8(bytes.0.clone())
        .ok()
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::assert_yaml;
    use crate::crd::{BrokerRef, TokenSpec};

    pub fn token(name: &str) -> Token {
        let mut t = Token::new(
            name,
            TokenSpec {
                broker_ref: BrokerRef {
                    name: "demo".into(),
                },
                ..TokenSpec::default()
            },
        );
        t.metadata.namespace = Some("ns".into());
        t.metadata.uid = Some(format!("uid-{name}"));
        t
    }

    #[test]
    fn credentials_snapshot() {
        let t = token("sensor");
        let b = crate::build::snapshot::broker("demo", crate::crd::BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let c = Credentials::new(
            "demo",
            "s3cr3t-s3cr3t-s3cr3t".into(),
            Some(&ctx),
            Some("CA".into()),
        );
        let s = credentials_secret(&t, &c).unwrap();
        assert_eq!(
            existing_secret(Some(&s)).as_deref(),
            Some("s3cr3t-s3cr3t-s3cr3t")
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let data = s.data.as_ref().unwrap();
        let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
        assert_eq!(text("username"), "sensor");
        assert_eq!(text("password"), "s3cr3t-s3cr3t-s3cr3t");
        assert_eq!(text("host"), "demo.ns.svc");
        assert_eq!(text("port"), "8883");
        assert_eq!(text("mqtts-url"), "mqtts://demo.ns.svc:8883");
        assert_eq!(text("wss-url"), "wss://demo.ns.svc:443/mqtt");
        assert_eq!(text("https-url"), "https://demo.ns.svc:443");
        assert_eq!(text("ca.crt"), "CA");
        assert_yaml(
            &s,
            r#"
apiVersion: v1
kind: Secret
metadata:
  labels:
    app.kubernetes.io/component: token
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
    starling.dev/broker: demo
    starling.dev/token: sensor
  name: sensor-credentials
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Token
    name: sensor
    uid: uid-sensor
type: Opaque
data:
  broker: <redacted>
  ca.crt: <redacted>
  host: <redacted>
  https-url: <redacted>
  mqtts-url: <redacted>
  password: <redacted>
  port: <redacted>
  username: <redacted>
  wss-url: <redacted>
"#,
        );
    }

    #[test]
    fn tokens_without_uid_are_refused() {
        let mut t = token("x");
        t.metadata.uid = None;
        assert!(matches!(
            credentials_secret(&t, &Credentials::new("demo", "x".into(), None, None)),
            Err(BuildError::NoUid(_))
        ));
    }
}

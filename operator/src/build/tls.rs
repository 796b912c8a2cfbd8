//! TLS Secrets: the operator CA (with key, never mounted), the server
//! certificate the pods mount, and the CA certificate alone for clients.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use super::{BrokerCtx, keys, secret_data, secret_keys};
use crate::crd::broker::TlsSpec;
use crate::tls::{CaMaterial, ServerMaterial};

/// Where a Broker's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// The operator's own CA for this Broker.
    Operator,
    /// A cert-manager Certificate writing `<broker>-tls`.
    CertManager,
    /// The user's Secret of this name.
    Existing(String),
}

impl TlsSource {
    pub fn of(spec: &TlsSpec) -> TlsSource {
        if let Some(r) = &spec.secret_ref {
            TlsSource::Existing(r.name.clone())
        } else if spec.cert_manager.is_some() {
            TlsSource::CertManager
        } else {
            TlsSource::Operator
        }
    }
}

/// Name of the Secret the pods mount as their server certificate.
pub fn server_secret_name(ctx: &BrokerCtx) -> String {
    match TlsSource::of(&ctx.spec.tls) {
        TlsSource::Existing(name) => name,
        TlsSource::Operator | TlsSource::CertManager => ctx.names.tls_secret(),
    }
}

/// The operator CA with its key.
pub fn ca_key_secret(ctx: &BrokerCtx, ca: &CaMaterial) -> Secret {
    Secret {
        metadata: ctx.meta(ctx.names.ca_key_secret(), "ca"),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(secret_data(
            [
                (secret_keys::TLS_CRT, ca.cert_pem.clone()),
                (secret_keys::TLS_KEY, ca.key_pem.clone()),
            ]
            .into_iter()
            .chain(ca.previous.iter().flat_map(|p| {
                [
                    (secret_keys::PREVIOUS_CA_CRT, p.cert_pem.clone()),
                    (secret_keys::CROSS_CRT, p.cross_pem.clone()),
                ]
            })),
        )),
        ..Secret::default()
    }
}

/// The server certificate signed by the operator CA.
pub fn server_secret(ctx: &BrokerCtx, server: &ServerMaterial, ca: &CaMaterial) -> Secret {
    let mut metadata = ctx.meta(ctx.names.tls_secret(), "tls");
    metadata.annotations = Some(BTreeMap::from([
        (keys::DNS_HASH.to_string(), server.dns_hash.clone()),
        (keys::CA_HASH.to_string(), server.ca_hash.clone()),
    ]));
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(secret_data([
            (
                secret_keys::TLS_CRT,
                format!("{}{}", server.cert_pem, ca.chain_extra()),
            ),
            (secret_keys::TLS_KEY, server.key_pem.clone()),
            (secret_keys::CA_CRT, ca.trust_bundle()),
        ])),
        ..Secret::default()
    }
}

/// The CA certificate for clients (`ca.crt` only; empty when the source
/// has none, e.g. a publicly trusted certificate).
pub fn client_ca_secret(ctx: &BrokerCtx, ca_pem: Option<&str>) -> Secret {
    Secret {
        metadata: ctx.meta(ctx.names.ca_secret(), "ca"),
        type_: Some("Opaque".into()),
        data: Some(secret_data([(
            secret_keys::CA_CRT,
            ca_pem.unwrap_or_default().to_string(),
        )])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::BrokerSpec;
    use crate::crd::broker::SecretNameRef;
    use std::time::SystemTime;

    fn material() -> (CaMaterial, ServerMaterial) {
        let ca = CaMaterial {
            cert_pem: "CA CERT".into(),
            key_pem: "CA KEY".into(),
            previous: None,
        };
        let server = ServerMaterial {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            not_after: SystemTime::UNIX_EPOCH,
            dns_hash: "d1".into(),
            ca_hash: "c1".into(),
        };
        (ca, server)
    }

    #[test]
    fn source_and_mounted_secret() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_eq!(TlsSource::of(&ctx.spec.tls), TlsSource::Operator);
        assert_eq!(server_secret_name(&ctx), "demo-tls");

        let mut spec = BrokerSpec::default();
        spec.tls.secret_ref = Some(SecretNameRef {
            name: "mine".into(),
        });
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_eq!(
            TlsSource::of(&ctx.spec.tls),
            TlsSource::Existing("mine".into())
        );
        assert_eq!(server_secret_name(&ctx), "mine");
    }

    #[test]
    fn secrets_snapshot() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let (ca, server) = material();
        let owner = r#"
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo"#;
        assert_yaml(
            &server_secret(&ctx, &server, &ca),
            &format!(
                r#"
apiVersion: v1
kind: Secret
metadata:
  annotations:
    starling.dev/ca-hash: c1
    starling.dev/dns-names-hash: d1
  labels:
    app.kubernetes.io/component: tls
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-tls
  namespace: ns{owner}
type: kubernetes.io/tls
data:
  ca.crt: <redacted>
  tls.crt: <redacted>
  tls.key: <redacted>
"#
            ),
        );
        assert_yaml(
            &ca_key_secret(&ctx, &ca),
            &format!(
                r#"
apiVersion: v1
kind: Secret
metadata:
  labels:
    app.kubernetes.io/component: ca
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-ca-key
  namespace: ns{owner}
type: kubernetes.io/tls
data:
  tls.crt: <redacted>
  tls.key: <redacted>
"#
            ),
        );
        let client = client_ca_secret(&ctx, Some("CA CERT"));
        assert_yaml(
            &client,
            &format!(
                r#"
apiVersion: v1
kind: Secret
metadata:
  labels:
    app.kubernetes.io/component: ca
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-ca
  namespace: ns{owner}
type: Opaque
data:
  ca.crt: <redacted>
"#
            ),
        );
        // The client Secret carries the certificate only, never a key.
        let data = client.data.unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data["ca.crt"].0, b"CA CERT");
    }
}

//! A cert-manager `Certificate` for Brokers with `tls.certManager`. Built as
//! a dynamic object so the operator does not need cert-manager's types (or
//! its CRDs, unless a Broker asks for it).

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::BrokerCtx;
use crate::crd::broker::CertManagerSpec;

/// `cert-manager.io/v1` `Certificate`.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cert-manager.io",
        "v1",
        "Certificate",
    ))
}

/// The Certificate writing the Broker's TLS Secret (`<broker>-tls`).
pub fn certificate(ctx: &BrokerCtx, cm: &CertManagerSpec) -> DynamicObject {
    // cert-manager wants IP addresses apart from DNS names.
    let (ips, dns): (Vec<String>, Vec<String>) = ctx
        .dns_names()
        .into_iter()
        .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
    let mut spec = json!({
        "secretName": ctx.names.tls_secret(),
        "commonName": ctx.service_host(),
        "dnsNames": dns,
        "issuerRef": {
            "name": cm.issuer_ref.name,
            "kind": cm.issuer_ref.kind,
            "group": cm.issuer_ref.group,
        },
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["server auth", "digital signature"],
        "secretTemplate": {"labels": ctx.labels("tls")},
    });
    if !ips.is_empty() {
        spec["ipAddresses"] = json!(ips);
    }
    if let Some(d) = &cm.duration {
        spec["duration"] = json!(d);
    }
    if let Some(r) = &cm.renew_before {
        spec["renewBefore"] = json!(r);
    }
    let mut obj = DynamicObject::new(&ctx.names.certificate(), &api_resource());
    obj.metadata = ctx.meta(ctx.names.certificate(), "tls");
    obj.data = json!({ "spec": spec });
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::BrokerSpec;
    use crate::crd::broker::IssuerRef;

    #[test]
    fn certificate_snapshot() {
        let cm = CertManagerSpec {
            issuer_ref: IssuerRef {
                name: "letsencrypt".into(),
                kind: "ClusterIssuer".into(),
                group: "cert-manager.io".into(),
            },
            duration: Some("2160h".into()),
            renew_before: None,
        };
        let mut spec = BrokerSpec::default();
        spec.tls.cert_manager = Some(cm.clone());
        spec.tls.dns_names = vec!["mqtt.example.com".into(), "192.0.2.7".into()];
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_yaml(
            &certificate(&ctx, &cm),
            r#"
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  labels:
    app.kubernetes.io/component: tls
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-tls
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
spec:
  commonName: demo.ns.svc
  dnsNames:
  - demo
  - demo.ns
  - demo.ns.svc
  - demo.ns.svc.cluster.local
  - "*.demo-headless.ns.svc"
  - "*.demo-headless.ns.svc.cluster.local"
  - mqtt.example.com
  duration: 2160h
  ipAddresses:
  - 192.0.2.7
  issuerRef:
    group: cert-manager.io
    kind: ClusterIssuer
    name: letsencrypt
  privateKey:
    algorithm: ECDSA
    rotationPolicy: Always
    size: 256
  secretName: demo-tls
  secretTemplate:
    labels:
      app.kubernetes.io/component: tls
      app.kubernetes.io/instance: demo
      app.kubernetes.io/managed-by: starling-operator
      app.kubernetes.io/name: starling
  usages:
  - server auth
  - digital signature
"#,
        );
    }
}

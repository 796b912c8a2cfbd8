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

/// The longest commonName X.509 allows (`ub-common-name`, RFC 5280); CAs
/// refuse a longer one.
const MAX_COMMON_NAME: usize = 64;

/// The Certificate writing the Broker's TLS Secret (`<broker>-tls`).
pub fn certificate(ctx: &BrokerCtx, cm: &CertManagerSpec) -> DynamicObject {
    let names = if cm.in_cluster_names() {
        ctx.dns_names()
    } else {
        // Only the user's names: public ACME issuers refuse `*.svc` names.
        let mut names: Vec<String> = Vec::new();
        for n in &ctx.spec.tls.dns_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    };
    // cert-manager wants IP addresses apart from DNS names.
    let (ips, dns): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
    // The commonName is informational (clients check the SANs); it is left
    // out rather than made longer than a CA accepts.
    let common_name = if cm.in_cluster_names() {
        Some(ctx.service_host())
    } else {
        dns.first().cloned()
    }
    .filter(|cn| cn.len() <= MAX_COMMON_NAME);
    let mut spec = json!({
        "secretName": ctx.names.tls_secret(),
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
    if let Some(cn) = common_name {
        spec["commonName"] = json!(cn);
    }
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
            in_cluster_names: None,
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

    fn letsencrypt(in_cluster_names: Option<bool>) -> CertManagerSpec {
        CertManagerSpec {
            issuer_ref: IssuerRef {
                name: "letsencrypt".into(),
                kind: "ClusterIssuer".into(),
                group: "cert-manager.io".into(),
            },
            in_cluster_names,
            ..CertManagerSpec::default()
        }
    }

    fn spec_of(name: &str, ns: &str, cm: &CertManagerSpec, dns: &[&str]) -> serde_json::Value {
        let mut spec = BrokerSpec::default();
        spec.tls.cert_manager = Some(cm.clone());
        spec.tls.dns_names = dns.iter().map(|s| s.to_string()).collect();
        let mut b = broker(name, spec);
        b.metadata.namespace = Some(ns.into());
        let ctx = BrokerCtx::new(&b).unwrap();
        certificate(&ctx, cm).data["spec"].clone()
    }

    #[test]
    fn without_in_cluster_names_only_the_users_names_are_requested() {
        let cm = letsencrypt(Some(false));
        let spec = spec_of(
            "demo",
            "ns",
            &cm,
            &[
                "mqtt.example.com",
                "192.0.2.7",
                "mqtt.example.com",
                "alt.example.com",
            ],
        );
        assert_eq!(
            spec["dnsNames"],
            json!(["mqtt.example.com", "alt.example.com"])
        );
        assert_eq!(spec["ipAddresses"], json!(["192.0.2.7"]));
        assert_eq!(spec["commonName"], json!("mqtt.example.com"));
        assert!(!spec.to_string().contains("svc"), "{spec}");
    }

    #[test]
    fn the_common_name_is_never_longer_than_64_bytes() {
        // A long namespace: `<broker>.<ns>.svc` is 73 bytes, so no commonName
        // (the names stay in dnsNames, where the limit is 253).
        let ns = "n".repeat(63);
        let spec = spec_of("demo", &ns, &letsencrypt(None), &[]);
        assert!(spec.get("commonName").is_none(), "{spec}");
        assert!(
            spec["dnsNames"]
                .to_string()
                .contains(&format!("demo.{ns}.svc"))
        );
        // The default namespace-length case keeps it.
        let spec = spec_of("demo", "ns", &letsencrypt(Some(true)), &[]);
        assert_eq!(spec["commonName"], json!("demo.ns.svc"));
        // User names only: a first name over 64 bytes is not a commonName.
        let long = format!("{}.example.com", "a".repeat(60));
        let spec = spec_of("demo", "ns", &letsencrypt(Some(false)), &[&long]);
        assert!(spec.get("commonName").is_none(), "{spec}");
        assert_eq!(spec["dnsNames"], json!([long]));
        // Only IP addresses: no commonName, no dnsNames.
        let spec = spec_of("demo", "ns", &letsencrypt(Some(false)), &["192.0.2.7"]);
        assert!(spec.get("commonName").is_none(), "{spec}");
        assert_eq!(spec["dnsNames"], json!([]));
    }
}

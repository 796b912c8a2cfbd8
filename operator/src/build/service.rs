//! The client Service (mqtts 8883, https 443 by default) and the headless
//! Service that gives each pod a stable name and exposes the admin port.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::BrokerCtx;
use crate::crd::broker::ServiceType;

/// Port name of the admin listener.
pub const ADMIN_PORT_NAME: &str = "admin";

fn port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(target.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The Service clients connect to.
pub fn client_service(ctx: &BrokerCtx) -> Service {
    let s = &ctx.spec.service;
    let mut metadata = ctx.meta(ctx.names.service(), "broker");
    if let Some(labels) = metadata.labels.as_mut() {
        for (k, v) in &s.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if !s.annotations.is_empty() {
        metadata.annotations = Some(s.annotations.clone());
    }
    let external = s.type_ != ServiceType::ClusterIP;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(s.type_.as_str().into()),
            selector: Some(ctx.selector_labels()),
            ports: Some(
                ctx.listeners
                    .enabled()
                    .map(|l| port(l.kind.name(), l.port, l.kind.name()))
                    .collect(),
            ),
            load_balancer_class: s.load_balancer_class.clone(),
            load_balancer_source_ranges: (!s.load_balancer_source_ranges.is_empty())
                .then(|| s.load_balancer_source_ranges.clone()),
            external_traffic_policy: s
                .external_traffic_policy
                .filter(|_| external)
                .map(|p| p.as_str().into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The headless Service of the StatefulSet: per-pod DNS names, and the
/// admin port for scrapers (it is never on the client Service).
pub fn headless_service(ctx: &BrokerCtx) -> Service {
    let mut ports: Vec<ServicePort> = ctx
        .listeners
        .enabled()
        .map(|l| port(l.kind.name(), l.container_port, l.kind.name()))
        .collect();
    ports.push(port(
        ADMIN_PORT_NAME,
        ctx.listeners.admin_port,
        ADMIN_PORT_NAME,
    ));
    Service {
        metadata: ctx.meta(ctx.names.headless_service(), "broker"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(ctx.selector_labels()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::BrokerSpec;
    use crate::crd::broker::TrafficPolicy;
    use std::collections::BTreeMap;

    #[test]
    fn default_client_service() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_yaml(
            &client_service(&ctx),
            r#"
apiVersion: v1
kind: Service
metadata:
  labels:
    app.kubernetes.io/component: broker
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
spec:
  ports:
  - name: mqtts
    port: 8883
    protocol: TCP
    targetPort: mqtts
  - name: https
    port: 443
    protocol: TCP
    targetPort: https
  selector:
    app.kubernetes.io/instance: demo
    app.kubernetes.io/name: starling
  type: ClusterIP
"#,
        );
    }

    #[test]
    fn load_balancer_service() {
        let mut spec = BrokerSpec::default();
        spec.service.type_ = ServiceType::LoadBalancer;
        spec.service.annotations = BTreeMap::from([(
            "external-dns.alpha.kubernetes.io/hostname".into(),
            "mqtt.example.com".into(),
        )]);
        spec.service.external_traffic_policy = Some(TrafficPolicy::Local);
        spec.service.load_balancer_source_ranges = vec!["10.0.0.0/8".into()];
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        let svc = client_service(&ctx);
        let s = svc.spec.as_ref().unwrap();
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(s.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(
            s.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_string()])
        );
        assert_eq!(
            svc.metadata.annotations.as_ref().unwrap()["external-dns.alpha.kubernetes.io/hostname"],
            "mqtt.example.com"
        );
    }

    #[test]
    fn headless_service_snapshot() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_yaml(
            &headless_service(&ctx),
            r#"
apiVersion: v1
kind: Service
metadata:
  labels:
    app.kubernetes.io/component: broker
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-headless
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  ports:
  - name: mqtts
    port: 8883
    protocol: TCP
    targetPort: mqtts
  - name: https
    port: 8443
    protocol: TCP
    targetPort: https
  - name: admin
    port: 8081
    protocol: TCP
    targetPort: admin
  selector:
    app.kubernetes.io/instance: demo
    app.kubernetes.io/name: starling
"#,
        );
    }
}

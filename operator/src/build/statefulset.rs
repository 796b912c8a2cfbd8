//! The broker StatefulSet. Its pod template carries the config hash, so pods
//! roll only when the ConfigMap (settings that need a restart) or the pod
//! spec itself changes; tokens, ACLs and certificates live in mounted
//! Secrets that the broker reloads live.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::paths;
use super::service::ADMIN_PORT_NAME;
use super::tls::server_secret_name;
use super::{BrokerCtx, keys};
use crate::crd::broker::DEFAULT_IMAGE;

/// Name of the broker container.
pub const CONTAINER: &str = "broker";
/// UID/GID the broker runs as (the distroless "nonroot" user).
pub const RUN_AS: i64 = 65532;

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn secret_volume(name: &str, secret: String) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The StatefulSet; `config_hash` comes from [`super::config::config_map`].
pub fn statefulset(ctx: &BrokerCtx, config_hash: &str) -> StatefulSet {
    let spec = ctx.spec;

    // Environment: only names outside the broker's STARLING_<SECTION>_<KEY>
    // space, which rejects unknown keys.
    let mut env_vars = vec![
        env("RUST_LOG", &spec.telemetry.log),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    if let Some(endpoint) = &spec.telemetry.otlp_endpoint {
        env_vars.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
        env_vars.push(env("OTEL_SERVICE_NAME", &format!("starling-{}", ctx.name)));
    }

    let mut ports: Vec<ContainerPort> = ctx
        .listeners
        .enabled()
        .map(|l| ContainerPort {
            name: Some(l.kind.name().into()),
            container_port: l.container_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some(ADMIN_PORT_NAME.into()),
        container_port: ctx.listeners.admin_port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });

    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into())),
        image_pull_policy: Some(
            spec.image_pull_policy
                .map(|p| p.as_str())
                .unwrap_or("IfNotPresent")
                .into(),
        ),
        args: Some(vec![
            "--config".into(),
            paths::CONFIG_FILE.into(),
            "--auth-bundle".into(),
            paths::BUNDLE_FILE.into(),
            "--data-dir".into(),
            paths::DATA_DIR.into(),
        ]),
        env: Some(env_vars),
        ports: Some(ports),
        startup_probe: Some(probe("/healthz", 2, 30)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("config", paths::CONFIG_DIR, true),
            mount("tls", paths::TLS_DIR, true),
            mount("auth", paths::AUTH_DIR, true),
            mount("admin", paths::ADMIN_DIR, true),
            mount("data", paths::DATA_DIR, false),
        ]),
        ..Container::default()
    };

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ctx.names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("tls", server_secret_name(ctx)),
        secret_volume("auth", ctx.names.bundle_secret()),
        secret_volume("admin", ctx.names.admin_secret()),
    ];
    let claims = if spec.persistence.enabled {
        let mut meta = ctx.meta("data".into(), "data");
        // Claims made from the template belong to the StatefulSet's pods, not the Broker.
        meta.owner_references = None;
        meta.namespace = None;
        Some(vec![PersistentVolumeClaim {
            metadata: meta,
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.persistence.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(spec.persistence.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        }])
    } else {
        volumes.push(Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        None
    };

    let mut pod_labels = ctx.labels("broker");
    for (k, v) in &spec.pod_labels {
        pod_labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let mut pod_annotations = spec.pod_annotations.clone();
    pod_annotations.insert(keys::CONFIG_HASH.into(), config_hash.into());

    StatefulSet {
        metadata: ctx.meta(ctx.names.statefulset(), "broker"),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(ctx.names.headless_service()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(ctx.selector_labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(ctx.names.service_account()),
                    // Service links would put STARLING_* variables in the
                    // environment for a Service named "starling-…", which the
                    // broker would read as config keys.
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    affinity: spec.affinity.clone(),
                    priority_class_name: spec.priority_class_name.clone(),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: claims,
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::BrokerSpec;

    #[test]
    fn default_statefulset_snapshot() {
        let b = broker(
            "demo",
            BrokerSpec {
                image: Some("starling:test".into()),
                ..BrokerSpec::default()
            },
        );
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_yaml(
            &statefulset(&ctx, "0123456789abcdef"),
            r#"
apiVersion: apps/v1
kind: StatefulSet
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
  podManagementPolicy: Parallel
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/instance: demo
      app.kubernetes.io/name: starling
  serviceName: demo-headless
  template:
    metadata:
      annotations:
        starling.dev/config-hash: 0123456789abcdef
      labels:
        app.kubernetes.io/component: broker
        app.kubernetes.io/instance: demo
        app.kubernetes.io/managed-by: starling-operator
        app.kubernetes.io/name: starling
    spec:
      containers:
      - args: [--config, /etc/starling/config/starling.toml, --auth-bundle, /etc/starling/auth/bundle.json, --data-dir, /var/lib/starling]
        env:
        - name: RUST_LOG
          value: info
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        image: starling:test
        imagePullPolicy: IfNotPresent
        livenessProbe:
          failureThreshold: 3
          httpGet:
            path: /healthz
            port: admin
          periodSeconds: 10
          timeoutSeconds: 2
        name: broker
        ports:
        - containerPort: 8883
          name: mqtts
          protocol: TCP
        - containerPort: 8443
          name: https
          protocol: TCP
        - containerPort: 8081
          name: admin
          protocol: TCP
        readinessProbe:
          failureThreshold: 2
          httpGet:
            path: /readyz
            port: admin
          periodSeconds: 5
          timeoutSeconds: 2
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: [ALL]
          readOnlyRootFilesystem: true
          runAsNonRoot: true
        startupProbe:
          failureThreshold: 30
          httpGet:
            path: /healthz
            port: admin
          periodSeconds: 2
          timeoutSeconds: 2
        volumeMounts:
        - mountPath: /etc/starling/config
          name: config
          readOnly: true
        - mountPath: /etc/starling/tls
          name: tls
          readOnly: true
        - mountPath: /etc/starling/auth
          name: auth
          readOnly: true
        - mountPath: /etc/starling/admin
          name: admin
          readOnly: true
        - mountPath: /var/lib/starling
          name: data
          readOnly: false
      enableServiceLinks: false
      securityContext:
        fsGroup: 65532
        runAsGroup: 65532
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile:
          type: RuntimeDefault
      serviceAccountName: demo
      terminationGracePeriodSeconds: 30
      volumes:
      - configMap:
          name: demo-config
        name: config
      - name: tls
        secret:
          defaultMode: 288
          secretName: demo-tls
      - name: auth
        secret:
          defaultMode: 288
          secretName: demo-auth
      - name: admin
        secret:
          defaultMode: 288
          secretName: demo-admin
      - emptyDir: {}
        name: data
"#,
        );
    }

    #[test]
    fn persistence_and_scheduling() {
        let mut spec: BrokerSpec = serde_json::from_value(serde_json::json!({
            "replicas": 3,
            "persistence": {"enabled": true, "size": "5Gi", "storageClassName": "fast"},
            "nodeSelector": {"pool": "mqtt"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mqtt", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "telemetry": {"log": "debug", "otlpEndpoint": "http://otel:4317"},
        }))
        .unwrap();
        spec.image_pull_policy = Some(crate::crd::broker::PullPolicy::Always);
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        let sts = statefulset(&ctx, "h");
        let s = sts.spec.unwrap();
        assert_eq!(s.replicas, Some(3));
        let claims = s.volume_claim_templates.unwrap();
        assert_eq!(
            serde_json::to_value(&claims[0].spec).unwrap(),
            serde_json::json!({
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "5Gi"}},
                "storageClassName": "fast",
            })
        );
        let pod = s.template.spec.unwrap();
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != "data"));
        assert_eq!(pod.node_selector.unwrap()["pool"], "mqtt");
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        let c = &pod.containers[0];
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
            "100m"
        );
        let env = c.env.as_ref().unwrap();
        assert!(env.iter().any(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert!(env.iter().all(|e| !e.name.starts_with("STARLING_")));
        let annotations = s.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations[keys::CONFIG_HASH], "h");
    }
}

//! `Broker`: one Starling MQTT broker (a StatefulSet and everything around it).

// Several `printcolumn(...)` entries repeat keys such as `type_`, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, conditions_schema, k8s_object, k8s_object_list};

/// Image used when `spec.image` is empty: the broker released with this operator.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/starling-mqtt/starling-broker:",
    env!("CARGO_PKG_VERSION")
);

/// A Starling MQTT broker. The operator turns it into a StatefulSet, Services,
/// a ConfigMap with the broker configuration, TLS and auth-bundle Secrets, a
/// PodDisruptionBudget and a ServiceAccount, all owned by this object.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "Broker",
    namespaced,
    status = "BrokerStatus",
    shortname = "br",
    category = "starling",
    // Rules on metadata.name live at the root without a fieldPath: the API
    // server resolves fieldPath against the schema, which has no metadata
    // (it refuses the CRD otherwise); the message names the field instead.
    validation = kube::core::Rule::new("size(self.metadata.name) <= 52")
        .message("metadata.name: a Broker name is at most 52 characters (it names a Service and a StatefulSet, and becomes a label value)"),
    validation = kube::core::Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name: a Broker name is a DNS label: lower-case letters, digits and '-', starting with a letter and ending with a letter or digit"),
    doc = "A Starling MQTT broker: listeners, TLS, limits, persistence and pod settings. Tokens and ACLs refer to it by name.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "MQTTS",
        type_ = "string",
        json_path = ".status.endpoints.mqtts"
    ),
    printcolumn(
        name = "HTTPS",
        type_ = "string",
        json_path = ".status.endpoints.https"
    ),
    printcolumn(
        name = "Tokens",
        type_ = "integer",
        json_path = ".status.tokens",
        priority = 1
    ),
    printcolumn(
        name = "ACLs",
        type_ = "integer",
        json_path = ".status.acls",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Number of broker pods: 1. More would be independent brokers that do
    /// not share messages or sessions, so the API server refuses it until
    /// clustering lands.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    #[x_kube(validation = kube::core::Rule::new("self <= 1")
        .message("replicas > 1 would make independent brokers that do not share messages; until clustering lands use 1"))]
    pub replicas: i32,

    /// Container image of the broker. Default: the broker released with this operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Image pull policy: Always, IfNotPresent or Never. Default: IfNotPresent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "k8s_object_list")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Which listeners run and on which ports.
    #[serde(default)]
    pub listeners: ListenersSpec,

    /// Where the server certificate comes from. Empty: the operator issues one
    /// from its own per-broker CA (and renews it).
    #[serde(default)]
    pub tls: TlsSpec,

    /// How the broker is exposed: the Service carrying mqtts and https.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Connection, packet, queue and topic limits. Unset fields keep the broker's defaults.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Authentication and authorization defaults.
    #[serde(default)]
    pub auth: AuthSpec,

    /// Persistent storage for retained messages and sessions. Fixed once
    /// enabled: a StatefulSet's volumeClaimTemplates cannot change.
    #[serde(default)]
    #[x_kube(validation = kube::core::Rule::new(
        "self == oldSelf || (!(has(self.enabled) && self.enabled) && !(has(oldSelf.enabled) && oldSelf.enabled))"
    ).message(
        "spec.persistence cannot change while persistence is enabled (a StatefulSet's volumeClaimTemplates are immutable): \
         to grow the volume, leave spec.persistence as it is and resize the PersistentVolumeClaim data-<broker>-0 \
         (its StorageClass must allow volume expansion); for another size, class or no volume, delete the Broker and its PVC and create it again"
    ))]
    pub persistence: PersistenceSpec,

    /// Logging and tracing.
    #[serde(default)]
    pub telemetry: TelemetrySpec,

    /// CPU and memory requests and limits of the broker container (core/v1 ResourceRequirements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "k8s_object")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the broker pods must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the broker pods (core/v1 Toleration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "k8s_object_list")]
    pub tolerations: Vec<Toleration>,

    /// Affinity of the broker pods (core/v1 Affinity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "k8s_object")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the broker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Extra annotations on the broker pods (e.g. for scrapers or meshes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Extra labels on the broker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for BrokerSpec {
    /// The same as an empty `spec: {}` after the API server's defaulting.
    fn default() -> Self {
        BrokerSpec {
            replicas: default_replicas(),
            image: None,
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            listeners: ListenersSpec::default(),
            tls: TlsSpec::default(),
            service: ServiceSpec::default(),
            limits: LimitsSpec::default(),
            auth: AuthSpec::default(),
            persistence: PersistenceSpec::default(),
            telemetry: TelemetrySpec::default(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            pod_annotations: BTreeMap::new(),
            pod_labels: BTreeMap::new(),
        }
    }
}

/// Kubernetes image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The broker's listeners. mqtts and https are on by default; the plain
/// mqtt and http listeners are off unless asked for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenersSpec {
    /// MQTT over TLS (MQTT 3.1.1 and 5.0). Default: enabled, port 8883.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtts: Option<ListenerSpec>,
    /// HTTPS: MQTT over WebSocket at /mqtt, the HTTP API under /broker/ and
    /// WebSocket topic streams. Default: enabled, Service port 443, container port 8443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<ListenerSpec>,
    /// Plain MQTT over TCP, without TLS. Default: disabled, port 1883.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<ListenerSpec>,
    /// Plain HTTP, without TLS. Default: disabled, port 1884.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<ListenerSpec>,
    /// Admin REST API, /metrics and the /healthz and /readyz probes. Always
    /// on; reachable through the headless Service only. Default port 8081.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminListenerSpec>,
}

/// One client-facing listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Whether the listener runs. Default depends on the listener (see above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Port on the Service (what clients connect to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Port the broker binds inside the pod. Default: the Service port, or
    /// 8443 when that port is privileged (below 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub container_port: Option<i32>,
}

/// The admin listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdminListenerSpec {
    /// Port of the admin API inside the pod (and on the headless Service). Default 8081.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<i32>,
}

/// Source of the server certificate. At most one of certManager and secretRef.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.certManager) && has(self.secretRef))")
    .message("tls.certManager and tls.secretRef are exclusive: pick one certificate source"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.certManager) || !has(self.certManager.inClusterNames) || self.certManager.inClusterNames || (has(self.dnsNames) && size(self.dnsNames) > 0)")
    .message("tls.certManager.inClusterNames: false needs at least one name in tls.dnsNames, the only names the certificate will have"))]
pub struct TlsSpec {
    /// Have cert-manager issue the certificate (a cert-manager Certificate is
    /// created, owned by the Broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerSpec>,
    /// Use an existing Secret of type kubernetes.io/tls (keys tls.crt, tls.key
    /// and, if clients need it, ca.crt). The broker reloads it when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretNameRef>,
    /// Extra DNS names (or IP addresses) for the certificate, e.g. the public
    /// name of a LoadBalancer. The in-cluster Service names are always included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub dns_names: Vec<String>,
}

/// cert-manager settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerSpec {
    /// The Issuer or ClusterIssuer that signs the certificate.
    pub issuer_ref: IssuerRef,
    /// Certificate lifetime as a Go duration (e.g. 2160h). Default: cert-manager's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// How long before expiry cert-manager renews (e.g. 360h). Default: cert-manager's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    /// Request the in-cluster Service names (`<broker>.<ns>.svc`,
    /// `*.<broker>-headless.<ns>.svc.cluster.local`, ...) as well as
    /// `tls.dnsNames`. Default true. Set false for public ACME issuers, which
    /// refuse in-cluster names: the certificate then has only `tls.dnsNames`
    /// (at least one required), and in-cluster clients must connect by one of
    /// those names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_cluster_names: Option<bool>,
}

/// Reference to a cert-manager issuer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Issuer or ClusterIssuer. Default: Issuer.
    #[serde(default = "default_issuer_kind")]
    pub kind: String,
    /// API group of the issuer. Default: cert-manager.io.
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

impl CertManagerSpec {
    /// Whether the in-cluster Service names are requested (default true).
    pub fn in_cluster_names(&self) -> bool {
        self.in_cluster_names.unwrap_or(true)
    }
}

fn default_issuer_kind() -> String {
    "Issuer".into()
}

fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

/// Reference to a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SecretNameRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The client-facing Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || (has(self.type) && self.type == 'LoadBalancer')")
    .message("loadBalancerSourceRanges needs service type LoadBalancer"))]
pub struct ServiceSpec {
    /// ClusterIP, NodePort or LoadBalancer. Default: ClusterIP.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations on the Service (cloud load balancer settings, external-dns, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Load balancer implementation class (spec.loadBalancerClass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    /// CIDRs allowed to reach a LoadBalancer Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    /// Cluster or Local (keep client source addresses). Only for NodePort and LoadBalancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Service external traffic policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// Broker limits. Every field is optional; unset means the broker default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Concurrent client connections per pod. Broker default: 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i64>,
    /// Largest MQTT packet (and so payload) in bytes. Broker default: 1048576 (1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 128, max = 268435455))]
    pub max_packet_size: Option<i64>,
    /// Keepalive cap in seconds (0 disables the cap). Broker default: 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub max_keepalive: Option<i32>,
    /// QoS 1/2 messages in flight per client and direction. Broker default: 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_inflight: Option<i32>,
    /// Messages queued per session beyond the inflight window. Broker default: 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queued_messages: Option<i64>,
    /// Payload bytes queued per session. Broker default: 16777216 (16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queued_bytes: Option<i64>,
    /// Upper bound for MQTT 5 session expiry, in seconds. Broker default: 604800 (7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967295_i64))]
    pub max_session_expiry: Option<i64>,
    /// Longest topic accepted on every protocol, in characters. Default: no limit for MQTT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_topic_length: Option<i64>,
    /// Characters allowed in topics besides ASCII letters and digits, e.g. "/-_.".
    /// Default: any valid UTF-8 topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_topic_chars: Option<String>,
}

/// Authentication defaults of the broker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Whether clients without a token may connect: deny (default), allow, or
    /// loopback (only from inside the pod, e.g. a sidecar).
    #[serde(default)]
    pub anonymous: AnonymousAccess,
    /// What a token may do when no ACL rule matches: deny (default) or allow.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
}

/// Anonymous access.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousAccess {
    #[default]
    Deny,
    Allow,
    Loopback,
}

/// Decision when no ACL rule matches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Deny,
    Allow,
}

/// Persistent storage (a PersistentVolumeClaim per pod).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceSpec {
    /// Keep retained messages and persistent sessions on a volume. Default: false
    /// (an emptyDir: state survives container restarts but not pod deletion).
    #[serde(default)]
    pub enabled: bool,
    /// Volume size. Default 1Gi. Fixed once enabled: to grow the volume,
    /// resize its PersistentVolumeClaim (data-<broker>-0) if the storage class allows expansion.
    #[serde(default = "default_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the volume. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for PersistenceSpec {
    fn default() -> Self {
        PersistenceSpec {
            enabled: false,
            size: default_size(),
            storage_class_name: None,
        }
    }
}

fn default_size() -> String {
    "1Gi".into()
}

/// Logging and tracing of the broker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// Log filter in RUST_LOG syntax. Default: info.
    #[serde(default = "default_log")]
    #[schemars(length(min = 1))]
    pub log: String,
    /// OTLP/HTTP (protobuf) endpoint for traces and metrics
    /// (OTEL_EXPORTER_OTLP_ENDPOINT), e.g.
    /// http://otel-collector.observability:4318; gRPC is not spoken.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        TelemetrySpec {
            log: default_log(),
            otlp_endpoint: None,
        }
    }
}

fn default_log() -> String {
    "info".into()
}

/// Observed state of a Broker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded, with reasons and messages.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// In-cluster URLs of the enabled listeners.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// Pods the StatefulSet has.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the broker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Tokens in this broker's auth bundle.
    #[serde(default)]
    pub tokens: i32,
    /// ACLs in this broker's auth bundle.
    #[serde(default)]
    pub acls: i32,
    /// When the server certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at: Option<String>,
    /// Hash of the settings that need a pod restart (also on the pod template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

//! `Token`: a named secret that lets clients connect to one Broker.

// Several `printcolumn(...)` entries repeat keys such as `type_`, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{BrokerRef, Condition, conditions_schema};

/// A token for one Broker. Clients connect with username = the token's name
/// (or the broker's name, or `authorization`) and password = the secret.
/// Without `secretRef` the operator generates the secret once and keeps it.
/// Either way it writes a credentials Secret owned by the Token.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "Token",
    namespaced,
    status = "TokenStatus",
    shortname = "tok",
    category = "starling",
    validation = kube::core::Rule::new("!has(self.spec.secretRef) || self.spec.secretRef.name != self.metadata.name + '-credentials'")
        .message("spec.secretRef must not name the credentials Secret the operator writes (<token>-credentials)")
        .field_path(".spec.secretRef.name"),
    // No fieldPath on a metadata.name rule: the API server resolves it
    // against the schema, which has no metadata (see broker.rs).
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name: a Token name is at most 63 characters (it becomes a label value)"),
    doc = "A client token for a Starling Broker; its labels can be matched by ACL tokenSelectors.",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// The Broker (same namespace) this token is for. Cannot be changed; make a new Token instead.
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("brokerRef cannot be changed"))]
    pub broker_ref: BrokerRef,

    /// Free text shown to humans: what or who uses this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// When the token stops working (RFC 3339, e.g. 2027-01-01T00:00:00Z).
    /// Connections using it are closed at that time. Default: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: Option<String>,

    /// Switch the token off without deleting it; its connections are closed.
    #[serde(default)]
    pub disabled: bool,

    /// Bring your own secret value (for GitOps with sealed or external secrets):
    /// a key of a Secret in this namespace. The value must be at least 16
    /// characters without whitespace. Without it the operator generates a
    /// 256-bit secret once and keeps it in the credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the Token's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret holding the token secret. Default: password.
    #[serde(default = "default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_key() -> String {
    "password".into()
}

/// Observed state of a Token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (usable: credentials written, not expired or disabled), Progressing, Degraded.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The Secret holding username, password, mqtts-url, https-url and ca.crt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the token expires (RFC 3339), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

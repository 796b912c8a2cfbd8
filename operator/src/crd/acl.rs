//! `ACL`: publish/subscribe rules for some of a Broker's tokens.

// Several `printcolumn(...)` entries repeat keys such as `type_`, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{BrokerRef, Condition, conditions_schema};

/// A valid MQTT topic filter: levels split by `/`, `+` alone in a level, `#`
/// alone in the last level, no NUL. Kept in sync with
/// `starling_model::topic::validate_filter` by a test.
pub const TOPIC_FILTER_PATTERN: &str = r"^(([^/+#\x00]*|\+)/)*([^/+#\x00]*|\+|#)$";

/// Rules that let some tokens publish and/or subscribe on topic filters.
/// Deny wins over allow; a token with no matching allow gets the Broker's
/// default policy. Merged into the Broker's auth bundle; brokers apply changes
/// without restarting.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "starling.dev",
    version = "v1alpha1",
    kind = "ACL",
    root = "Acl",
    plural = "acls",
    singular = "acl",
    namespaced,
    status = "AclStatus",
    shortname = "sacl",
    category = "starling",
    doc = "Access rules for a Starling Broker: which tokens may publish and subscribe on which topic filters.",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(
        name = "Tokens",
        type_ = "integer",
        json_path = ".status.matchedTokens"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("size(self.tokens) > 0 || has(self.tokenSelector) || (has(self.anonymous) && self.anonymous)")
    .message("name some tokens, give a tokenSelector or set anonymous: true"))]
pub struct AclSpec {
    /// The Broker (same namespace) whose tokens this ACL governs. Cannot be changed.
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("brokerRef cannot be changed"))]
    pub broker_ref: BrokerRef,

    /// Names of Tokens (same namespace) this ACL applies to.
    #[serde(default)]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 253)))]
    pub tokens: Vec<String>,

    /// Tokens whose labels match this selector also get these rules. An empty
    /// selector ({}) matches every token of the Broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_selector: Option<TokenSelector>,

    /// Also apply these rules to clients that connect without a token (when
    /// the Broker admits anonymous clients at all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,

    /// The rules, applied together. Deny wins over allow.
    #[schemars(length(min = 1, max = 1000))]
    pub rules: Vec<AclRule>,
}

/// A label selector over Tokens. Only `matchLabels` for now: the auth bundle
/// the broker evaluates carries label equality only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TokenSelector {
    /// Labels a token must all carry with exactly these values. Empty: every
    /// token of the Broker.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One MQTT topic filter in an ACL rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct TopicFilter(pub String);

impl JsonSchema for TopicFilter {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TopicFilter".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An MQTT topic filter: levels split by '/', '+' for one whole level, '#' for the rest (last level only).",
            "type": "string",
            "minLength": 1,
            "maxLength": 4096,
            "pattern": TOPIC_FILTER_PATTERN,
            "x-kubernetes-validations": [{
                "rule": "!self.startsWith('$share/')",
                "message": "rules apply to the filter inside a shared subscription; drop the \"$share/<group>/\" prefix",
            }],
        })
    }
}

/// One rule: an effect for some actions on some topic filters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AclRule {
    /// MQTT topic filters (`+` one level, `#` the rest). A subscription is
    /// allowed only if one allowed filter covers it entirely.
    #[schemars(length(min = 1, max = 100))]
    pub topics: Vec<TopicFilter>,
    /// What the rule is about: publish, subscribe, or both.
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    pub actions: Vec<AclAction>,
    /// allow (default) or deny.
    #[serde(default)]
    pub effect: AclEffect,
}

/// An action a rule covers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    Publish,
    Subscribe,
}

/// A rule's effect.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AclEffect {
    #[default]
    Allow,
    Deny,
}

/// Observed state of an ACL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AclStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (valid and in the Broker's bundle) or Degraded (with the rule at fault).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Number of rules.
    #[serde(default)]
    pub rules: i32,
    /// Number of existing Tokens this ACL applies to.
    #[serde(default)]
    pub matched_tokens: i32,
}

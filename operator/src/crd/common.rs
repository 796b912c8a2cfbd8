//! Pieces shared by the three kinds: references, conditions and schema helpers.

use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Names the Broker (in the same namespace) that a Token or ACL belongs to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct BrokerRef {
    /// Name of a Broker in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Status of a condition: "True", "False" or "Unknown".
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One aspect of an object's state, in the shape of Kubernetes'
/// `metav1.Condition` (so `kubectl wait --for=condition=Ready` works).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: Ready, Progressing or Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The condition types every Starling resource reports.
pub mod types {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
}

impl Condition {
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.into(),
            status: if status {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: reason.into(),
            message: message.into(),
            last_transition_time: String::new(),
            observed_generation: None,
        }
    }
}

/// Merges freshly computed conditions into the previous ones: a condition
/// whose status did not change keeps its `lastTransitionTime`, so writing the
/// same state twice changes nothing. `now` is RFC 3339.
pub fn merge_conditions(
    previous: &[Condition],
    fresh: Vec<Condition>,
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    fresh
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.to_string());
            c
        })
        .collect()
}

/// The status of condition `type_`, if present.
pub fn condition_is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::True)
}

/// Schema for a field holding a Kubernetes core type (resources, affinity,
/// tolerations): the API server validates these itself when the pod is
/// created, so the CRD keeps them open instead of copying their schemas.
pub fn k8s_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Like [`k8s_object`], for lists of Kubernetes core objects.
pub fn k8s_object_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

/// `conditions` as a list map keyed by type, as Kubernetes conventions ask.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let first = merge_conditions(
            &[],
            vec![Condition::new(types::READY, true, "Ok", "")],
            Some(1),
            "2026-01-01T00:00:00Z",
        );
        let second = merge_conditions(
            &first,
            vec![Condition::new(types::READY, true, "Ok", "")],
            Some(2),
            "2026-01-02T00:00:00Z",
        );
        assert_eq!(second[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(second[0].observed_generation, Some(2));
        let third = merge_conditions(
            &second,
            vec![Condition::new(types::READY, false, "Broken", "x")],
            Some(2),
            "2026-01-03T00:00:00Z",
        );
        assert_eq!(third[0].last_transition_time, "2026-01-03T00:00:00Z");
        assert!(!condition_is_true(&third, types::READY));
    }
}

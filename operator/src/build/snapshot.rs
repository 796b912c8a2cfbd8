//! Test helpers: sample resources and snapshot comparison that never shows
//! secret material.

use kube::api::ObjectMeta;
use serde::Serialize;
use serde_json::Value;

use crate::crd::{Broker, BrokerSpec};

/// A Broker as the API server would hand it over: namespace, uid, generation.
pub fn broker(name: &str, spec: BrokerSpec) -> Broker {
    Broker {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// The object as JSON with every Secret value replaced by its length, so
/// snapshots show which keys exist but never what they hold.
pub fn redacted<T: Serialize>(obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).expect("test objects serialize");
    if v.get("kind").and_then(Value::as_str) == Some("Secret") {
        for field in ["data", "stringData"] {
            if let Some(Value::Object(map)) = v.get_mut(field) {
                for (_, val) in map.iter_mut() {
                    *val = Value::String("<redacted>".into());
                }
            }
        }
    }
    v
}

/// Compares `obj` (redacted) with the YAML `expected`; on mismatch prints
/// the actual YAML so the snapshot can be reviewed and updated.
#[track_caller]
pub fn assert_yaml<T: Serialize>(obj: &T, expected: &str) {
    let actual = redacted(obj);
    let expected: Value = serde_saphyr::from_str(expected).expect("snapshot is valid YAML");
    if actual != expected {
        let shown = serde_saphyr::to_string(&actual).unwrap_or_default();
        panic!("snapshot mismatch; actual object:\n{shown}");
    }
}

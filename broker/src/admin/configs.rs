//! Setting the configuration over the admin API: one decision for NanoMQ's
//! req 12 and EMQX's `PUT /api/v4/configs`, which only wrap it in their own
//! envelopes. Fields are named as in the req 11 / `GET /api/v4/configs`
//! view. The configuration is read once at startup and nothing in it can
//! change live yet, so every known field that differs from the running
//! value is reported as needing a restart; an unknown field refuses the
//! whole request with nothing applied, so a typo is never silently ignored.

use serde_json::{Map, Value};

use crate::server::Shared;

/// What a configuration request did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigChange {
    /// Fields now in force (none so far: see the module comment).
    pub applied: Vec<String>,
    /// Fields that differ from the running value and take a restart.
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigRefusal {
    #[error("unknown configuration fields {}; nothing was applied", .0.join(", "))]
    Unknown(Vec<String>),
}

pub fn change(shared: &Shared, data: &Map<String, Value>) -> Result<ConfigChange, ConfigRefusal> {
    decide(data, &super::nanomq::get_config(shared))
}

/// The pure part: `data` against the current view.
pub fn decide(data: &Map<String, Value>, current: &Value) -> Result<ConfigChange, ConfigRefusal> {
    let mut unknown = Vec::new();
    let mut restart = Vec::new();
    diff("", data, current, &mut unknown, &mut restart);
    if !unknown.is_empty() {
        return Err(ConfigRefusal::Unknown(unknown));
    }
    Ok(ConfigChange {
        applied: Vec::new(),
        restart_required: restart,
    })
}

/// NanoMQ fields accepted without a counterpart (they tune NanoMQ's own
/// threads or features we do not have): ignored, not refused, so NanoMQ
/// scripts keep working.
const IGNORED: &[&str] = &[
    "num_taskq_thread",
    "max_taskq_thread",
    "parallel",
    "qos_duration",
    "daemon",
    "bridge",
    "tls.key",
    "tls.cert",
    "tls.cacert",
    "tls.key_password",
    "tls.keypass",
    "http_server.password",
    "http_server.auth_type",
];

fn diff(
    prefix: &str,
    new: &Map<String, Value>,
    cur: &Value,
    unknown: &mut Vec<String>,
    restart: &mut Vec<String>,
) {
    for (k, v) in new {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if IGNORED.contains(&path.as_str()) {
            continue;
        }
        match (v, cur.get(k)) {
            (_, None) => unknown.push(path),
            (Value::Object(inner), Some(c @ Value::Object(_))) if path != "starling" => {
                diff(&path, inner, c, unknown, restart)
            }
            (v, Some(c)) if v != c => restart.push(path),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn differences_need_a_restart_and_equal_values_nothing() {
        let cur = json!({"msq_len": 10, "tls": {"enable": false}, "starling": {"a": 1}});
        let got = decide(
            &obj(json!({"msq_len": 11, "tls": {"enable": false}, "num_taskq_thread": 4})),
            &cur,
        )
        .unwrap();
        assert_eq!(got.restart_required, vec!["msq_len".to_string()]);
        assert!(got.applied.is_empty());
        let whole = decide(&obj(json!({"starling": {"a": 2}})), &cur).unwrap();
        assert_eq!(whole.restart_required, vec!["starling".to_string()]);
    }

    #[test]
    fn unknown_fields_refuse_everything() {
        let cur = json!({"msq_len": 10, "tls": {"enable": false}});
        let e = decide(
            &obj(json!({"msq_len": 11, "tls": {"nope": 1}, "x": 0})),
            &cur,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ConfigRefusal::Unknown(vec!["tls.nope".into(), "x".into()])
        );
        assert!(e.to_string().contains("tls.nope, x; nothing was applied"));
    }
}

//! Setting the configuration over the admin API: one decision for NanoMQ's
//! req 12 and EMQX's `PUT /api/v4/configs`, which only wrap it in their own
//! envelopes. Fields are named as in the req 11 / `GET /api/v4/configs`
//! view. `[limits]` changes live (`starling.limits.*`, and NanoMQ's
//! `msq_len` and `max_packet_size`): each limit applies where it is next
//! read — new connections get the new negotiated limits (a connected
//! client keeps what it was told in its CONNACK), new sessions the new
//! queue caps, the retained store its caps at once. Every other field that
//! differs from the running value is reported as needing a restart. An
//! unknown field or an invalid value refuses the whole request with
//! nothing applied, so a typo is never silently ignored.

use serde_json::{Map, Value};
use starling_model::config::Limits;

use crate::server::Shared;

/// What a configuration request did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigChange {
    /// Fields now in force.
    pub applied: Vec<String>,
    /// Fields that differ from the running value and take a restart.
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigRefusal {
    #[error("unknown configuration fields {}; nothing was applied", .0.join(", "))]
    Unknown(Vec<String>),
    #[error("{0}; nothing was applied")]
    Invalid(String),
}

/// `[limits]` fields that stay as they were until a restart: the topic
/// index is sized with it at startup.
const RESTART_LIMITS: &[&str] = &["max_shared_groups"];

/// NanoMQ's names for live limits.
const ALIASES: &[(&str, &str)] = &[
    ("msq_len", "max_queued_messages"),
    ("max_packet_size", "max_packet_size"),
];

pub fn change(shared: &Shared, data: &Map<String, Value>) -> Result<ConfigChange, ConfigRefusal> {
    let limits = shared.limits();
    let (change, new) = plan(data, &super::nanomq::get_config(shared), &limits)?;
    if let Some(new) = new {
        let mut whole = shared.config.clone();
        whole.limits = new.clone();
        whole
            .validate()
            .map_err(|e| ConfigRefusal::Invalid(e.to_string()))?;
        shared.set_limits(new);
        tracing::info!(fields = ?change.applied, "limits changed through the admin API");
    }
    Ok(change)
}

/// The pure part: `data` against the current view and limits; the new
/// limits if any live field changed.
pub fn plan(
    data: &Map<String, Value>,
    current: &Value,
    limits: &Limits,
) -> Result<(ConfigChange, Option<Limits>), ConfigRefusal> {
    let mut c = decide(data, current)?;
    let mut live = serde_json::to_value(limits).unwrap_or(Value::Null);
    let mut changed = false;
    let mut restart = Vec::new();
    for path in std::mem::take(&mut c.restart_required) {
        let field = path.strip_prefix("starling.limits.").or_else(|| {
            ALIASES
                .iter()
                .find(|(alias, _)| *alias == path)
                .map(|(_, f)| *f)
        });
        let value = lookup(data, &path);
        match (field, value) {
            (Some(f), Some(v)) if !RESTART_LIMITS.contains(&f) => {
                if let Some(obj) = live.as_object_mut() {
                    obj.insert(f.to_owned(), v.clone());
                }
                changed = true;
                c.applied.push(path);
            }
            _ => restart.push(path),
        }
    }
    c.restart_required = restart;
    if !changed {
        return Ok((c, None));
    }
    let new: Limits = serde_json::from_value(live)
        .map_err(|e| ConfigRefusal::Invalid(format!("a limit has an invalid value ({e})")))?;
    Ok((c, Some(new)))
}

fn lookup<'a>(data: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = data.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

/// Which known fields differ from `current`; unknown ones refuse.
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
            (Value::Object(inner), Some(c @ Value::Object(_))) => {
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
        assert_eq!(whole.restart_required, vec!["starling.a".to_string()]);
    }

    fn view(l: &Limits) -> Value {
        json!({"msq_len": l.max_queued_messages, "max_packet_size": l.max_packet_size,
               "starling": {"limits": serde_json::to_value(l).unwrap(), "mqtt": {"bind": "x"}}})
    }

    #[test]
    fn limits_apply_live_and_the_rest_needs_a_restart() {
        let l = Limits::default();
        let (c, new) = plan(
            &obj(json!({"msq_len": 5, "starling": {"limits": {"max_connections": 7, "max_shared_groups": 3},
                                                  "mqtt": {"bind": "y"}}})),
            &view(&l),
            &l,
        )
        .unwrap();
        let new = new.unwrap();
        assert_eq!((new.max_queued_messages, new.max_connections), (5, 7));
        assert_eq!(new.max_shared_groups, l.max_shared_groups, "not live");
        assert_eq!(c.applied, ["msq_len", "starling.limits.max_connections"]);
        assert_eq!(
            c.restart_required,
            ["starling.limits.max_shared_groups", "starling.mqtt.bind"]
        );
        let (c, new) = plan(
            &obj(json!({"msq_len": l.max_queued_messages})),
            &view(&l),
            &l,
        )
        .unwrap();
        assert!(
            new.is_none() && c.applied.is_empty(),
            "equal values change nothing"
        );
    }

    #[test]
    fn an_invalid_limit_refuses_everything() {
        let l = Limits::default();
        let e = plan(
            &obj(json!({"starling": {"limits": {"max_connections": "many"}}})),
            &view(&l),
            &l,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigRefusal::Invalid(_)), "{e}");
        assert!(e.to_string().ends_with("nothing was applied"));
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

//! Reading a `/broker/` or stream request line: the topic from the path and
//! the options from the query. Pure functions, so every rule is unit-tested
//! without a socket.

use std::time::Duration;

use starling_codec::QoS;
use starling_model::topic::{self, TopicError, TopicPolicy};

use super::error::ApiError;

/// What the topic of a request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// POST and publishing streams: a topic name, no wildcards.
    Name,
    /// GET and streams: a filter (wildcards allowed, no `$share/`).
    Filter,
}

/// The topic a path stands for: percent-decoding first, then `@` → `#` and
/// `*` → `+` (browsers and HTTP tools eat a literal `#` as the fragment).
/// `%40` is therefore `#` too: the substitution applies to decoded text,
/// as shiftr.io's documentation implies.
pub fn topic_from_path(tail: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(tail)
        .decode_utf8()
        .map_err(|_| {
            ApiError::bad(
                "topic_encoding",
                "the topic is not valid UTF-8 after percent-decoding",
            )
        })?;
    Ok(decoded
        .chars()
        .map(|c| match c {
            '@' => '#',
            '*' => '+',
            c => c,
        })
        .collect())
}

/// Checks a request topic against the HTTP limits (length and characters,
/// shiftr.io's by default), the level limit and MQTT's own rules.
pub fn check_topic(
    t: &str,
    kind: TopicKind,
    policy: &TopicPolicy,
    max_levels: usize,
) -> Result<(), ApiError> {
    let err = |e: TopicError| {
        let rule = match e {
            TopicError::TooLong { .. } => "max_topic_length",
            TopicError::ForbiddenChar(_) => "allowed_chars",
            TopicError::TooManyLevels { .. } => "max_topic_levels",
            TopicError::WildcardInName => "wildcard",
            TopicError::Empty => "topic_empty",
            _ => "topic_format",
        };
        ApiError::bad(rule, format!("{e}."))
    };
    if t.is_empty() {
        return Err(err(TopicError::Empty));
    }
    match kind {
        TopicKind::Name => {
            policy.check(t).map_err(err)?;
            if t.contains(['+', '#']) {
                return Err(ApiError::bad(
                    "wildcard",
                    "a message cannot be published to a topic filter; remove '+', '#', '*' and '@' from the topic.",
                ));
            }
            topic::validate_name(t).map_err(err)?;
        }
        TopicKind::Filter => {
            policy.check_filter(t).map_err(err)?;
            if t.starts_with("$share/") {
                return Err(ApiError::bad(
                    "topic_format",
                    "shared subscriptions ($share/...) are for MQTT clients only.",
                ));
            }
            topic::validate_filter(t).map_err(err)?;
        }
    }
    topic::check_levels(t, max_levels).map_err(err)
}

/// How a stream sends messages to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    /// The payload as published: a text frame if it is UTF-8, else binary.
    #[default]
    Raw,
    /// A JSON text frame with topic, payload, QoS and retain flag.
    Json,
}

/// The query options of one request, after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub retained: bool,
    pub qos: QoS,
    /// `?wait=` as given; `None` means the configured default.
    pub wait: Option<Duration>,
    pub access_token: Option<String>,
    pub envelope: Envelope,
    pub pub_states: bool,
}

/// Which options a route takes; any other is a 400, so a typo (`?retain=1`
/// on a GET) is not silently ignored.
pub const GET_OPTIONS: &[&str] = &["retained", "wait", "access_token"];
pub const POST_OPTIONS: &[&str] = &["retained", "qos", "access_token"];
pub const STREAM_OPTIONS: &[&str] = &["access_token", "envelope", "pubStates", "qos"];

fn flag(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::bad(
            "query",
            format!("{name} must be true or false (or 1 or 0)."),
        )),
    }
}

/// Parses the query string, allowing only the options in `allowed`.
pub fn parse_params(
    query: Option<&str>,
    allowed: &[&str],
    max_wait: Duration,
) -> Result<Params, ApiError> {
    let mut p = Params::default();
    let Some(q) = query else {
        return Ok(p);
    };
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        if !allowed.contains(&&*k) {
            let shown: String = k.chars().take(32).collect();
            return Err(ApiError::bad(
                "query",
                format!(
                    "unknown query parameter {shown:?}; this route takes {}.",
                    allowed.join(", ")
                ),
            ));
        }
        match &*k {
            "retained" => p.retained = flag("retained", &v)?,
            "pubStates" => p.pub_states = flag("pubStates", &v)?,
            "qos" => {
                p.qos = match &*v {
                    "0" => QoS::AtMostOnce,
                    "1" => QoS::AtLeastOnce,
                    "2" => QoS::ExactlyOnce,
                    _ => return Err(ApiError::bad("qos", "qos must be 0, 1 or 2.")),
                }
            }
            "wait" => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        ApiError::bad(
                            "wait",
                            "wait must be a number of seconds, such as 5 or 0.5.",
                        )
                    })?;
                if secs > max_wait.as_secs_f64() {
                    return Err(ApiError::bad(
                        "max_wait",
                        format!("wait may be at most {} seconds.", max_wait.as_secs()),
                    ));
                }
                p.wait = Some(Duration::from_secs_f64(secs));
            }
            "access_token" => p.access_token = Some(v.into_owned()),
            "envelope" => {
                p.envelope = match &*v {
                    "json" => Envelope::Json,
                    "raw" | "none" => Envelope::Raw,
                    _ => return Err(ApiError::bad("envelope", "envelope must be json or raw.")),
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> TopicPolicy {
        starling_model::config::WebConfig::default().policy()
    }

    fn rule(r: Result<impl std::fmt::Debug, ApiError>) -> &'static str {
        r.err().map_or("ok", |e| e.rule())
    }

    #[test]
    fn paths_become_topics() {
        assert_eq!(topic_from_path("foo/bar").unwrap(), "foo/bar");
        assert_eq!(topic_from_path("foo/@").unwrap(), "foo/#");
        assert_eq!(topic_from_path("foo/*/x").unwrap(), "foo/+/x");
        assert_eq!(topic_from_path("foo/%40").unwrap(), "foo/#");
        assert_eq!(topic_from_path("a%2Fb").unwrap(), "a/b");
        assert_eq!(topic_from_path("caf%C3%A9").unwrap(), "café");
        assert_eq!(rule(topic_from_path("bad%FF")), "topic_encoding");
    }

    #[test]
    fn topic_rules() {
        let w = web();
        let ok = |t: &str, k| check_topic(t, k, &w, 128);
        assert_eq!(rule(ok("foo/bar", TopicKind::Name)), "ok");
        assert_eq!(rule(ok("a.b,c:d;e-f_g$h/1", TopicKind::Name)), "ok");
        assert_eq!(rule(ok("foo/+", TopicKind::Filter)), "ok");
        assert_eq!(rule(ok("foo/#", TopicKind::Filter)), "ok");
        assert_eq!(rule(ok("foo/+", TopicKind::Name)), "wildcard");
        assert_eq!(rule(ok("foo/#", TopicKind::Name)), "wildcard");
        assert_eq!(rule(ok("", TopicKind::Name)), "topic_empty");
        assert_eq!(rule(ok("a b", TopicKind::Name)), "allowed_chars");
        assert_eq!(rule(ok("café", TopicKind::Filter)), "allowed_chars");
        assert_eq!(rule(ok(&"a".repeat(128), TopicKind::Name)), "ok");
        assert_eq!(
            rule(ok(&"a".repeat(129), TopicKind::Name)),
            "max_topic_length"
        );
        assert_eq!(rule(ok("a/#/b", TopicKind::Filter)), "topic_format");
        assert_eq!(rule(ok("$share/g/a", TopicKind::Filter)), "topic_format");
        let deep = "a/".repeat(10) + "a";
        assert_eq!(
            rule(check_topic(&deep, TopicKind::Name, &w, 10)),
            "max_topic_levels"
        );
    }

    #[test]
    fn query_options() {
        let max = Duration::from_secs(60);
        let p = parse_params(Some("retained=true&qos=2"), POST_OPTIONS, max).unwrap();
        assert!(p.retained);
        assert_eq!(p.qos, QoS::ExactlyOnce);
        let p = parse_params(Some("wait=0.5&access_token=a%2Bb"), GET_OPTIONS, max).unwrap();
        assert_eq!(p.wait, Some(Duration::from_millis(500)));
        assert_eq!(p.access_token.as_deref(), Some("a+b"));
        let p = parse_params(Some("envelope=json&pubStates=1"), STREAM_OPTIONS, max).unwrap();
        assert_eq!((p.envelope, p.pub_states), (Envelope::Json, true));
        assert_eq!(
            parse_params(None, GET_OPTIONS, max).unwrap(),
            Params::default()
        );
        assert_eq!(rule(parse_params(Some("qos=3"), POST_OPTIONS, max)), "qos");
        assert_eq!(
            rule(parse_params(Some("retained=yes"), POST_OPTIONS, max)),
            "query"
        );
        assert_eq!(rule(parse_params(Some("qos=1"), GET_OPTIONS, max)), "query");
        assert_eq!(
            rule(parse_params(Some("pubStates=1"), POST_OPTIONS, max)),
            "query"
        );
        assert_eq!(
            rule(parse_params(Some("wait=61"), GET_OPTIONS, max)),
            "max_wait"
        );
        assert_eq!(
            rule(parse_params(Some("wait=-1"), GET_OPTIONS, max)),
            "wait"
        );
        assert_eq!(
            rule(parse_params(Some("wait=NaN"), GET_OPTIONS, max)),
            "wait"
        );
        assert_eq!(
            rule(parse_params(Some("envelope=xml"), STREAM_OPTIONS, max)),
            "envelope"
        );
    }
}

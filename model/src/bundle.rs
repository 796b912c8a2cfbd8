//! The auth bundle: tokens (hashed) and ACLs for one broker, as one versioned
//! JSON document. The operator writes it into a Secret, the broker reads it
//! from `--auth-bundle FILE`; defining it here keeps the two from drifting.
//! The format is documented for humans in `docs/auth-bundle.md`.
//!
//! The bundle is security policy, so it fails closed: unknown fields, an
//! unknown version or any invalid entry reject the *whole* document (a
//! misspelt `disabled` must not leave a token enabled), and the broker keeps
//! the bundle it had. Errors name the offending entry by index and name but
//! never echo a secret or the hash key.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::token::{self, HashKey, KeyError};
use crate::topic::{self, TopicError};

/// The only bundle version this build reads and writes.
pub const BUNDLE_VERSION: u32 = 1;

/// MQTT username that means "identify the token by its secret alone"
/// (EVRYTHNG style), like the broker's own name.
pub const AUTHORIZATION_USERNAME: &str = "authorization";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthBundle {
    /// Always [`BUNDLE_VERSION`]; checked before anything else so that a
    /// bundle from a newer operator fails with a clear message.
    pub version: u32,
    /// The broker's name; also accepted as MQTT username for any token.
    pub broker: String,
    /// HMAC key for `secret_hash` (standard base64, at least 16 bytes).
    pub hash_key: String,
    /// What happens when no ACL rule allows an action. Absent: deny when the
    /// bundle has any token, allow when it has none (an empty bundle is a
    /// development setup, not a lock-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_policy: Option<Effect>,
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    #[serde(default)]
    pub acls: Vec<AclEntry>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Unique within the bundle; accepted as MQTT username for this token.
    pub name: String,
    /// Base64 of HMAC-SHA256(hash_key, secret).
    pub secret_hash: String,
    /// For people reading the bundle or the admin API's token list; the
    /// broker does not act on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339; the token stops working at this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Matched by ACL selectors (the Token resource's labels in Kubernetes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Redacted: bundles end up in logs and error chains, and the key (with a
/// hash) is what a guesser needs.
impl std::fmt::Debug for AuthBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthBundle")
            .field("version", &self.version)
            .field("broker", &self.broker)
            .field("hash_key", &"<redacted>")
            .field("default_policy", &self.default_policy)
            .field("tokens", &self.tokens)
            .field("acls", &self.acls)
            .finish()
    }
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("secret_hash", &"<redacted>")
            .field("description", &self.description)
            .field("expires_at", &self.expires_at)
            .field("disabled", &self.disabled)
            .field("labels", &self.labels)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    /// Unique within the bundle; named in refusal logs.
    pub name: String,
    /// Token names this ACL applies to. Names that are not in the bundle are
    /// ignored (a deleted Token must not block every other change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<String>,
    /// Also applies to every token whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Also applies to clients without a token (as mosquitto's rules for
    /// anonymous users do), so a broker that admits anonymous clients can
    /// still fence topics off from them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub anonymous: bool,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LabelSelector {
    /// Every pair must be present on the token. Empty selects every token,
    /// as an empty Kubernetes label selector does.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Topic filters (wildcards allowed, no `$share/` prefix).
    pub topics: Vec<String>,
    pub actions: Vec<Action>,
    pub effect: Effect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BundleError {
    #[error("auth bundle is not valid: {0}")]
    Json(String),
    #[error("auth bundle has no \"version\" field (expected {BUNDLE_VERSION})")]
    MissingVersion,
    #[error(
        "auth bundle version {found} is not supported; this build reads version {BUNDLE_VERSION}"
    )]
    UnsupportedVersion { found: String },
    #[error("auth bundle: \"broker\" must not be empty")]
    EmptyBroker,
    #[error("auth bundle: {0}")]
    HashKey(KeyError),
    #[error("auth bundle: tokens[{index}] ({name:?}): {problem}")]
    Token {
        index: usize,
        name: String,
        problem: TokenProblem,
    },
    #[error("auth bundle: acls[{index}] ({name:?}): {problem}")]
    Acl {
        index: usize,
        name: String,
        problem: AclProblem,
    },
    #[error("auth bundle: acls[{acl}] ({name:?}) rules[{rule}]: {problem}")]
    Rule {
        acl: usize,
        name: String,
        rule: usize,
        problem: RuleProblem,
    },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TokenProblem {
    #[error("name must not be empty")]
    EmptyName,
    #[error("name is already used by tokens[{first}]")]
    DuplicateName { first: usize },
    #[error("secret_hash is not base64 of a {} byte HMAC-SHA256", token::HASH_LEN)]
    BadSecretHash,
    /// Two tokens with one secret could not be told apart at CONNECT.
    #[error("has the same secret as token {other:?}")]
    SameSecretAs { other: String },
    #[error("expires_at {value:?}: {error}")]
    ExpiresAt { value: String, error: TimeError },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AclProblem {
    #[error("name must not be empty")]
    EmptyName,
    #[error("name is already used by acls[{first}]")]
    DuplicateName { first: usize },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RuleProblem {
    #[error("topics must not be empty")]
    NoTopics,
    #[error("actions must not be empty")]
    NoActions,
    #[error("topics[{index}] {topic:?} is not a valid topic filter: {error}")]
    Filter {
        index: usize,
        topic: String,
        error: TopicError,
    },
    #[error(
        "topics[{index}] {topic:?}: rules apply to the filter inside a shared subscription; drop the \"$share/<group>/\" prefix"
    )]
    SharedFilter { index: usize, topic: String },
}

/// What validation learnt about each token, so compiling does not parse twice.
pub(crate) struct Checked {
    pub key: HashKey,
    /// In bundle order.
    pub tokens: Vec<CheckedToken>,
}

pub(crate) struct CheckedToken {
    pub hash: [u8; token::HASH_LEN],
    pub expires_at: Option<SystemTime>,
}

impl AuthBundle {
    /// An empty bundle for `broker` with a fresh hash key: the starting point
    /// for the operator and for `starling-broker token new`.
    pub fn new(broker: impl Into<String>) -> AuthBundle {
        AuthBundle {
            version: BUNDLE_VERSION,
            broker: broker.into(),
            hash_key: token::generate_hash_key(),
            default_policy: None,
            tokens: Vec::new(),
            acls: Vec::new(),
        }
    }

    /// Parses and validates. The version is checked before the shape, so a
    /// newer format is reported as such rather than as a confusing field error.
    pub fn parse(bytes: &[u8]) -> Result<AuthBundle, BundleError> {
        #[derive(Deserialize)]
        struct Probe {
            version: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        match probe.version {
            None => return Err(BundleError::MissingVersion),
            Some(v) if v.as_u64() == Some(u64::from(BUNDLE_VERSION)) => {}
            Some(v) => {
                return Err(BundleError::UnsupportedVersion {
                    found: v.to_string(),
                });
            }
        }
        let bundle: AuthBundle =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        bundle.validate()?;
        Ok(bundle)
    }

    /// Pretty JSON, the form `starling-broker token new` writes to bundle
    /// files people edit (the operator writes compact JSON to Secrets).
    pub fn to_json_pretty(&self) -> String {
        // Only strings, integers, booleans and string-keyed maps: serde_json
        // cannot fail on them.
        #[allow(clippy::expect_used)]
        serde_json::to_string_pretty(self).expect("auth bundle serializes")
    }

    /// The policy in force when no rule allows an action.
    pub fn effective_default_policy(&self) -> Effect {
        match self.default_policy {
            Some(p) => p,
            None if self.tokens.is_empty() => Effect::Allow,
            None => Effect::Deny,
        }
    }

    /// Checks everything the broker relies on; the first problem found is
    /// returned. The operator should call this before writing a bundle and
    /// report the error in the resource's status.
    pub fn validate(&self) -> Result<(), BundleError> {
        self.check().map(|_| ())
    }

    pub(crate) fn check(&self) -> Result<Checked, BundleError> {
        if self.version != BUNDLE_VERSION {
            return Err(BundleError::UnsupportedVersion {
                found: self.version.to_string(),
            });
        }
        if self.broker.is_empty() {
            return Err(BundleError::EmptyBroker);
        }
        let key = HashKey::from_base64(&self.hash_key).map_err(BundleError::HashKey)?;

        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut hashes: HashMap<[u8; token::HASH_LEN], usize> = HashMap::new();
        let mut tokens = Vec::with_capacity(self.tokens.len());
        for (index, t) in self.tokens.iter().enumerate() {
            let fail = |problem| BundleError::Token {
                index,
                name: t.name.clone(),
                problem,
            };
            if t.name.is_empty() {
                return Err(fail(TokenProblem::EmptyName));
            }
            if let Some(&first) = names.get(t.name.as_str()) {
                return Err(fail(TokenProblem::DuplicateName { first }));
            }
            names.insert(&t.name, index);
            let hash = token::decode_hash(&t.secret_hash)
                .ok_or_else(|| fail(TokenProblem::BadSecretHash))?;
            if let Some(&other) = hashes.get(&hash) {
                return Err(fail(TokenProblem::SameSecretAs {
                    other: self.tokens[other].name.clone(),
                }));
            }
            hashes.insert(hash, index);
            let expires_at = match &t.expires_at {
                None => None,
                Some(value) => Some(parse_rfc3339(value).map_err(|error| {
                    fail(TokenProblem::ExpiresAt {
                        value: value.clone(),
                        error,
                    })
                })?),
            };
            tokens.push(CheckedToken { hash, expires_at });
        }

        let mut acl_names: HashMap<&str, usize> = HashMap::new();
        for (index, acl) in self.acls.iter().enumerate() {
            let fail = |problem| BundleError::Acl {
                index,
                name: acl.name.clone(),
                problem,
            };
            if acl.name.is_empty() {
                return Err(fail(AclProblem::EmptyName));
            }
            if let Some(&first) = acl_names.get(acl.name.as_str()) {
                return Err(fail(AclProblem::DuplicateName { first }));
            }
            acl_names.insert(&acl.name, index);
            for (rule, r) in acl.rules.iter().enumerate() {
                check_rule(r).map_err(|problem| BundleError::Rule {
                    acl: index,
                    name: acl.name.clone(),
                    rule,
                    problem,
                })?;
            }
        }
        Ok(Checked { key, tokens })
    }

    /// Things that are valid but probably not meant: the broker logs them,
    /// the operator can show them in status.
    pub fn warnings(&self) -> Vec<String> {
        let names: std::collections::HashSet<&str> =
            self.tokens.iter().map(|t| t.name.as_str()).collect();
        let mut out = Vec::new();
        for acl in &self.acls {
            if acl.tokens.is_empty() && acl.selector.is_none() {
                out.push(format!(
                    "ACL {:?} names no tokens and has no selector; it applies to nobody",
                    acl.name
                ));
            }
            for t in &acl.tokens {
                if !names.contains(t.as_str()) {
                    out.push(format!(
                        "ACL {:?} names token {t:?}, which is not in the bundle",
                        acl.name
                    ));
                }
            }
        }
        out
    }
}

fn check_rule(r: &Rule) -> Result<(), RuleProblem> {
    if r.topics.is_empty() {
        return Err(RuleProblem::NoTopics);
    }
    if r.actions.is_empty() {
        return Err(RuleProblem::NoActions);
    }
    for (index, t) in r.topics.iter().enumerate() {
        if t.starts_with("$share/") {
            return Err(RuleProblem::SharedFilter {
                index,
                topic: t.clone(),
            });
        }
        topic::validate_filter(t).map_err(|error| RuleProblem::Filter {
            index,
            topic: t.clone(),
            error,
        })?;
    }
    Ok(())
}

impl TokenEntry {
    /// An enabled, unlabelled, non-expiring entry for `secret` under `key`.
    pub fn new(name: impl Into<String>, key: &HashKey, secret: &str) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            secret_hash: key.hash_secret(secret),
            description: None,
            expires_at: None,
            disabled: false,
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("not an RFC 3339 date-time like 2030-01-31T12:00:00Z ({reason})")]
pub struct TimeError {
    reason: &'static str,
}

fn time_err(reason: &'static str) -> TimeError {
    TimeError { reason }
}

/// Parses an RFC 3339 date-time (`2030-01-31T12:00:00Z`,
/// `2030-01-31t14:00:00.5+02:00`; a space may replace the `T`). Written here
/// rather than pulled in as a dependency because the model crate must stay
/// light and the grammar is small. A leap second (`:60`) counts as `:59`.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, TimeError> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<u32, TimeError> {
        let digits = b.get(range).ok_or(time_err("too short"))?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(time_err("expected digits"));
        }
        Ok(digits
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let sep = |i: usize, allowed: &[u8], what: &'static str| -> Result<(), TimeError> {
        match b.get(i) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(time_err(what)),
        }
    };
    let year = num(0..4)?;
    sep(4, b"-", "expected '-' after the year")?;
    let month = num(5..7)?;
    sep(7, b"-", "expected '-' after the month")?;
    let day = num(8..10)?;
    sep(10, b"Tt ", "expected 'T' between date and time")?;
    let hour = num(11..13)?;
    sep(13, b":", "expected ':' after the hour")?;
    let minute = num(14..16)?;
    sep(16, b":", "expected ':' after the minutes")?;
    let second = num(17..19)?;

    let mut i = 19;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(time_err("expected digits after '.'"));
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(&sign @ (b'+' | b'-')) if b.len() == i + 6 => {
            let oh = num(i + 1..i + 3)?;
            sep(i + 3, b":", "expected ':' in the UTC offset")?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(time_err("UTC offset out of range"));
            }
            let secs = i64::from(oh * 3600 + om * 60);
            if sign == b'-' { -secs } else { secs }
        }
        _ => {
            return Err(time_err(
                "expected 'Z' or a UTC offset like +02:00 at the end",
            ));
        }
    };

    if !(1..=12).contains(&month) {
        return Err(time_err("month out of range"));
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err(time_err("day out of range"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(time_err("time of day out of range"));
    }
    let second = second.min(59);
    let secs = days_from_civil(i64::from(year), month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    base.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
        .ok_or(time_err("out of range for this platform"))
}

/// Formats as `YYYY-MM-DDTHH:MM:SSZ` (whole seconds, UTC), the form the
/// operator writes and status fields show.
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            // Round towards the past so the sub-second part is not lost upwards.
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn is_leap(year: u32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's
/// algorithm: shift the year to start in March so February's length only
/// matters at the end).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn sample() -> AuthBundle {
        let key = HashKey::from_base64(KEY).unwrap();
        let mut sensor = TokenEntry::new("sensor-1", &key, "secret-of-sensor-1");
        sensor.expires_at = Some("2030-01-31T12:00:00Z".into());
        sensor.labels.insert("role".into(), "sensor".into());
        let mut old = TokenEntry::new("old", &key, "secret-of-the-old-one");
        old.disabled = true;
        AuthBundle {
            version: 1,
            broker: "home".into(),
            hash_key: KEY.into(),
            default_policy: Some(Effect::Deny),
            tokens: vec![sensor, old],
            acls: vec![AclEntry {
                anonymous: false,
                name: "sensors".into(),
                tokens: vec!["old".into()],
                selector: Some(LabelSelector {
                    match_labels: [("role".to_string(), "sensor".to_string())].into(),
                }),
                rules: vec![
                    Rule {
                        topics: vec!["sensors/+/temp".into(), "$SYS/#".into()],
                        actions: vec![Action::Publish, Action::Subscribe],
                        effect: Effect::Allow,
                    },
                    Rule {
                        topics: vec!["sensors/secret/#".into()],
                        actions: vec![Action::Subscribe],
                        effect: Effect::Deny,
                    },
                ],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let json = b.to_json_pretty();
        assert!(json.contains("\"secret_hash\""), "snake_case fields");
        assert!(json.contains("\"match_labels\""));
        assert!(!json.contains("\"disabled\": false"), "defaults omitted");
        let back = AuthBundle::parse(json.as_bytes()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn minimal_bundle_and_default_policy() {
        let json = format!(r#"{{"version":1,"broker":"b","hash_key":"{KEY}"}}"#);
        let b = AuthBundle::parse(json.as_bytes()).unwrap();
        assert!(b.tokens.is_empty() && b.acls.is_empty());
        assert_eq!(b.effective_default_policy(), Effect::Allow);
        assert_eq!(sample().effective_default_policy(), Effect::Deny);
        let mut s = sample();
        s.default_policy = None;
        assert_eq!(s.effective_default_policy(), Effect::Deny);
        s.default_policy = Some(Effect::Allow);
        assert_eq!(s.effective_default_policy(), Effect::Allow);
    }

    fn err(json: &str) -> String {
        AuthBundle::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn version_checked_first() {
        assert_eq!(
            AuthBundle::parse(br#"{"version":2,"something":"new"}"#),
            Err(BundleError::UnsupportedVersion { found: "2".into() })
        );
        assert_eq!(
            AuthBundle::parse(br#"{"broker":"x"}"#),
            Err(BundleError::MissingVersion)
        );
        assert!(err(r#"{"version":"1"}"#).contains("version \"1\" is not supported"));
        assert!(err("[1]").contains("not valid"));
        assert!(err("{").contains("not valid"));
    }

    #[test]
    fn unknown_fields_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json_pretty()).unwrap();
        v["tokens"][0]["expiresAt"] = "2020-01-01T00:00:00Z".into();
        let e = err(&v.to_string());
        assert!(e.contains("unknown field `expiresAt`"), "{e}");
    }

    fn invalid(edit: impl FnOnce(&mut AuthBundle)) -> BundleError {
        let mut b = sample();
        edit(&mut b);
        let e = b.validate().unwrap_err();
        // Also through parse, which must agree.
        assert_eq!(
            AuthBundle::parse(b.to_json_pretty().as_bytes()),
            Err(e.clone())
        );
        e
    }

    #[test]
    fn validation_errors_are_precise() {
        let cases: Vec<(BundleError, &str)> = vec![
            (
                invalid(|b| b.broker.clear()),
                "\"broker\" must not be empty",
            ),
            (
                invalid(|b| b.hash_key = "not base64!".into()),
                "hash_key is not valid base64",
            ),
            (
                invalid(|b| b.hash_key = "c2hvcnQ=".into()),
                "hash_key is 5 bytes long; at least 16",
            ),
            (
                invalid(|b| b.tokens[1].name = "sensor-1".into()),
                "tokens[1] (\"sensor-1\"): name is already used by tokens[0]",
            ),
            (
                invalid(|b| b.tokens[0].name.clear()),
                "tokens[0] (\"\"): name must not be empty",
            ),
            (
                invalid(|b| b.tokens[1].secret_hash = "%%%".into()),
                "tokens[1] (\"old\"): secret_hash is not base64",
            ),
            (
                invalid(|b| b.tokens[1].secret_hash = "c2hvcnQ=".into()),
                "tokens[1] (\"old\"): secret_hash is not base64 of a 32 byte",
            ),
            (
                invalid(|b| b.tokens[1].secret_hash = b.tokens[0].secret_hash.clone()),
                "tokens[1] (\"old\"): has the same secret as token \"sensor-1\"",
            ),
            (
                invalid(|b| b.tokens[0].expires_at = Some("2030-02-30T00:00:00Z".into())),
                "tokens[0] (\"sensor-1\"): expires_at \"2030-02-30T00:00:00Z\": not an RFC 3339 date-time like 2030-01-31T12:00:00Z (day out of range)",
            ),
            (
                invalid(|b| b.acls.push(b.acls[0].clone())),
                "acls[1] (\"sensors\"): name is already used by acls[0]",
            ),
            (
                invalid(|b| b.acls[0].name.clear()),
                "acls[0] (\"\"): name must not be empty",
            ),
            (
                invalid(|b| b.acls[0].rules[1].topics[0] = "a/#/b".into()),
                "acls[0] (\"sensors\") rules[1]: topics[0] \"a/#/b\" is not a valid topic filter: '#' must be the last level",
            ),
            (
                invalid(|b| b.acls[0].rules[0].topics[1] = "a+".into()),
                "rules[0]: topics[1] \"a+\" is not a valid topic filter: '+' must stand alone",
            ),
            (
                invalid(|b| b.acls[0].rules[0].topics[1] = String::new()),
                "rules[0]: topics[1] \"\" is not a valid topic filter: topic is empty",
            ),
            (
                invalid(|b| b.acls[0].rules[0].topics[0] = "$share/g/a".into()),
                "rules[0]: topics[0] \"$share/g/a\": rules apply to the filter inside a shared subscription",
            ),
            (
                invalid(|b| b.acls[0].rules[1].actions.clear()),
                "acls[0] (\"sensors\") rules[1]: actions must not be empty",
            ),
            (
                invalid(|b| b.acls[0].rules[0].topics.clear()),
                "rules[0]: topics must not be empty",
            ),
        ];
        for (e, want) in cases {
            let msg = e.to_string();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
            assert!(!msg.contains(KEY), "no key in {msg:?}");
        }
        assert!(matches!(
            invalid(|b| b.version = 3),
            BundleError::UnsupportedVersion { .. }
        ));
    }

    #[test]
    fn errors_never_show_secrets_or_hashes() {
        let b = sample();
        let dump = format!("{b:?}");
        assert!(
            !dump.contains(&b.hash_key),
            "Debug shows the hash key: {dump}"
        );
        assert!(
            !dump.contains(&b.tokens[0].secret_hash),
            "Debug shows a hash"
        );
        let e = invalid(|x| x.tokens[1].secret_hash = x.tokens[0].secret_hash.clone());
        assert!(!e.to_string().contains(&b.tokens[0].secret_hash));
    }

    #[test]
    fn warnings() {
        let mut b = sample();
        assert!(b.warnings().is_empty());
        b.acls[0].tokens.push("gone".into());
        b.acls.push(AclEntry {
            anonymous: false,
            name: "nobody".into(),
            tokens: vec![],
            selector: None,
            rules: vec![],
        });
        let w = b.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("\"gone\""));
        assert!(w[1].contains("applies to nobody"));
    }

    #[test]
    fn rfc3339() {
        let secs = |s: &str| {
            parse_rfc3339(s)
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0.0);
        assert_eq!(secs("2024-02-29T12:00:00Z"), 1_709_208_000.0);
        assert_eq!(secs("2000-01-01T00:00:00+01:00"), 946_681_200.0);
        assert_eq!(secs("2000-01-01t00:00:00-00:30"), 946_686_600.0);
        assert_eq!(secs("2000-01-01 00:00:00.25z"), 946_684_800.25);
        assert_eq!(secs("2016-12-31T23:59:60Z"), 1_483_228_799.0);
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z").unwrap(),
            UNIX_EPOCH - Duration::from_secs(1)
        );
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+0100",
            "2024-01-01T00:00:00.Z",
            "2024-01-01",
            "2024-1-01T00:00:00Z",
            "2024-01-01T00:00:00Zjunk",
            "2024-01-01T00:00:00+24:00",
            "２024-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
        for s in [
            "1970-01-01T00:00:00Z",
            "2024-02-29T12:34:56Z",
            "1900-03-01T00:00:01Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert_eq!(format_rfc3339(parse_rfc3339(s).unwrap()), s);
        }
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_millis(500)),
            "1969-12-31T23:59:59Z"
        );
    }
}

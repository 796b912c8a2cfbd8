//! The checks behind the cargo-fuzz targets in `fuzz/`, kept in the library
//! so that `cargo test` (model/tests/fuzz_corpus.rs) replays the committed
//! corpus and every past crash without libFuzzer.
//!
//! Each function takes arbitrary bytes. Invalid input is never a failure: a
//! function panics only when the model breaks one of its own invariants, and
//! the panic message says which.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::acl::AuthState;
use crate::bundle::{AuthBundle, format_rfc3339, parse_rfc3339};
use crate::config::BrokerConfig;
use crate::topic::{
    TopicPolicy, check_levels, covers, matches, overlaps, parse_subscription, validate_filter,
    validate_name,
};

/// Separates the parts of a [`topic`] input. NUL is the one character no
/// topic name or filter may contain, so a part never holds it.
pub const TOPIC_SEPARATOR: char = '\0';

/// Topic names and filters. The input (UTF-8, invalid sequences replaced) is
/// checked whole, then split at NUL into `a`, `b` and `t` (missing parts are
/// empty). Every function must terminate and not panic on any of them, and:
///
/// * a valid name is a valid filter that matches itself;
/// * [`parse_subscription`] accepts exactly `$share/<group>/<valid filter>`
///   with a non-empty group without wildcards or `/`, and otherwise exactly
///   the valid filters, and its parts rebuild the input;
/// * a name the topic policy accepts is also accepted as a filter;
/// * [`check_levels`] accepts exactly the strings of at most `max` levels
///   (`max` from 1 up; the broker's setting is 1..=1024);
/// * for valid filters `a`, `b` and name `t`:
///   - every valid filter matches some name (a witness built from it);
///   - `covers(a, a)`; `overlaps` is symmetric;
///   - `covers(a, b) && matches(b, t)` implies `matches(a, t)`;
///   - `matches(a, t) && matches(b, t)` implies `overlaps(a, b)`;
///   - `overlaps` is exact: it is true if and only if a name matched by both
///     exists (one is constructed from the two filters);
///   - `covers` is exact: when it is false, a name matched by `b` and not
///     by `a` is found among names built from `b`.
pub fn topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let whole: &str = &text;
    single(whole);
    let mut parts = whole.split(TOPIC_SEPARATOR);
    let a = parts.next().unwrap_or_default();
    let b = parts.next().unwrap_or_default();
    let t = parts.next().unwrap_or_default();
    for s in [a, b, t] {
        single(s);
    }
    // Termination and no panic on anything, valid or not.
    let _ = (matches(a, t), matches(b, t), matches(a, b));
    let _ = (covers(a, b), covers(b, a), overlaps(a, b));

    let (fa, fb) = (validate_filter(a).is_ok(), validate_filter(b).is_ok());
    for (f, ok) in [(a, fa), (b, fb)] {
        if ok {
            let w = witness(f, "x");
            assert!(
                validate_name(&w).is_ok() && matches(f, &w),
                "valid filter {f:?} does not match its witness {w:?}"
            );
            assert!(covers(f, f), "covers({f:?}, itself) is false");
        }
    }
    if !(fa && fb) {
        return;
    }
    assert_eq!(
        overlaps(a, b),
        overlaps(b, a),
        "overlaps({a:?}, {b:?}) is not symmetric"
    );
    if validate_name(t).is_ok() {
        if covers(a, b) && matches(b, t) {
            assert!(
                matches(a, t),
                "covers({a:?}, {b:?}) and matches({b:?}, {t:?}) but not matches({a:?}, {t:?})"
            );
        }
        if matches(a, t) && matches(b, t) {
            assert!(
                overlaps(a, b),
                "both {a:?} and {b:?} match {t:?} but overlaps() is false"
            );
        }
    }
    let common =
        common_name(a, b).filter(|n| validate_name(n).is_ok() && matches(a, n) && matches(b, n));
    assert_eq!(
        overlaps(a, b),
        common.is_some(),
        "overlaps({a:?}, {b:?}) disagrees with the common name {common:?}"
    );
    for (outer, inner) in [(a, b), (b, a)] {
        let found = counterexamples(outer, inner)
            .into_iter()
            .find(|n| validate_name(n).is_ok() && matches(inner, n) && !matches(outer, n));
        match (covers(outer, inner), found) {
            (true, Some(n)) => panic!(
                "covers({outer:?}, {inner:?}) but {inner:?} matches {n:?} and {outer:?} does not"
            ),
            (false, None) => panic!(
                "covers({outer:?}, {inner:?}) is false but no name matched by {inner:?} and not \
                 {outer:?} was found"
            ),
            _ => {}
        }
    }
}

/// Checks on one string, whatever it holds.
fn single(s: &str) {
    let name = validate_name(s);
    let filter = validate_filter(s);
    if name.is_ok() {
        assert!(
            filter.is_ok(),
            "{s:?} is a valid name but not a valid filter"
        );
        assert!(matches(s, s), "valid name {s:?} does not match itself");
    }
    let policy = TopicPolicy::shiftr();
    if policy.check(s).is_ok() {
        assert!(
            policy.check_filter(s).is_ok(),
            "the topic policy accepts {s:?} as a name but not as a filter"
        );
    }
    let _ = TopicPolicy::default().check(s);
    let levels = s.split('/').count();
    for max in [
        1,
        2,
        levels.saturating_sub(1),
        levels,
        levels + 1,
        128,
        1024,
    ] {
        if max >= 1 {
            assert_eq!(
                check_levels(s, max).is_ok(),
                levels <= max,
                "check_levels({s:?}, {max}) is wrong for {levels} levels"
            );
        }
    }

    let parsed = parse_subscription(s);
    let share = s.strip_prefix("$share/");
    match (&parsed, share) {
        (Ok(sub), None) => {
            assert_eq!(sub.share_group, None, "{s:?} has no $share/ prefix");
            assert_eq!(sub.filter, s, "parse_subscription changed {s:?}");
            assert!(filter.is_ok(), "parse_subscription accepted invalid {s:?}");
        }
        (Err(e), None) => {
            assert!(
                filter.is_err(),
                "parse_subscription refused valid filter {s:?}: {e}"
            );
        }
        (Ok(sub), Some(rest)) => {
            let Some(group) = sub.share_group else {
                panic!("{s:?} parsed as not shared");
            };
            assert!(
                !group.is_empty() && !group.contains(['+', '#', '/']),
                "invalid share group {group:?} accepted in {s:?}"
            );
            assert_eq!(
                format!("{group}/{}", sub.filter),
                rest,
                "parts of {s:?} do not rebuild it"
            );
            assert!(
                validate_filter(sub.filter).is_ok(),
                "invalid filter {:?} accepted in {s:?}",
                sub.filter
            );
        }
        (Err(e), Some(rest)) => {
            if let Some((group, f)) = rest.split_once('/') {
                assert!(
                    group.is_empty() || group.contains(['+', '#']) || validate_filter(f).is_err(),
                    "parse_subscription refused valid shared subscription {s:?}: {e}"
                );
            }
        }
    }
}

/// A name matched by filter `f` (valid): each `+` and `#` level becomes
/// `fill`.
fn witness(f: &str, fill: &str) -> String {
    f.split('/')
        .map(|l| if l == "+" || l == "#" { fill } else { l })
        .collect::<Vec<_>>()
        .join("/")
}

/// A name both valid filters match, if the walk that [`overlaps`] makes
/// finds one; `None` when the levels conflict.
fn common_name(a: &str, b: &str) -> Option<String> {
    let mut x = a.split('/');
    let mut y = b.split('/');
    let mut levels: Vec<&str> = Vec::new();
    loop {
        match (x.next(), y.next()) {
            (None, None) => break,
            // `#` also matches its parent: the name ends here.
            (Some("#"), None) | (None, Some("#")) => break,
            (Some("#"), Some(l)) => {
                levels.push(concrete(l));
                levels.extend(y.map(concrete));
                break;
            }
            (Some(l), Some("#")) => {
                levels.push(concrete(l));
                levels.extend(x.map(concrete));
                break;
            }
            (Some("+"), Some(l)) | (Some(l), Some("+")) => levels.push(concrete(l)),
            (Some(p), Some(q)) if p == q => levels.push(p),
            _ => return None,
        }
    }
    Some(levels.join("/"))
}

fn concrete(level: &str) -> &str {
    if level == "+" || level == "#" {
        "x"
    } else {
        level
    }
}

/// Names matched by valid filter `inner` that are as hard as possible for
/// `outer` to match: every `+` becomes a level `outer` never names, and a
/// final `#` becomes nothing (the parent), one or two such levels.
fn counterexamples(outer: &str, inner: &str) -> Vec<String> {
    let named: Vec<&str> = outer.split('/').collect();
    let mut fresh = String::from("x");
    while named.contains(&fresh.as_str()) {
        fresh.push('x');
    }
    let levels: Vec<&str> = inner
        .split('/')
        .map(|l| if l == "+" { fresh.as_str() } else { l })
        .collect();
    match levels.split_last() {
        Some((&"#", parent)) => vec![
            parent.join("/"),
            [parent, &[fresh.as_str()]].concat().join("/"),
            [parent, &[fresh.as_str(), fresh.as_str()]]
                .concat()
                .join("/"),
        ],
        _ => vec![levels.join("/")],
    }
}

/// Most principals and topics [`bundle`] checks against each other, so one
/// input stays fast whatever its size.
const BUNDLE_CHECK_PRINCIPALS: usize = 8;
const BUNDLE_CHECK_TOPICS: usize = 32;

/// The auth bundle from JSON bytes, as the broker reloads it. Parsing must
/// not panic, and when [`AuthBundle::parse`] accepts the bytes:
///
/// * [`AuthBundle::validate`] agrees and [`AuthState::compile`] succeeds (and
///   [`AuthState::load`] on the same bytes too): what validates, the broker
///   can use;
/// * the pretty JSON written to bundle files parses back to an equal bundle and
///   serializes to the same text;
/// * every valid `expires_at` survives [`format_rfc3339`] (to whole seconds,
///   rounded down) wherever the formatted year has four digits;
/// * for each principal (a few tokens and anonymous) and topics from the
///   rules: a subscription to a filter permits receiving every name that
///   filter matches, and for a topic name, subscribing and receiving are
///   decided alike.
///
/// The Debug form of a bundle (what logs show) does not depend on its hash
/// key or secret hashes. When the bytes are refused, the error (Display and
/// Debug) must not contain the hash key or a secret hash (unless that text
/// also sits in a field errors do name).
pub fn bundle(data: &[u8]) {
    let parsed = AuthBundle::parse(data);
    let loaded = AuthState::load(data);
    let b = match parsed {
        Ok(b) => b,
        Err(e) => {
            assert!(
                loaded.is_err(),
                "AuthState::load accepts what parse refuses"
            );
            no_secret_in_error(data, &format!("{e} {e:?}"));
            return;
        }
    };
    if let Err(e) = b.validate() {
        panic!("a parsed bundle does not validate: {e}");
    }
    let state = match (AuthState::compile(&b), loaded) {
        (Ok(s), Ok(_)) => s,
        (Err(e), _) | (_, Err(e)) => panic!("a valid bundle does not compile: {e}"),
    };
    let _ = (b.warnings(), b.effective_default_policy());
    let mut masked = b.clone();
    masked.hash_key = "other".into();
    for t in &mut masked.tokens {
        t.secret_hash = "other".into();
    }
    assert_eq!(
        format!("{b:?}"),
        format!("{masked:?}"),
        "the Debug form of a bundle depends on its hash key or secret hashes"
    );

    let json = b.to_json_pretty();
    match AuthBundle::parse(json.as_bytes()) {
        Ok(back) => {
            assert_eq!(back, b, "the bundle changed through its own JSON");
            assert_eq!(
                back.to_json_pretty(),
                json,
                "the bundle's JSON is not stable"
            );
        }
        Err(e) => panic!("the bundle's own JSON does not parse: {e}\n{json}"),
    }

    for t in &b.tokens {
        if let Some(Ok(at)) = t.expires_at.as_deref().map(parse_rfc3339) {
            let text = format_rfc3339(at);
            if text.bytes().take(4).all(|c| c.is_ascii_digit())
                && text.as_bytes().get(4) == Some(&b'-')
            {
                assert_eq!(
                    parse_rfc3339(&text).ok(),
                    Some(whole_seconds(at)),
                    "{:?} formats as {text:?}, which does not parse back",
                    t.expires_at
                );
            }
        }
    }

    let mut topics: Vec<String> = Vec::new();
    'rules: for acl in &b.acls {
        for rule in &acl.rules {
            for f in &rule.topics {
                if topics.len() >= BUNDLE_CHECK_TOPICS {
                    break 'rules;
                }
                topics.push(f.clone());
                topics.push(witness(f, "x"));
            }
        }
    }
    topics.extend(["a".to_string(), "a/b".to_string(), "$SYS/x".to_string()]);
    let principals = state
        .tokens()
        .take(BUNDLE_CHECK_PRINCIPALS)
        .cloned()
        .chain([state.anonymous()]);
    for p in principals {
        for f in &topics {
            let sub = p.check_subscribe(f);
            if validate_name(f).is_ok() && !f.starts_with("$share/") {
                let recv = p.check_receive(f);
                assert_eq!(
                    sub.allowed,
                    recv.allowed,
                    "{:?}: subscribing to name {f:?} is {sub:?}, receiving it is {recv:?}",
                    p.name()
                );
            }
            let _ = p.check_publish(f);
            // A filtered grant checks each message; a whole one must not
            // need to.
            if p.grant_subscribe(f) != crate::acl::Grant::Whole {
                continue;
            }
            for t in &topics {
                if validate_name(t).is_ok() && matches(f, t) {
                    assert!(
                        p.may_receive(t),
                        "{:?} has a whole grant for {f:?} but may not receive {t:?}, which it matches",
                        p.name()
                    );
                }
            }
        }
    }
}

/// `t` rounded down to a whole second, as [`format_rfc3339`] writes it.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(e) => {
            let d = e.duration();
            UNIX_EPOCH - Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
        }
    }
}

fn no_secret_in_error(data: &[u8], message: &str) {
    let Ok(raw) = serde_json::from_slice::<AuthBundle>(data) else {
        return;
    };
    let mut named: Vec<&str> = vec![&raw.broker];
    for t in &raw.tokens {
        named.push(&t.name);
        named.extend(t.expires_at.as_deref());
    }
    for acl in &raw.acls {
        named.push(&acl.name);
        for r in &acl.rules {
            named.extend(r.topics.iter().map(String::as_str));
        }
    }
    let secrets = std::iter::once(raw.hash_key.as_str())
        .chain(raw.tokens.iter().map(|t| t.secret_hash.as_str()));
    for s in secrets {
        if s.len() >= 8 && message.contains(s) && !named.iter().any(|n| n.contains(s)) {
            panic!("a bundle error shows a secret {s:?}: {message}");
        }
    }
}

/// The broker configuration from TOML text, the way `starling-broker
/// --config` reads it (`toml::Table`, then `BrokerConfig`). No panic, and
/// for a configuration that loads:
///
/// * `toml::from_str` gives the same configuration;
/// * the TOML the operator writes for it (`toml::to_string`) loads back
///   equal, and serializes to the same text again;
/// * [`BrokerConfig::with_default_binds`] is idempotent and fills every bind;
/// * validation and the topic policy do not panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let direct = toml::from_str::<BrokerConfig>(text);
    let Some(cfg) = load_config(text) else {
        if let Ok(cfg) = direct {
            panic!("toml::from_str accepts a config the broker's loading refuses: {cfg:?}");
        }
        return;
    };
    match direct {
        Ok(d) => assert_eq!(d, cfg, "toml::from_str and the broker's loading disagree"),
        Err(e) => panic!("the broker's loading accepts a config toml::from_str refuses: {e}"),
    }

    let written = match toml::to_string(&cfg) {
        Ok(s) => s,
        Err(e) => panic!("a loaded config does not serialize: {e}: {cfg:?}"),
    };
    match load_config(&written) {
        Some(back) => assert_eq!(back, cfg, "the config changed through TOML:\n{written}"),
        None => panic!("the config's own TOML does not load:\n{written}"),
    }
    assert_eq!(
        toml::to_string(&cfg).ok().as_deref(),
        Some(written.as_str()),
        "the config's TOML is not stable"
    );

    let bound = cfg.clone().with_default_binds();
    assert_eq!(
        bound.clone().with_default_binds(),
        bound,
        "with_default_binds is not idempotent"
    );
    for l in [
        &bound.mqtt,
        &bound.mqtts,
        &bound.http,
        &bound.https,
        &bound.admin,
    ] {
        assert!(!l.bind.is_empty(), "with_default_binds left a bind empty");
    }
    let _ = cfg.validate();
    let _ = cfg.topics.policy().check("a/b");
}

/// Parses like `broker/src/settings.rs`: a TOML table, then the typed config.
fn load_config(text: &str) -> Option<BrokerConfig> {
    let table = text.parse::<toml::Table>().ok()?;
    table.try_into().ok()
}

//! ACL and authentication behaviour through the public API, as the broker
//! and operator use it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use starling_model::acl::{AuthError, AuthState, Grant, Reason};
use starling_model::bundle::{
    AclEntry, Action, AuthBundle, Effect, LabelSelector, Rule, TokenEntry,
};
use starling_model::token::HashKey;
use starling_model::topic::{covers, matches, overlaps};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

#[test]
fn covers_table() {
    let cases = [
        // outer, inner, covers
        ("a/+/c", "a/b/c", true),
        ("a/+/c", "a/+/c", true),
        ("a/+/c", "a/#", false),
        ("a/+/c", "a/+/#", false),
        ("a/+", "a/+", true),
        ("a/+", "a/b", true),
        ("a/+", "a/#", false),
        ("a/+", "a", false),
        ("a/#", "a/b/#", true),
        ("a/#", "a", true),
        ("a/#", "a/#", true),
        ("a/#", "a/+/+/+", true),
        ("a/#", "b/#", false),
        ("a/b/#", "a/#", false),
        ("a/b/#", "a/b", true),
        ("a/b", "a/b/#", false),
        ("#", "a/b/#", true),
        ("#", "#", true),
        ("#", "+", true),
        ("#", "/", true),
        ("#", "+/#", true),
        ("+/#", "#", true),
        ("+/+/#", "#", false),
        ("a/+/#", "a/#", false),
        ("+", "#", false),
        ("+", "+", true),
        ("+", "a", true),
        ("+", "a/b", false),
        ("+/+", "+/+", true),
        ("+/+", "/", true),
        ("+/b", "a/+", false),
        ("a/+", "+/b", false),
        // $-topics: a wildcard in the first level never reaches them.
        ("#", "$SYS/#", false),
        ("#", "$SYS", false),
        ("+/x", "$SYS/x", false),
        ("+/#", "$x/#", false),
        ("$SYS/#", "$SYS/broker/+", true),
        ("$SYS/#", "$SYS", true),
        ("$SYS/+", "$SYS/a", true),
        ("$SYS/#", "#", false),
        ("$SYS/#", "+/#", false),
        ("a/#", "a/$x", true),
        ("a/+", "a/$x", true),
        ("#", "a/$x/#", true),
        // empty levels
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        ("a//b", "a/+/b", false),
        ("+/+", "/a", true),
        ("/#", "/", true),
        ("/#", "/a/b", true),
        ("/#", "#", false),
        ("/+/#", "/#", true), // "/#" also matches "", which is no topic
        ("+/+/#", "/#", true),
        ("/+", "/#", false),
        ("+/+/#", "+/#", false),
        ("+", "", true),
        ("a/", "a/+", false),
        ("a/+", "a/", true),
        // # and + at every position
        ("#", "a/b/c/#", true),
        ("a/#", "a/b/c/#", true),
        ("a/b/#", "a/b/c/#", true),
        ("a/b/c/#", "a/b/c/#", true),
        ("a/b/c/d/#", "a/b/c/#", false),
        ("+/b/c", "a/b/c", true),
        ("a/+/c", "a/b/c", true),
        ("a/b/+", "a/b/c", true),
        ("+/+/+", "a/+/c", true),
        ("a/b/c", "+/b/c", false),
        ("a/b/c", "a/+/c", false),
        ("a/b/c", "a/b/+", false),
    ];
    for (outer, inner, want) in cases {
        assert_eq!(covers(outer, inner), want, "covers({outer:?}, {inner:?})");
    }
}

#[test]
fn overlaps_table() {
    let cases = [
        ("a/+", "+/b", true),
        ("a/+/c", "a/#", true),
        ("a/b", "a/c", false),
        ("a/b", "a/b/c", false),
        ("a/b", "a/b/#", true),
        ("a/#", "a", true),
        ("#", "+", true),
        ("+", "a/b", false),
        ("+/+", "a/b", true),
        ("+/+", "a/b/c", false),
        ("a//b", "a/+/b", true),
        ("a//b", "a/x/b", false),
        ("/", "+/+", true),
        ("/", "+", false),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("+/#", "$SYS", false),
        ("$SYS/#", "$SYS/+", true),
        ("$SYS/#", "#", false),
        ("$x", "$x", true),
        ("a/$x", "a/+", true),
        ("#", "a/$x", true),
        ("a/b/c/#", "+/+/+", true),
        ("a/b/c/#", "+/+", false),
        ("x/+/y", "x/#", true),
        ("/#", "+", false), // they share only "", which is no topic
        ("/#", "/", true),
        ("/#", "/#", true),
        ("+/#", "+", true),
        ("/#", "+/+", true),
    ];
    for (a, b, want) in cases {
        assert_eq!(overlaps(a, b), want, "overlaps({a:?}, {b:?})");
        assert_eq!(overlaps(b, a), want, "overlaps({b:?}, {a:?})");
    }
}

fn rule(topics: &[&str], actions: &[Action], effect: Effect) -> Rule {
    Rule {
        topics: topics.iter().map(|s| s.to_string()).collect(),
        actions: actions.to_vec(),
        effect,
    }
}

const PUB: &[Action] = &[Action::Publish];
const SUB: &[Action] = &[Action::Subscribe];
const BOTH: &[Action] = &[Action::Publish, Action::Subscribe];

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2030-01-01T00:00:00Z
const EXPIRY: u64 = 1_893_456_000;

fn bundle() -> AuthBundle {
    let key = HashKey::from_base64(KEY).unwrap();
    let mut sensor = TokenEntry::new("sensor", &key, "sensor-secret-000000");
    sensor.labels.insert("role".into(), "sensor".into());
    let mut app = TokenEntry::new("app", &key, "app-secret-0000000000");
    app.expires_at = Some("2030-01-01T00:00:00Z".into());
    let mut off = TokenEntry::new("off", &key, "off-secret-0000000000");
    off.disabled = true;
    let bare = TokenEntry::new("bare", &key, "bare-secret-000000000");
    AuthBundle {
        version: 1,
        broker: "home".into(),
        hash_key: KEY.into(),
        default_policy: None,
        tokens: vec![sensor, app, off, bare],
        acls: vec![
            AclEntry {
                anonymous: false,
                name: "sensors".into(),
                tokens: vec![],
                selector: Some(LabelSelector {
                    match_labels: [("role".to_string(), "sensor".to_string())].into(),
                }),
                rules: vec![
                    rule(&["sensors/+/temp", "sensors/+/hum"], PUB, Effect::Allow),
                    rule(&["sensors/#"], SUB, Effect::Allow),
                    rule(&["sensors/vault/#"], BOTH, Effect::Deny),
                ],
            },
            AclEntry {
                anonymous: false,
                name: "app".into(),
                tokens: vec!["app".into(), "gone".into()],
                selector: None,
                rules: vec![
                    rule(&["#"], BOTH, Effect::Allow),
                    rule(&["admin/#"], BOTH, Effect::Deny),
                    rule(&["$SYS/broker/+"], SUB, Effect::Allow),
                ],
            },
        ],
    }
}

fn state() -> AuthState {
    AuthState::compile(&bundle()).unwrap()
}

#[test]
fn allow_deny_table() {
    let s = state();
    let now = at(EXPIRY - 10);
    let sensor = s.authenticate(None, b"sensor-secret-000000", now).unwrap();
    let app = s.authenticate(None, b"app-secret-0000000000", now).unwrap();
    let bare = s.authenticate(None, b"bare-secret-000000000", now).unwrap();
    let anon = s.anonymous();

    // (principal, action, topic/filter, allowed)
    let cases = [
        (&sensor, 'p', "sensors/1/temp", true),
        (&sensor, 'p', "sensors/1/hum", true),
        (&sensor, 'p', "sensors/1/other", false),
        (&sensor, 'p', "sensors/vault/temp", false),
        (&sensor, 'p', "sensors/1/temp/x", false),
        (&sensor, 'p', "sensors/+/temp", false),
        (&sensor, 'p', "", false),
        (&sensor, 's', "sensors/#", true), // granted; the vault deny overlaps it: filtered
        (&sensor, 's', "sensors/+/temp", true), // so does this
        (&sensor, 's', "sensors/1/temp", true),
        (&sensor, 's', "sensors/1/#", true),
        (&sensor, 's', "sensors/vault", false), // "sensors/vault/#" matches its parent
        (&sensor, 's', "sensors/vault/x", false),
        (&sensor, 's', "#", false),
        (&sensor, 's', "$share/g/sensors/1/#", true),
        (&sensor, 's', "$share/g/sensors/vault/x", false),
        (&sensor, 's', "sensors/a#", false),
        (&sensor, 'r', "sensors/1/temp", true),
        (&sensor, 'r', "sensors/vault/temp", false),
        (&sensor, 'r', "other", false),
        (&app, 'p', "anything/at/all", true),
        (&app, 'p', "admin/x", false),
        (&app, 'p', "admin", false),
        (&app, 'p', "administrator", true),
        (&app, 'p', "$SYS/broker/x", false), // "#" does not reach $-topics
        (&app, 's', "a/+/c", true),
        (&app, 's', "#", true),        // overlaps admin/#: filtered
        (&app, 's', "+/x", true),      // shares "admin/x" with the deny: filtered
        (&app, 's', "+", true),        // "+" and "admin/#" share the topic "admin"
        (&app, 's', "admin/+", false), // covered by the deny
        (&app, 's', "$SYS/broker/uptime", true),
        (&app, 's', "$SYS/broker/+", true),
        (&app, 's', "$SYS/#", false),
        (&app, 'r', "$SYS/broker/uptime", true),
        (&app, 'r', "$SYS/other", false),
        (&app, 'r', "admin/x", false),
        (&bare, 'p', "x", false),
        (&bare, 's', "x", false),
        (&anon, 'p', "x", false),
        (&anon, 's', "#", false),
        (&anon, 'r', "sensors/1/temp", false),
    ];
    let mut failures = vec![];
    for (p, action, topic, want) in cases {
        let got = match action {
            'p' => p.may_publish(topic),
            's' => p.may_subscribe(topic),
            _ => p.may_receive(topic),
        };
        if got != want {
            failures.push(format!(
                "{:?} {action} {topic:?}: got {got}, want {want}",
                p.name()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn grants_say_when_messages_are_checked_one_by_one() {
    let s = state();
    let now = at(EXPIRY - 10);
    let sensor = s.authenticate(None, b"sensor-secret-000000", now).unwrap();
    let app = s.authenticate(None, b"app-secret-0000000000", now).unwrap();
    for (p, filter, want) in [
        (&sensor, "sensors/1/#", Grant::Whole),
        (&sensor, "sensors/#", Grant::Filtered),
        (&sensor, "sensors/+/temp", Grant::Filtered),
        (&sensor, "sensors/vault/#", Grant::Refused),
        (&sensor, "#", Grant::Refused),
        (&app, "a/+/c", Grant::Whole),
        (&app, "#", Grant::Filtered),
        (&app, "$share/g/#", Grant::Filtered),
        (&app, "admin/#", Grant::Refused),
        (&app, "a/#/b", Grant::Refused),
    ] {
        assert_eq!(p.grant_subscribe(filter), want, "{:?} {filter:?}", p.name());
    }
    // What a filtered grant delivers: the matching topics that may be read.
    assert!(sensor.may_receive("sensors/1/temp"));
    assert!(!sensor.may_receive("sensors/vault/temp"));
}

#[test]
fn anonymous_acls_fence_anonymous_clients() {
    let mut b = bundle();
    b.default_policy = Some(Effect::Allow);
    let s = AuthState::compile(&b).unwrap();
    assert!(
        s.anonymous().may_publish("sensors/vault/x"),
        "no anonymous ACL yet"
    );
    b.acls.push(AclEntry {
        anonymous: true,
        name: "guests".into(),
        tokens: vec![],
        selector: None,
        rules: vec![rule(
            &["sensors/vault/#"],
            &[Action::Publish, Action::Subscribe],
            Effect::Deny,
        )],
    });
    let s = AuthState::compile(&b).unwrap();
    let anon = s.anonymous();
    assert!(!anon.may_publish("sensors/vault/x"));
    assert!(anon.may_publish("sensors/1/temp"));
    assert_eq!(anon.grant_subscribe("sensors/#"), Grant::Filtered);
    assert!(!anon.may_receive("sensors/vault/x"));
    // The anonymous ACL does not apply to tokens.
    let bare = s
        .authenticate(None, b"bare-secret-000000000", at(0))
        .unwrap();
    assert!(bare.may_publish("sensors/vault/x"));
}

#[test]
fn the_every_topic_shortcut_agrees_with_the_rules() {
    let mut b = bundle();
    b.default_policy = Some(Effect::Allow);
    let s = AuthState::compile(&b).unwrap();
    let now = at(EXPIRY - 10);
    let bare = s.authenticate(None, b"bare-secret-000000000", now).unwrap();
    let sensor = s.authenticate(None, b"sensor-secret-000000", now).unwrap();
    let topics = [
        "sensors/1/temp",
        "sensors/vault/x",
        "admin",
        "a/b/c",
        "$SYS/x",
    ];
    // No rule names a topic: one verdict, the default, for every topic.
    for p in [&s.anonymous(), &bare] {
        let every = p.publish_for_every_topic();
        assert_eq!(every, Some(true));
        for t in topics {
            assert_eq!(every, Some(p.may_publish(t)), "{t}");
        }
    }
    // Rules: no shortcut, the topic decides.
    assert_eq!(sensor.publish_for_every_topic(), None);
    b.default_policy = Some(Effect::Deny);
    let s = AuthState::compile(&b).unwrap();
    assert_eq!(s.anonymous().publish_for_every_topic(), Some(false));
    assert!(!s.anonymous().may_publish("a/b/c"));
}

#[test]
fn decisions_name_the_rule() {
    let s = state();
    let sensor = s
        .authenticate(Some("sensor"), b"sensor-secret-000000", at(0))
        .unwrap();
    let d = sensor.check_publish("sensors/vault/temp");
    assert!(!d.allowed);
    assert_eq!(
        d.reason,
        Reason::Rule {
            acl: "sensors".into(),
            rule: 2,
            filter: "sensors/vault/#".into()
        }
    );
    let d = sensor.check_subscribe("sensors/1/#");
    assert!(d.allowed);
    assert!(matches!(d.reason, Reason::Rule { rule: 1, .. }));
    assert_eq!(sensor.check_publish("x").reason, Reason::DefaultPolicy);
    assert_eq!(sensor.check_publish("a/+").reason, Reason::InvalidTopic);
    assert_eq!(sensor.check_receive("a/#").reason, Reason::InvalidTopic);
}

#[test]
fn default_policy() {
    let mut b = bundle();
    b.default_policy = Some(Effect::Allow);
    let s = AuthState::compile(&b).unwrap();
    assert_eq!(s.default_policy(), Effect::Allow);
    let bare = s
        .authenticate(None, b"bare-secret-000000000", at(0))
        .unwrap();
    assert!(bare.may_publish("x") && bare.may_subscribe("#"));
    let sensor = s
        .authenticate(None, b"sensor-secret-000000", at(0))
        .unwrap();
    assert!(sensor.may_publish("unrelated"));
    assert!(!sensor.may_publish("sensors/vault/a"), "deny still wins");
    assert_eq!(
        sensor.grant_subscribe("#"),
        Grant::Filtered,
        "a deny rule inside the filter makes it filtered, under allow too"
    );
    assert_eq!(sensor.grant_subscribe("sensors/vault/#"), Grant::Refused);
    assert!(s.anonymous().may_subscribe("x/#"));

    // Without tokens and without a policy: allow.
    b.tokens.clear();
    b.default_policy = None;
    let s = AuthState::compile(&b).unwrap();
    assert_eq!(s.default_policy(), Effect::Allow);
    assert!(s.anonymous().may_publish("x"));

    let open = AuthState::open("dev");
    assert_eq!(open.broker(), "dev");
    assert!(open.anonymous().may_subscribe("#"));
    assert_eq!(
        open.authenticate(None, b"anything", at(0)).unwrap_err(),
        AuthError::UnknownOrWrongSecret
    );
}

#[test]
fn authentication_forms() {
    let s = state();
    let before = at(EXPIRY - 1);
    let after = at(EXPIRY);
    for user in [None, Some(""), Some("home"), Some("authorization")] {
        let p = s
            .authenticate(user, b"sensor-secret-000000", before)
            .unwrap();
        assert_eq!(p.name(), Some("sensor"), "{user:?}");
        assert_eq!(
            s.authenticate(user, b"sensor-secret-000001", before)
                .map(|_| ()),
            Err(AuthError::UnknownOrWrongSecret),
            "{user:?}"
        );
        assert_eq!(
            s.authenticate(user, b"", before).map(|_| ()),
            Err(AuthError::UnknownOrWrongSecret)
        );
        assert_eq!(
            s.authenticate(user, b"app-secret-0000000000", after)
                .map(|_| ()),
            Err(AuthError::Expired {
                token: "app".into()
            })
        );
        assert!(
            s.authenticate(user, b"app-secret-0000000000", before)
                .is_ok()
        );
        assert_eq!(
            s.authenticate(user, b"off-secret-0000000000", before)
                .map(|_| ()),
            Err(AuthError::Disabled {
                token: "off".into()
            })
        );
    }
    // Token-name form: the secret must belong to that token.
    assert!(
        s.authenticate(Some("sensor"), b"sensor-secret-000000", before)
            .is_ok()
    );
    assert_eq!(
        s.authenticate(Some("app"), b"sensor-secret-000000", before)
            .map(|_| ()),
        Err(AuthError::UsernameMismatch {
            token: "sensor".into()
        })
    );
    assert_eq!(
        s.authenticate(Some("nobody"), b"sensor-secret-000000", before)
            .map(|_| ()),
        Err(AuthError::UsernameMismatch {
            token: "sensor".into()
        })
    );
    assert_eq!(
        s.authenticate(Some("Authorization"), b"sensor-secret-000000", before)
            .unwrap_err(),
        AuthError::UsernameMismatch {
            token: "sensor".into()
        },
        "the literal is lower case"
    );
    assert_eq!(
        s.authenticate(Some("sensor"), b"wrong", before).map(|_| ()),
        Err(AuthError::UnknownOrWrongSecret)
    );
    assert_eq!(
        s.authenticate(Some("app"), b"app-secret-0000000000", after)
            .map(|_| ()),
        Err(AuthError::Expired {
            token: "app".into()
        })
    );
    assert_eq!(
        s.authenticate(Some("off"), b"off-secret-0000000000", before)
            .map(|_| ()),
        Err(AuthError::Disabled {
            token: "off".into()
        })
    );
    // Error text carries token names only.
    let e = s
        .authenticate(Some("off"), b"off-secret-0000000000", before)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("secret-0"), "{e}");
}

#[test]
fn token_names_that_look_like_the_special_usernames() {
    let key = HashKey::from_base64(KEY).unwrap();
    let mut b = bundle();
    b.tokens
        .push(TokenEntry::new("home", &key, "home-secret-000000000"));
    b.tokens.push(TokenEntry::new(
        "authorization",
        &key,
        "auth-secret-00000000",
    ));
    let s = AuthState::compile(&b).unwrap();
    let now = at(0);
    // The secret decides; the username only narrows.
    assert_eq!(
        s.authenticate(Some("home"), b"sensor-secret-000000", now)
            .unwrap()
            .name(),
        Some("sensor")
    );
    assert_eq!(
        s.authenticate(Some("home"), b"home-secret-000000000", now)
            .unwrap()
            .name(),
        Some("home")
    );
    assert_eq!(
        s.authenticate(Some("authorization"), b"auth-secret-00000000", now)
            .unwrap()
            .name(),
        Some("authorization")
    );
}

#[test]
fn expiry_and_lookup() {
    let s = state();
    assert_eq!(s.token_count(), 4);
    assert_eq!(s.acl_count(), 2);
    let app = s.token("app").unwrap();
    assert_eq!(app.expires_at(), Some(at(EXPIRY)));
    assert!(app.is_valid_at(at(EXPIRY - 1)) && !app.is_valid_at(at(EXPIRY)));
    assert!(s.token("off").unwrap().is_disabled());
    assert!(s.token("gone").is_none());
    assert_eq!(s.next_expiry(at(0)), Some(at(EXPIRY)));
    assert_eq!(s.next_expiry(at(EXPIRY)), None);
    assert_eq!(
        s.tokens().filter_map(|p| p.name()).collect::<Vec<_>>(),
        ["sensor", "app", "off", "bare"]
    );
    assert!(s.anonymous().is_anonymous());
    let dbg = format!("{s:?} {:?}", s.token("sensor").unwrap());
    assert!(!dbg.contains(KEY) && !dbg.contains("hash"), "{dbg}");
}

#[test]
fn reload_revokes_and_refreshes() {
    let old = state();
    let now = at(EXPIRY - 100);
    let sensor = old
        .authenticate(None, b"sensor-secret-000000", now)
        .unwrap();
    let app = old
        .authenticate(None, b"app-secret-0000000000", now)
        .unwrap();
    let bare = old
        .authenticate(None, b"bare-secret-000000000", now)
        .unwrap();
    assert!(!sensor.may_publish("sensors/1/other"));

    let key = HashKey::from_base64(KEY).unwrap();
    let mut b = bundle();
    // sensor: rules widened; app: expires earlier; bare: removed;
    // off: still disabled (not reported again).
    b.acls[0]
        .rules
        .push(rule(&["sensors/+/other"], PUB, Effect::Allow));
    b.tokens[1].expires_at = Some("2029-12-31T23:59:00Z".into());
    b.tokens.retain(|t| t.name != "bare");
    b.tokens
        .push(TokenEntry::new("new", &key, "new-secret-0000000000"));
    let new = AuthState::compile(&b).unwrap();
    assert_ne!(new.generation(), old.generation());

    assert_eq!(new.revoked_since(&old, now), ["bare"]);
    assert_eq!(new.revoked_since(&old, at(EXPIRY - 30)), ["app", "bare"]);

    let sensor2 = new.refresh(&sensor, now).unwrap();
    assert_eq!(sensor2.generation(), new.generation());
    assert!(sensor2.may_publish("sensors/1/other"));
    assert!(new.refresh(&app, now).is_ok());
    assert_eq!(
        new.refresh(&app, at(EXPIRY - 30)).unwrap_err(),
        AuthError::Expired {
            token: "app".into()
        }
    );
    assert_eq!(
        new.refresh(&bare, now).unwrap_err(),
        AuthError::Revoked {
            token: "bare".into()
        }
    );
    assert!(new.refresh(&old.anonymous(), now).unwrap().is_anonymous());

    // Secret rotation and disabling revoke.
    let mut b2 = b.clone();
    b2.tokens[0].secret_hash = key.hash_secret("sensor-secret-rotated");
    b2.tokens[1].disabled = true;
    let rotated = AuthState::compile(&b2).unwrap();
    assert_eq!(rotated.revoked_since(&new, now), ["sensor", "app"]);
    assert!(matches!(
        rotated.refresh(&sensor2, now),
        Err(AuthError::Revoked { .. })
    ));
    assert!(matches!(
        rotated.refresh(&app, now),
        Err(AuthError::Disabled { .. })
    ));

    // A new hash key revokes everyone (the secrets cannot be re-checked).
    let mut b3 = b.clone();
    let key3 = HashKey::generate();
    b3.hash_key = key3.to_base64();
    for t in &mut b3.tokens {
        t.secret_hash = key3.hash_secret(&format!("{}-x-secret-0000000", t.name));
    }
    let rekeyed = AuthState::compile(&b3).unwrap();
    assert_eq!(rekeyed.revoked_since(&new, now), ["sensor", "app", "new"]);
    // Identical bundle: nothing revoked, still a new generation.
    let same = AuthState::compile(&b).unwrap();
    assert!(same.revoked_since(&new, now).is_empty());
    assert_ne!(same.generation(), new.generation());
}

#[test]
fn load_rejects_bad_bundles_whole() {
    let mut b = bundle();
    assert!(AuthState::load(b.to_json_pretty().as_bytes()).is_ok());
    b.acls[1].rules[0].topics.push("bad/#/x".into());
    let e = AuthState::load(b.to_json_pretty().as_bytes()).unwrap_err();
    assert!(e.to_string().contains("acls[1] (\"app\") rules[0]"), "{e}");
}

// ---------------------------------------------------------------------------
// Randomized properties. A small xorshift generator keeps them reproducible
// and dependency-free; the alphabet is tiny so that collisions (and hence the
// interesting cases) are frequent.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const LEVELS: [&str; 4] = ["a", "b", "$x", ""];

fn random_filter(rng: &mut XorShift) -> String {
    loop {
        let f = random_filter_or_empty(rng);
        if !f.is_empty() {
            return f;
        }
    }
}

fn random_filter_or_empty(rng: &mut XorShift) -> String {
    let len = 1 + rng.below(3);
    let mut levels: Vec<&str> = (0..len)
        .map(|_| {
            if rng.chance(30) {
                "+"
            } else {
                LEVELS[rng.below(LEVELS.len())]
            }
        })
        .collect();
    if rng.chance(30) {
        if rng.chance(50) {
            levels.push("#");
        } else {
            *levels.last_mut().unwrap() = "#";
        }
    }
    levels.join("/")
}

/// Every topic name of up to four levels over the alphabet plus a level no
/// filter uses, so that `+` and `#` always have a witness of their own.
fn all_topics() -> Vec<String> {
    let alphabet = ["a", "b", "$x", "", "c"];
    let mut out: Vec<String> = Vec::new();
    let mut layer: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
    for _ in 0..4 {
        out.extend(layer.iter().filter(|t| !t.is_empty()).cloned());
        layer = layer
            .iter()
            .flat_map(|t| alphabet.iter().map(move |l| format!("{t}/{l}")))
            .collect();
    }
    out
}

#[test]
fn covers_and_overlaps_agree_with_matching() {
    let topics = all_topics();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut counts = [0usize; 4];
    for _ in 0..1000 {
        let f = random_filter(&mut rng);
        let g = random_filter(&mut rng);
        let f_topics: Vec<&String> = topics.iter().filter(|t| matches(&f, t)).collect();
        let brute_covers = f_topics.iter().all(|t| matches(&g, t));
        let brute_overlaps = f_topics.iter().any(|t| matches(&g, t));
        assert_eq!(covers(&g, &f), brute_covers, "covers({g:?}, {f:?})");
        assert_eq!(overlaps(&f, &g), brute_overlaps, "overlaps({f:?}, {g:?})");
        assert_eq!(overlaps(&g, &f), brute_overlaps, "overlaps({g:?}, {f:?})");
        counts[usize::from(brute_covers) * 2 + usize::from(brute_overlaps)] += 1;
    }
    // The generator must exercise both outcomes of both relations.
    assert!(
        counts.iter().filter(|&&c| c > 20).count() >= 3,
        "{counts:?}"
    );
    // On topic names, covering and matching are the same thing.
    for t in topics.iter().step_by(7) {
        for f in ["#", "+/+", "a/#", "$x/#", "+/$x/+", "/+", "+"] {
            assert_eq!(covers(f, t), matches(f, t), "{f:?} {t:?}");
            assert_eq!(overlaps(f, t), matches(f, t), "{f:?} {t:?}");
        }
    }
}

fn random_rules(rng: &mut XorShift) -> Vec<Rule> {
    (0..rng.below(5))
        .map(|_| {
            let topics = (0..1 + rng.below(2)).map(|_| random_filter(rng)).collect();
            let actions = match rng.below(3) {
                0 => vec![Action::Publish],
                1 => vec![Action::Subscribe],
                _ => vec![Action::Subscribe, Action::Publish],
            };
            let effect = if rng.chance(35) {
                Effect::Deny
            } else {
                Effect::Allow
            };
            Rule {
                topics,
                actions,
                effect,
            }
        })
        .collect()
}

/// Reference semantics straight from the rules, independent of the compiled
/// structure: may `action` on topic *name* `topic`?
fn reference_allows(rules: &[&Rule], default_allow: bool, action: Action, topic: &str) -> bool {
    let applicable = || rules.iter().filter(|r| r.actions.contains(&action));
    let hit = |effect| {
        applicable()
            .filter(|r| r.effect == effect)
            .any(|r| r.topics.iter().any(|f| matches(f, topic)))
    };
    !hit(Effect::Deny) && (hit(Effect::Allow) || default_allow)
}

#[test]
fn no_message_reaches_or_leaves_a_token_without_permission() {
    let topics = all_topics();
    let key = HashKey::from_base64(KEY).unwrap();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut granted_subscriptions = 0;
    let mut granted_publishes = 0;
    let mut refused = 0;
    let mut filtered = 0;
    for round in 0..60 {
        let mut b = AuthBundle {
            version: 1,
            broker: "b".into(),
            hash_key: KEY.into(),
            default_policy: match rng.below(3) {
                0 => None,
                1 => Some(Effect::Allow),
                _ => Some(Effect::Deny),
            },
            tokens: vec![],
            acls: vec![],
        };
        for t in 0..3 {
            let mut e = TokenEntry::new(format!("t{t}"), &key, &format!("secret-{round}-{t}"));
            if rng.chance(50) {
                e.labels.insert("g".into(), format!("{}", rng.below(2)));
            }
            b.tokens.push(e);
        }
        for a in 0..3 {
            let tokens = (0..3)
                .filter(|_| rng.chance(40))
                .map(|t| format!("t{t}"))
                .collect();
            let selector = rng.chance(30).then(|| LabelSelector {
                match_labels: [("g".to_string(), format!("{}", rng.below(2)))].into(),
            });
            b.acls.push(AclEntry {
                anonymous: false,
                name: format!("acl{a}"),
                tokens,
                selector,
                rules: random_rules(&mut rng),
            });
        }
        let state = AuthState::compile(&b).unwrap();
        let default_allow = b.effective_default_policy() == Effect::Allow;

        for t in 0..3 {
            let name = format!("t{t}");
            let entry = &b.tokens[t];
            let rules: Vec<&Rule> = b
                .acls
                .iter()
                .filter(|acl| {
                    acl.tokens.contains(&name)
                        || acl
                            .selector
                            .as_ref()
                            .is_some_and(|s| s.matches(&entry.labels))
                })
                .flat_map(|acl| &acl.rules)
                .collect();
            let p = state
                .authenticate(Some(&name), format!("secret-{round}-{t}").as_bytes(), at(0))
                .unwrap();

            // Names of up to three levels keep this exhaustive part fast;
            // deliveries below use every topic.
            for topic in topics.iter().filter(|t| t.matches('/').count() < 3) {
                // (b) publish is exactly "no deny matches, and an allow
                // matches or the default allows".
                let want = reference_allows(&rules, default_allow, Action::Publish, topic);
                assert_eq!(
                    p.may_publish(topic),
                    want,
                    "publish {topic:?} by {name}: {b:#?}"
                );
                granted_publishes += usize::from(want);
                // Reading one topic has the same shape.
                let want = reference_allows(&rules, default_allow, Action::Subscribe, topic);
                assert_eq!(p.may_receive(topic), want, "receive {topic:?} by {name}");
            }

            for _ in 0..12 {
                let filter = random_filter(&mut rng);
                let raw = if rng.chance(15) {
                    format!("$share/g/{filter}")
                } else {
                    filter.clone()
                };
                let grant = p.grant_subscribe(&raw);
                assert_eq!(grant.allowed(), p.may_subscribe(&raw));
                if !grant.allowed() {
                    refused += 1;
                    continue;
                }
                granted_subscriptions += 1;
                filtered += usize::from(grant == Grant::Filtered);
                // (a) every message the subscription delivers — all it
                // matches for a whole grant, those that pass the per-message
                // check for a filtered one — is one the rules let it read.
                for topic in topics.iter().filter(|t| matches(&filter, t)) {
                    let delivered = match grant {
                        Grant::Whole => true,
                        _ => p.may_receive(topic),
                    };
                    let allowed = reference_allows(&rules, default_allow, Action::Subscribe, topic);
                    assert!(
                        !delivered || allowed,
                        "{name} subscribed {raw:?} ({grant:?}) would get {topic:?}, which the rules refuse: {b:#?}"
                    );
                    // (c) and nothing readable is withheld from it.
                    assert!(
                        delivered || !allowed,
                        "{name} subscribed {raw:?} ({grant:?}) would miss {topic:?}, which it may read"
                    );
                }
            }
        }
    }
    assert!(
        granted_subscriptions > 100 && refused > 100 && granted_publishes > 1000 && filtered > 20,
        "weak generator: {granted_subscriptions} granted ({filtered} filtered), {refused} refused, {granted_publishes} publishes"
    );
}

/// The example and the table in docs/auth-bundle.md must stay true.
#[test]
fn documented_example() {
    let doc = include_str!("../../docs/auth-bundle.md");
    let json = doc
        .split("```json")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a json block in the doc");
    let bundle = AuthBundle::parse(json.as_bytes()).unwrap();
    assert!(bundle.warnings().is_empty());
    let s = AuthState::compile(&bundle).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000); // 2027
    let sensor = s
        .authenticate(
            Some("home"),
            b"q6H0bA3c0bm1yWbJ4kR7vTt0dM2xQ9pL-8sNfUe_3Zc",
            now,
        )
        .unwrap();
    let dash = s
        .authenticate(
            Some("dashboard"),
            b"Wz4lJp0Yc2m8rT1fQ5hB7nK9sV3xA6eD-0gUiLoP_Mw",
            now,
        )
        .unwrap();
    assert!(sensor.may_publish("sensors/attic/temperature"));
    assert!(!sensor.may_publish("sensors/attic/status"));
    assert!(sensor.may_subscribe("commands/+"));
    assert!(sensor.may_subscribe("commands/attic"));
    assert!(!sensor.may_subscribe("commands/#"));
    assert!(dash.may_subscribe("sensors/#"));
    assert!(dash.may_subscribe("#"));
    assert_eq!(dash.grant_subscribe("#"), Grant::Filtered);
    assert!(!dash.may_receive("internal/x"));
    assert!(!dash.may_subscribe("internal/x"));
    assert!(!dash.may_subscribe("$SYS/#"));
    assert!(dash.may_publish("commands/attic/fan"));
    assert!(!dash.may_publish("internal/x"));
    assert!(matches!(
        s.authenticate(None, b"Hn2bT7xQ0cV5mR8kJ3zW1pL6sD9fA4gE-yU_iOtKaBc", now),
        Err(AuthError::Disabled { .. })
    ));
    let after = starling_model::bundle::parse_rfc3339("2030-06-30T00:00:01Z").unwrap();
    assert!(matches!(
        s.authenticate(None, b"Wz4lJp0Yc2m8rT1fQ5hB7nK9sV3xA6eD-0gUiLoP_Mw", after),
        Err(AuthError::Expired { .. })
    ));
    assert!(!s.anonymous().may_publish("sensors/attic/temperature"));
}

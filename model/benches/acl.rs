//! Cost of the ACL checks on the broker's hot paths, measured with
//! `std::time::Instant` (no benchmark framework):
//!
//! ```sh
//! cargo bench -p starling-model --bench acl
//! ```
//!
//! Prints ns per `Principal::may_publish` for a token with 1, 10 and 100
//! publish rules (allowed topic matched by the last rule, and a refused topic
//! that scans every rule), per `may_subscribe`, per
//! `AuthState::authenticate`, per bare `topic::matches` and per hit in a
//! decision cache like the broker's, for comparison in the same run, with
//! the ratios between them.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use starling_model::acl::{AuthState, Principal};
use starling_model::bundle::{AclEntry, Action, AuthBundle, Effect, Rule, TokenEntry};
use starling_model::token::HashKey;
use starling_model::topic;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET: &str = "bench-secret-0123456789abcdef";

/// Runs `f` in batches until at least `target` has elapsed and returns the
/// best (lowest) ns/op over 15 rounds, which filters scheduler noise.
fn measure(mut f: impl FnMut() -> bool) -> f64 {
    const ROUNDS: usize = 15;
    let target = Duration::from_millis(20);
    // Calibrate the batch size so one batch takes about `target`.
    let mut batch: u64 = 64;
    loop {
        let start = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        let took = start.elapsed();
        if took >= target / 4 || batch >= 1 << 30 {
            let per = took.as_nanos() as f64 / batch as f64;
            batch = ((target.as_nanos() as f64 / per.max(0.01)) as u64).max(16);
            break;
        }
        batch *= 4;
    }
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        let ns = start.elapsed().as_nanos() as f64 / batch as f64;
        best = best.min(ns);
    }
    best
}

/// A bundle with one token `t` carrying `rules` publish/subscribe allow rules
/// `bench/r{i}/+/value` (plus one deny rule `bench/denied/#` in front when
/// `rules > 1`), so an allowed topic is matched by the *last* rule.
fn bundle(rules: usize) -> AuthBundle {
    let key = HashKey::from_base64(KEY).expect("key");
    let mut b = AuthBundle::new("bench");
    b.hash_key = KEY.into();
    b.default_policy = Some(Effect::Deny);
    b.tokens.push(TokenEntry::new("t", &key, SECRET));
    // Some other tokens so authenticate's map is not trivially small.
    for i in 0..1000 {
        b.tokens.push(TokenEntry::new(
            format!("other-{i}"),
            &key,
            &format!("other-secret-{i:06}-xxxxxxxx"),
        ));
    }
    let mut acl_rules = Vec::new();
    if rules > 1 {
        acl_rules.push(Rule {
            topics: vec!["bench/denied/#".into()],
            actions: vec![Action::Publish, Action::Subscribe],
            effect: Effect::Deny,
        });
    }
    let allow = if rules > 1 { rules - 1 } else { rules };
    acl_rules.push(Rule {
        topics: (0..allow).map(|i| format!("bench/r{i}/+/value")).collect(),
        actions: vec![Action::Publish, Action::Subscribe],
        effect: Effect::Allow,
    });
    b.acls.push(AclEntry {
        anonymous: false,
        name: "bench".into(),
        tokens: vec!["t".into()],
        selector: None,
        rules: acl_rules,
    });
    b.validate().expect("valid bench bundle");
    b
}

struct Row {
    what: String,
    ns: f64,
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary too (without it), where a quick smoke run is enough.
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        // Only prove it runs; `cargo test --all-targets` should stay fast.
        let state = AuthState::compile(&bundle(10)).expect("compile");
        let who = state
            .authenticate(Some("t"), SECRET.as_bytes(), SystemTime::now())
            .expect("auth");
        assert!(who.may_publish("bench/r8/x/value"));
        assert!(!who.may_publish("bench/denied/x"));
        return;
    }

    // Warm up (CPU frequency, caches) before the first measurement.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        black_box(topic::matches(black_box("a/+/c"), black_box("a/b/c")));
    }

    let topic_name = "bench/r0/device-42/value";
    let filter = "bench/r0/+/value";
    let mut rows: Vec<Row> = Vec::new();

    let matches_ns = measure(|| topic::matches(black_box(filter), black_box(topic_name)));
    rows.push(Row {
        what: "topic::matches (one filter, hit)".into(),
        ns: matches_ns,
    });
    let matches_miss_ns =
        measure(|| topic::matches(black_box("bench/r7/+/value"), black_box(topic_name)));
    rows.push(Row {
        what: "topic::matches (one filter, miss at level 2)".into(),
        ns: matches_miss_ns,
    });

    let mut per_rule_counts = Vec::new();
    for n in [1usize, 10, 100] {
        let state = AuthState::compile(&bundle(n)).expect("compile");
        let who: std::sync::Arc<Principal> = state
            .authenticate(Some("t"), SECRET.as_bytes(), SystemTime::now())
            .expect("auth");
        let allow = if n > 1 { n - 1 } else { n };
        let last = format!("bench/r{}/device-42/value", allow - 1);
        assert!(who.may_publish(&last), "{n}: last rule must allow");
        assert!(!who.may_publish("bench/nope/x"), "{n}: default deny");
        let hit = measure(|| who.may_publish(black_box(&last)));
        let miss = measure(|| who.may_publish(black_box("bench/nope/device-42/value")));
        let first = measure(|| who.may_publish(black_box(topic_name)));
        let sub_last = format!("bench/r{}/+/value", allow - 1);
        assert!(who.may_subscribe(&sub_last));
        let sub = measure(|| who.may_subscribe(black_box(&sub_last)));
        rows.push(Row {
            what: format!("may_publish, {n:>3} rules, allowed by first rule"),
            ns: first,
        });
        rows.push(Row {
            what: format!("may_publish, {n:>3} rules, allowed by last rule"),
            ns: hit,
        });
        rows.push(Row {
            what: format!("may_publish, {n:>3} rules, refused (all rules scanned)"),
            ns: miss,
        });
        rows.push(Row {
            what: format!("may_subscribe, {n:>3} rules, allowed by last rule"),
            ns: sub,
        });
        per_rule_counts.push((n, hit, miss));
    }

    // The broker keeps a per-connection map of publish decisions by topic
    // (cleared on bundle change); a repeated topic costs one lookup.
    let mut cache: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    cache.insert(topic_name.to_string(), true);
    for i in 0..50 {
        cache.insert(format!("bench/r{i}/device-42/value"), true);
    }
    let cached = measure(|| cache.get(black_box(topic_name)).copied().unwrap_or(false));
    rows.push(Row {
        what: "decision cache hit (HashMap<String, bool>, as the broker)".into(),
        ns: cached,
    });

    let state = AuthState::compile(&bundle(10)).expect("compile");
    let now = SystemTime::now();
    let auth_ok = measure(|| {
        state
            .authenticate(black_box(Some("bench")), black_box(SECRET.as_bytes()), now)
            .is_ok()
    });
    let auth_bad = measure(|| {
        state
            .authenticate(
                black_box(Some("bench")),
                black_box(b"wrong-secret-0123456789abcdef"),
                now,
            )
            .is_ok()
    });
    rows.push(Row {
        what: "authenticate (1001 tokens, good secret)".into(),
        ns: auth_ok,
    });
    rows.push(Row {
        what: "authenticate (1001 tokens, wrong secret)".into(),
        ns: auth_bad,
    });

    println!("ACL benchmark (best of 15 rounds, ns per operation)");
    println!("{:<58} {:>10} {:>12}", "operation", "ns/op", "x matches");
    for r in &rows {
        println!("{:<58} {:>10.1} {:>12.1}", r.what, r.ns, r.ns / matches_ns);
    }
    println!();
    for (n, hit, miss) in per_rule_counts {
        println!(
            "{n:>3} rules: allowed-by-last {hit:.1} ns = {:.1} ns/rule, refused {miss:.1} ns = {:.1} ns/rule",
            hit / n as f64,
            miss / n as f64
        );
    }
}

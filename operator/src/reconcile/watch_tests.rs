//! The controllers' watches against the in-memory API server, with the real
//! Controllers running (`controllers::run`): what a bulk import and one
//! change cost in API requests, and that the Secrets users bring (a Token's
//! `secretRef`, a Broker's `tls.secretRef`) are followed within seconds
//! rather than at the 5-minute resync.
//!
//! Requests are counted by the fake ([`FakeApi::requests`]); watch streams
//! are left out of the counts (they are long-lived, not per change).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use starling_model::bundle::AuthBundle;
use starling_model::token::verify_secret;
use tokio::time::Instant;

use super::Context;
use super::fake::{ApiCall, FakeApi};
use crate::crd::broker::{SecretNameRef, TlsSpec};
use crate::crd::token::SecretKeyRef;
use crate::crd::{Broker, BrokerRef, BrokerSpec, Token, TokenSpec};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

const NS: &str = "ns";
const BROKER: &str = "demo";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..ObjectMeta::default()
    }
}

/// The controllers running against a fresh fake.
struct Running {
    fake: FakeApi,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start() -> Running {
        let fake = FakeApi::new();
        let metrics = Arc::new(Metrics::default());
        let ctx = Arc::new(Context::new(fake.client(), metrics.clone()));
        let shutdown = Shutdown::default();
        let task = tokio::spawn(crate::controllers::run(
            fake.client(),
            ctx,
            Some(NS.into()),
            shutdown.wait(),
        ));
        Running {
            fake,
            metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("controllers stop on shutdown")
            .expect("controller task");
    }

    /// Reconciliations of `kind` started so far.
    fn reconciles(&self, kind: &str) -> u64 {
        let text = self.metrics.encode();
        let prefix = format!("starling_operator_reconciliations_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().unwrap_or(0))
    }

    /// Waits until no request has come for `quiet` (every reconcile that
    /// was started by what happened before has finished).
    async fn settle(&self, quiet: Duration) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.fake.requests().len();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = self.fake.requests().len();
            if n != last {
                (last, since) = (n, Instant::now());
            } else if since.elapsed() >= quiet {
                return;
            }
            assert!(Instant::now() < deadline, "the controllers never settle");
        }
    }

    fn bundle(&self) -> Option<AuthBundle> {
        let s: Secret = self.fake.get(NS, &format!("{BROKER}-auth"))?;
        AuthBundle::parse(&s.data?["bundle.json"].0).ok()
    }

    fn password(&self, token: &str) -> Option<String> {
        let s: Secret = self.fake.get(NS, &format!("{token}-credentials"))?;
        String::from_utf8(s.data?.get("password")?.0.clone()).ok()
    }
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// One-off requests (watches left out), as `verb plural[/name]` → count.
fn summary(calls: &[ApiCall]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in calls.iter().filter(|c| !c.watch) {
        let key = match c.name.as_deref() {
            // Per-object calls are summed per kind of object, not per name.
            Some(n) if n.ends_with("-credentials") => {
                format!("{} {}/*-credentials", c.verb(), c.plural)
            }
            Some(_) if c.plural == "tokens" || c.plural == "events" => {
                format!("{} {}/*", c.verb(), c.plural)
            }
            _ => c.to_string(),
        };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

fn one_off(calls: &[ApiCall]) -> usize {
    calls.iter().filter(|c| !c.watch).count()
}

fn broker(fake: &FakeApi, spec: BrokerSpec) -> Broker {
    fake.put(&Broker {
        metadata: meta(BROKER),
        spec,
        status: None,
    })
}

fn token(name: &str) -> Token {
    Token {
        metadata: meta(name),
        spec: TokenSpec {
            broker_ref: BrokerRef {
                name: BROKER.into(),
            },
            ..TokenSpec::default()
        },
        status: None,
    }
}

/// Stores a changed object as a user's update through the API server would:
/// `metadata.generation` goes up when the spec changed. (Done on the fake
/// directly so that the user's own request is not counted.)
fn user_update<K>(fake: &FakeApi, mut obj: K) -> K
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
{
    let spec = |v: &serde_json::Value| v.get("spec").cloned();
    let old: Option<K> = fake.get(NS, &obj.name_any());
    let old_spec = old
        .as_ref()
        .map(|o| spec(&serde_json::to_value(o).unwrap()));
    let new_spec = spec(&serde_json::to_value(&obj).unwrap());
    let g = old.as_ref().and_then(|o| o.meta().generation).unwrap_or(1);
    obj.meta_mut().generation = Some(if old_spec == Some(new_spec) { g } else { g + 1 });
    fake.put(&obj)
}

fn opaque(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: meta(name),
        data: Some(crate::build::secret_data(
            data.iter().map(|(k, v)| (*k, v.to_string())),
        )),
        ..Secret::default()
    }
}

/// Creates a Broker and `n` Tokens and waits until every Token has its
/// credentials Secret and the bundle holds all of them; returns the
/// controllers, settled, and the requests the import cost.
async fn import(n: usize) -> (Running, Vec<ApiCall>, Duration) {
    let r = Running::start();
    broker(&r.fake, BrokerSpec::default());
    until("the broker's bundle", Duration::from_secs(20), || {
        r.bundle().is_some()
    })
    .await;
    let start = Instant::now();
    for i in 0..n {
        r.fake.put(&token(&format!("t{i:03}")));
    }
    until(
        "every token's credentials and the bundle with all of them",
        Duration::from_secs(60),
        || {
            r.bundle().is_some_and(|b| b.tokens.len() == n)
                && (0..n).all(|i| r.password(&format!("t{i:03}")).is_some())
        },
    )
    .await;
    let took = start.elapsed();
    r.settle(Duration::from_millis(800)).await;
    let calls = r.fake.take_requests();
    (r, calls, took)
}

/// Disables one Token; returns the requests that cost once all settled.
async fn disable_one(r: &Running) -> Vec<ApiCall> {
    r.fake.take_requests();
    let mut t: Token = r.fake.get(NS, "t007").expect("token");
    t.spec.disabled = true;
    user_update(&r.fake, t);
    until(
        "the token disabled in the bundle",
        Duration::from_secs(10),
        || {
            r.bundle()
                .is_some_and(|b| b.tokens.iter().any(|t| t.name == "t007" && t.disabled))
        },
    )
    .await;
    r.settle(Duration::from_millis(800)).await;
    r.fake.take_requests()
}

/// Adds one Token (the Broker's status `tokens` count changes); returns
/// the requests that cost once all settled.
async fn add_one(r: &Running, n: usize) -> Vec<ApiCall> {
    r.fake.take_requests();
    r.fake.put(&token("late"));
    until(
        "the new token in the bundle",
        Duration::from_secs(10),
        || r.bundle().is_some_and(|b| b.tokens.len() == n + 1),
    )
    .await;
    r.settle(Duration::from_millis(800)).await;
    r.fake.take_requests()
}

/// What one change may cost, whatever the number of Tokens: the Token's
/// reconcile and the echo of its own write (≤ 6 calls each: 3 gets, the
/// credentials apply, an event, a status write), and at most three Broker
/// reconciles (the change, the echo of the bundle write, one coalesced
/// straggler), ≤ 23 calls each (5 gets, 3 lists, 13 applies, an event, a
/// status write).
const ONE_CHANGE_MAX: usize = 2 * 6 + 3 * 23;

/// (a) and (b): a bulk import of 500 Tokens costs a bounded number of calls
/// per Token, and one Token change afterwards a constant number: the same
/// with 50 Tokens as with 500.
///
/// Measured before the predicates (controllers re-reconciling every Token
/// on each Broker status write): 17402 calls for the import (3616 Token
/// reconciles), 2058 for adding one Token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_import_and_one_change_cost_bounded_calls() {
    let mut per_change = Vec::new();
    for n in [500, 50] {
        let (r, calls, took) = import(n).await;
        let total = one_off(&calls);
        eprintln!(
            "import of {n} tokens: {total} requests in {took:?}, {} token and {} broker reconciles: {:#?}",
            r.reconciles("token"),
            r.reconciles("broker"),
            summary(&calls)
        );
        // Per Token: two reconciles (its creation and the echo of its new
        // credentials Secret) of ≤ 6 calls; the Broker's reconciles are
        // coalesced (one runs at a time, later triggers wait as one) and
        // cost ≤ 23 calls each, far fewer than one per Token. 16 per Token
        // leaves room for those; re-reconciling Tokens on Broker status
        // writes (≈ 35 per Token) does not fit.
        assert!(
            total <= 16 * n,
            "importing {n} tokens cost {total} requests: {:#?}",
            summary(&calls)
        );
        // A Token is reconciled for its creation and for its credentials
        // Secret appearing, not again for its status or the Broker's.
        let token_reconciles = r.reconciles("token") as usize;
        assert!(
            token_reconciles <= 2 * n + 10,
            "{token_reconciles} token reconciles for {n} tokens"
        );

        let disable = disable_one(&r).await;
        let add = add_one(&r, n).await;
        for (what, calls) in [
            ("disabling one token", &disable),
            ("adding one token", &add),
        ] {
            eprintln!(
                "{what} with {n} tokens: {} requests: {:#?}",
                one_off(calls),
                summary(calls)
            );
            assert!(
                one_off(calls) <= ONE_CHANGE_MAX,
                "{what} with {n} tokens cost {} requests: {:#?}",
                one_off(calls),
                summary(calls)
            );
            // Nothing per Token: no other Token's credentials are read.
            let creds = calls
                .iter()
                .filter(|c| {
                    c.name
                        .as_deref()
                        .is_some_and(|n| n.ends_with("-credentials"))
                })
                .filter(|c| {
                    !c.name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("t007") || n.starts_with("late"))
                })
                .count();
            assert_eq!(creds, 0, "{what}: other Tokens' credentials touched");
        }
        per_change.push((n, one_off(&disable), one_off(&add)));
        r.stop().await;
    }
    eprintln!("(tokens, disable one, add one) requests: {per_change:?}");
}

/// (c) A Broker status write that Tokens do not read (its pods became
/// ready) reconciles no Token, and a change to a Secret nobody refers to
/// costs no request at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_status_writes_and_unrelated_secrets_cost_tokens_nothing() {
    let (r, _, _) = import(20).await;
    let tokens_before = r.reconciles("token");
    r.fake.take_requests();

    // The StatefulSet's pods become ready: the Broker writes readyReplicas.
    let sts: k8s_openapi::api::apps::v1::StatefulSet = r.fake.get(NS, BROKER).expect("statefulset");
    let mut status = serde_json::to_value(sts.status.unwrap_or_default()).unwrap();
    status["replicas"] = 1.into();
    status["readyReplicas"] = 1.into();
    r.fake
        .set_status::<k8s_openapi::api::apps::v1::StatefulSet>(NS, BROKER, status);
    until("the broker's status", Duration::from_secs(5), || {
        r.fake
            .get::<Broker>(NS, BROKER)
            .and_then(|b| b.status)
            .is_some_and(|s| s.ready_replicas == 1)
    })
    .await;
    r.settle(Duration::from_millis(800)).await;
    let calls = r.fake.take_requests();
    assert!(
        calls
            .iter()
            .any(|c| c.to_string() == format!("patch brokers/{BROKER}/status")),
        "the broker wrote its status: {:#?}",
        summary(&calls)
    );
    assert_eq!(r.reconciles("token"), tokens_before, "tokens reconciled");
    // (The Broker's own reconcile lists Tokens once, for the bundle.)
    let token_calls: Vec<String> = calls
        .iter()
        .filter(|c| !c.watch)
        .filter(|c| {
            (c.plural == "tokens" && c.name.is_some())
                || c.name
                    .as_deref()
                    .is_some_and(|n| n.ends_with("-credentials"))
        })
        .map(ApiCall::to_string)
        .collect();
    assert_eq!(token_calls, Vec::<String>::new());

    // A Secret nobody refers to: created, changed, deleted.
    r.fake.put(&opaque("unrelated", &[("k", "v1")]));
    r.fake.put(&opaque("unrelated", &[("k", "v2")]));
    r.fake.remove::<Secret>(NS, "unrelated");
    r.settle(Duration::from_millis(500)).await;
    let calls = r.fake.take_requests();
    assert_eq!(one_off(&calls), 0, "{:#?}", summary(&calls));
    r.stop().await;
}

/// (d) Rotating the Secret a Token's `secretRef` names reaches its
/// credentials Secret and the bundle within seconds (no resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_token_secret_ref_updates_the_bundle_within_seconds() {
    let r = Running::start();
    broker(&r.fake, BrokerSpec::default());
    r.fake
        .put(&opaque("gitops", &[("token", "first-sealed-secret-123")]));
    let mut t = token("byo");
    t.spec.secret_ref = Some(SecretKeyRef {
        name: "gitops".into(),
        key: "token".into(),
    });
    r.fake.put(&t);
    r.fake.put(&token("plain"));
    let verifies = |secret: &str| {
        r.bundle().is_some_and(|b| {
            b.tokens.iter().any(|e| {
                e.name == "byo"
                    && verify_secret(&b.hash_key, secret.as_bytes(), &e.secret_hash) == Ok(true)
            })
        })
    };
    until(
        "the brought secret in the bundle",
        Duration::from_secs(20),
        || verifies("first-sealed-secret-123"),
    )
    .await;
    r.settle(Duration::from_millis(500)).await;
    r.fake.take_requests();

    r.fake
        .put(&opaque("gitops", &[("token", "second-sealed-secret-456")]));
    let took = until(
        "the rotated secret in the bundle",
        Duration::from_secs(3),
        || {
            verifies("second-sealed-secret-456")
                && r.password("byo").as_deref() == Some("second-sealed-secret-456")
        },
    )
    .await;
    r.settle(Duration::from_millis(500)).await;
    let calls = r.fake.take_requests();
    eprintln!(
        "secretRef rotation applied in {took:?}, {} requests: {:#?}",
        one_off(&calls),
        summary(&calls)
    );
    assert!(one_off(&calls) <= ONE_CHANGE_MAX, "{:#?}", summary(&calls));
    // The other Token was left alone.
    assert!(
        !calls
            .iter()
            .any(|c| c.name.as_deref() == Some("plain-credentials")),
        "{:#?}",
        summary(&calls)
    );
    r.stop().await;
}

/// A self-signed certificate for the Broker's Service name, valid until
/// `year`-01-01: (tls.crt, tls.key).
fn certificate(year: i32) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec![format!("{BROKER}.{NS}.svc")]).expect("params");
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn tls_secret(year: i32) -> Secret {
    let (crt, key) = certificate(year);
    let mut s = opaque(
        "my-tls",
        &[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &crt)],
    );
    s.type_ = Some("kubernetes.io/tls".into());
    s
}

/// (e) Rotating the Secret a Broker's `tls.secretRef` names reconciles the
/// Broker within seconds (its status shows the new certificate's expiry),
/// and the new `ca.crt` reaches the Tokens' credentials Secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_broker_tls_secret_ref_reconciles_the_broker_within_seconds() {
    let r = Running::start();
    r.fake.put(&tls_secret(2030));
    broker(
        &r.fake,
        BrokerSpec {
            tls: TlsSpec {
                secret_ref: Some(SecretNameRef {
                    name: "my-tls".into(),
                }),
                ..TlsSpec::default()
            },
            ..BrokerSpec::default()
        },
    );
    r.fake.put(&token("sensor"));
    let expires = || {
        r.fake
            .get::<Broker>(NS, BROKER)
            .and_then(|b| b.status?.certificate_expires_at)
    };
    let ca_of_token = || {
        let s: Secret = r.fake.get(NS, "sensor-credentials")?;
        String::from_utf8(s.data?.get("ca.crt")?.0.clone()).ok()
    };
    until(
        "the first certificate's expiry",
        Duration::from_secs(20),
        || expires().as_deref() == Some("2030-01-01T00:00:00Z") && ca_of_token().is_some(),
    )
    .await;
    r.settle(Duration::from_millis(500)).await;
    r.fake.take_requests();

    let rotated = tls_secret(2031);
    let new_ca = String::from_utf8(rotated.data.as_ref().unwrap()["ca.crt"].0.clone()).unwrap();
    r.fake.put(&rotated);
    let took = until(
        "the rotated certificate's expiry",
        Duration::from_secs(3),
        || expires().as_deref() == Some("2031-01-01T00:00:00Z"),
    )
    .await;
    until(
        "the new ca.crt in the token's credentials",
        Duration::from_secs(3),
        || ca_of_token().as_deref() == Some(new_ca.as_str()),
    )
    .await;
    r.settle(Duration::from_millis(500)).await;
    let calls = r.fake.take_requests();
    eprintln!(
        "tls.secretRef rotation applied in {took:?}, {} requests: {:#?}",
        one_off(&calls),
        summary(&calls)
    );
    r.stop().await;
}

/// Deletions pass the predicates (a delete event need not change what they
/// hash): a deleted credentials Secret is written again at once, and a
/// deleted Broker turns its Tokens `BrokerNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_reach_the_controllers_through_the_predicates() {
    let (r, _, _) = import(3).await;
    r.fake.remove::<Secret>(NS, "t001-credentials");
    // (A generated secret lives only there: a new one is generated, and the
    // bundle follows.)
    until(
        "the credentials written again",
        Duration::from_secs(3),
        || {
            r.password("t001").is_some_and(|p| {
                r.bundle().is_some_and(|b| {
                    b.tokens.iter().any(|e| {
                        e.name == "t001"
                            && verify_secret(&b.hash_key, p.as_bytes(), &e.secret_hash) == Ok(true)
                    })
                })
            })
        },
    )
    .await;

    r.fake.remove::<Broker>(NS, BROKER);
    until("the tokens BrokerNotFound", Duration::from_secs(3), || {
        (0..3).all(|i| {
            r.fake
                .get::<Token>(NS, &format!("t{i:03}"))
                .and_then(|t| t.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "BrokerNotFound")
                })
        })
    })
    .await;
    r.stop().await;
}

/// Secrets are watched as metadata only, and the fake answers that the way
/// the API server does: `PartialObjectMetadata`, no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_watched_metadata_only() {
    let (r, calls, _) = import(1).await;
    // Every Secret watch the controllers run (and its initial list).
    let all: Vec<ApiCall> = calls.into_iter().chain(r.fake.requests()).collect();
    let watches: Vec<_> = all
        .iter()
        .filter(|c| c.plural == "secrets" && c.watch)
        .collect();
    assert_eq!(
        watches.len(),
        2,
        "one for the Broker and one for the Token controller"
    );
    assert!(watches.iter().all(|c| c.metadata_only), "{watches:?}");
    // Their initial lists too (the Broker's reconcile lists credentials
    // Secrets in full: it needs their passwords).
    let lists = all
        .iter()
        .filter(|c| c.plural == "secrets" && c.verb() == "list" && c.metadata_only)
        .count();
    assert!(lists >= 2, "{lists} metadata-only lists of secrets");

    let client = r.fake.client();
    for (path, kind) in [
        (
            format!("/api/v1/namespaces/{NS}/secrets/t000-credentials"),
            "PartialObjectMetadata",
        ),
        (
            format!("/api/v1/namespaces/{NS}/secrets"),
            "PartialObjectMetadataList",
        ),
    ] {
        let req = http::Request::get(&path)
            .header(
                http::header::ACCEPT,
                format!("application/json;as={kind};g=meta.k8s.io;v=v1"),
            )
            .body(Vec::new())
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&client.request_text(req).await.expect("answer")).unwrap();
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("meta.k8s.io/v1"), Some(kind))
        );
        let items = match v.get("items") {
            Some(items) => items.as_array().unwrap().clone(),
            None => vec![v.clone()],
        };
        assert!(!items.is_empty());
        for item in items {
            assert_eq!(item["kind"], "PartialObjectMetadata");
            assert!(
                item.get("data").is_none() && item["metadata"]["name"].is_string(),
                "{item}"
            );
        }
    }
    r.stop().await;
}

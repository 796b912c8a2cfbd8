//! Reconcile tests against the in-memory API server (`fake`).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::ObjectMeta;
use serde_json::json;
use starling_model::bundle::AuthBundle;
use starling_model::token::verify_secret;

use super::fake::{FakeApi, Write};
use super::{Context, acl, broker, token};
use crate::crd::acl::{AclAction, AclEffect, AclRule, AclSpec, TopicFilter};
use crate::crd::common::ConditionStatus;
use crate::crd::{Acl, Broker, BrokerRef, BrokerSpec, Token, TokenSpec};
use crate::metrics::Metrics;

const NS: &str = "ns";

fn setup() -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    let ctx = Arc::new(Context::new(fake.client(), Arc::new(Metrics::default())));
    (fake, ctx)
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..ObjectMeta::default()
    }
}

fn new_broker(fake: &FakeApi, spec: BrokerSpec) -> Broker {
    fake.put(&Broker {
        metadata: meta("demo"),
        spec,
        status: None,
    })
}

fn new_token(fake: &FakeApi, name: &str) -> Token {
    fake.put(&Token {
        metadata: meta(name),
        spec: TokenSpec {
            broker_ref: BrokerRef {
                name: "demo".into(),
            },
            ..TokenSpec::default()
        },
        status: None,
    })
}

fn new_acl(fake: &FakeApi, name: &str, topic: &str) -> Acl {
    fake.put(&Acl {
        metadata: meta(name),
        spec: AclSpec {
            anonymous: false,
            broker_ref: BrokerRef {
                name: "demo".into(),
            },
            tokens: vec!["sensor".into()],
            token_selector: None,
            rules: vec![AclRule {
                topics: vec![TopicFilter(topic.into())],
                actions: vec![AclAction::Publish],
                effect: AclEffect::Allow,
            }],
        },
        status: None,
    })
}

async fn reconcile_broker(fake: &FakeApi, ctx: &Arc<Context>) {
    let b: Broker = fake.get(NS, "demo").expect("broker exists");
    broker::reconcile(Arc::new(b), ctx.clone())
        .await
        .expect("broker reconciles");
}

async fn reconcile_token(fake: &FakeApi, ctx: &Arc<Context>, name: &str) {
    let t: Token = fake.get(NS, name).expect("token exists");
    token::reconcile(Arc::new(t), ctx.clone())
        .await
        .expect("token reconciles");
}

fn condition(conds: &[crate::crd::Condition], t: &str) -> (ConditionStatus, String, String) {
    let c = conds
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition in {conds:?}"));
    (c.status, c.reason.clone(), c.message.clone())
}

fn bundle(fake: &FakeApi) -> AuthBundle {
    let s: Secret = fake.get(NS, "demo-auth").expect("bundle secret");
    AuthBundle::parse(&s.data.unwrap()["bundle.json"].0).expect("valid bundle")
}

#[tokio::test]
async fn first_reconcile_creates_everything() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;

    let mut names = fake.names();
    names.retain(|n| n != "brokers/demo");
    assert_eq!(
        names,
        [
            "configmaps/demo-config",
            "secrets/demo-admin",
            "secrets/demo-auth",
            "secrets/demo-ca",
            "secrets/demo-ca-key",
            "secrets/demo-tls",
            "serviceaccounts/demo",
            "services/demo",
            "services/demo-headless",
            "statefulsets/demo",
            "poddisruptionbudgets/demo",
            "rolebindings/demo",
            "roles/demo",
        ]
    );
    // One field manager for everything.
    let writes = fake.take_writes();
    assert!(
        writes
            .iter()
            .filter(|w| w.plural != "events")
            .all(|w| w.field_manager.as_deref() == Some("starling-operator")),
        "{writes:?}"
    );
    // Everything is owned by the Broker (garbage-collected with it).
    let sts: StatefulSet = fake.get(NS, "demo").unwrap();
    let owner = &sts.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Broker", "demo", Some(true))
    );
    assert_eq!(owner.uid, "uid-brokers-demo");

    // Status: endpoints, counts, certificate expiry, not ready yet.
    let b: Broker = fake.get(NS, "demo").unwrap();
    let s = b.status.unwrap();
    assert_eq!(s.endpoints["mqtts"], "mqtts://demo.ns.svc:8883");
    assert_eq!((s.tokens, s.acls), (0, 0));
    assert!(s.certificate_expires_at.is_some());
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(condition(&s.conditions, "Ready").0, ConditionStatus::False);
    assert_eq!(
        condition(&s.conditions, "Progressing").0,
        ConditionStatus::True
    );
    assert_eq!(
        condition(&s.conditions, "Degraded").0,
        ConditionStatus::False
    );

    // The TLS secret verifies against the CA the clients get.
    let tls: Secret = fake.get(NS, "demo-tls").unwrap();
    let ca: Secret = fake.get(NS, "demo-ca").unwrap();
    assert_eq!(
        tls.data.as_ref().unwrap()["ca.crt"],
        ca.data.as_ref().unwrap()["ca.crt"]
    );
    assert!(!ca.data.unwrap().contains_key("tls.key"));
}

#[tokio::test]
async fn second_reconcile_changes_nothing() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    // The pods come up.
    fake.set_status::<StatefulSet>(
        NS,
        "demo",
        json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}),
    );
    reconcile_broker(&fake, &ctx).await;
    let b: Broker = fake.get(NS, "demo").unwrap();
    assert_eq!(
        condition(&b.status.unwrap().conditions, "Ready").0,
        ConditionStatus::True
    );
    fake.take_writes();

    reconcile_broker(&fake, &ctx).await;
    assert_eq!(fake.take_changes(), Vec::<String>::new());
}

#[tokio::test]
async fn token_added_changes_only_the_bundle_secret() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    reconcile_broker(&fake, &ctx).await;
    fake.take_writes();

    new_token(&fake, "sensor");
    reconcile_token(&fake, &ctx, "sensor").await;
    let changes = fake.take_changes();
    assert_eq!(
        changes,
        ["apply secrets/sensor-credentials", "status tokens/sensor"]
    );
    let t: Token = fake.get(NS, "sensor").unwrap();
    let ts = t.status.unwrap();
    assert_eq!(ts.secret_name.as_deref(), Some("sensor-credentials"));
    assert_eq!(condition(&ts.conditions, "Ready").0, ConditionStatus::True);

    // The credentials carry everything a client needs.
    let creds: Secret = fake.get(NS, "sensor-credentials").unwrap();
    let data = creds.data.unwrap();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    assert_eq!(text("username"), "sensor");
    assert_eq!(text("host"), "demo.ns.svc");
    assert_eq!(text("port"), "8883");
    assert_eq!(text("mqtts-url"), "mqtts://demo.ns.svc:8883");
    assert_eq!(text("wss-url"), "wss://demo.ns.svc:443/mqtt");
    assert_eq!(text("https-url"), "https://demo.ns.svc:443");
    assert!(text("ca.crt").contains("BEGIN CERTIFICATE"));
    let password = text("password");
    assert!(password.len() >= 43);

    reconcile_broker(&fake, &ctx).await;
    let changes = fake.take_changes();
    assert_eq!(changes, ["apply secrets/demo-auth", "status brokers/demo"]);
    let b = bundle(&fake);
    assert_eq!(b.tokens.len(), 1);
    assert_eq!(
        verify_secret(&b.hash_key, password.as_bytes(), &b.tokens[0].secret_hash),
        Ok(true)
    );
    let broker: Broker = fake.get(NS, "demo").unwrap();
    assert_eq!(broker.status.unwrap().tokens, 1);

    // Reconciling the token again keeps its secret.
    reconcile_token(&fake, &ctx, "sensor").await;
    assert_eq!(fake.take_changes(), Vec::<String>::new());

    // Deleting the Token takes it out of the bundle (and only that).
    fake.remove::<Token>(NS, "sensor");
    reconcile_broker(&fake, &ctx).await;
    assert_eq!(
        fake.take_changes(),
        ["apply secrets/demo-auth", "status brokers/demo"]
    );
    assert!(bundle(&fake).tokens.is_empty());
}

#[tokio::test]
async fn invalid_acl_is_degraded_and_touches_nothing_else() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    new_acl(&fake, "good", "sensors/+/temp");
    reconcile_broker(&fake, &ctx).await;
    reconcile_broker(&fake, &ctx).await;
    fake.take_writes();
    let before = bundle(&fake);
    assert_eq!(before.acls.len(), 1);

    // An ACL the schema would refuse, as if applied before the CRD was updated.
    let bad = new_acl(&fake, "bad", "a/#/b");
    acl::reconcile(Arc::new(bad), ctx.clone())
        .await
        .expect("an invalid ACL is a status, not an error");
    let a: Acl = fake.get(NS, "bad").unwrap();
    let s = a.status.unwrap();
    let (st, reason, msg) = condition(&s.conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "InvalidRules")
    );
    assert!(msg.contains("rules[0]"), "{msg}");
    assert_eq!(condition(&s.conditions, "Ready").0, ConditionStatus::False);
    assert_eq!(s.rules, 1);
    assert_eq!(fake.take_changes(), ["status acls/bad"]);

    // The broker keeps serving: same bundle, same objects; its status says why.
    reconcile_broker(&fake, &ctx).await;
    assert_eq!(fake.take_changes(), ["status brokers/demo"]);
    assert_eq!(bundle(&fake), before);
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, msg) = condition(&b.status.unwrap().conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "InvalidTokensOrACLs")
    );
    assert!(msg.contains("ACL bad"), "{msg}");

    // The valid ACL is Ready.
    let good: Acl = fake.get(NS, "good").unwrap();
    acl::reconcile(Arc::new(good), ctx.clone()).await.unwrap();
    let good: Acl = fake.get(NS, "good").unwrap();
    assert_eq!(
        condition(&good.status.unwrap().conditions, "Ready").0,
        ConditionStatus::True
    );
}

#[tokio::test]
async fn deleted_broker_is_left_to_garbage_collection() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    new_token(&fake, "sensor");
    reconcile_broker(&fake, &ctx).await;
    reconcile_token(&fake, &ctx, "sensor").await;
    fake.take_writes();

    // Being deleted: the reconciler writes nothing and deletes nothing.
    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-02T00:00:00Z".parse().unwrap(),
    ));
    broker::reconcile(Arc::new(b), ctx.clone()).await.unwrap();
    assert!(fake.take_writes().is_empty());

    // Gone: every object it owned points at it, so the garbage collector
    // removes them; the operator deletes nothing itself.
    fake.remove::<Broker>(NS, "demo");
    let cm: k8s_openapi::api::core::v1::ConfigMap = fake.get(NS, "demo-config").unwrap();
    assert_eq!(cm.owner_ref_uid(), Some("uid-brokers-demo".into()));
    let creds: Secret = fake.get(NS, "sensor-credentials").unwrap();
    assert_eq!(creds.owner_ref_uid(), Some("uid-tokens-sensor".into()));
    reconcile_token(&fake, &ctx, "sensor").await;
    let writes = fake.take_writes();
    assert!(writes.iter().all(|w| w.verb != "delete"), "{writes:?}");
    let t: Token = fake.get(NS, "sensor").unwrap();
    let (st, reason, _) = condition(&t.status.unwrap().conditions, "Ready");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::False, "BrokerNotFound")
    );
}

trait OwnerUid {
    fn owner_ref_uid(&self) -> Option<String>;
}

impl<K: Resource> OwnerUid for K {
    fn owner_ref_uid(&self) -> Option<String> {
        self.meta()
            .owner_references
            .as_ref()?
            .first()
            .map(|o| o.uid.clone())
    }
}

#[tokio::test]
async fn invalid_spec_and_missing_tls_secret_show_in_status() {
    let (fake, ctx) = setup();
    let spec: BrokerSpec = serde_json::from_value(json!({
        "listeners": {"mqtt": {"enabled": true, "port": 8883, "containerPort": 1883}}
    }))
    .unwrap();
    new_broker(&fake, spec);
    reconcile_broker(&fake, &ctx).await;
    // Nothing built from an invalid spec.
    assert_eq!(fake.names(), ["brokers/demo"]);
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, msg) = condition(&b.status.unwrap().conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "InvalidSpec")
    );
    assert!(msg.contains("8883"), "{msg}");

    // A TLS Secret that does not exist: everything else is applied, and
    // status says what is missing.
    let (fake, ctx) = setup();
    let spec: BrokerSpec =
        serde_json::from_value(json!({"tls": {"secretRef": {"name": "mine"}}})).unwrap();
    new_broker(&fake, spec);
    reconcile_broker(&fake, &ctx).await;
    assert!(fake.names().contains(&"statefulsets/demo".to_string()));
    assert!(!fake.names().contains(&"secrets/demo-tls".to_string()));
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, msg) = condition(&b.status.unwrap().conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "CertificateUnavailable")
    );
    assert!(msg.contains("mine"), "{msg}");
}

#[tokio::test]
async fn api_errors_are_reported_in_status_and_returned() {
    let (fake, ctx) = setup();
    // cert-manager is not installed: applying the Certificate fails (404).
    let spec: BrokerSpec =
        serde_json::from_value(json!({"tls": {"certManager": {"issuerRef": {"name": "ca"}}}}))
            .unwrap();
    new_broker(&fake, spec);
    let b: Broker = fake.get(NS, "demo").unwrap();
    fake.fail_plural("certificates");
    let err = broker::reconcile(Arc::new(b), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ApiError");
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, _) = condition(&b.status.clone().unwrap().conditions, "Degraded");
    assert_eq!((st, reason.as_str()), (ConditionStatus::True, "ApiError"));
    // The error policy backs off.
    let b = Arc::new(b);
    let a1 = super::error_policy(b.clone(), &err, ctx.clone());
    let a2 = super::error_policy(b, &err, ctx.clone());
    assert_ne!(a1, a2);
}

#[tokio::test]
async fn brought_secrets_are_used_and_checked() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    let mut s = Secret {
        metadata: meta("gitops"),
        ..Secret::default()
    };
    s.data = Some(crate::build::secret_data([(
        "token",
        "a-sealed-secret-value-123".to_string(),
    )]));
    fake.put(&s);
    let mut t = Token {
        metadata: meta("byo"),
        spec: TokenSpec {
            broker_ref: BrokerRef {
                name: "demo".into(),
            },
            secret_ref: Some(crate::crd::token::SecretKeyRef {
                name: "gitops".into(),
                key: "token".into(),
            }),
            ..TokenSpec::default()
        },
        status: None,
    };
    t = fake.put(&t);
    token::reconcile(Arc::new(t), ctx.clone()).await.unwrap();
    let creds: Secret = fake.get(NS, "byo-credentials").unwrap();
    assert_eq!(
        creds.data.unwrap()["password"].0,
        b"a-sealed-secret-value-123"
    );
    reconcile_broker(&fake, &ctx).await;
    let b = bundle(&fake);
    assert_eq!(
        verify_secret(
            &b.hash_key,
            b"a-sealed-secret-value-123",
            &b.tokens[0].secret_hash
        ),
        Ok(true)
    );

    // Too short: refused, reported, nothing written for it.
    let mut s2 = s.clone();
    s2.metadata = meta("weak");
    s2.data = Some(crate::build::secret_data([(
        "password",
        "short".to_string(),
    )]));
    fake.put(&s2);
    let t = fake.put(&Token {
        metadata: meta("weak"),
        spec: TokenSpec {
            broker_ref: BrokerRef {
                name: "demo".into(),
            },
            secret_ref: Some(crate::crd::token::SecretKeyRef {
                name: "weak".into(),
                key: "password".into(),
            }),
            ..TokenSpec::default()
        },
        status: None,
    });
    token::reconcile(Arc::new(t), ctx.clone()).await.unwrap();
    assert!(fake.get::<Secret>(NS, "weak-credentials").is_none());
    let t: Token = fake.get(NS, "weak").unwrap();
    let (st, reason, _) = condition(&t.status.unwrap().conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "InvalidSecret")
    );
}

/// The controllers end to end (watches included) against the fake: a new
/// Token or ACL reaches the Broker's bundle without anyone reconciling by
/// hand, a deleted Token leaves it, and once settled nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_follow_tokens_and_acls_through_watches() {
    use std::time::Duration;
    let (fake, ctx) = setup();
    let shutdown = crate::shutdown::Shutdown::default();
    let run = tokio::spawn(crate::controllers::run(
        fake.client(),
        ctx.clone(),
        None,
        shutdown.wait(),
    ));

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let bundle_of = |fake: &FakeApi| {
        fake.get::<Secret>(NS, "demo-auth")
            .and_then(|s| AuthBundle::parse(&s.data?["bundle.json"].0).ok())
    };

    new_broker(&fake, BrokerSpec::default());
    until("the broker's objects", || bundle_of(&fake).is_some()).await;
    new_token(&fake, "sensor");
    until("the token in the bundle", || {
        bundle_of(&fake).is_some_and(|b| b.tokens.len() == 1)
    })
    .await;
    new_acl(&fake, "sensors", "sensors/+/temp");
    until("the ACL in the bundle", || {
        bundle_of(&fake).is_some_and(|b| b.acls.len() == 1)
    })
    .await;
    until("the ACL's status", || {
        fake.get::<Acl>(NS, "sensors")
            .and_then(|a| a.status)
            .is_some_and(|s| s.matched_tokens == 1)
    })
    .await;
    fake.remove::<Token>(NS, "sensor");
    until("the token out of the bundle", || {
        bundle_of(&fake).is_some_and(|b| b.tokens.is_empty())
    })
    .await;

    // Settled: no reconcile loop keeps writing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.take_writes();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.take_changes(), Vec::<String>::new());

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("controllers stop on shutdown")
        .expect("controller task");
}

/// The API server's answer to a write that failed: (code, reason, message).
fn refused<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Applies `obj` as a second field manager would (a user with kubectl).
async fn apply_as_user<K>(fake: &FakeApi, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<K> = Api::namespaced(fake.client(), NS);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(obj),
    )
    .await
}

#[tokio::test]
async fn fake_refuses_immutable_statefulset_fields() {
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    let sts: StatefulSet = fake.get(NS, "demo").unwrap();
    let mut mutated: Vec<(&str, StatefulSet)> = Vec::new();
    let mut s = sts.clone();
    s.spec.as_mut().unwrap().service_name = Some("other".into());
    mutated.push(("serviceName", s));
    let mut s = sts.clone();
    s.spec
        .as_mut()
        .unwrap()
        .selector
        .match_labels
        .as_mut()
        .unwrap()
        .insert("extra".into(), "x".into());
    mutated.push(("selector", s));
    let mut s = sts.clone();
    s.spec.as_mut().unwrap().pod_management_policy = Some("OrderedReady".into());
    mutated.push(("podManagementPolicy", s));
    let mut s = sts.clone();
    s.spec.as_mut().unwrap().volume_claim_templates =
        Some(vec![k8s_openapi::api::core::v1::PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                ..ObjectMeta::default()
            },
            ..Default::default()
        }]);
    mutated.push(("volumeClaimTemplates", s));
    for (field, s) in mutated {
        let (code, reason, message) = refused(apply_as_user(&fake, &s).await);
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{field}");
        assert_eq!(
            message,
            "StatefulSet.apps \"demo\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
            "{field}"
        );
    }
    // What a StatefulSet can take in place is taken.
    let mut s = sts.clone();
    s.spec.as_mut().unwrap().replicas = Some(0);
    s.spec.as_mut().unwrap().min_ready_seconds = Some(5);
    apply_as_user(&fake, &s).await.unwrap();
    // The operator's own applies never trip over it.
    reconcile_broker(&fake, &ctx).await;
}

#[tokio::test]
async fn fake_allocates_cluster_ips_that_never_change() {
    use k8s_openapi::api::core::v1::Service;
    let (fake, ctx) = setup();
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    let cluster_ip = |fake: &FakeApi, name: &str| {
        fake.get::<Service>(NS, name)
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
    };
    let ip = cluster_ip(&fake, "demo");
    assert!(
        ip.as_deref().is_some_and(|ip| ip.starts_with("10.96.")),
        "{ip:?}"
    );
    assert_eq!(cluster_ip(&fake, "demo-headless").as_deref(), Some("None"));
    // The operator never applies clusterIP on the client Service: the
    // allocated one stays, and reconciling again changes nothing.
    reconcile_broker(&fake, &ctx).await;
    fake.take_writes();
    reconcile_broker(&fake, &ctx).await;
    assert_eq!(fake.take_changes(), Vec::<String>::new());

    // Switching the Broker to a LoadBalancer with a class keeps the IP.
    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.spec.service = serde_json::from_value(
        json!({"type": "LoadBalancer", "loadBalancerClass": "example.com/lb"}),
    )
    .unwrap();
    fake.put(&b);
    reconcile_broker(&fake, &ctx).await;
    assert_eq!(cluster_ip(&fake, "demo"), ip);

    // A real API server refuses changing either once set.
    let mut svc: Service = fake.get(NS, "demo").unwrap();
    svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.9.9".into());
    let (code, _, message) = refused(apply_as_user(&fake, &svc).await);
    assert_eq!(code, 422);
    assert!(
        message.starts_with("Service \"demo\" is invalid: spec.clusterIPs[0]: Invalid value")
            && message.ends_with("may not change once set"),
        "{message}"
    );
    let mut svc: Service = fake.get(NS, "demo").unwrap();
    svc.spec.as_mut().unwrap().load_balancer_class = Some("other.example/lb".into());
    let (code, _, message) = refused(apply_as_user(&fake, &svc).await);
    assert_eq!(code, 422);
    assert!(message.contains("spec.loadBalancerClass"), "{message}");
}

#[tokio::test]
async fn fake_enforces_the_size_limits() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let fake = FakeApi::new();
    let secret = |n: usize| Secret {
        metadata: meta("big"),
        data: Some(crate::build::secret_data([("k", "x".repeat(n))])),
        ..Secret::default()
    };
    apply_as_user(&fake, &secret(1024 * 1024)).await.unwrap();
    let (code, reason, message) = refused(apply_as_user(&fake, &secret(1024 * 1024 + 1)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        "Secret \"big\" is invalid: data: Too long: must have at most 1048576 bytes"
    );
    let cm = |n: usize| ConfigMap {
        metadata: meta("big"),
        data: Some([("k".to_string(), "x".repeat(n))].into()),
        ..ConfigMap::default()
    };
    let (code, _, message) = refused(apply_as_user(&fake, &cm(1024 * 1024)).await);
    assert_eq!(code, 422);
    assert!(
        message.starts_with("ConfigMap \"big\" is invalid: data: Too long"),
        "{message}"
    );
    let (code, reason, message) = refused(apply_as_user(&fake, &cm(4 * 1024 * 1024)).await);
    assert_eq!((code, reason.as_str()), (413, "RequestEntityTooLarge"));
    assert_eq!(message, "Request entity too large: limit is 3145728");
}

#[tokio::test]
async fn fake_refuses_apply_patches_without_api_version_or_kind() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    let fake = FakeApi::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let pp = PatchParams::apply("kubectl");
    for patch in [
        json!({"metadata": {"name": "c"}, "data": {"a": "b"}}),
        json!({"kind": "ConfigMap", "metadata": {"name": "c"}}),
        json!({"apiVersion": "v1", "metadata": {"name": "c"}}),
        json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
    ] {
        let (code, reason, _) = refused(api.patch("c", &pp, &Patch::Apply(&patch)).await);
        assert_eq!((code, reason.as_str()), (400, "BadRequest"), "{patch}");
    }
    assert!(fake.names().is_empty());
    api.patch(
        "c",
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})),
    )
    .await
    .unwrap();
}

/// A failing apply (here: a persistence change an old CRD without the CEL
/// rule let through, which the StatefulSet cannot take) is Degraded with one
/// sentence naming the object, at the Broker's generation; reverting the
/// change recovers.
#[tokio::test]
async fn failing_apply_is_one_sentence_at_the_current_generation() {
    let (fake, ctx) = setup();
    let spec: BrokerSpec =
        serde_json::from_value(json!({"persistence": {"enabled": true, "size": "5Gi"}})).unwrap();
    new_broker(&fake, spec);
    reconcile_broker(&fake, &ctx).await;

    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.spec.persistence.size = "10Gi".into();
    b.metadata.generation = Some(2);
    let b = fake.put(&b);
    let err = broker::reconcile(Arc::new(b), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ApiError");
    let b: Broker = fake.get(NS, "demo").unwrap();
    let s = b.status.clone().unwrap();
    let (st, reason, message) = condition(&s.conditions, "Degraded");
    assert_eq!((st, reason.as_str()), (ConditionStatus::True, "ApiError"));
    assert!(
        message.starts_with(
            "StatefulSet demo could not be applied (Invalid: StatefulSet.apps \"demo\" is invalid: spec: Forbidden: updates to statefulset spec"
        ),
        "{message}"
    );
    assert!(message.contains("--cascade=orphan"), "{message}");
    for bad in ["{", "Status {", "\n"] {
        assert!(!message.contains(bad), "{bad:?} in {message}");
    }
    assert_eq!(s.observed_generation, b.metadata.generation);
    assert_eq!(s.observed_generation, Some(2));
    let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(d.observed_generation, Some(2));

    // Never a permanent Degraded: the change reverted, the Broker recovers.
    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.spec.persistence.size = "5Gi".into();
    b.metadata.generation = Some(3);
    fake.put(&b);
    reconcile_broker(&fake, &ctx).await;
    let b: Broker = fake.get(NS, "demo").unwrap();
    let s = b.status.unwrap();
    assert_eq!(
        condition(&s.conditions, "Degraded").0,
        ConditionStatus::False
    );
    assert_eq!(s.observed_generation, Some(3));
}

/// A bundle over the Secret limit is not applied (the previous one stays in
/// force), the Broker says so, and every other object is still applied.
#[tokio::test]
async fn oversized_bundle_is_degraded_and_the_rest_still_applied() {
    use k8s_openapi::api::core::v1::Service;
    let fake = FakeApi::new();
    let ctx = Arc::new(Context::new(fake.client(), Arc::new(Metrics::default())));
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    let before: Secret = fake.get(NS, "demo-auth").unwrap();
    let json = &before.data.as_ref().unwrap()["bundle.json"].0;
    assert!(!json.contains(&b'\n'), "compact JSON");
    let size = json.len();

    let small = Arc::new(
        Context::new(fake.client(), Arc::new(Metrics::default())).with_secret_limit(size + 50),
    );
    for i in 0..5 {
        new_token(&fake, &format!("t{i}"));
        reconcile_token(&fake, &small, &format!("t{i}")).await;
    }
    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.spec.service = serde_json::from_value(json!({"type": "LoadBalancer"})).unwrap();
    fake.put(&b);
    fake.take_writes();
    reconcile_broker(&fake, &small).await;

    let changes = fake.take_changes();
    assert!(
        changes.contains(&"apply services/demo".to_string()),
        "{changes:?}"
    );
    assert!(
        !changes.contains(&"apply secrets/demo-auth".to_string()),
        "{changes:?}"
    );
    let svc: Service = fake.get(NS, "demo").unwrap();
    assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        fake.get::<Secret>(NS, "demo-auth").unwrap().data,
        before.data
    );
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, message) = condition(&b.status.unwrap().conditions, "Degraded");
    assert_eq!(
        (st, reason.as_str()),
        (ConditionStatus::True, "AuthBundleTooLarge")
    );
    assert!(
        message.contains("demo-auth") && message.contains("limit"),
        "{message}"
    );

    // Under the real limit it goes through.
    reconcile_broker(&fake, &ctx).await;
    assert_eq!(bundle(&fake).tokens.len(), 5);
}

/// Whether `cert_pem` chains to `ca_pem` for `host`, as a TLS client checks it.
fn signed_by(cert_pem: &str, ca_pem: &str, host: &str) -> bool {
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let der = |pem: &str| CertificateDer::from(crate::tls::x509::first_der(pem).expect("PEM"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca_pem)).expect("CA certificate");
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    verifier
        .verify_server_cert(
            &der(cert_pem),
            &[],
            &ServerName::try_from(host.to_string()).expect("host"),
            &[],
            UnixTime::now(),
        )
        .is_ok()
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

#[tokio::test]
async fn switching_away_from_cert_manager_deletes_its_certificate() {
    use kube::api::{Api, DynamicObject, PostParams};
    let (fake, ctx) = setup();
    let spec: BrokerSpec =
        serde_json::from_value(json!({"tls": {"certManager": {"issuerRef": {"name": "ca"}}}}))
            .unwrap();
    new_broker(&fake, spec);
    reconcile_broker(&fake, &ctx).await;
    assert!(fake.names().contains(&"certificates/demo-tls".to_string()));

    // cert-manager issues the Secret from its own CA.
    let now = std::time::SystemTime::now();
    let names = vec!["demo.ns.svc".to_string()];
    let (acme_ca, acme_server, _) =
        crate::tls::ensure("acme", NS, &names, None, None, now).unwrap();
    let mut issued = Secret {
        metadata: meta("demo-tls"),
        type_: Some("kubernetes.io/tls".into()),
        ..Secret::default()
    };
    issued.data = Some(crate::build::secret_data([
        ("tls.crt", acme_server.cert_pem.clone()),
        ("tls.key", acme_server.key_pem.clone()),
        ("ca.crt", acme_ca.cert_pem.clone()),
    ]));
    fake.put(&issued);
    // A user's Certificate that copies the Broker's labels but is not owned
    // by it stays.
    let certs: Api<DynamicObject> = Api::namespaced_with(
        fake.client(),
        NS,
        &crate::build::certificate::api_resource(),
    );
    let mut mine = DynamicObject::new("mine", &crate::build::certificate::api_resource());
    mine.metadata.labels = Some(
        [
            ("app.kubernetes.io/name", "starling"),
            ("app.kubernetes.io/instance", "demo"),
            ("app.kubernetes.io/managed-by", "starling-operator"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    mine.data = json!({"spec": {"secretName": "mine", "issuerRef": {"name": "ca"}}});
    certs.create(&PostParams::default(), &mine).await.unwrap();
    reconcile_broker(&fake, &ctx).await;
    assert!(fake.names().contains(&"certificates/demo-tls".to_string()));
    fake.take_writes();

    // Switch to the operator's CA.
    let mut b: Broker = fake.get(NS, "demo").unwrap();
    b.spec.tls.cert_manager = None;
    fake.put(&b);
    reconcile_broker(&fake, &ctx).await;
    let writes = fake.take_writes();
    let deletes: Vec<String> = writes
        .iter()
        .filter(|w| w.verb == "delete" && w.plural != "events")
        .map(Write::id)
        .collect();
    assert_eq!(deletes, ["delete certificates/demo-tls"], "{writes:?}");
    // Deleted before the new TLS Secret was written, so cert-manager had no
    // Certificate left to write it over.
    let pos = |id: &str| writes.iter().position(|w| w.id() == id).unwrap();
    assert!(pos("delete certificates/demo-tls") < pos("apply secrets/demo-tls"));
    let names = fake.names();
    assert!(
        !names.contains(&"certificates/demo-tls".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"certificates/mine".to_string()),
        "{names:?}"
    );

    // The TLS Secret is signed by the operator's CA, not cert-manager's.
    let tls: Secret = fake.get(NS, "demo-tls").unwrap();
    let ca: Secret = fake.get(NS, "demo-ca").unwrap();
    let (crt, ca_crt) = (secret_text(&tls, "tls.crt"), secret_text(&ca, "ca.crt"));
    assert!(signed_by(&crt, &ca_crt, "demo.ns.svc"));
    assert!(!signed_by(&crt, &acme_ca.cert_pem, "demo.ns.svc"));
    assert_eq!(secret_text(&tls, "ca.crt"), ca_crt);

    // Settled: nothing more is deleted or changed.
    reconcile_broker(&fake, &ctx).await;
    let writes = fake.take_writes();
    assert!(
        writes
            .iter()
            .all(|w| w.verb != "delete" && (!w.changed || w.plural == "events")),
        "{writes:?}"
    );
}

#[tokio::test]
async fn unwanted_certificates_are_not_looked_for_without_cert_manager() {
    // No cert-manager CRDs (404 on every Certificate request): a Broker with
    // the operator CA reconciles as before.
    let (fake, ctx) = setup();
    fake.fail_plural("certificates");
    new_broker(&fake, BrokerSpec::default());
    reconcile_broker(&fake, &ctx).await;
    let b: Broker = fake.get(NS, "demo").unwrap();
    let (st, reason, _) = condition(&b.status.unwrap().conditions, "Degraded");
    assert_eq!(st, ConditionStatus::False, "{reason}");
}

/// The real reconciler's span (not a hand-made one) reaches a collector
/// through the shared telemetry setup the binary installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_reconcile_is_one_exported_span() {
    use std::collections::HashMap;

    use axum::body::Bytes as Body;
    use axum::extract::State;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message as _;
    use starling_telemetry::{LogFormat, OtlpConfig};
    use tracing::instrument::WithSubscriber as _;

    type Got = Arc<std::sync::Mutex<Vec<Body>>>;
    let got = Got::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(got): State<Got>, body: Body| async move {
                got.lock().unwrap().push(body);
            }),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let cfg = OtlpConfig::from_lookup(crate::SERVICE_NAME, |k| {
        (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| format!("{base}/v1/traces"))
    })
    .unwrap();
    let (subscriber, telemetry) = starling_telemetry::subscriber(
        tracing_subscriber::EnvFilter::new(crate::DEFAULT_LOG_FILTER),
        LogFormat::Json,
        Some(&cfg),
        crate::SERVICE_NAME,
    )
    .unwrap();
    let (fake, ctx) = setup();
    let mut object = Acl::new(
        "sensors",
        AclSpec {
            anonymous: false,
            broker_ref: BrokerRef {
                name: "missing".into(),
            },
            ..Default::default()
        },
    );
    object.metadata.namespace = Some("iot".into());
    let object = fake.put(&object);
    acl::reconcile(Arc::new(object), ctx)
        .with_subscriber(subscriber)
        .await
        .unwrap();
    telemetry.force_flush().await.unwrap();
    telemetry.shutdown().await;

    let bodies = got.lock().unwrap().clone();
    let spans: Vec<_> = bodies
        .iter()
        .map(|b| ExportTraceServiceRequest::decode(b.as_ref()).unwrap())
        .flat_map(|r| r.resource_spans)
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect();
    let reconciles: Vec<_> = spans.iter().filter(|s| s.name == "reconcile").collect();
    assert_eq!(reconciles.len(), 1, "{spans:?}");
    let attrs: HashMap<&str, &str> = reconciles[0]
        .attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some((kv.key.as_str(), v.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(attrs.get("kind"), Some(&"ACL"));
    assert_eq!(attrs.get("name"), Some(&"sensors"));
    assert_eq!(attrs.get("namespace"), Some(&"iot"));
}

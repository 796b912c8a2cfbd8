//! The CRDs' CEL rules (`x-kubernetes-validations`), evaluated client-side
//! with kube's CEL implementation, so a typo in a rule or a rule that does
//! not say what it means fails here instead of at `kubectl apply`.

use kube::CustomResourceExt;
use kube_cel::Validator;
use serde_json::{Value, json};

use super::{Acl, Broker, Token};

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(
        &crd.spec.versions[0]
            .schema
            .as_ref()
            .expect("schema")
            .open_api_v3_schema,
    )
    .expect("schema JSON")
}

/// `Ok` or the messages of the failed rules.
fn check<K: CustomResourceExt>(obj: Value, old: Option<Value>) -> Result<(), Vec<String>> {
    Validator::new()
        .validate(&schema::<K>(), &obj, old.as_ref())
        .map_err(|e| e.as_slice().iter().map(|e| e.message.clone()).collect())
}

fn broker(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "starling.dev/v1alpha1", "kind": "Broker",
           "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

fn token(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "starling.dev/v1alpha1", "kind": "Token",
           "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

fn acl(spec: Value) -> Value {
    json!({"apiVersion": "starling.dev/v1alpha1", "kind": "ACL",
           "metadata": {"name": "a", "namespace": "ns"}, "spec": spec})
}

fn fails_with(r: Result<(), Vec<String>>, needle: &str) {
    match r {
        Ok(()) => panic!("expected a failure mentioning {needle:?}"),
        Err(msgs) => assert!(
            msgs.iter().any(|m| m.contains(needle)),
            "expected {needle:?} in {msgs:?}"
        ),
    }
}

#[test]
fn broker_rules() {
    check::<Broker>(broker("demo", json!({})), None).unwrap();
    check::<Broker>(
        broker(
            "demo",
            json!({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
                   "tls": {"certManager": {"issuerRef": {"name": "x"}}}}),
        ),
        None,
    )
    .unwrap();
    fails_with(
        check::<Broker>(
            broker(
                "demo",
                json!({"tls": {"certManager": {"issuerRef": {"name": "x"}}, "secretRef": {"name": "s"}}}),
            ),
            None,
        ),
        "exclusive",
    );
    fails_with(
        check::<Broker>(
            broker(
                "demo",
                json!({"service": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}),
            ),
            None,
        ),
        "LoadBalancer",
    );
    check::<Broker>(broker(&"b".repeat(52), json!({})), None).unwrap();
    check::<Broker>(broker("home-2", json!({})), None).unwrap();
    for bad in ["Home", "home-", "home.iot", "-home"] {
        fails_with(
            check::<Broker>(broker(bad, json!({})), None),
            "metadata.name: a Broker name is a DNS label",
        );
    }
    fails_with(
        check::<Broker>(broker("9lives", json!({})), None),
        "metadata.name: a Broker name is a DNS label",
    );
    fails_with(
        check::<Broker>(broker(&"b".repeat(53), json!({})), None),
        "metadata.name: a Broker name is at most 52 characters",
    );
}

#[test]
fn token_rules() {
    let spec = json!({"brokerRef": {"name": "demo"}});
    check::<Token>(token("t", spec.clone()), None).unwrap();
    check::<Token>(
        token(
            "t",
            json!({"brokerRef": {"name": "demo"}, "secretRef": {"name": "sealed"}}),
        ),
        None,
    )
    .unwrap();
    fails_with(
        check::<Token>(
            token(
                "t",
                json!({"brokerRef": {"name": "demo"}, "secretRef": {"name": "t-credentials"}}),
            ),
            None,
        ),
        "credentials Secret",
    );
    fails_with(
        check::<Token>(
            token("t", json!({"brokerRef": {"name": "other"}})),
            Some(token("t", spec)),
        ),
        "brokerRef cannot be changed",
    );
    check::<Token>(
        token(&"t".repeat(63), json!({"brokerRef": {"name": "demo"}})),
        None,
    )
    .unwrap();
    fails_with(
        check::<Token>(
            token(&"t".repeat(64), json!({"brokerRef": {"name": "demo"}})),
            None,
        ),
        "metadata.name: a Token name is at most 63 characters",
    );
}

#[test]
fn acl_rules() {
    let rules = json!([{"topics": ["sensors/+/temp"], "actions": ["publish"]}]);
    check::<Acl>(
        acl(json!({"brokerRef": {"name": "demo"}, "tokens": ["t"], "rules": rules})),
        None,
    )
    .unwrap();
    check::<Acl>(
        acl(json!({"brokerRef": {"name": "demo"}, "tokenSelector": {}, "rules": rules})),
        None,
    )
    .unwrap();
    fails_with(
        check::<Acl>(
            acl(json!({"brokerRef": {"name": "demo"}, "rules": rules})),
            None,
        ),
        "tokenSelector",
    );
    // An ACL for anonymous clients only needs neither tokens nor a selector;
    // `anonymous: false` alone is still nobody.
    check::<Acl>(
        acl(json!({"brokerRef": {"name": "demo"}, "anonymous": true, "rules": rules})),
        None,
    )
    .unwrap();
    fails_with(
        check::<Acl>(
            acl(json!({"brokerRef": {"name": "demo"}, "anonymous": false, "rules": rules})),
            None,
        ),
        "anonymous: true",
    );
    fails_with(
        check::<Acl>(
            acl(json!({"brokerRef": {"name": "demo"}, "tokens": ["t"],
                       "rules": [{"topics": ["$share/g/x"], "actions": ["subscribe"]}]})),
            None,
        ),
        "$share",
    );
    fails_with(
        check::<Acl>(
            acl(json!({"brokerRef": {"name": "x"}, "tokens": ["t"], "rules": rules})),
            Some(acl(
                json!({"brokerRef": {"name": "demo"}, "tokens": ["t"], "rules": rules}),
            )),
        ),
        "brokerRef cannot be changed",
    );
}

#[test]
fn broker_replicas_above_one_are_refused() {
    check::<Broker>(broker("demo", json!({"replicas": 1})), None).unwrap();
    fails_with(
        check::<Broker>(broker("demo", json!({"replicas": 2})), None),
        "replicas > 1 would make independent brokers that do not share messages; until clustering lands use 1",
    );
}

#[test]
fn broker_persistence_is_fixed_once_enabled() {
    let p = |enabled: bool, size: &str| json!({"persistence": {"enabled": enabled, "size": size}});
    let update =
        |old: Value, new: Value| check::<Broker>(broker("demo", new), Some(broker("demo", old)));
    // Unchanged, or no volume before nor after: fine.
    update(p(true, "5Gi"), p(true, "5Gi")).unwrap();
    update(p(false, "1Gi"), p(false, "5Gi")).unwrap();
    // Created with any persistence: fine (transition rules need an old object).
    check::<Broker>(broker("demo", p(true, "5Gi")), None).unwrap();
    // A change the StatefulSet cannot take is refused, saying what to do.
    for (old, new) in [
        (p(true, "5Gi"), p(true, "10Gi")),
        (p(false, "1Gi"), p(true, "1Gi")),
        (p(true, "1Gi"), p(false, "1Gi")),
        (
            p(true, "1Gi"),
            json!({"persistence": {"enabled": true, "size": "1Gi", "storageClassName": "fast"}}),
        ),
    ] {
        fails_with(
            update(old, new),
            "resize the PersistentVolumeClaim data-<broker>-0",
        );
    }
}

#[test]
fn cert_manager_without_in_cluster_names_needs_a_dns_name() {
    let tls = |tls: Value| check::<Broker>(broker("demo", json!({"tls": tls})), None);
    let cm = |v: Value| json!({"issuerRef": {"name": "letsencrypt"}, "inClusterNames": v});
    tls(json!({"certManager": {"issuerRef": {"name": "x"}}})).unwrap();
    tls(json!({"certManager": cm(json!(true))})).unwrap();
    tls(json!({"certManager": cm(json!(false)), "dnsNames": ["mqtt.example.com"]})).unwrap();
    for bad in [
        json!({"certManager": cm(json!(false))}),
        json!({"certManager": cm(json!(false)), "dnsNames": []}),
    ] {
        fails_with(
            tls(bad),
            "tls.certManager.inClusterNames: false needs at least one name in tls.dnsNames",
        );
    }
}

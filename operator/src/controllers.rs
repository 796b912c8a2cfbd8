//! Wires the three reconcilers to the watches that keep them current. Each
//! watch passes through a predicate (only changes the reconciler reads
//! trigger it) and a mapper (which objects to reconcile, found in the
//! reflector stores, never by asking the API server):
//! - Broker: its own spec (generation; its status writes do not come back
//!   as reconciles); what it owns (StatefulSet, ConfigMap, Services,
//!   Secrets, by owner reference, metadata only); Token credentials Secrets
//!   (by label: a generated password reaches the bundle); Tokens (spec and
//!   labels, not status) and ACLs (spec); the user's Secrets it reads: its
//!   `tls.secretRef` and its Tokens' `secretRef`.
//! - Token: its own spec; its credentials Secret; the Broker's spec and
//!   existence (not its status: nothing a Token writes depends on it); the
//!   Broker's CA Secret `<broker>-ca`; the Secret its `secretRef` names.
//! - ACL: its own spec; whether its Broker exists; the names and labels of
//!   that Broker's Tokens (the matched-token count).
//!
//! Secrets are watched metadata-only (`PartialObjectMetadata`): neither the
//! auth bundle nor any user Secret's data is held or streamed for this, and
//! an unrelated Secret's change costs the watch event and nothing else.
//! Built on kube-runtime's `applier` (what `Controller::run` uses) because
//! predicates on a Controller's watches need kube's unstable features.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, ReconcileReason, ReconcileRequest, applier};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::utils::CancelableJoinHandle;
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::build::{APP, MANAGER, Names, keys};
use crate::crd::{Acl, Broker, Token};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context, error_policy};

/// Reconcile requests for `K` from one watch.
type Trigger<K> = BoxStream<'static, Result<ReconcileRequest<K>, watcher::Error>>;

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// `K` as metadata only (`PartialObjectMetadata`): what a watch needs that
/// only maps objects to their owners or by name and labels.
fn meta<K>(client: &Client, namespace: Option<&str>) -> Api<PartialObjectMeta<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    api::<PartialObjectMeta<K>>(client, namespace)
}

/// Only what the operator made.
fn owned() -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={MANAGER}", keys::MANAGED_BY))
}

fn hash<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

fn deleted<K: Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_some()
}

// Predicates: a hash of what a reconciler reads from a watched object; an
// event whose hash is unchanged (for that name and uid) is dropped. Each one
// includes `deleted`, which `touched` sets on objects from Delete events, so
// deletions always pass.

/// What a Token's reconcile reads from its Broker: that it exists and its
/// spec (listeners and Service → the credentials' host, port and URLs). Not
/// its status (the Broker's own frequent writes): the CA comes from the
/// `<broker>-ca` Secret, watched directly ([`tokens_for_secret`]).
pub(crate) fn broker_for_tokens(b: &Broker) -> Option<u64> {
    Some(hash(&(b.meta().generation, deleted(b))))
}

/// What a Broker's reconcile reads from a Token for the bundle: spec
/// (brokerRef, expiresAt, disabled, secretRef), labels (ACL selectors),
/// existence. Not its status (each Token reconcile writes one).
pub(crate) fn token_for_broker(t: &Token) -> Option<u64> {
    Some(hash(&(t.meta().generation, t.labels(), deleted(t))))
}

/// An ACL's spec and existence (its status is the ACL controller's).
fn acl_for_broker(a: &Acl) -> Option<u64> {
    Some(hash(&(a.meta().generation, deleted(a))))
}

/// An ACL's status reads only whether its Broker exists.
fn broker_for_acls(b: &Broker) -> Option<u64> {
    Some(hash(&deleted(b)))
}

/// ... and the names and labels of the Broker's Tokens.
fn token_for_acls(t: &Token) -> Option<u64> {
    Some(hash(&(t.labels(), deleted(t))))
}

/// Any new revision of an object watched as metadata only (a re-list after
/// a watch restart repeats the objects with the revisions already seen).
fn revision<K: Resource>(o: &K) -> Option<u64> {
    Some(hash(&(&o.meta().resource_version, deleted(o))))
}

/// The objects of a watch, Added, Modified and Deleted alike; one from a
/// Delete event is marked deleted (the API server need not set
/// `deletionTimestamp` on it) so that predicates see the difference.
fn touched<K, S>(events: S) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    events
        .map_ok(|e| match e {
            watcher::Event::Delete(mut o) => {
                o.meta_mut()
                    .deletion_timestamp
                    .get_or_insert_with(|| Time(k8s_openapi::jiff::Timestamp::now()));
                watcher::Event::Delete(o)
            }
            e => e,
        })
        .touched_objects()
}

/// The controller's own kind: fills the store its reconciles read from and
/// asks for a reconcile when the spec changes (`metadata.generation`), not
/// on status writes.
fn own<K>(api: Api<K>, writer: Writer<K>) -> Trigger<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    controller::trigger_self(objects, ()).boxed()
}

/// A related watch: events whose `predicate` hash changed, mapped to the
/// objects to reconcile.
fn related<K, O, S, I>(
    events: S,
    predicate: fn(&O) -> Option<u64>,
    mapper: impl Fn(&O) -> I + Send + 'static,
) -> Trigger<K>
where
    K: Resource<DynamicType = ()> + 'static,
    O: Resource<DynamicType = ()> + Send + 'static,
    S: Stream<Item = Result<watcher::Event<O>, watcher::Error>> + Send + 'static,
    I: IntoIterator<Item = ObjectRef<K>>,
{
    let objects =
        touched(events.default_backoff()).predicate_filter(predicate, PredicateConfig::default());
    controller::trigger_with(objects, move |o: O| {
        let from = ObjectRef::from_obj(&o).erase();
        mapper(&o)
            .into_iter()
            .map(|obj_ref| ReconcileRequest {
                obj_ref,
                reason: ReconcileReason::RelatedObjectUpdated {
                    obj_ref: Box::new(from.clone()),
                },
            })
            .collect::<Vec<_>>()
    })
    .boxed()
}

fn broker_of<K: Resource>(obj: &K, broker: &str) -> Option<ObjectRef<Broker>> {
    Some(ObjectRef::new(broker).within(obj.meta().namespace.as_deref()?))
}

/// The owners of `obj` of kind `K`.
fn owners<K, O>(obj: &O) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
    O: Resource,
{
    let ns = obj.meta().namespace.as_deref();
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .filter_map(|o| ObjectRef::from_owner_ref(ns, o, ()))
        .collect()
}

/// Objects in `store` in namespace `ns` for which `refers` holds.
fn in_store<K>(store: &Store<K>, ns: Option<&str>, refers: impl Fn(&K) -> bool) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state_filter(|o| o.meta().namespace.as_deref() == ns && refers(o))
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

fn label<'a, K: Resource>(o: &'a K, key: &str) -> Option<&'a str> {
    o.meta().labels.as_ref()?.get(key).map(String::as_str)
}

/// Made by this operator for Broker `<instance>` (labels of `BrokerCtx::labels`).
fn broker_label<K: Resource>(o: &K) -> Option<&str> {
    (label(o, keys::MANAGED_BY) == Some(MANAGER) && label(o, keys::NAME) == Some(APP))
        .then(|| label(o, keys::INSTANCE))
        .flatten()
}

/// The Tokens a change of Secret `s` matters to: the one whose credentials
/// it is, every Token of the Broker whose CA Secret it is, and those whose
/// `secretRef` names it.
pub(crate) fn tokens_for_secret(
    tokens: &Store<Token>,
    s: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<Token>> {
    let ns = s.meta().namespace.as_deref();
    let name = s.name_any();
    let mut out = owners::<Token, _>(s);
    let ca_of = broker_label(s)
        .filter(|b| label(s, keys::COMPONENT) == Some("ca") && Names::new(b).ca_secret() == name);
    out.extend(in_store(tokens, ns, |t| {
        ca_of == Some(t.spec.broker_ref.name.as_str())
            || t.spec.secret_ref.as_ref().is_some_and(|r| r.name == name)
    }));
    out
}

/// The Brokers a change of Secret `s` matters to: its owner (or, for the
/// cert-manager TLS Secret, the Broker its labels name), the Broker of a
/// Token credentials Secret, Brokers whose `tls.secretRef` names it, and the
/// Brokers of Tokens whose `secretRef` names it.
pub(crate) fn brokers_for_secret(
    brokers: &Store<Broker>,
    tokens: &Store<Token>,
    s: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<Broker>> {
    let ns = s.meta().namespace.as_deref();
    let name = s.name_any();
    let mut out = owners::<Broker, _>(s);
    out.extend(broker_label(s).and_then(|b| broker_of(s, b)));
    if label(s, keys::MANAGED_BY) == Some(MANAGER) && label(s, keys::COMPONENT) == Some("token") {
        out.extend(label(s, keys::BROKER).and_then(|b| broker_of(s, b)));
    }
    out.extend(in_store(brokers, ns, |b| {
        b.spec
            .tls
            .secret_ref
            .as_ref()
            .is_some_and(|r| r.name == name)
    }));
    for t in tokens.state_filter(|t| {
        t.meta().namespace.as_deref() == ns
            && t.spec.secret_ref.as_ref().is_some_and(|r| r.name == name)
    }) {
        out.extend(broker_of(t.as_ref(), &t.spec.broker_ref.name));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup();
    out
}

/// Runs all controllers until `shutdown` resolves (then lets in-flight
/// reconciles finish).
pub async fn run<S>(client: Client, ctx: Arc<Context>, namespace: Option<String>, shutdown: S)
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let ns = namespace.as_deref();
    let (broker_store, broker_writer) = reflector::store::<Broker>();
    let (token_store, token_writer) = reflector::store::<Token>();
    let (acl_store, acl_writer) = reflector::store::<Acl>();
    let all = watcher::Config::default;

    let brokers = {
        let (bs, ts) = (broker_store.clone(), token_store.clone());
        vec![
            own(api::<Broker>(&client, ns), broker_writer),
            related(
                watcher(meta::<StatefulSet>(&client, ns), owned()),
                revision,
                owners::<Broker, _>,
            ),
            related(
                watcher(meta::<ConfigMap>(&client, ns), owned()),
                revision,
                owners::<Broker, _>,
            ),
            related(
                watcher(meta::<Service>(&client, ns), owned()),
                revision,
                owners::<Broker, _>,
            ),
            related(
                watcher(meta::<Secret>(&client, ns), all()),
                revision,
                move |s| brokers_for_secret(&bs, &ts, s),
            ),
            related(
                watcher(api::<Token>(&client, ns), all()),
                token_for_broker,
                |t: &Token| broker_of(t, &t.spec.broker_ref.name),
            ),
            related(
                watcher(api::<Acl>(&client, ns), all()),
                acl_for_broker,
                |a: &Acl| broker_of(a, &a.spec.broker_ref.name),
            ),
        ]
    };

    let tokens = {
        let (ts, ts2) = (token_store.clone(), token_store.clone());
        vec![
            own(api::<Token>(&client, ns), token_writer),
            related(
                watcher(api::<Broker>(&client, ns), all()),
                broker_for_tokens,
                move |b: &Broker| {
                    in_store(&ts, b.meta().namespace.as_deref(), |t| {
                        t.spec.broker_ref.name == b.name_any()
                    })
                },
            ),
            related(
                watcher(meta::<Secret>(&client, ns), all()),
                revision,
                move |s| tokens_for_secret(&ts2, s),
            ),
        ]
    };

    let acls = {
        let (a1, a2) = (acl_store.clone(), acl_store.clone());
        vec![
            own(api::<Acl>(&client, ns), acl_writer),
            related(
                watcher(api::<Broker>(&client, ns), all()),
                broker_for_acls,
                move |b: &Broker| {
                    in_store(&a1, b.meta().namespace.as_deref(), |a| {
                        a.spec.broker_ref.name == b.name_any()
                    })
                },
            ),
            related(
                watcher(api::<Token>(&client, ns), all()),
                token_for_acls,
                move |t: &Token| {
                    in_store(&a2, t.meta().namespace.as_deref(), |a| {
                        a.spec.broker_ref.name == t.spec.broker_ref.name
                    })
                },
            ),
        ]
    };

    tracing::info!(namespace = ns.unwrap_or("<all>"), "controllers started");
    futures::join!(
        drive(
            "broker",
            broker_store,
            brokers,
            reconcile::broker::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        drive(
            "token",
            token_store,
            tokens,
            reconcile::token::reconcile,
            ctx.clone(),
            shutdown.clone()
        ),
        drive(
            "acl",
            acl_store,
            acls,
            reconcile::acl::reconcile,
            ctx,
            shutdown
        ),
    );
    tracing::info!("controllers stopped");
}

/// One controller: reconciles (each on its own task, as `Controller::run`
/// does) what `triggers` ask for, reading objects from `store`, until
/// `shutdown`; then lets in-flight reconciles finish.
async fn drive<K, R, F>(
    kind: &'static str,
    store: Store<K>,
    triggers: Vec<Trigger<K>>,
    mut reconcile: R,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    R: FnMut(Arc<K>, Arc<Context>) -> F,
    F: Future<Output = Result<Action, reconcile::Error>> + Send + 'static,
{
    let metrics = ctx.metrics.clone();
    let queue = futures::stream::select_all(triggers).take_until(shutdown);
    applier(
        move |obj, ctx| {
            CancelableJoinHandle::spawn(
                reconcile(obj, ctx).in_current_span(),
                &tokio::runtime::Handle::current(),
            )
        },
        error_policy::<K>,
        ctx,
        store,
        queue,
        controller::Config::default(),
    )
    .for_each(|r| {
        log(kind, &metrics, r);
        futures::future::ready(())
    })
    .await;
}

/// What a controller stream yields besides reconcile results. Reconcile
/// errors are logged and counted by the error policy; a missing object is
/// routine (deleted while queued). Watch errors (a list/watch refused, e.g.
/// RBAC 403, or an object that does not decode) stall that watch until it
/// recovers, so they are logged at `warn` and counted per controller `kind`.
fn log<K, E, Q>(
    kind: &str,
    metrics: &Metrics,
    r: Result<
        (ObjectRef<K>, kube::runtime::controller::Action),
        kube::runtime::controller::Error<E, Q>,
    >,
) where
    K: Resource,
    E: std::error::Error,
    Q: std::error::Error,
{
    use kube::runtime::controller::Error;
    match r {
        Ok((obj, _)) => tracing::debug!(kind, name = %obj.name, "reconciled"),
        Err(Error::QueueError(e)) => {
            metrics.watch_error(kind);
            tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
        }
        Err(e @ Error::RunnerError(_)) => {
            tracing::warn!(kind, error = %e, "controller runner error")
        }
        Err(e) => tracing::debug!(kind, error = %e, "controller event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::broker::{SecretNameRef, TlsSpec};
    use crate::crd::token::SecretKeyRef;
    use crate::crd::{BrokerRef, BrokerSpec, BrokerStatus, TokenSpec, TokenStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;
    use kube::runtime::controller::Error;
    use std::collections::BTreeMap;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            ..ObjectMeta::default()
        }
    }

    fn token(name: &str, secret_ref: Option<&str>) -> Token {
        Token {
            metadata: meta(name),
            spec: TokenSpec {
                broker_ref: BrokerRef {
                    name: "demo".into(),
                },
                secret_ref: secret_ref.map(|n| SecretKeyRef {
                    name: n.into(),
                    key: "password".into(),
                }),
                ..TokenSpec::default()
            },
            status: None,
        }
    }

    fn secret(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Secret> {
        let mut m = meta(name);
        m.generation = None;
        m.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        PartialObjectMeta {
            metadata: m,
            ..PartialObjectMeta::default()
        }
    }

    fn store<K>(objs: Vec<K>) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = reflector::store();
        for o in objs {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        store
    }

    fn names<K: Resource>(refs: Vec<ObjectRef<K>>) -> Vec<String> {
        let mut v: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        v.sort();
        v
    }

    #[test]
    fn tokens_ignore_broker_status_but_not_spec_or_deletion() {
        let mut b = Broker {
            metadata: meta("demo"),
            spec: BrokerSpec::default(),
            status: None,
        };
        let h = broker_for_tokens(&b);
        b.status = Some(BrokerStatus {
            ready_replicas: 1,
            tokens: 500,
            certificate_expires_at: Some("2030-01-01T00:00:00Z".into()),
            ..BrokerStatus::default()
        });
        b.metadata.resource_version = Some("7".into());
        assert_eq!(broker_for_tokens(&b), h, "a status write");
        b.metadata.generation = Some(2);
        let h2 = broker_for_tokens(&b);
        assert_ne!(h2, h, "a spec change");
        b.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_ne!(broker_for_tokens(&b), h2, "a deletion");
        // ACLs read only whether the Broker exists.
        b.metadata.deletion_timestamp = None;
        let a = broker_for_acls(&b);
        b.metadata.generation = Some(3);
        assert_eq!(broker_for_acls(&b), a);
    }

    #[test]
    fn brokers_ignore_token_status_but_not_spec_or_labels() {
        let mut t = token("a", None);
        let h = token_for_broker(&t);
        t.status = Some(TokenStatus {
            secret_name: Some("a-credentials".into()),
            ..TokenStatus::default()
        });
        assert_eq!(token_for_broker(&t), h, "a status write");
        t.metadata.labels = Some(BTreeMap::from([("room".into(), "1".into())]));
        let h2 = token_for_broker(&t);
        assert_ne!(h2, h, "labels (ACL selectors)");
        t.metadata.generation = Some(2);
        assert_ne!(token_for_broker(&t), h2, "a spec change");
        // The ACL count reads names and labels only.
        assert_eq!(token_for_acls(&t), {
            let mut u = t.clone();
            u.metadata.generation = Some(9);
            token_for_acls(&u)
        });
    }

    #[tokio::test]
    async fn delete_events_are_marked_so_predicates_let_them_through() {
        let t = token("a", None);
        let events = futures::stream::iter([
            Ok(watcher::Event::Apply(t.clone())),
            Ok(watcher::Event::Delete(t)),
        ]);
        let out: Vec<Token> = touched(events)
            .predicate_filter(token_for_broker, PredicateConfig::default())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 2, "the deletion passed the predicate");
        assert!(out[1].metadata.deletion_timestamp.is_some());
    }

    #[test]
    fn secrets_map_to_what_reads_them_and_nothing_else() {
        let mut b_tls = Broker {
            metadata: meta("edge"),
            spec: BrokerSpec {
                tls: TlsSpec {
                    secret_ref: Some(SecretNameRef {
                        name: "edge-cert".into(),
                    }),
                    ..TlsSpec::default()
                },
                ..BrokerSpec::default()
            },
            status: None,
        };
        b_tls.metadata.namespace = Some("ns".into());
        let brokers = store(vec![
            Broker {
                metadata: meta("demo"),
                spec: BrokerSpec::default(),
                status: None,
            },
            b_tls,
        ]);
        let mut other_ns = token("elsewhere", Some("gitops"));
        other_ns.metadata.namespace = Some("other".into());
        let tokens = store(vec![
            token("a", None),
            token("b", Some("gitops")),
            token("c", None),
            other_ns,
        ]);

        // A Token's credentials Secret: that Token, and its Broker (by label).
        let mut creds = secret(
            "a-credentials",
            &[
                (keys::MANAGED_BY, MANAGER),
                (keys::COMPONENT, "token"),
                (keys::BROKER, "demo"),
                (keys::TOKEN, "a"),
            ],
        );
        creds.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "starling.dev/v1alpha1".into(),
            kind: "Token".into(),
            name: "a".into(),
            uid: "uid-a".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        assert_eq!(names(tokens_for_secret(&tokens, &creds)), ["a"]);
        assert_eq!(
            names(brokers_for_secret(&brokers, &tokens, &creds)),
            ["demo"]
        );

        // The Broker's CA Secret: every Token of that Broker (here), and
        // the Broker that owns it.
        let mut ca = secret(
            "demo-ca",
            &[
                (keys::NAME, APP),
                (keys::INSTANCE, "demo"),
                (keys::COMPONENT, "ca"),
                (keys::MANAGED_BY, MANAGER),
            ],
        );
        ca.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "starling.dev/v1alpha1".into(),
            kind: "Broker".into(),
            name: "demo".into(),
            uid: "uid-demo".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        assert_eq!(names(tokens_for_secret(&tokens, &ca)), ["a", "b", "c"]);
        assert_eq!(names(brokers_for_secret(&brokers, &tokens, &ca)), ["demo"]);
        // Another component of the Broker (the bundle): no Token.
        let bundle = secret(
            "demo-auth",
            &[
                (keys::NAME, APP),
                (keys::INSTANCE, "demo"),
                (keys::COMPONENT, "auth"),
                (keys::MANAGED_BY, MANAGER),
            ],
        );
        assert!(tokens_for_secret(&tokens, &bundle).is_empty());

        // A user's Secret named by a Token's secretRef (in its namespace).
        let gitops = secret("gitops", &[]);
        assert_eq!(names(tokens_for_secret(&tokens, &gitops)), ["b"]);
        assert_eq!(
            names(brokers_for_secret(&brokers, &tokens, &gitops)),
            ["demo"]
        );
        // ... and one named by a Broker's tls.secretRef.
        let cert = secret("edge-cert", &[]);
        assert!(tokens_for_secret(&tokens, &cert).is_empty());
        assert_eq!(
            names(brokers_for_secret(&brokers, &tokens, &cert)),
            ["edge"]
        );
        // Nobody's.
        let unrelated = secret("unrelated", &[]);
        assert!(tokens_for_secret(&tokens, &unrelated).is_empty());
        assert!(brokers_for_secret(&brokers, &tokens, &unrelated).is_empty());
    }

    type R = Result<(ObjectRef<Broker>, Action), Error<std::io::Error, watcher::Error>>;

    #[test]
    fn watch_errors_are_counted_per_kind() {
        let m = Metrics::default();
        let forbidden = || -> R {
            Err(Error::QueueError(watcher::Error::InitialListFailed(
                kube::Error::Api(
                    kube::core::Status::failure("secrets is forbidden", "Forbidden")
                        .with_code(403)
                        .boxed(),
                ),
            )))
        };
        log("token", &m, forbidden());
        log("token", &m, forbidden());
        let undecodable: R = Err(Error::QueueError(watcher::Error::NoResourceVersion));
        log("acl", &m, undecodable);
        // Not watch errors: a reconcile result and a vanished object.
        let ok: R = Ok((ObjectRef::new("b").within("ns"), Action::await_change()));
        log("broker", &m, ok);
        let gone: R = Err(Error::ObjectNotFound(Box::new(
            ObjectRef::<Broker>::new("b").within("ns").erase(),
        )));
        log("broker", &m, gone);
        let text = m.encode();
        assert!(
            text.contains(r#"starling_operator_watch_errors_total{kind="token"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"starling_operator_watch_errors_total{kind="acl"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"watch_errors_total{kind="broker"}"#),
            "{text}"
        );
    }
}

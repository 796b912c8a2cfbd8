//! Wires the three reconcilers into kube-runtime Controllers with the watches
//! that keep them current:
//! - Broker: its own objects (by owner reference), and every Token and ACL
//!   (mapped to the Broker they name), so bundle changes follow at once.
//! - Token: its credentials Secret, and Brokers (a new CA or endpoint
//!   reaches the credentials of every Token of that Broker).
//! - ACL: Brokers and Tokens (for Ready and the matched-token count).

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::build::{MANAGER, keys};
use crate::crd::{Acl, Broker, Token};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context, error_policy};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Only what the operator made (keeps the Secret cache small).
fn owned() -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={MANAGER}", keys::MANAGED_BY))
}

fn broker_of<K: ResourceExt>(obj: &K, broker: &str) -> Option<ObjectRef<Broker>> {
    Some(ObjectRef::new(broker).within(&obj.namespace()?))
}

/// Objects in `store` that refer to the Broker `name` in namespace `ns`.
fn referring<K, F>(
    store: &Store<K>,
    ns: Option<String>,
    name: &str,
    broker_name: F,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
    F: Fn(&K) -> &str,
{
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == ns && broker_name(o) == name)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Runs all controllers until `shutdown` resolves (then lets in-flight
/// reconciles finish).
pub async fn run<S>(client: Client, ctx: Arc<Context>, namespace: Option<String>, shutdown: S)
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let ns = namespace.as_deref();
    let (bm, tm, am) = (
        ctx.metrics.clone(),
        ctx.metrics.clone(),
        ctx.metrics.clone(),
    );

    let brokers = Controller::new(api::<Broker>(&client, ns), watcher::Config::default())
        .owns(api::<StatefulSet>(&client, ns), owned())
        .owns(api::<ConfigMap>(&client, ns), owned())
        .owns(api::<Service>(&client, ns), owned())
        .owns(api::<Secret>(&client, ns), owned())
        .watches(api::<Token>(&client, ns), watcher::Config::default(), |t| {
            broker_of(&t, &t.spec.broker_ref.name)
        })
        .watches(api::<Acl>(&client, ns), watcher::Config::default(), |a| {
            broker_of(&a, &a.spec.broker_ref.name)
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile::broker::reconcile,
            error_policy::<Broker>,
            ctx.clone(),
        )
        .for_each(move |r| {
            let m = bm.clone();
            async move { log("broker", &m, r) }
        });

    let tokens = Controller::new(api::<Token>(&client, ns), watcher::Config::default());
    let token_store = tokens.store();
    let tokens = tokens
        .owns(api::<Secret>(&client, ns), owned())
        .watches(
            api::<Broker>(&client, ns),
            watcher::Config::default(),
            move |b| {
                referring(&token_store, b.namespace(), &b.name_any(), |t: &Token| {
                    &t.spec.broker_ref.name
                })
            },
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile::token::reconcile,
            error_policy::<Token>,
            ctx.clone(),
        )
        .for_each(move |r| {
            let m = tm.clone();
            async move { log("token", &m, r) }
        });

    let acls = Controller::new(api::<Acl>(&client, ns), watcher::Config::default());
    let acl_store = acls.store();
    let acl_store2 = acls.store();
    let acls = acls
        .watches(
            api::<Broker>(&client, ns),
            watcher::Config::default(),
            move |b| {
                referring(&acl_store, b.namespace(), &b.name_any(), |a: &Acl| {
                    &a.spec.broker_ref.name
                })
            },
        )
        .watches(
            api::<Token>(&client, ns),
            watcher::Config::default(),
            move |t| {
                referring(
                    &acl_store2,
                    t.namespace(),
                    &t.spec.broker_ref.name,
                    |a: &Acl| &a.spec.broker_ref.name,
                )
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::acl::reconcile, error_policy::<Acl>, ctx)
        .for_each(move |r| {
            let m = am.clone();
            async move { log("acl", &m, r) }
        });

    tracing::info!(namespace = ns.unwrap_or("<all>"), "controllers started");
    futures::join!(brokers, tokens, acls);
    tracing::info!("controllers stopped");
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
    use kube::runtime::controller::{Action, Error};

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

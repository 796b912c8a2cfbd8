//! In Kubernetes, the broker watches its own Secrets — the auth bundle and
//! the TLS certificate — through the API server, so `kubectl delete token`
//! closes that token's connections in seconds. The kubelet refreshes the
//! mounted copies only at its sync interval (a minute or more); they stay
//! the fallback, and the only source outside Kubernetes.
//!
//! Each Secret is watched by name (a `metadata.name` field selector), which
//! is what the operator's Role allows: get/list/watch on exactly those two
//! names. While a watch is current the mounted file is not read, so its
//! lagging copy cannot put an older bundle back. Without `POD_NAMESPACE` or
//! a reachable API server the broker says so once and serves from the files.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::auth;
use crate::server::Shared;
use crate::tls::{self, ReloadingResolver};

/// The key of the bundle in its Secret (what the operator writes).
pub const BUNDLE_KEY: &str = "bundle.json";

/// Starts the watches the config asks for, if any.
pub fn spawn(shared: Arc<Shared>, resolver: Option<Arc<ReloadingResolver>>) {
    let bundle = shared.config.auth.bundle_secret.clone();
    let tls_secret = shared
        .config
        .tls
        .secret
        .clone()
        .filter(|_| resolver.is_some());
    if bundle.is_none() && tls_secret.is_none() {
        return;
    }
    tokio::spawn(async move {
        let Some(ns) = std::env::var("POD_NAMESPACE")
            .ok()
            .filter(|n| !n.is_empty())
        else {
            tracing::warn!(
                "[auth] bundle_secret or [tls] secret is set but POD_NAMESPACE is not; serving the auth bundle and certificate from the mounted files only"
            );
            return;
        };
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes API server configuration; serving the auth bundle and certificate from the mounted files only");
                return;
            }
        };
        let api: Api<Secret> = Api::namespaced(client, &ns);
        if let Some(name) = bundle {
            let shared2 = shared.clone();
            let origin = format!("Secret {ns}/{name}");
            tokio::spawn(watch_one(
                shared.clone(),
                api.clone(),
                name,
                move |s: &Secret| apply_bundle(&shared2, s, &origin),
                |shared: &Shared, live| shared.auth.set_api_live(live),
            ));
        }
        if let (Some(name), Some(r)) = (tls_secret, resolver) {
            let origin = format!("Secret {ns}/{name}");
            let r2 = r.clone();
            tokio::spawn(watch_one(
                shared.clone(),
                api,
                name,
                move |s: &Secret| apply_tls(&r2, s, &origin),
                move |_: &Shared, live| r.set_api_live(live),
            ));
        }
    });
}

/// Follows one named Secret until shutdown. `apply` gets each version;
/// `live` is told whether the watch is current (false on errors, while the
/// watcher retries with backoff), so the file fallback takes over.
async fn watch_one(
    shared: Arc<Shared>,
    api: Api<Secret>,
    name: String,
    mut apply: impl FnMut(&Secret) -> bool,
    live: impl Fn(&Shared, bool),
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut shutdown = shared.shutdown.subscribe();
    let mut failing = false;
    loop {
        let ev = tokio::select! {
            _ = shutdown.changed() => return,
            ev = events.next() => ev,
        };
        let Some(ev) = ev else { return };
        match ev {
            Ok(Event::Apply(s) | Event::InitApply(s)) => {
                if failing {
                    tracing::info!(secret = %name, "watching the Secret through the API server again");
                    failing = false;
                }
                live(&shared, apply(&s));
            }
            Ok(Event::Delete(_)) => {
                live(&shared, false);
                tracing::warn!(secret = %name, "the Secret was deleted; keeping what is in force and watching the mounted file");
            }
            Ok(Event::Init | Event::InitDone) => {}
            Err(e) => {
                live(&shared, false);
                if !failing {
                    tracing::warn!(secret = %name, error = %e, "cannot watch the Secret through the API server; serving from the mounted file until it works again");
                    failing = true;
                }
                // The watcher's backoff paces retries; this only keeps a
                // tight error loop from spinning if it ever does not.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Returns whether the Secret held a usable bundle key (the watch then
/// counts as current even if the bundle itself was rejected: the mounted
/// file has the same content).
fn apply_bundle(shared: &Shared, s: &Secret, origin: &str) -> bool {
    let Some(bytes) = s.data.as_ref().and_then(|d| d.get(BUNDLE_KEY)) else {
        tracing::warn!(
            origin,
            "the Secret has no {BUNDLE_KEY} key; keeping the auth bundle in force"
        );
        return false;
    };
    auth::watch::apply_bytes(shared, &bytes.0, origin);
    true
}

fn apply_tls(r: &ReloadingResolver, s: &Secret, origin: &str) -> bool {
    let data = s.data.as_ref();
    let (Some(cert), Some(key)) = (
        data.and_then(|d| d.get("tls.crt")),
        data.and_then(|d| d.get("tls.key")),
    ) else {
        tracing::warn!(
            origin,
            "the Secret has no tls.crt and tls.key; keeping the certificate in force"
        );
        return false;
    };
    match tls::load_pem_bytes(&cert.0, &key.0, origin) {
        Ok(k) => {
            if r.replace_if_new(k) {
                tracing::info!(origin, "TLS certificate reloaded");
            }
            true
        }
        Err(e) => {
            tracing::error!(origin, error = %e, "new TLS certificate rejected; keeping the old one");
            true
        }
    }
}

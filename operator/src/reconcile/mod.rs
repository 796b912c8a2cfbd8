//! One controller per kind, each a pipeline: read the resource and what it
//! references → validate → build the desired objects (pure, `crate::build`)
//! → server-side apply under one field manager → write status.
//!
//! Errors never stop a controller: they are written to the resource's status
//! (Degraded), counted, and the resource is retried with exponential backoff.

pub mod acl;
pub mod broker;
pub mod token;

#[cfg(test)]
pub(crate) use starling_fake_apiserver as fake;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod watch_tests;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use starling_model::bundle::format_rfc3339;
use thiserror::Error;

use crate::build::{BuildError, MANAGER};
use crate::metrics::Metrics;
use crate::tls::TlsError;

/// How often a healthy resource is looked at again even without events
/// (picks up changes to Secrets the operator does not watch, renews
/// certificates, notices expired tokens).
pub const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A server-side apply of one object failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl Error {
    /// Short class for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::Apply { .. } => "ApiError",
            Error::Build(BuildError::InvalidSpec(_)) => "InvalidSpec",
            Error::Build(_) => "InvalidObject",
            Error::Tls(_) => "CertificateError",
        }
    }

    /// The error for people, as a condition message: one sentence with the
    /// object, the Kubernetes reason and what to do, no debug dump (the full
    /// error goes to the log).
    pub fn message(&self) -> String {
        match self {
            Error::Apply { kind, name, source } => {
                api_message(&format!("{kind} {name} could not be applied"), source)
            }
            Error::Kube(e) => api_message("Reading from the Kubernetes API failed", e),
            Error::Build(e) => one_line(&e.to_string()),
            Error::Tls(e) => format!(
                "{}; the operator retries with backoff",
                one_line(&e.to_string())
            ),
        }
    }
}

/// `what`, the API server's reason and message, and what to do about it.
fn api_message(what: &str, e: &kube::Error) -> String {
    let kube::Error::Api(s) = e else {
        return format!(
            "{what}: the Kubernetes API server could not be reached or answered badly ({}); \
             the operator retries with backoff",
            one_line(&e.to_string())
        );
    };
    let hint = match s.code {
        403 => "grant the operator the RBAC listed in operator/README.md",
        404 => {
            "install the API it needs (cert-manager's CRDs for spec.tls.certManager) or remove the setting that needs it"
        }
        409 => "another client changed it at the same time; the operator retries",
        413 => "the object is too large; reduce what goes into it",
        422 if s.message.contains("updates to statefulset spec") => {
            "the StatefulSet cannot take this change in place: revert it, or delete the StatefulSet with --cascade=orphan (pods and volumes stay) so the operator recreates it"
        }
        400 | 422 => "revert the last change to the resource's spec",
        _ => "the operator retries with backoff",
    };
    let reason = if s.reason.is_empty() {
        format!("HTTP {}", s.code)
    } else {
        s.reason.clone()
    };
    format!("{what} ({reason}: {}); {hint}", one_line(&s.message))
}

/// The first line of `s`, at most 300 characters, without braces (Go and
/// Rust dumps in server messages read badly in `kubectl get`).
fn one_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default().trim();
    let mut out: String = line
        .chars()
        .map(|c| match c {
            '{' => '(',
            '}' => ')',
            c => c,
        })
        .take(300)
        .collect();
    if line.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The largest Secret data the API server takes (1 MiB); smaller in tests.
    pub secret_limit: usize,
}

/// The API server's limit on a Secret's data.
pub const SECRET_LIMIT: usize = 1024 * 1024;

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Context {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            secret_limit: SECRET_LIMIT,
        }
    }

    /// The same context with another Secret size limit (tests).
    #[cfg(test)]
    pub fn with_secret_limit(mut self, limit: usize) -> Context {
        self.secret_limit = limit;
        self
    }

    /// Publishes an event about `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "could not publish event");
        }
    }

    fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!(
            "{}/{}/{}",
            K::kind(&()),
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        )
    }

    /// Forgets the failures of `obj` after a successful reconcile.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&Self::key(obj));
        }
    }

    /// Records a failure of `obj` and returns how long to wait: 5 s, doubling
    /// per consecutive failure, at most 5 minutes.
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(Self::key(obj)).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff_delay(n)
    }
}

/// Delay after `n` consecutive failures.
pub fn backoff_delay(n: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

/// The error policy shared by all controllers: count, log, back off.
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    ctx.metrics.failure(&kind.to_lowercase(), error.reason());
    let delay = ctx.backoff(obj.as_ref());
    tracing::warn!(
        kind = %kind,
        name = %obj.name_any(),
        namespace = %obj.namespace().unwrap_or_default(),
        error = %error,
        details = ?error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Server-side apply of `obj` under the operator's field manager; an error
/// names the object.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: serde_json::to_value(obj)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
            .unwrap_or_else(|| "object".into()),
        name,
        source,
    })
}

/// Server-side apply of a status: `{apiVersion, kind, status}` on the status
/// subresource.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// The current time as written into conditions.
pub fn now() -> String {
    format_rfc3339(SystemTime::now())
}

#[cfg(test)]
mod unit {
    use super::*;

    fn apply_error(code: u16, reason: &str, message: &str) -> Error {
        Error::Apply {
            kind: "Service".into(),
            name: "demo".into(),
            source: kube::Error::Api(
                kube::core::Status::failure(message, reason)
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    #[test]
    fn condition_messages_are_one_sentence_without_dumps() {
        let e = apply_error(
            422,
            "Invalid",
            "Service \"demo\" is invalid: spec.clusterIPs[0]: Invalid value: []string{\"10.0.0.1\"}: may not change once set\nmore",
        );
        let m = e.message();
        assert_eq!(
            m,
            "Service demo could not be applied (Invalid: Service \"demo\" is invalid: spec.clusterIPs[0]: \
             Invalid value: []string(\"10.0.0.1\"): may not change once set); revert the last change to the resource's spec"
        );
        // The log keeps everything.
        assert!(format!("{e:?}").contains("Status {"));
        let m = apply_error(403, "Forbidden", "secrets \"x\" is forbidden").message();
        assert!(m.contains("(Forbidden: ") && m.contains("RBAC"), "{m}");
        let m = apply_error(500, "", &"x".repeat(1000)).message();
        assert!(m.contains("(HTTP 500: ") && m.len() < 450, "{m}");
        let m = Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded).message();
        assert!(!m.contains('{') && m.contains("retries"), "{m}");
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let d: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(d, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}

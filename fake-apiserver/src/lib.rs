//! An in-memory stand-in for the Kubernetes API server, behind a real
//! `kube::Client` (as a tower service) for the operator's reconcile tests,
//! or served over HTTP on 127.0.0.1 ([`FakeApi::serve`]) for tests that run
//! a real process against it (the broker's own Secret watch).
//!
//! It understands what the reconcilers, controllers and the broker use: get,
//! list and watch (with equality label selectors and the `metadata.name` /
//! `metadata.namespace` field selectors), create, delete, server-side apply
//! (one field manager, so an apply replaces the object's content) and status
//! patches. Every write is
//! recorded with whether it changed the stored object; unchanged writes do
//! not bump `resourceVersion`, as with a real API server. Every request is
//! counted ([`FakeApi::requests`]), and get/list/watch with the
//! `PartialObjectMetadata` Accept header (kube's `metadata_watcher`,
//! `Api::list_metadata`) are answered with metadata only, as a real API
//! server does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use kube::client::Body;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::broadcast;

type Key = (String, String, String, String); // (api prefix, plural, namespace, name)
type Resp = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// A change, as a watch reports it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    key: Key,
    type_: &'static str,
    object: Value,
}

/// One write the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// apply, status, create, delete or merge.
    pub verb: &'static str,
    pub plural: String,
    pub name: String,
    /// Did it change the stored object?
    pub changed: bool,
    pub field_manager: Option<String>,
}

impl Write {
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.verb, self.plural, self.name)
    }
}

/// One request the fake answered (reads, writes and watches alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    /// The HTTP method: GET, POST, PATCH, DELETE, ...
    pub method: String,
    /// The resource's plural (`tokens`, `secrets`, ...), or the path when
    /// the fake does not know it.
    pub plural: String,
    /// The object's name, for requests on one object.
    pub name: Option<String>,
    /// `status` for the status subresource.
    pub subresource: Option<String>,
    /// A watch (`?watch=true`): a stream, not a one-off request.
    pub watch: bool,
    /// Asked for `PartialObjectMetadata` (metadata only).
    pub metadata_only: bool,
}

impl ApiCall {
    /// The verb as RBAC names it: get, list, watch, create, patch, delete.
    pub fn verb(&self) -> &'static str {
        match (self.method.as_str(), self.name.is_some(), self.watch) {
            ("GET", _, true) => "watch",
            ("GET", true, _) => "get",
            ("GET", false, _) => "list",
            ("POST", ..) => "create",
            ("PATCH", ..) => "patch",
            ("PUT", ..) => "update",
            ("DELETE", ..) => "delete",
            _ => "other",
        }
    }
}

impl std::fmt::Display for ApiCall {
    /// `verb plural[/name][/subresource]`, e.g. `patch tokens/a/status`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb(), self.plural)?;
        if let Some(n) = &self.name {
            write!(f, "/{n}")?;
        }
        if let Some(s) = &self.subresource {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

struct State {
    /// Every request so far, in order.
    calls: Vec<ApiCall>,
    objects: BTreeMap<Key, Value>,
    rv: u64,
    writes: Vec<Write>,
    /// Resources the "cluster" does not have (e.g. cert-manager's CRDs).
    missing: Vec<String>,
    /// The last configuration each field manager applied to each object.
    applied: BTreeMap<(Key, String), Value>,
    /// Every change, for watches that start from an older resourceVersion.
    log: Vec<Change>,
    changes: broadcast::Sender<Change>,
}

impl Default for State {
    fn default() -> Self {
        State {
            calls: Vec::new(),
            objects: BTreeMap::new(),
            rv: 0,
            writes: Vec::new(),
            missing: Vec::new(),
            applied: BTreeMap::new(),
            log: Vec::new(),
            changes: broadcast::channel(4096).0,
        }
    }
}

impl State {
    /// Records a change of `key` at the current resourceVersion.
    fn changed(&mut self, key: &Key, type_: &'static str, object: &Value) {
        let c = Change {
            rv: self.rv,
            key: key.clone(),
            type_,
            object: object.clone(),
        };
        self.log.push(c.clone());
        let _ = self.changes.send(c);
    }
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn prefix_of<K: Resource<DynamicType = ()>>() -> String {
    let group = K::group(&());
    if group.is_empty() {
        format!("api/{}", K::version(&()))
    } else {
        format!("apis/{group}/{}", K::version(&()))
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(code: u16, body: &Value) -> Resp {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut r = Response::new(Full::new(bytes).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Removes from `target` what `prev` set and `cur` no longer does.
fn prune(target: &mut Value, prev: &Value, cur: &Value) {
    let (Some(t), Some(p)) = (target.as_object_mut(), prev.as_object()) else {
        return;
    };
    for (k, pv) in p {
        match cur.get(k) {
            None => {
                t.remove(k);
            }
            Some(cv) => {
                if let Some(tv) = t.get_mut(k) {
                    prune(tv, pv, cv);
                }
            }
        }
    }
}

/// `obj` as a `PartialObjectMetadata` (what a real API server sends for the
/// `as=PartialObjectMetadata;g=meta.k8s.io;v=v1` Accept header): type and
/// metadata, nothing else.
fn partial(obj: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn without_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("generation");
    }
    v
}

fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

/// Field selectors the API server supports on every type (others are a 400).
fn field_match(obj: &Value, selector: Option<&str>) -> Result<bool, String> {
    let Some(sel) = selector else {
        return Ok(true);
    };
    let mut all = true;
    for req in sel.split(',').filter(|s| !s.is_empty()) {
        let (field, want, negate) = match req.split_once("!=") {
            Some((f, v)) => (f, v, true),
            None => match req.split_once('=') {
                Some((f, v)) => (f, v.trim_start_matches('='), false),
                None => return Err(format!("invalid field selector: {req}")),
            },
        };
        let got = match field {
            "metadata.name" => obj.pointer("/metadata/name"),
            "metadata.namespace" => obj.pointer("/metadata/namespace"),
            other => return Err(format!("field label not supported: {other}")),
        };
        let equal = got.and_then(Value::as_str) == Some(want);
        all &= equal != negate;
    }
    Ok(all)
}

fn label_match(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector else { return true };
    let labels = obj.pointer("/metadata/labels");
    sel.split(',')
        .filter(|s| !s.is_empty())
        .all(|req| match req.split_once('=') {
            Some((k, v)) => labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v),
            None => labels.and_then(|l| l.get(req)).is_some(),
        })
}

/// The largest request body the API server reads (3 MiB).
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;
/// The largest `data` of a Secret or ConfigMap (1 MiB).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// Kind and API group of a plural, as the API server names them in errors.
fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        "statefulsets" => ("StatefulSet", "apps"),
        "services" => ("Service", ""),
        "secrets" => ("Secret", ""),
        "configmaps" => ("ConfigMap", ""),
        "serviceaccounts" => ("ServiceAccount", ""),
        "poddisruptionbudgets" => ("PodDisruptionBudget", "policy"),
        "roles" => ("Role", "rbac.authorization.k8s.io"),
        "rolebindings" => ("RoleBinding", "rbac.authorization.k8s.io"),
        "certificates" => ("Certificate", "cert-manager.io"),
        "brokers" => ("Broker", "starling.dev"),
        "tokens" => ("Token", "starling.dev"),
        "acls" => ("ACL", "starling.dev"),
        _ => ("Object", ""),
    }
}

/// A 422 Invalid as the API server words it: `Kind.group "name" is invalid:
/// field: detail`.
fn invalid(plural: &str, name: &str, field: &str, cause: &str, detail: &str) -> Box<Resp> {
    let (kind, group) = kind_of(plural);
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let mut body = status_body(
        422,
        "Invalid",
        &format!("{qualified} \"{name}\" is invalid: {field}: {detail}"),
    );
    body["details"] = json!({
        "name": name,
        "group": group,
        "kind": plural,
        "causes": [{"reason": cause, "message": detail, "field": field}],
    });
    Box::new(respond(422, &body))
}

/// Size of a Secret's or ConfigMap's data as the API server counts it
/// (Secrets: the decoded values; ConfigMaps: keys and values).
fn data_size(plural: &str, obj: &Value) -> usize {
    use base64::Engine;
    let decoded = |v: &Value| {
        v.as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .map_or(0, |b| b.len())
    };
    let entries = |field: &str| {
        obj.get(field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
    };
    match plural {
        "secrets" => {
            entries("data").map(|(_, v)| decoded(v)).sum::<usize>()
                + entries("stringData")
                    .map(|(_, v)| v.as_str().map_or(0, str::len))
                    .sum::<usize>()
        }
        "configmaps" => {
            entries("data")
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum::<usize>()
                + entries("binaryData")
                    .map(|(k, v)| k.len() + decoded(v))
                    .sum::<usize>()
        }
        _ => 0,
    }
}

/// What a real API server refuses in a create or update that the fake would
/// otherwise store: immutable fields, oversized data.
fn validate(plural: &str, name: &str, old: Option<&Value>, new: &Value) -> Result<(), Box<Resp>> {
    if matches!(plural, "secrets" | "configmaps") && data_size(plural, new) > MAX_DATA_BYTES {
        return Err(invalid(
            plural,
            name,
            "data",
            "FieldValueTooLong",
            &format!("Too long: must have at most {MAX_DATA_BYTES} bytes"),
        ));
    }
    let Some(old) = old else { return Ok(()) };
    let field = |v: &Value, f: &str| v.pointer(f).cloned().unwrap_or(Value::Null);
    match plural {
        "statefulsets" => {
            let immutable = [
                "/spec/selector",
                "/spec/serviceName",
                "/spec/volumeClaimTemplates",
                "/spec/podManagementPolicy",
            ];
            if immutable.iter().any(|f| field(old, f) != field(new, f)) {
                return Err(invalid(
                    plural,
                    name,
                    "spec",
                    "FieldValueForbidden",
                    "Forbidden: updates to statefulset spec for fields other than 'replicas', \
                     'ordinals', 'template', 'updateStrategy', \
                     'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                ));
            }
        }
        "services" => {
            let old_ip = field(old, "/spec/clusterIP");
            let new_ip = field(new, "/spec/clusterIP");
            if old_ip.as_str().is_some_and(|s| !s.is_empty()) && old_ip != new_ip {
                return Err(invalid(
                    plural,
                    name,
                    "spec.clusterIPs[0]",
                    "FieldValueInvalid",
                    &format!(
                        "Invalid value: []string{{{}}}: may not change once set",
                        new_ip
                    ),
                ));
            }
            let lb = |v: &Value| field(v, "/spec/type").as_str() == Some("LoadBalancer");
            let (old_class, new_class) = (
                field(old, "/spec/loadBalancerClass"),
                field(new, "/spec/loadBalancerClass"),
            );
            if lb(old) && lb(new) && old_class != new_class {
                return Err(invalid(
                    plural,
                    name,
                    "spec.loadBalancerClass",
                    "FieldValueInvalid",
                    &format!("Invalid value: {new_class}: may not change once set"),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// What the API server fills in on create (only what the operator could
/// trip over): a Service's cluster IP.
fn allocate(plural: &str, rv: u64, obj: &mut Value) {
    if plural != "services" {
        return;
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
        return;
    }
    let ip = spec
        .entry("clusterIP")
        .or_insert_with(|| json!(format!("10.96.{}.{}", (rv / 250) % 250, rv % 250 + 1)))
        .clone();
    spec.entry("clusterIPs").or_insert_with(|| json!([ip]));
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi::default()
    }

    /// A kube client whose every request this fake answers.
    pub fn client(&self) -> Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        Client::new(svc, "default")
    }

    /// Serves this fake over plain HTTP on `listener` until the returned
    /// task is aborted, for a real process to talk to (a kubeconfig with
    /// `server: http://127.0.0.1:<port>`, as `kubectl proxy` gives).
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let resp = me
                                    .handle(Request::from_parts(parts, Body::from(bytes)))
                                    .await;
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `obj` as if a user created it (uid, resourceVersion, generation).
    pub fn put<K>(&self, obj: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut v = serde_json::to_value(obj).unwrap_or_default();
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let name = obj.meta().name.clone().unwrap_or_default();
        let key = (
            prefix_of::<K>(),
            K::plural(&()).to_string(),
            ns,
            name.clone(),
        );
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.entry("uid")
                .or_insert(json!(format!("uid-{}-{name}", K::plural(&()))));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.entry("generation").or_insert(json!(1));
            m.entry("creationTimestamp")
                .or_insert(json!("2026-01-01T00:00:00Z"));
        }
        if let Some(o) = v.as_object_mut() {
            o.insert("apiVersion".into(), json!(K::api_version(&())));
            o.insert("kind".into(), json!(K::kind(&())));
        }
        let type_ = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key.clone(), v.clone());
        st.changed(&key, type_, &v);
        serde_json::from_value(v).unwrap_or_else(|e| panic!("stored object reads back: {e}"))
    }

    pub fn get<K>(&self, ns: &str, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let key = (
            prefix_of::<K>(),
            K::plural(&()).to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let v = self.lock().objects.get(&key).cloned()?;
        serde_json::from_value(v).ok()
    }

    /// Removes an object (as a completed deletion would).
    pub fn remove<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str) {
        let key = (
            prefix_of::<K>(),
            K::plural(&()).to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let mut st = self.lock();
        if let Some(old) = st.objects.remove(&key) {
            st.rv += 1;
            st.changed(&key, "DELETED", &old);
        }
    }

    /// Sets `.status` of a stored object (as another controller would).
    pub fn set_status<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str, status: Value) {
        let key = (
            prefix_of::<K>(),
            K::plural(&()).to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let Some(o) = st.objects.get_mut(&key) else {
            return;
        };
        o["status"] = status;
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        let o = o.clone();
        st.changed(&key, "MODIFIED", &o);
    }

    /// Makes every request for `plural` fail with 404, as when its CRD is
    /// not installed.
    pub fn fail_plural(&self, plural: &str) {
        self.lock().missing.push(plural.to_string());
    }

    /// Names (`plural/name`) of every stored object, events left out.
    pub fn names(&self) -> Vec<String> {
        self.lock()
            .objects
            .keys()
            .filter(|k| k.1 != "events")
            .map(|k| format!("{}/{}", k.1, k.3))
            .collect()
    }

    /// Every write so far, and forgets them.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut self.lock().writes)
    }

    /// The writes that changed something, events left out, as `verb plural/name`.
    pub fn take_changes(&self) -> Vec<String> {
        self.take_writes()
            .into_iter()
            .filter(|w| w.changed && w.plural != "events")
            .map(|w| w.id())
            .collect()
    }

    /// Every request so far (watches included), oldest first.
    pub fn requests(&self) -> Vec<ApiCall> {
        self.lock().calls.clone()
    }

    /// Every request so far, and forgets them.
    pub fn take_requests(&self) -> Vec<ApiCall> {
        std::mem::take(&mut self.lock().calls)
    }

    /// How many requests so far were not watches (the one-off calls a
    /// controller's cost is counted in).
    pub fn request_count(&self) -> usize {
        self.lock().calls.iter().filter(|c| !c.watch).count()
    }

    /// A watch: changes after `since`, then live ones, as JSON lines
    /// (objects as `PartialObjectMetadata` with `metadata_only`).
    #[allow(clippy::too_many_arguments)] // the request's parts, one each
    fn watch(
        st: &State,
        prefix: String,
        plural: String,
        ns: Option<String>,
        selector: Option<String>,
        fields: Option<String>,
        since: u64,
        metadata_only: bool,
    ) -> Resp {
        let live = st.changes.subscribe();
        let backlog: Vec<Change> = st.log.iter().filter(|c| c.rv > since).cloned().collect();
        let last = backlog.last().map(|c| c.rv).unwrap_or(since);
        let wanted = move |c: &Change| {
            c.key.0 == prefix
                && c.key.1 == plural
                && ns.as_ref().is_none_or(|n| *n == c.key.2)
                && label_match(&c.object, selector.as_deref())
                && field_match(&c.object, fields.as_deref()).unwrap_or(false)
        };
        let wanted2 = wanted.clone();
        let backlog = futures::stream::iter(backlog.into_iter().filter(move |c| wanted(c)));
        let live = futures::stream::unfold(live, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(c) => return Some((c, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .filter(move |c| futures::future::ready(c.rv > last && wanted2(c)));
        let frames = backlog.chain(live).map(move |c| {
            let object = if metadata_only {
                partial(&c.object)
            } else {
                c.object
            };
            let mut line =
                serde_json::to_vec(&json!({"type": c.type_, "object": object})).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
        });
        Response::new(StreamBody::new(frames).boxed_unsync())
    }

    /// Counts a request answered before its path was looked at.
    fn count_unparsed(&self, parts: &http::request::Parts) {
        self.lock().calls.push(ApiCall {
            method: parts.method.to_string(),
            plural: parts.uri.path().to_string(),
            name: None,
            subresource: None,
            watch: false,
            metadata_only: false,
        });
    }

    /// A path the fake does not serve: counted, then a 404.
    fn unknown_path(&self, parts: &http::request::Parts) -> Resp {
        self.count_unparsed(parts);
        respond(404, &status_body(404, "NotFound", "unknown path"))
    }

    async fn handle(&self, req: Request<Body>) -> Resp {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        if body.len() > MAX_REQUEST_BYTES {
            self.count_unparsed(&parts);
            return respond(
                413,
                &status_body(
                    413,
                    "RequestEntityTooLarge",
                    &format!("Request entity too large: limit is {MAX_REQUEST_BYTES}"),
                ),
            );
        }
        let query: BTreeMap<String, String> = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.replace("%3D", "=")
                        .replace("%21", "!")
                        .replace("%2C", ",")
                        .replace("%2F", "/"),
                )
            })
            .collect();
        let segs: Vec<&str> = parts
            .uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (prefix, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => (format!("api/{v}"), rest),
            ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
            _ => return self.unknown_path(&parts),
        };
        let (ns, plural, name, sub) = match rest {
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
            ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            [plural] => (None, *plural, None, None),
            _ => return self.unknown_path(&parts),
        };
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // `as=PartialObjectMetadata` or `as=PartialObjectMetadataList`.
        let metadata_only = parts
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        let manager = query.get("fieldManager").cloned();
        let mut st = self.lock();
        st.calls.push(ApiCall {
            method: parts.method.to_string(),
            plural: plural.to_string(),
            name: name.map(String::from),
            subresource: sub.map(String::from),
            watch: query.get("watch").map(String::as_str) == Some("true"),
            metadata_only,
        });
        if st.missing.iter().any(|m| m == plural) {
            return respond(
                404,
                &status_body(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        let key = |name: &str| {
            (
                prefix.clone(),
                plural.to_string(),
                ns.unwrap_or_default().to_string(),
                name.to_string(),
            )
        };
        match (&parts.method, name) {
            (&Method::GET, Some(name)) => match st.objects.get(&key(name)) {
                Some(v) if metadata_only => respond(200, &partial(v)),
                Some(v) => respond(200, v),
                None => respond(
                    404,
                    &status_body(404, "NotFound", &format!("{plural} {name} not found")),
                ),
            },
            (&Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => {
                let since = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if let Err(e) =
                    field_match(&json!({}), query.get("fieldSelector").map(String::as_str))
                {
                    return respond(400, &status_body(400, "BadRequest", &e));
                }
                Self::watch(
                    &st,
                    prefix.clone(),
                    plural.to_string(),
                    ns.map(String::from),
                    query.get("labelSelector").cloned(),
                    query.get("fieldSelector").cloned(),
                    since,
                    metadata_only,
                )
            }
            (&Method::GET, None) => {
                let fields = query.get("fieldSelector").map(String::as_str);
                if let Err(e) = field_match(&json!({}), fields) {
                    return respond(400, &status_body(400, "BadRequest", &e));
                }
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.0 == prefix && k.1 == plural && ns.is_none_or(|n| n == k.2))
                    .filter(|(_, v)| label_match(v, query.get("labelSelector").map(String::as_str)))
                    .filter(|(_, v)| field_match(v, fields).unwrap_or(false))
                    .map(|(_, v)| v.clone())
                    .collect();
                if metadata_only {
                    let items: Vec<Value> = items.iter().map(partial).collect();
                    return respond(
                        200,
                        &json!({
                            "apiVersion": "meta.k8s.io/v1",
                            "kind": "PartialObjectMetadataList",
                            "metadata": {"resourceVersion": st.rv.to_string()},
                            "items": items,
                        }),
                    );
                }
                let api_version = prefix
                    .trim_start_matches("api/")
                    .trim_start_matches("apis/");
                respond(
                    200,
                    &json!({
                        "apiVersion": api_version,
                        "kind": "List",
                        "metadata": {"resourceVersion": st.rv.to_string()},
                        "items": items,
                    }),
                )
            }
            (&Method::POST, None) => {
                let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                    return respond(400, &status_body(400, "BadRequest", "body is not JSON"));
                };
                let name = v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("unnamed")
                    .to_string();
                if st.objects.contains_key(&key(&name)) {
                    return respond(409, &status_body(409, "AlreadyExists", "exists"));
                }
                if let Err(refused) = validate(plural, &name, None, &v) {
                    return *refused;
                }
                st.rv += 1;
                let rv = st.rv;
                allocate(plural, rv, &mut v);
                if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("resourceVersion".into(), json!(rv.to_string()));
                    m.insert("uid".into(), json!(format!("uid-{plural}-{name}")));
                }
                st.objects.insert(key(&name), v.clone());
                st.changed(&key(&name), "ADDED", &v);
                st.writes.push(Write {
                    verb: "create",
                    plural: plural.into(),
                    name,
                    changed: true,
                    field_manager: manager,
                });
                respond(201, &v)
            }
            (&Method::DELETE, Some(name)) => {
                let old = st.objects.remove(&key(name));
                let found = old.is_some();
                st.writes.push(Write {
                    verb: "delete",
                    plural: plural.into(),
                    name: name.into(),
                    changed: found,
                    field_manager: None,
                });
                match old {
                    Some(old) => {
                        st.rv += 1;
                        st.changed(&key(name), "DELETED", &old);
                        // What this manager applied goes with the object.
                        st.applied.retain(|(k, _), _| *k != key(name));
                        // As a real API server answers for an object without
                        // finalizers: the object as it was.
                        respond(200, &old)
                    }
                    None => {
                        let (_, group) = kind_of(plural);
                        let resource = if group.is_empty() {
                            plural.to_string()
                        } else {
                            format!("{plural}.{group}")
                        };
                        let mut body = status_body(
                            404,
                            "NotFound",
                            &format!("{resource} \"{name}\" not found"),
                        );
                        body["details"] = json!({"name": name, "group": group, "kind": plural});
                        respond(404, &body)
                    }
                }
            }
            (&Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return respond(400, &status_body(400, "BadRequest", "body is not JSON"));
                };
                let apply = content_type.starts_with("application/apply-patch");
                if apply {
                    let expected = prefix
                        .trim_start_matches("api/")
                        .trim_start_matches("apis/");
                    let version = patch.get("apiVersion").and_then(Value::as_str);
                    let kind = patch.get("kind").and_then(Value::as_str);
                    if version != Some(expected) {
                        let msg = format!(
                            "Incorrect version specified in apply patch. Specified patch version: {}, expected: {expected}",
                            version.unwrap_or_default()
                        );
                        return respond(400, &status_body(400, "BadRequest", &msg));
                    }
                    if kind.is_none_or(str::is_empty) {
                        let msg = "Object 'Kind' is missing in apply patch";
                        return respond(400, &status_body(400, "BadRequest", msg));
                    }
                }
                let k = key(name);
                let old = st.objects.get(&k).cloned();
                let new = match (sub, &old) {
                    (Some("status"), None) => {
                        return respond(404, &status_body(404, "NotFound", "not found"));
                    }
                    (Some("status"), Some(old)) => {
                        let mut new = old.clone();
                        let status = patch.get("status").cloned().unwrap_or(Value::Null);
                        if apply {
                            new["status"] = status;
                        } else {
                            merge(&mut new["status"], &status);
                        }
                        new
                    }
                    (Some(_), _) => {
                        return respond(404, &status_body(404, "NotFound", "subresource"));
                    }
                    (None, _) if apply => {
                        // Server-side apply: fields this manager applied last
                        // time and no longer applies are removed; the rest of
                        // the object (other managers, server fields) stays.
                        let mut applied = patch.clone();
                        if let Some(o) = applied.as_object_mut() {
                            o.remove("status");
                        }
                        let mut new = old.clone().unwrap_or_else(|| json!({}));
                        let mk = (k.clone(), manager.clone().unwrap_or_default());
                        if let Some(prev) = st.applied.get(&mk) {
                            prune(&mut new, prev, &applied);
                        }
                        merge(&mut new, &applied);
                        st.applied.insert(mk, applied);
                        if old.is_none()
                            && let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut)
                        {
                            m.insert("uid".into(), json!(format!("uid-{plural}-{name}")));
                            m.insert("generation".into(), json!(1));
                            m.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
                        }
                        new
                    }
                    (None, None) => {
                        return respond(404, &status_body(404, "NotFound", "not found"));
                    }
                    (None, Some(old)) => {
                        // JSON merge (and strategic merge, close enough here).
                        let mut new = old.clone();
                        let mut patch = patch.clone();
                        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("resourceVersion");
                        }
                        merge(&mut new, &patch);
                        if let Some(o) = new.as_object_mut() {
                            match old.get("status") {
                                Some(s) => o.insert("status".into(), s.clone()),
                                None => o.remove("status"),
                            };
                        }
                        new
                    }
                };
                let mut new = new;
                if sub.is_none() {
                    if old.is_none() {
                        allocate(plural, st.rv + 1, &mut new);
                    }
                    if let Err(refused) = validate(plural, name, old.as_ref(), &new) {
                        return *refused;
                    }
                }
                let changed = old.as_ref().map(without_rv) != Some(without_rv(&new));
                let mut rv = old
                    .as_ref()
                    .and_then(|o| o.pointer("/metadata/resourceVersion").cloned());
                if changed {
                    st.rv += 1;
                    rv = Some(json!(st.rv.to_string()));
                    if let (Some(o), None) = (&old, sub)
                        && spec_part(o) != spec_part(&new)
                    {
                        let g = o
                            .pointer("/metadata/generation")
                            .and_then(Value::as_i64)
                            .unwrap_or(1);
                        new["metadata"]["generation"] = json!(g + 1);
                    }
                }
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("resourceVersion".into(), rv.unwrap_or(json!("0")));
                }
                st.objects.insert(k.clone(), new.clone());
                if changed {
                    st.changed(&k, if old.is_some() { "MODIFIED" } else { "ADDED" }, &new);
                }
                st.writes.push(Write {
                    verb: match (sub, apply) {
                        (Some(_), _) => "status",
                        (None, true) => "apply",
                        (None, false) => "merge",
                    },
                    plural: plural.into(),
                    name: name.into(),
                    changed,
                    field_manager: manager,
                });
                respond(200, &new)
            }
            _ => respond(
                405,
                &status_body(405, "MethodNotAllowed", "not supported by the fake"),
            ),
        }
    }
}

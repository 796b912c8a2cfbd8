//! Token and ACL management in EMQX v4's shapes: `/api/v4/auth_username`
//! (EMQX's username/password authentication; here a username is a token's
//! name and its password the token's secret) and `/api/v4/acl` (here whole
//! named ACL entries of the bundle rather than EMQX's one rule per login).
//!
//! Lists show the bundle in force, never a secret or hash. Changes go
//! through `auth::store`, which refuses them unless the bundle is this
//! broker's own file, so an operator-managed broker stays read-only here.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use starling_model::bundle::{
    AclEntry, Action, BundleError, Effect, LabelSelector, Rule, RuleProblem, TokenEntry,
};
use starling_model::bundle_edit::{self, EditError, NewToken, TokenUpdate};
use utoipa::ToSchema;

use super::emqx::{self, ErrorReply, Meta, OkReply, Refusal, code};
use crate::auth::store::{self, StoreError};
use crate::listen::SharedRef;

// ---------------------------------------------------------------- shapes

/// A token as listed: never its secret or hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// The token's name, usable as MQTT username.
    pub username: String,
    pub description: Option<String>,
    pub disabled: bool,
    /// RFC 3339.
    pub expires_at: Option<String>,
    /// `expires_at` has passed.
    pub expired: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokensReply {
    pub code: u32,
    pub data: Vec<TokenView>,
    pub meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenReply {
    pub code: u32,
    pub data: TokenView,
}

/// A new token with its secret, shown this once (only its hash is kept).
/// No `Debug`, here and on the requests: they hold a secret, and a derived
/// `Debug` is one log line away from printing it.
#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    pub username: String,
    /// The secret: the MQTT password (or HTTP bearer token).
    pub password: String,
    /// The broker generated the secret (no `password` was given).
    pub generated: bool,
    pub description: Option<String>,
    pub disabled: bool,
    pub expires_at: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedTokenReply {
    pub code: u32,
    pub data: CreatedToken,
}

/// `POST /api/v4/auth_username`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTokenRequest {
    /// The token's name.
    #[schema(min_length = 1)]
    pub username: String,
    /// Bring your own secret (at least 16 characters, no whitespace);
    /// without it the broker generates one.
    #[serde(default)]
    #[schema(min_length = 16)]
    pub password: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// RFC 3339, e.g. `2030-01-31T12:00:00Z`.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `PUT /api/v4/auth_username/{username}`: the fields to change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenUpdateRequest {
    /// `true` refuses the token and closes its connections; `false`
    /// enables it again.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Empty clears it.
    #[serde(default)]
    pub description: Option<String>,
    /// A new secret; connections made with the old one are closed.
    #[serde(default)]
    #[schema(min_length = 16)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActionView {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EffectView {
    Allow,
    Deny,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleView {
    /// Topic filters (wildcards allowed, no `$share/` prefix).
    #[schema(min_items = 1)]
    pub topics: Vec<String>,
    #[schema(min_items = 1)]
    pub actions: Vec<ActionView>,
    pub effect: EffectView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectorView {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// An ACL entry of the bundle: which tokens, and its rules in order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclView {
    #[schema(min_length = 1)]
    pub name: String,
    /// Token names it applies to.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Also every token with these labels.
    #[serde(default)]
    pub selector: Option<SelectorView>,
    /// Also clients without a token.
    #[serde(default)]
    pub anonymous: bool,
    #[serde(default)]
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AclsReply {
    pub code: u32,
    pub data: Vec<AclView>,
    pub meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AclReply {
    pub code: u32,
    pub data: AclView,
}

// ---------------------------------------------------------------- mapping

fn token_view(t: &TokenEntry, now: SystemTime) -> TokenView {
    let expired = t
        .expires_at
        .as_deref()
        .and_then(|e| starling_model::bundle::parse_rfc3339(e).ok())
        .is_some_and(|at| at <= now);
    TokenView {
        username: t.name.clone(),
        description: t.description.clone(),
        disabled: t.disabled,
        expires_at: t.expires_at.clone(),
        expired,
        labels: t.labels.clone(),
    }
}

fn acl_view(a: &AclEntry) -> AclView {
    AclView {
        name: a.name.clone(),
        tokens: a.tokens.clone(),
        selector: a.selector.as_ref().map(|s| SelectorView {
            match_labels: s.match_labels.clone(),
        }),
        anonymous: a.anonymous,
        rules: a
            .rules
            .iter()
            .map(|r| RuleView {
                topics: r.topics.clone(),
                actions: r
                    .actions
                    .iter()
                    .map(|a| match a {
                        Action::Publish => ActionView::Publish,
                        Action::Subscribe => ActionView::Subscribe,
                    })
                    .collect(),
                effect: match r.effect {
                    Effect::Allow => EffectView::Allow,
                    Effect::Deny => EffectView::Deny,
                },
            })
            .collect(),
    }
}

fn acl_entry(v: AclView) -> AclEntry {
    AclEntry {
        name: v.name,
        tokens: v.tokens,
        selector: v.selector.map(|s| LabelSelector {
            match_labels: s.match_labels,
        }),
        anonymous: v.anonymous,
        rules: v
            .rules
            .into_iter()
            .map(|r| Rule {
                topics: r.topics,
                actions: r
                    .actions
                    .into_iter()
                    .map(|a| match a {
                        ActionView::Publish => Action::Publish,
                        ActionView::Subscribe => Action::Subscribe,
                    })
                    .collect(),
                effect: match r.effect {
                    EffectView::Allow => Effect::Allow,
                    EffectView::Deny => Effect::Deny,
                },
            })
            .collect(),
    }
}

/// The HTTP status and EMQX code of a refused change.
pub fn status_of(e: &StoreError) -> (StatusCode, u32) {
    match e {
        StoreError::Managed { .. } | StoreError::NoBundle => {
            (StatusCode::CONFLICT, code::READ_ONLY)
        }
        StoreError::InvalidFile { .. } => (StatusCode::CONFLICT, code::UNKNOWN),
        StoreError::Read { .. } | StoreError::Write { .. } | StoreError::Aborted(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, code::UNKNOWN)
        }
        StoreError::Edit(e) => match e {
            EditError::TokenExists(_) | EditError::AclExists(_) => {
                (StatusCode::CONFLICT, code::EXISTS)
            }
            EditError::NoSuchToken(_) | EditError::NoSuchAcl(_) => {
                (StatusCode::NOT_FOUND, code::NOT_FOUND)
            }
            EditError::NothingToChange => (StatusCode::BAD_REQUEST, code::MISSING_PARAMETER),
            EditError::Invalid(BundleError::Rule {
                problem: RuleProblem::Filter { .. } | RuleProblem::SharedFilter { .. },
                ..
            }) => (StatusCode::BAD_REQUEST, code::ILLEGAL_TOPIC),
            EditError::Secret(_) | EditError::Invalid(_) => {
                (StatusCode::BAD_REQUEST, code::PARAMETER_ERROR)
            }
        },
    }
}

fn refused(e: StoreError) -> Response {
    let (status, c) = status_of(&e);
    if status.is_server_error() {
        tracing::error!(error = %e, "admin API could not change the auth bundle");
    }
    emqx::error(status, c, e.to_string())
}

/// The body as `T`: 109 when it is not JSON, 108 when it has the wrong
/// shape (unknown or mistyped fields, a missing required one).
fn body_of<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Refusal> {
    let v = emqx::json_body(body)?;
    if !v.is_object() {
        return Err((
            code::PARAMETER_ERROR,
            "the request body must be a JSON object.".into(),
        ));
    }
    serde_json::from_value(v).map_err(|e| {
        (
            code::PARAMETER_ERROR,
            format!("the request body is not acceptable: {e}."),
        )
    })
}

fn name_of(p: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    p.map(|Path(n)| n).map_err(|e| {
        (
            code::PARAMETER_ERROR,
            format!("the name in the path cannot be read: {e}."),
        )
    })
}

/// Without a bundle there is nothing to list (everything is allowed).
fn tokens_in_force(shared: &crate::server::Shared) -> Vec<TokenEntry> {
    shared
        .auth
        .bundle_in_force()
        .map(|b| b.tokens)
        .unwrap_or_default()
}

fn acls_in_force(shared: &crate::server::Shared) -> Vec<AclEntry> {
    shared
        .auth
        .bundle_in_force()
        .map(|b| b.acls)
        .unwrap_or_default()
}

fn no_token(name: &str) -> Response {
    emqx::error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("no token is named {name:?}."),
    )
}

// ---------------------------------------------------------------- tokens

/// The tokens in force (no secrets, no hashes), paged.
#[utoipa::path(get, path = "/api/v4/auth_username", tag = "emqx-auth",
    params(
        ("_page" = Option<u64>, Query, description = "Page, from 1"),
        ("_limit" = Option<u64>, Query, description = "Items per page (default and most: 10000)"),
    ),
    responses(
        (status = 200, description = "One page of tokens", body = TokensReply),
        (status = 400, description = "A paging parameter is malformed (108)", body = ErrorReply),
    ))]
pub async fn list_tokens(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let p = match emqx::paging(&emqx::query(q.as_deref())) {
        Ok(p) => p,
        Err(e) => return emqx::refuse(e),
    };
    let now = SystemTime::now();
    let items: Vec<TokenView> = tokens_in_force(&shared)
        .iter()
        .map(|t| token_view(t, now))
        .collect();
    let (data, meta) = emqx::page_of(items, &p);
    emqx::ok(TokensReply {
        code: code::OK,
        data,
        meta,
    })
}

/// One token in force (no secret, no hash).
#[utoipa::path(get, path = "/api/v4/auth_username/{username}", tag = "emqx-auth",
    params(("username" = String, Path, description = "The token's name")),
    responses(
        (status = 200, description = "The token", body = TokenReply),
        (status = 400, description = "The path cannot be read (108)", body = ErrorReply),
        (status = 404, description = "No such token (105)", body = ErrorReply),
    ))]
pub async fn get_token(
    State(shared): State<SharedRef>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(n) => n,
        Err(e) => return emqx::refuse(e),
    };
    match tokens_in_force(&shared).iter().find(|t| t.name == name) {
        Some(t) => emqx::ok(TokenReply {
            code: code::OK,
            data: token_view(t, SystemTime::now()),
        }),
        None => no_token(&name),
    }
}

/// Adds a token to the bundle file and puts it in force. The secret is
/// generated unless `password` is given, and shown in this answer only.
#[utoipa::path(post, path = "/api/v4/auth_username", tag = "emqx-auth",
    request_body = NewTokenRequest,
    responses(
        (status = 200, description = "The token and its secret, shown once", body = CreatedTokenReply),
        (status = 400, description = "108 bad field, unknown field, short password, invalid expiry or name; 109 not JSON", body = ErrorReply),
        (status = 409, description = "The bundle is managed by the operator or there is no bundle file (111), the name exists (113), or the bundle file is invalid (102)", body = ErrorReply),
        (status = 500, description = "The bundle file cannot be read or written (102)", body = ErrorReply),
    ))]
pub async fn create_token(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let r: NewTokenRequest = match body_of(&body) {
        Ok(r) => r,
        Err(e) => return emqx::refuse(e),
    };
    let generated = r.password.is_none();
    let secret = r
        .password
        .unwrap_or_else(starling_model::token::generate_secret);
    let new = NewToken {
        name: r.username,
        description: r.description.filter(|d| !d.is_empty()),
        expires_at: r.expires_at,
        disabled: r.disabled,
        labels: r.labels,
    };
    let name = new.name.clone();
    let s = secret.clone();
    let bundle = match store::edit(&shared, move |b| bundle_edit::add_token(b, new, &s)).await {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    tracing::info!(token = %name, generated, "admin API added a token");
    let Some(t) = bundle.tokens.iter().find(|t| t.name == name) else {
        return no_token(&name);
    };
    let mut r = emqx::ok(CreatedTokenReply {
        code: code::OK,
        data: CreatedToken {
            username: t.name.clone(),
            password: secret,
            generated,
            description: t.description.clone(),
            disabled: t.disabled,
            expires_at: t.expires_at.clone(),
            labels: t.labels.clone(),
        },
    });
    // The one answer that carries a secret must not linger in a cache.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Disables or enables a token, changes its description or its secret; a
/// disabled token's connections are closed within 2 s.
#[utoipa::path(put, path = "/api/v4/auth_username/{username}", tag = "emqx-auth",
    params(("username" = String, Path, description = "The token's name")),
    request_body = TokenUpdateRequest,
    responses(
        (status = 200, description = "The token as it is now", body = TokenReply),
        (status = 400, description = "107 nothing to change, 108 bad or unknown field or short password, 109 not JSON", body = ErrorReply),
        (status = 404, description = "No such token (105)", body = ErrorReply),
        (status = 409, description = "The bundle is managed by the operator or there is no bundle file (111), the name exists (113), or the bundle file is invalid (102)", body = ErrorReply),
        (status = 500, description = "The bundle file cannot be read or written (102)", body = ErrorReply),
    ))]
pub async fn update_token(
    State(shared): State<SharedRef>,
    name: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let name = match name_of(name) {
        Ok(n) => n,
        Err(e) => return emqx::refuse(e),
    };
    let r: TokenUpdateRequest = match body_of(&body) {
        Ok(r) => r,
        Err(e) => return emqx::refuse(e),
    };
    let update = TokenUpdate {
        disabled: r.disabled,
        description: r.description,
        secret: r.password,
    };
    let n = name.clone();
    let bundle = match store::edit(&shared, move |b| bundle_edit::update_token(b, &n, update)).await
    {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    tracing::info!(token = %name, "admin API changed a token");
    match bundle.tokens.iter().find(|t| t.name == name) {
        Some(t) => emqx::ok(TokenReply {
            code: code::OK,
            data: token_view(t, SystemTime::now()),
        }),
        None => no_token(&name),
    }
}

/// Removes a token; its connections are closed within 2 s.
#[utoipa::path(delete, path = "/api/v4/auth_username/{username}", tag = "emqx-auth",
    params(("username" = String, Path, description = "The token's name")),
    responses(
        (status = 200, description = "Removed", body = OkReply),
        (status = 400, description = "The path cannot be read (108)", body = ErrorReply),
        (status = 404, description = "No such token (105)", body = ErrorReply),
        (status = 409, description = "The bundle is managed by the operator or there is no bundle file (111), the name exists (113), or the bundle file is invalid (102)", body = ErrorReply),
        (status = 500, description = "The bundle file cannot be read or written (102)", body = ErrorReply),
    ))]
pub async fn delete_token(
    State(shared): State<SharedRef>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(n) => n,
        Err(e) => return emqx::refuse(e),
    };
    let n = name.clone();
    match store::edit(&shared, move |b| bundle_edit::remove_token(b, &n)).await {
        Ok(_) => {
            tracing::info!(token = %name, "admin API removed a token");
            emqx::ok(OkReply { code: code::OK })
        }
        Err(e) => refused(e),
    }
}

// ---------------------------------------------------------------- ACLs

/// The ACL entries in force, paged.
#[utoipa::path(get, path = "/api/v4/acl", tag = "emqx-auth",
    params(
        ("_page" = Option<u64>, Query, description = "Page, from 1"),
        ("_limit" = Option<u64>, Query, description = "Items per page (default and most: 10000)"),
    ),
    responses(
        (status = 200, description = "One page of ACL entries", body = AclsReply),
        (status = 400, description = "A paging parameter is malformed (108)", body = ErrorReply),
    ))]
pub async fn list_acls(State(shared): State<SharedRef>, RawQuery(q): RawQuery) -> Response {
    let p = match emqx::paging(&emqx::query(q.as_deref())) {
        Ok(p) => p,
        Err(e) => return emqx::refuse(e),
    };
    let items: Vec<AclView> = acls_in_force(&shared).iter().map(acl_view).collect();
    let (data, meta) = emqx::page_of(items, &p);
    emqx::ok(AclsReply {
        code: code::OK,
        data,
        meta,
    })
}

/// One ACL entry in force.
#[utoipa::path(get, path = "/api/v4/acl/{name}", tag = "emqx-auth",
    params(("name" = String, Path, description = "The ACL entry's name")),
    responses(
        (status = 200, description = "The ACL entry", body = AclReply),
        (status = 400, description = "The path cannot be read (108)", body = ErrorReply),
        (status = 404, description = "No such ACL entry (105)", body = ErrorReply),
    ))]
pub async fn get_acl(
    State(shared): State<SharedRef>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(n) => n,
        Err(e) => return emqx::refuse(e),
    };
    match acls_in_force(&shared).iter().find(|a| a.name == name) {
        Some(a) => emqx::ok(AclReply {
            code: code::OK,
            data: acl_view(a),
        }),
        None => emqx::error(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("no ACL is named {name:?}."),
        ),
    }
}

/// Adds an ACL entry (its rules apply after those of the entries before
/// it) and puts it in force; connections are re-checked at once.
#[utoipa::path(post, path = "/api/v4/acl", tag = "emqx-auth",
    request_body = AclView,
    responses(
        (status = 200, description = "The ACL entry as stored", body = AclReply),
        (status = 400, description = "108 bad or unknown field or empty name or rule, 109 not JSON, 115 invalid topic filter", body = ErrorReply),
        (status = 409, description = "The bundle is managed by the operator or there is no bundle file (111), the name exists (113), or the bundle file is invalid (102)", body = ErrorReply),
        (status = 500, description = "The bundle file cannot be read or written (102)", body = ErrorReply),
    ))]
pub async fn create_acl(State(shared): State<SharedRef>, body: Bytes) -> Response {
    let v: AclView = match body_of(&body) {
        Ok(v) => v,
        Err(e) => return emqx::refuse(e),
    };
    let entry = acl_entry(v);
    let name = entry.name.clone();
    let bundle = match store::edit(&shared, move |b| bundle_edit::add_acl(b, entry)).await {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    tracing::info!(acl = %name, "admin API added an ACL");
    match bundle.acls.iter().find(|a| a.name == name) {
        Some(a) => emqx::ok(AclReply {
            code: code::OK,
            data: acl_view(a),
        }),
        None => emqx::error(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("no ACL is named {name:?}."),
        ),
    }
}

/// Removes an ACL entry; connections are re-checked at once.
#[utoipa::path(delete, path = "/api/v4/acl/{name}", tag = "emqx-auth",
    params(("name" = String, Path, description = "The ACL entry's name")),
    responses(
        (status = 200, description = "Removed", body = OkReply),
        (status = 400, description = "The path cannot be read (108)", body = ErrorReply),
        (status = 404, description = "No such ACL entry (105)", body = ErrorReply),
        (status = 409, description = "The bundle is managed by the operator or there is no bundle file (111), the name exists (113), or the bundle file is invalid (102)", body = ErrorReply),
        (status = 500, description = "The bundle file cannot be read or written (102)", body = ErrorReply),
    ))]
pub async fn delete_acl(
    State(shared): State<SharedRef>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match name_of(name) {
        Ok(n) => n,
        Err(e) => return emqx::refuse(e),
    };
    let n = name.clone();
    match store::edit(&shared, move |b| bundle_edit::remove_acl(b, &n)).await {
        Ok(_) => {
            tracing::info!(acl = %name, "admin API removed an ACL");
            emqx::ok(OkReply { code: code::OK })
        }
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use starling_model::bundle::TokenProblem;

    #[test]
    fn refusal_statuses() {
        let s = |e: StoreError| status_of(&e);
        assert_eq!(
            s(StoreError::Managed { secret: "x".into() }),
            (StatusCode::CONFLICT, code::READ_ONLY)
        );
        assert_eq!(
            s(StoreError::NoBundle),
            (StatusCode::CONFLICT, code::READ_ONLY)
        );
        assert_eq!(
            s(EditError::TokenExists("a".into()).into()),
            (StatusCode::CONFLICT, code::EXISTS)
        );
        assert_eq!(
            s(EditError::NoSuchAcl("a".into()).into()),
            (StatusCode::NOT_FOUND, code::NOT_FOUND)
        );
        let filter = BundleError::Rule {
            acl: 0,
            name: "a".into(),
            rule: 0,
            problem: RuleProblem::NoTopics,
        };
        assert_eq!(
            s(EditError::Invalid(filter).into()),
            (StatusCode::BAD_REQUEST, code::PARAMETER_ERROR)
        );
        let filter = BundleError::Rule {
            acl: 0,
            name: "a".into(),
            rule: 0,
            problem: RuleProblem::SharedFilter {
                index: 0,
                topic: "$share/g/a".into(),
            },
        };
        assert_eq!(
            s(EditError::Invalid(filter).into()),
            (StatusCode::BAD_REQUEST, code::ILLEGAL_TOPIC)
        );
        let token = BundleError::Token {
            index: 0,
            name: String::new(),
            problem: TokenProblem::EmptyName,
        };
        assert_eq!(
            s(EditError::Invalid(token).into()),
            (StatusCode::BAD_REQUEST, code::PARAMETER_ERROR)
        );
    }

    #[test]
    fn views_never_carry_the_hash() {
        let key = starling_model::token::HashKey::generate();
        let mut t = TokenEntry::new("t", &key, "secret-value-0123456789");
        t.expires_at = Some("2000-01-01T00:00:00Z".into());
        let v = serde_json::to_string(&token_view(&t, SystemTime::now())).unwrap();
        assert!(!v.contains(&t.secret_hash), "{v}");
        assert!(!v.contains("secret"), "{v}");
        assert!(v.contains("\"expired\":true"), "{v}");
    }

    #[test]
    fn acl_views_round_trip() {
        let a = AclEntry {
            name: "a".into(),
            tokens: vec!["t".into()],
            selector: Some(LabelSelector {
                match_labels: [("k".to_string(), "v".to_string())].into(),
            }),
            anonymous: true,
            rules: vec![Rule {
                topics: vec!["x/#".into()],
                actions: vec![Action::Publish, Action::Subscribe],
                effect: Effect::Deny,
            }],
        };
        assert_eq!(acl_entry(acl_view(&a)), a);
        let body: Value = serde_json::to_value(acl_view(&a)).unwrap();
        assert_eq!(body["rules"][0]["actions"][1], "subscribe");
        assert!(
            serde_json::from_value::<AclView>(serde_json::json!({"name": "a", "rulez": []}))
                .is_err()
        );
    }
}

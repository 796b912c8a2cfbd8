//! The OpenAPI 3 document of the admin API, generated from the handlers'
//! `#[utoipa::path]` annotations and response types, served (behind the
//! admin credentials like the rest) at `/api/v4/openapi.json` and
//! `/api/v1/openapi.json`. A unit test checks it against the route table
//! in [`super::table`], both ways.

use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{auth_manage, emqx, hivemq};

/// What a request without (103/104: wrong or missing) admin credentials
/// gets, with HTTP 401.
#[derive(Debug, Serialize, ToSchema)]
pub struct Unauthorized {
    pub code: u32,
}

/// NanoMQ's request: `{"req": N, "seq": S}` (and `data` for req 12).
#[derive(Debug, Serialize, ToSchema)]
pub struct NanoRequest {
    /// 2 broker info, 4 subscriptions, 5 clients, 11 get config, 12 set config.
    pub req: u64,
    pub seq: i64,
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
}

/// NanoMQ's reply: `{"code", "seq", "rep", "data"}`; refusals carry
/// `message` instead of `rep`/`data`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NanoReply {
    pub code: u32,
    pub seq: Option<i64>,
    pub rep: Option<u64>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    pub message: Option<String>,
}

/// NanoMQ's API (`crate::admin::nanomq`).
#[utoipa::path(post, path = "/api/v1", tag = "nanomq",
    request_body = NanoRequest,
    responses(
        (status = 200, description = "The answer to req", body = NanoReply),
        (status = 400, description = "107 missing req/seq, 108 unknown req or field, 109 not JSON", body = NanoReply),
    ))]
#[allow(dead_code)]
fn nanomq_post() {}

/// NanoMQ's API, the same over GET with a JSON body.
#[utoipa::path(get, path = "/api/v1", tag = "nanomq",
    request_body = NanoRequest,
    responses(
        (status = 200, description = "The answer to req", body = NanoReply),
        (status = 400, description = "107 missing req/seq, 108 unknown req or field, 109 not JSON", body = NanoReply),
    ))]
#[allow(dead_code)]
fn nanomq_get() {}

/// This document.
#[utoipa::path(get, path = "/api/v4/openapi.json", tag = "openapi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn document_v4() -> Response {
    serve()
}

/// This document (the same as `/api/v4/openapi.json`).
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "openapi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn document_v1() -> Response {
    serve()
}

fn serve() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    let body = JSON.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.clone(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Starling admin API",
        description = "NanoMQ (POST /api/v1), EMQX v4 (/api/v4) and HiveMQ (/api/v1/mqtt/clients) styles on the admin listener, behind HTTP Basic."
    ),
    paths(
        nanomq_post,
        nanomq_get,
        document_v4,
        document_v1,
        emqx::brokers,
        emqx::stats,
        emqx::metrics_view,
        emqx::clients,
        emqx::client,
        emqx::kick,
        emqx::subscriptions,
        emqx::client_subscriptions,
        emqx::routes,
        emqx::configs,
        emqx::set_configs,
        auth_manage::list_tokens,
        auth_manage::create_token,
        auth_manage::get_token,
        auth_manage::update_token,
        auth_manage::delete_token,
        auth_manage::list_acls,
        auth_manage::create_acl,
        auth_manage::get_acl,
        auth_manage::delete_acl,
        emqx::publish,
        emqx::publish_batch,
        emqx::subscribe,
        emqx::subscribe_batch,
        emqx::unsubscribe,
        emqx::unsubscribe_batch,
        hivemq::list,
        hivemq::client,
        hivemq::connection,
        hivemq::subscriptions,
        hivemq::disconnect,
    ),
    components(schemas(Unauthorized)),
    modifiers(&Security),
    security(("basic" = []))
)]
pub struct ApiDoc;

/// HTTP Basic for every operation, and its 401 answer.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
        let unauthorized = ResponseBuilder::new()
            .description("Missing (104) or wrong (103) admin credentials")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Unauthorized")))
                    .build(),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .insert("401".into(), unauthorized.clone().into());
            }
        }
    }
}

/// `(METHOD, path)` of every operation in the document.
pub fn operations() -> Vec<(String, String)> {
    let doc = ApiDoc::openapi();
    let mut out = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (m, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
        ] {
            if op.is_some() {
                out.push((m.to_owned(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let mut routed: Vec<(String, String)> = super::super::table()
            .into_iter()
            .map(|(m, p, _)| (m.as_str().to_owned(), p.to_owned()))
            .collect();
        routed.sort();
        let documented = operations();
        let missing: Vec<_> = routed.iter().filter(|r| !documented.contains(r)).collect();
        let extra: Vec<_> = documented.iter().filter(|d| !routed.contains(d)).collect();
        assert!(
            missing.is_empty(),
            "routes not in the document: {missing:?}"
        );
        assert!(extra.is_empty(), "documented routes not served: {extra:?}");
    }

    #[test]
    fn the_document_is_openapi_3_with_basic_auth() {
        let v: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(
            v["components"]["securitySchemes"]["basic"]["scheme"],
            "basic"
        );
        assert!(v["components"]["schemas"]["ClientsReply"].is_object());
    }
}

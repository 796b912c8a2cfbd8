//! Every refusal of the HTTP interface, as one type: each variant knows its
//! status code, and the body is always JSON naming the rule that refused
//! the request, so scripts can tell a bad topic from a bad token.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A refused request. Messages are one sentence and never echo a secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path, a query parameter or the topic broke a rule.
    #[error("{message}")]
    BadRequest { rule: &'static str, message: String },
    /// No valid credentials (missing, unknown, expired or disabled token).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the ACL refuses the action on this topic.
    #[error("{0}")]
    Forbidden(String),
    #[error("too many failed authentications from this address; try again in a minute")]
    RateLimited,
    #[error("the request body is larger than the limit of {max} bytes")]
    TooLarge { max: usize },
    #[error("the request body did not arrive within {secs} seconds")]
    BodyTimeout { secs: u64 },
    #[error("the request body could not be read: the connection failed")]
    BodyFailed,
    /// The broker cannot take the message (retained store full).
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "no such path; the HTTP interface is under /broker/ and topic streams need a WebSocket upgrade"
    )]
    NotFound,
    #[error("this method is not allowed here; /broker/ takes GET and POST")]
    MethodNotAllowed,
}

#[derive(Serialize)]
struct Body<'a> {
    error: String,
    rule: &'a str,
    status: u16,
}

impl ApiError {
    pub fn bad(rule: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            rule,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyFailed => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The machine-readable name of what refused the request.
    pub fn rule(&self) -> &'static str {
        match self {
            ApiError::BadRequest { rule, .. } => rule,
            ApiError::Unauthorized(_) => "authentication",
            ApiError::Forbidden(_) => "acl",
            ApiError::RateLimited => "auth_rate_limit",
            ApiError::TooLarge { .. } => "max_body_bytes",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::BodyFailed => "body",
            ApiError::Unavailable(_) => "capacity",
            ApiError::NotFound => "path",
            ApiError::MethodNotAllowed => "method",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Body {
            error: self.to_string(),
            rule: self.rule(),
            status: status.as_u16(),
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // Browsers and curl --anyauth pick a scheme from this.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"starling\", Bearer realm=\"starling\""),
            );
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        resp
    }
}

//! Who an HTTP request or stream handshake is. The forms shiftr.io and
//! EVRYTHNG clients send — HTTP Basic (username = broker or token name,
//! password = secret), `Bearer <secret>`, a bare secret in `Authorization`,
//! `?access_token=<secret>` for browsers, which cannot set headers on a
//! WebSocket — all end in the same check MQTT's CONNECT uses, with its
//! failure counting, logging and rate limit.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use base64::Engine;
use starling_model::acl::Principal;

use super::error::ApiError;
use crate::auth::Refusal;
use crate::logging::shown;
use crate::server::Shared;

/// Credentials as presented, before they are checked.
#[derive(PartialEq, Eq)]
pub enum Credentials {
    /// Nothing presented: anonymous, if the broker admits it.
    None,
    Secret {
        username: Option<String>,
        secret: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Secret { username, .. } => f
                .debug_struct("Secret")
                .field("username", username)
                .finish_non_exhaustive(),
        }
    }
}

/// Reads the credentials of a request. The `Authorization` header wins over
/// `?access_token`. A Basic header with an empty password is anonymous (what
/// `curl -u name:` sends).
pub fn from_request(
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<Credentials, ApiError> {
    let bad = || ApiError::Unauthorized("the Authorization header is malformed.".into());
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| bad())?.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| bad())?;
            let text = String::from_utf8(raw).map_err(|_| bad())?;
            let (user, pass) = text.split_once(':').ok_or_else(bad)?;
            if pass.is_empty() {
                return Ok(Credentials::None);
            }
            return Ok(Credentials::Secret {
                username: (!user.is_empty()).then(|| user.to_owned()),
                secret: pass.to_owned(),
            });
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            if rest.is_empty() {
                return Err(bad());
            }
            return Ok(Credentials::Secret {
                username: None,
                secret: rest.to_owned(),
            });
        }
        // EVRYTHNG's clients send the bare key as the header value.
        if rest.is_empty() && !v.is_empty() {
            return Ok(Credentials::Secret {
                username: None,
                secret: v.to_owned(),
            });
        }
        return Err(bad());
    }
    Ok(match access_token {
        Some(t) if !t.is_empty() => Credentials::Secret {
            username: None,
            secret: t.to_owned(),
        },
        _ => Credentials::None,
    })
}

/// Checks credentials like a CONNECT: counted, rate-limited per source and
/// username, refusals logged (rate-limited, secret never shown).
pub fn authenticate(
    shared: &Shared,
    creds: &Credentials,
    peer: SocketAddr,
) -> Result<Arc<Principal>, ApiError> {
    let (username, secret) = match creds {
        Credentials::None => (None, None),
        Credentials::Secret { username, secret } => (username.as_deref(), Some(secret.as_bytes())),
    };
    shared
        .auth
        .authenticate(username, secret, peer.ip(), &shared.metrics)
        .map_err(|e| {
            if let Some(suppressed) = shared.refusal_log.take(std::time::Instant::now()) {
                tracing::info!(%peer, username = %shown(username), reason = %e, suppressed, via = "http", "authentication failed");
            }
            match e {
                Refusal::RateLimited => ApiError::RateLimited,
                Refusal::AnonymousNotAllowed => ApiError::Unauthorized(
                    "credentials are required: HTTP Basic (broker or token name, token secret), a Bearer token or ?access_token=.".into(),
                ),
                Refusal::BadToken(_) => ApiError::Unauthorized(
                    "the token is unknown, expired or disabled, or the username does not fit it.".into(),
                ),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn secret(u: Option<&str>, s: &str) -> Credentials {
        Credentials::Secret {
            username: u.map(str::to_owned),
            secret: s.to_owned(),
        }
    }

    #[test]
    fn every_form() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let h = HeaderMap::new();
        assert_eq!(from_request(&h, None).unwrap(), Credentials::None);
        assert_eq!(from_request(&h, Some("")).unwrap(), Credentials::None);
        assert_eq!(from_request(&h, Some("s3")).unwrap(), secret(None, "s3"));
        let basic = with(&format!("Basic {}", b64("home:s3:cr3t")));
        assert_eq!(
            from_request(&basic, None).unwrap(),
            secret(Some("home"), "s3:cr3t")
        );
        let anon = with(&format!("Basic {}", b64("home:")));
        assert_eq!(from_request(&anon, None).unwrap(), Credentials::None);
        assert_eq!(
            from_request(&with("Bearer abc"), Some("x")).unwrap(),
            secret(None, "abc"),
            "the header wins"
        );
        assert_eq!(
            from_request(&with("bearer  abc "), None).unwrap(),
            secret(None, "abc")
        );
        assert_eq!(
            from_request(&with("rawkey"), None).unwrap(),
            secret(None, "rawkey")
        );
        for bad in ["Basic !!!", "Bearer", "Basic bm9jb2xvbg==", "Digest a=b"] {
            assert!(
                matches!(
                    from_request(&with(bad), None),
                    Err(ApiError::Unauthorized(_))
                ),
                "{bad}"
            );
        }
        // Debug never shows the secret.
        assert!(!format!("{:?}", secret(Some("u"), "hunter2")).contains("hunter2"));
    }
}

//! Who may use the admin API: HTTP Basic against the configured username
//! and password, or the mounted admin Secret (`[api] credentials_dir`, read
//! on each request so a rotated Secret applies without a restart). The
//! check is constant-time, and failures share the client-facing failure
//! limiter's per-address budget so the admin password cannot be guessed at
//! line rate either.

use std::path::Path;

use axum::http::{HeaderMap, header};
use base64::Engine;
use starling_model::config::ApiConfig;
use subtle::ConstantTimeEq;

/// The credentials in force: from the directory when configured.
pub fn expected(cfg: &ApiConfig) -> Result<(String, String), String> {
    match &cfg.credentials_dir {
        Some(dir) => {
            let read = |name: &str| {
                let p = Path::new(dir).join(name);
                std::fs::read_to_string(&p)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            Ok((read("username")?, read("password")?))
        }
        None => Ok((cfg.username.clone(), cfg.password.clone())),
    }
}

/// Why a request was not let in (NanoMQ's codes 103 and 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No Basic credentials, or an empty username or password.
    Missing,
    Wrong,
}

/// Checks the request's Basic credentials against `want`.
pub fn check(headers: &HeaderMap, want: &(String, String)) -> Result<String, Denied> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(Denied::Missing)?;
    let (scheme, rest) = value.split_once(' ').ok_or(Denied::Missing)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Denied::Missing);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| Denied::Missing)?;
    let text = String::from_utf8(raw).map_err(|_| Denied::Missing)?;
    let (user, pass) = text.split_once(':').ok_or(Denied::Missing)?;
    if user.is_empty() || pass.is_empty() {
        return Err(Denied::Missing);
    }
    let ok = user.as_bytes().ct_eq(want.0.as_bytes()) & pass.as_bytes().ct_eq(want.1.as_bytes());
    if bool::from(ok) {
        Ok(user.to_owned())
    } else {
        Err(Denied::Wrong)
    }
}

/// The claims a JWT must carry: an expiry (checked), and optionally who.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

/// Checks `Authorization: Bearer <jwt>` against the HS256 key `secret`:
/// signature, algorithm (HS256 only) and `exp` (required, as NanoMQ's
/// tokens carry one). Returns the subject, or "jwt".
pub fn check_jwt(headers: &HeaderMap, secret: &str) -> Result<String, Denied> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(Denied::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(Denied::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Denied::Missing);
    }
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.leeway = 5;
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::decode::<Claims>(token.trim(), &key, &v)
        .map(|d| d.claims.sub.unwrap_or_else(|| "jwt".into()))
        .map_err(|_| Denied::Wrong)
}

/// Is this request presenting a bearer token (rather than Basic)?
pub fn is_bearer(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case("bearer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn basic(s: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        h
    }

    #[test]
    fn basic_credentials() {
        let want = ("admin".to_string(), "public".to_string());
        assert_eq!(check(&basic("admin:public"), &want), Ok("admin".into()));
        assert_eq!(check(&basic("admin:nope"), &want), Err(Denied::Wrong));
        assert_eq!(check(&basic("root:public"), &want), Err(Denied::Wrong));
        assert_eq!(check(&basic("admin:"), &want), Err(Denied::Missing));
        assert_eq!(check(&HeaderMap::new(), &want), Err(Denied::Missing));
    }

    fn jwt(header_alg: &str, claims: &str, key: &[u8]) -> String {
        let claims: serde_json::Value = serde_json::from_str(claims).unwrap();
        if header_alg == "none" {
            use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
            let head = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
            return format!("{head}.{}.", B64.encode(claims.to_string()));
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .unwrap()
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn jwt_bearer_tokens() {
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let good = jwt(
            "HS256",
            &format!(r#"{{"sub":"ops","exp":{later}}}"#),
            b"k3y",
        );
        assert_eq!(check_jwt(&bearer(&good), "k3y"), Ok("ops".into()));
        assert_eq!(
            check_jwt(&bearer(&good), "other"),
            Err(Denied::Wrong),
            "wrong key"
        );
        let expired = jwt("HS256", r#"{"sub":"ops","exp":1000}"#, b"k3y");
        assert_eq!(check_jwt(&bearer(&expired), "k3y"), Err(Denied::Wrong));
        let no_exp = jwt("HS256", r#"{"sub":"ops"}"#, b"k3y");
        assert_eq!(check_jwt(&bearer(&no_exp), "k3y"), Err(Denied::Wrong));
        let none_alg = jwt("none", &format!(r#"{{"exp":{later}}}"#), b"k3y");
        assert_eq!(check_jwt(&bearer(&none_alg), "k3y"), Err(Denied::Wrong));
        assert_eq!(check_jwt(&HeaderMap::new(), "k3y"), Err(Denied::Missing));
        assert!(is_bearer(&bearer(&good)) && !is_bearer(&HeaderMap::new()));
    }

    #[test]
    fn credentials_from_a_mounted_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("username"), "ops\n").unwrap();
        std::fs::write(dir.path().join("password"), "s3cret").unwrap();
        let cfg = ApiConfig {
            credentials_dir: Some(dir.path().to_path_buf()),
            ..ApiConfig::default()
        };
        assert_eq!(expected(&cfg).unwrap(), ("ops".into(), "s3cret".into()));
        assert!(!cfg.is_default());
        std::fs::remove_file(dir.path().join("password")).unwrap();
        assert!(expected(&cfg).is_err());
    }
}

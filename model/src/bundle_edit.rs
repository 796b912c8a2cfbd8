//! Changes to an auth bundle as pure functions: a bundle and one request in,
//! a new, validated bundle or a typed refusal out. The admin API's token and
//! ACL management calls these, then writes and applies the result; keeping
//! the decisions here lets them be tested without files or sockets, and the
//! validation is the loader's own (`AuthBundle::validate`), so nothing the
//! API writes could be refused on the next start.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::bundle::{AclEntry, AuthBundle, BundleError, TokenEntry};
use crate::token::{self, HashKey, SecretError};

/// Why an edit was refused. The bundle it was applied to is unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EditError {
    #[error("a token named {0:?} exists already")]
    TokenExists(String),
    #[error("no token is named {0:?}")]
    NoSuchToken(String),
    #[error("an ACL named {0:?} exists already")]
    AclExists(String),
    #[error("no ACL is named {0:?}")]
    NoSuchAcl(String),
    #[error("the password is not acceptable: {0}")]
    Secret(SecretError),
    #[error("the change asks for nothing; give at least one field to change")]
    NothingToChange,
    /// The edited bundle fails the loader's validation (an invalid topic
    /// filter, expiry or name).
    #[error("{0}")]
    Invalid(BundleError),
}

/// A token to add. The secret is passed separately so that generating it
/// (randomness) stays with the caller and these functions stay pure.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewToken {
    pub name: String,
    pub description: Option<String>,
    pub expires_at: Option<String>,
    pub disabled: bool,
    pub labels: BTreeMap<String, String>,
}

/// What to change on an existing token; `None` leaves a field as it is.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TokenUpdate {
    pub disabled: Option<bool>,
    pub description: Option<String>,
    /// A new secret: connections made with the old one are closed, because
    /// the reload sees the hash change.
    pub secret: Option<String>,
}

/// Redacted: requests end up in logs and error chains.
impl std::fmt::Debug for TokenUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenUpdate")
            .field("disabled", &self.disabled)
            .field("description", &self.description)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn validated(b: AuthBundle) -> Result<AuthBundle, EditError> {
    b.validate().map_err(EditError::Invalid)?;
    Ok(b)
}

fn key_of(b: &AuthBundle) -> Result<HashKey, EditError> {
    HashKey::from_base64(&b.hash_key).map_err(|e| EditError::Invalid(BundleError::HashKey(e)))
}

/// Adds a token with `secret`. Generated secrets pass `check_secret`
/// trivially; a caller-provided one must too.
pub fn add_token(b: &AuthBundle, t: NewToken, secret: &str) -> Result<AuthBundle, EditError> {
    if b.tokens.iter().any(|e| e.name == t.name) {
        return Err(EditError::TokenExists(t.name));
    }
    token::check_secret(secret).map_err(EditError::Secret)?;
    let key = key_of(b)?;
    let mut entry = TokenEntry::new(t.name, &key, secret);
    entry.description = t.description;
    entry.expires_at = t.expires_at;
    entry.disabled = t.disabled;
    entry.labels = t.labels;
    let mut out = b.clone();
    out.tokens.push(entry);
    validated(out)
}

/// Removes a token. ACLs naming it keep the name (the loader ignores names
/// it does not know), as a deleted Token resource leaves its ACLs alone;
/// a token later made with the same name gets those ACLs again.
pub fn remove_token(b: &AuthBundle, name: &str) -> Result<AuthBundle, EditError> {
    let mut out = b.clone();
    let before = out.tokens.len();
    out.tokens.retain(|t| t.name != name);
    if out.tokens.len() == before {
        return Err(EditError::NoSuchToken(name.to_owned()));
    }
    validated(out)
}

pub fn update_token(b: &AuthBundle, name: &str, u: TokenUpdate) -> Result<AuthBundle, EditError> {
    if u == TokenUpdate::default() {
        return Err(EditError::NothingToChange);
    }
    if let Some(s) = &u.secret {
        token::check_secret(s).map_err(EditError::Secret)?;
    }
    let key = key_of(b)?;
    let mut out = b.clone();
    let entry = out
        .tokens
        .iter_mut()
        .find(|t| t.name == name)
        .ok_or_else(|| EditError::NoSuchToken(name.to_owned()))?;
    if let Some(d) = u.disabled {
        entry.disabled = d;
    }
    if let Some(d) = u.description {
        entry.description = Some(d).filter(|d| !d.is_empty());
    }
    if let Some(s) = &u.secret {
        entry.secret_hash = key.hash_secret(s);
    }
    validated(out)
}

pub fn add_acl(b: &AuthBundle, acl: AclEntry) -> Result<AuthBundle, EditError> {
    if b.acls.iter().any(|a| a.name == acl.name) {
        return Err(EditError::AclExists(acl.name));
    }
    let mut out = b.clone();
    out.acls.push(acl);
    validated(out)
}

pub fn remove_acl(b: &AuthBundle, name: &str) -> Result<AuthBundle, EditError> {
    let mut out = b.clone();
    let before = out.acls.len();
    out.acls.retain(|a| a.name != name);
    if out.acls.len() == before {
        return Err(EditError::NoSuchAcl(name.to_owned()));
    }
    validated(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Action, Effect, Rule, RuleProblem};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const SECRET: &str = "a-secret-long-enough-1";

    fn base() -> AuthBundle {
        let key = HashKey::from_base64(KEY).unwrap();
        AuthBundle {
            version: 1,
            broker: "home".into(),
            hash_key: KEY.into(),
            default_policy: None,
            tokens: vec![TokenEntry::new("old", &key, "the-old-secret-0001")],
            acls: vec![acl("readers", "a/#")],
        }
    }

    fn acl(name: &str, filter: &str) -> AclEntry {
        AclEntry {
            name: name.into(),
            tokens: vec!["old".into()],
            selector: None,
            anonymous: false,
            rules: vec![Rule {
                topics: vec![filter.into()],
                actions: vec![Action::Subscribe],
                effect: Effect::Allow,
            }],
        }
    }

    fn new(name: &str) -> NewToken {
        NewToken {
            name: name.into(),
            description: Some("for tests".into()),
            ..NewToken::default()
        }
    }

    #[test]
    fn add_token_hashes_the_secret_and_keeps_the_rest() {
        let b = base();
        let out = add_token(&b, new("fresh"), SECRET).unwrap();
        assert_eq!(out.tokens.len(), 2);
        assert_eq!(out.tokens[0], b.tokens[0]);
        let t = &out.tokens[1];
        assert_eq!(t.description.as_deref(), Some("for tests"));
        assert!(
            HashKey::from_base64(KEY)
                .unwrap()
                .verify(SECRET.as_bytes(), &t.secret_hash)
        );
        assert!(!t.secret_hash.contains(SECRET));
        assert_eq!(out.acls, b.acls);
    }

    #[test]
    fn add_token_refusals() {
        let b = base();
        assert_eq!(
            add_token(&b, new("old"), SECRET),
            Err(EditError::TokenExists("old".into()))
        );
        assert_eq!(
            add_token(&b, new("x"), "short"),
            Err(EditError::Secret(SecretError::TooShort(5)))
        );
        assert!(matches!(
            add_token(&b, new(""), SECRET),
            Err(EditError::Invalid(BundleError::Token { .. }))
        ));
        assert!(matches!(
            add_token(&b, new("x"), "the-old-secret-0001"),
            Err(EditError::Invalid(BundleError::Token { .. }))
        ));
        let mut late = new("x");
        late.expires_at = Some("tomorrow".into());
        let e = add_token(&b, late, SECRET).unwrap_err();
        assert!(e.to_string().contains("expires_at \"tomorrow\""), "{e}");
    }

    #[test]
    fn remove_and_update_tokens() {
        let b = base();
        let out = remove_token(&b, "old").unwrap();
        assert!(out.tokens.is_empty());
        assert_eq!(out.acls[0].tokens, vec!["old".to_string()]);
        assert_eq!(
            remove_token(&b, "nobody"),
            Err(EditError::NoSuchToken("nobody".into()))
        );

        let off = update_token(
            &b,
            "old",
            TokenUpdate {
                disabled: Some(true),
                ..TokenUpdate::default()
            },
        )
        .unwrap();
        assert!(off.tokens[0].disabled);
        assert_eq!(off.tokens[0].secret_hash, b.tokens[0].secret_hash);
        let on = update_token(
            &off,
            "old",
            TokenUpdate {
                disabled: Some(false),
                description: Some("back".into()),
                ..TokenUpdate::default()
            },
        )
        .unwrap();
        assert!(!on.tokens[0].disabled);
        assert_eq!(on.tokens[0].description.as_deref(), Some("back"));

        let rotated = update_token(
            &b,
            "old",
            TokenUpdate {
                secret: Some(SECRET.into()),
                ..TokenUpdate::default()
            },
        )
        .unwrap();
        assert_ne!(rotated.tokens[0].secret_hash, b.tokens[0].secret_hash);

        assert_eq!(
            update_token(&b, "old", TokenUpdate::default()),
            Err(EditError::NothingToChange)
        );
        assert_eq!(
            update_token(
                &b,
                "ghost",
                TokenUpdate {
                    disabled: Some(true),
                    ..TokenUpdate::default()
                }
            ),
            Err(EditError::NoSuchToken("ghost".into()))
        );
        assert!(matches!(
            update_token(
                &b,
                "old",
                TokenUpdate {
                    secret: Some("has a space in it!".into()),
                    ..TokenUpdate::default()
                }
            ),
            Err(EditError::Secret(SecretError::BadCharacter))
        ));
    }

    #[test]
    fn acl_edits() {
        let b = base();
        let out = add_acl(&b, acl("writers", "b/+")).unwrap();
        assert_eq!(out.acls.len(), 2);
        assert_eq!(
            add_acl(&b, acl("readers", "c")),
            Err(EditError::AclExists("readers".into()))
        );
        match add_acl(&b, acl("bad", "a/#/b")) {
            Err(EditError::Invalid(BundleError::Rule {
                problem: RuleProblem::Filter { .. },
                ..
            })) => {}
            other => panic!("an invalid filter must be refused: {other:?}"),
        }
        assert!(matches!(
            add_acl(&b, acl("", "a")),
            Err(EditError::Invalid(BundleError::Acl { .. }))
        ));
        let gone = remove_acl(&out, "readers").unwrap();
        assert_eq!(
            gone.acls
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>(),
            vec!["writers"]
        );
        assert_eq!(
            remove_acl(&b, "nope"),
            Err(EditError::NoSuchAcl("nope".into()))
        );
    }

    #[test]
    fn a_refused_edit_leaves_the_input_alone() {
        let b = base();
        let copy = b.clone();
        let _ = add_acl(&b, acl("bad", "a/#/b"));
        let _ = add_token(&b, new("old"), SECRET);
        let _ = remove_token(&b, "ghost");
        assert_eq!(b, copy);
    }
}

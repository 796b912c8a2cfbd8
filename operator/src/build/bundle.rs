//! Tokens and ACLs of one Broker → the shared `AuthBundle` → its Secret.
//!
//! Deterministic: entries are sorted by name and the hash key is an input
//! (kept from the previous bundle), so the same cluster state always yields
//! byte-identical JSON and a second reconcile writes nothing.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Secret;
use starling_model::bundle::{AuthBundle, BUNDLE_VERSION, Effect, TokenEntry, parse_rfc3339};
use starling_model::token;

use super::acl::check;
use super::{BrokerCtx, BuildError, secret_data, secret_keys};
use crate::crd::Acl;
use crate::crd::broker::DefaultPolicy;

/// A Token as the Broker reconciler found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub expires_at: Option<String>,
    pub disabled: bool,
    /// The secret value; `None` while the Token's credentials are not written yet.
    pub secret: Option<String>,
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token {}", self.name)
    }
}

/// The bundle and what was left out of it, and why.
#[derive(Debug, Clone)]
pub struct BundleOutcome {
    pub bundle: AuthBundle,
    /// Tokens still waiting for their secret.
    pub pending: Vec<String>,
    /// Tokens and ACLs (or parts of ACLs) left out, one line each.
    pub problems: Vec<String>,
}

/// Builds the bundle for one broker.
pub fn auth_bundle(
    broker: &str,
    hash_key: &str,
    policy: DefaultPolicy,
    tokens: &[TokenSource],
    acls: &[Acl],
) -> Result<BundleOutcome, BuildError> {
    let mut pending = Vec::new();
    let mut problems = Vec::new();

    let mut tokens: Vec<&TokenSource> = tokens.iter().collect();
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    let mut entries = Vec::with_capacity(tokens.len());
    let mut by_hash: HashMap<String, &str> = HashMap::new();
    for t in tokens {
        let Some(secret) = &t.secret else {
            pending.push(t.name.clone());
            continue;
        };
        if let Err(e) = token::check_secret(secret) {
            problems.push(format!("token {}: secret rejected: {e}", t.name));
            continue;
        }
        if let Some(at) = &t.expires_at
            && let Err(e) = parse_rfc3339(at)
        {
            problems.push(format!("token {}: expiresAt {at:?}: {e}", t.name));
            continue;
        }
        let hash = token::hash_secret(hash_key, secret)
            .map_err(|e| BuildError::InvalidSpec(format!("bundle hash key: {e}")))?;
        if let Some(first) = by_hash.get(&hash) {
            problems.push(format!(
                "token {}: has the same secret as token {first}; left out",
                t.name
            ));
            continue;
        }
        by_hash.insert(hash.clone(), &t.name);
        entries.push(TokenEntry {
            name: t.name.clone(),
            secret_hash: hash,
            description: None,
            expires_at: t.expires_at.clone(),
            disabled: t.disabled,
            labels: t.labels.clone(),
        });
    }

    let mut acls: Vec<&Acl> = acls.iter().collect();
    acls.sort_by_key(|a| a.metadata.name.clone());
    let mut acl_entries = Vec::with_capacity(acls.len());
    for a in acls {
        let c = check(a);
        let name = a.metadata.name.clone().unwrap_or_default();
        for p in &c.problems {
            problems.push(format!("ACL {name}: {p}"));
        }
        acl_entries.extend(c.entry);
    }

    let bundle = AuthBundle {
        version: BUNDLE_VERSION,
        broker: broker.to_string(),
        hash_key: hash_key.to_string(),
        default_policy: Some(match policy {
            DefaultPolicy::Allow => Effect::Allow,
            DefaultPolicy::Deny => Effect::Deny,
        }),
        tokens: entries,
        acls: acl_entries,
    };
    // Everything above mirrors the model's checks; if they ever disagree,
    // write nothing rather than a bundle every broker would reject.
    bundle
        .validate()
        .map_err(|e| BuildError::InvalidSpec(e.to_string()))?;
    Ok(BundleOutcome {
        bundle,
        pending,
        problems,
    })
}

/// The bundle Secret the broker pods mount (and watch).
pub fn bundle_secret(ctx: &BrokerCtx, bundle: &AuthBundle) -> Secret {
    Secret {
        metadata: ctx.meta(ctx.names.bundle_secret(), "auth"),
        type_: Some("Opaque".into()),
        data: Some(secret_data([(secret_keys::BUNDLE, compact_json(bundle))])),
        ..Secret::default()
    }
}

/// The bundle as compact JSON: it is read by programs, and every byte counts
/// against the 1 MiB a Secret may hold.
pub fn compact_json(bundle: &AuthBundle) -> String {
    // Only strings, integers, booleans and string-keyed maps: serde_json
    // cannot fail on them.
    serde_json::to_string(bundle).unwrap_or_default()
}

/// The size of a Secret's data as the API server counts it against its
/// limit: the sum of the (decoded) values.
pub fn data_size(secret: &Secret) -> usize {
    secret
        .data
        .iter()
        .flatten()
        .map(|(_, v)| v.0.len())
        .sum::<usize>()
        + secret
            .string_data
            .iter()
            .flatten()
            .map(|(_, v)| v.len())
            .sum::<usize>()
}

/// The hash key of an existing bundle Secret, if it holds a readable bundle.
pub fn existing_hash_key(secret: Option<&Secret>) -> Option<String> {
    let bytes = secret?.data.as_ref()?.get(secret_keys::BUNDLE)?;
    let bundle: AuthBundle = serde_json::from_slice(&bytes.0).ok()?;
    token::HashKey::from_base64(&bundle.hash_key).ok()?;
    Some(bundle.hash_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};
    use crate::crd::BrokerRef;
    use crate::crd::acl::{AclAction, AclEffect, AclRule, AclSpec, TopicFilter};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn tok(name: &str, secret: Option<&str>) -> TokenSource {
        TokenSource {
            name: name.into(),
            labels: BTreeMap::new(),
            expires_at: None,
            disabled: false,
            secret: secret.map(String::from),
        }
    }

    fn acl(name: &str, topic: &str) -> Acl {
        Acl::new(
            name,
            AclSpec {
                anonymous: false,
                broker_ref: BrokerRef {
                    name: "demo".into(),
                },
                tokens: vec!["a".into()],
                token_selector: None,
                rules: vec![AclRule {
                    topics: vec![TopicFilter(topic.into())],
                    actions: vec![AclAction::Publish],
                    effect: AclEffect::Allow,
                }],
            },
        )
    }

    #[test]
    fn bundle_is_sorted_deterministic_and_hashed() {
        let tokens = vec![
            TokenSource {
                labels: BTreeMap::from([("team".into(), "x".into())]),
                expires_at: Some("2030-01-01T00:00:00Z".into()),
                ..tok("b", Some("bbbbbbbbbbbbbbbbbbbbbbbb"))
            },
            tok("a", Some("aaaaaaaaaaaaaaaaaaaaaaaa")),
            tok("waiting", None),
        ];
        let acls = vec![acl("z", "z/#"), acl("y", "y/+")];
        let out = auth_bundle("demo", KEY, DefaultPolicy::Deny, &tokens, &acls).unwrap();
        assert_eq!(out.pending, vec!["waiting".to_string()]);
        assert!(out.problems.is_empty());
        let b = &out.bundle;
        assert_eq!(
            b.tokens.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            b.acls.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["y", "z"]
        );
        assert_eq!(
            b.tokens[0].secret_hash,
            token::hash_secret(KEY, "aaaaaaaaaaaaaaaaaaaaaaaa").unwrap()
        );
        assert!(
            !b.to_json_pretty().contains("aaaaaaaaaaaaaaaa"),
            "no secret in the bundle"
        );
        // Same input, same bytes.
        let again = auth_bundle("demo", KEY, DefaultPolicy::Deny, &tokens, &acls).unwrap();
        assert_eq!(again.bundle.to_json_pretty(), b.to_json_pretty());
        // And the broker's parser accepts it.
        assert_eq!(
            AuthBundle::parse(b.to_json_pretty().as_bytes()).unwrap(),
            *b
        );
    }

    #[test]
    fn bad_tokens_are_left_out_with_a_reason() {
        let tokens = vec![
            tok("short", Some("tiny")),
            tok("one", Some("same-secret-same-secret")),
            tok("two", Some("same-secret-same-secret")),
        ];
        let out = auth_bundle("demo", KEY, DefaultPolicy::Allow, &tokens, &[]).unwrap();
        assert_eq!(out.bundle.tokens.len(), 1);
        assert_eq!(out.bundle.tokens[0].name, "one");
        assert_eq!(out.bundle.default_policy, Some(Effect::Allow));
        assert_eq!(out.problems.len(), 2, "{:?}", out.problems);
        assert!(out.problems.iter().all(|p| !p.contains("same-secret-same")));
    }

    #[test]
    fn invalid_acl_is_reported_not_fatal() {
        let out = auth_bundle(
            "demo",
            KEY,
            DefaultPolicy::Deny,
            &[],
            &[acl("good", "a/+"), acl("bad", "a/#/b")],
        )
        .unwrap();
        assert_eq!(out.bundle.acls.len(), 1);
        assert_eq!(out.problems.len(), 1);
        assert!(
            out.problems[0].starts_with("ACL bad: rules[0]"),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn hash_key_survives_round_trip_through_the_secret() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let out = auth_bundle("demo", KEY, DefaultPolicy::Deny, &[], &[]).unwrap();
        let secret = bundle_secret(&ctx, &out.bundle);
        assert_eq!(existing_hash_key(Some(&secret)).as_deref(), Some(KEY));
        assert_eq!(existing_hash_key(None), None);
        assert_yaml(
            &secret,
            r#"
apiVersion: v1
kind: Secret
metadata:
  labels:
    app.kubernetes.io/component: auth
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-auth
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
type: Opaque
data:
  bundle.json: <redacted>
"#,
        );
    }
}

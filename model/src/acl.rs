//! A validated auth bundle compiled for the broker's hot paths: O(1) token
//! lookup at CONNECT and per-token rule lists for PUBLISH/SUBSCRIBE checks.
//!
//! The broker holds one `Arc<AuthState>` and swaps it whole when the bundle
//! file changes; each connection holds the `Arc<Principal>` it authenticated
//! as and, after a swap, asks the new state to [`AuthState::refresh`] it. Rules
//! are evaluated here as pure functions so that the semantics (deny wins,
//! subscriptions must be *covered*) are tested in one place for every
//! protocol.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::bundle::{AUTHORIZATION_USERNAME, Action, AuthBundle, BundleError, Effect};
use crate::token::{HASH_LEN, HashKey};
use crate::topic;

/// Process-wide, so two states never share a generation even when compiled
/// from identical bundles: a cache keyed by generation is then never stale.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Why a token was not accepted. The broker answers every variant with the
/// same "bad credentials" so that clients learn nothing; the distinction is
/// for metrics and logs. Token names may be logged, secrets never are.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    #[error("unknown token or wrong secret")]
    UnknownOrWrongSecret,
    /// The secret is valid, but the username is neither the broker's name,
    /// `authorization`, nor the name of the token the secret belongs to.
    #[error("secret of token {token:?} presented with a username that does not fit it")]
    UsernameMismatch { token: String },
    #[error("token {token:?} has expired")]
    Expired { token: String },
    #[error("token {token:?} is disabled")]
    Disabled { token: String },
    /// From [`AuthState::refresh`]: the token left the bundle or its secret
    /// (or the bundle's hash key) changed, so the connection's credentials
    /// are no longer valid.
    #[error("token {token:?} was removed or its secret changed")]
    Revoked { token: String },
}

/// The outcome of a check with its cause, for refusal logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Decided by rule number `rule` (0-based) of the ACL named `acl`,
    /// through its topic filter `filter`.
    Rule {
        acl: Arc<str>,
        rule: usize,
        filter: Arc<str>,
    },
    /// No rule decided; the bundle's default policy did.
    DefaultPolicy,
    /// The topic or filter itself is malformed; always refused.
    InvalidTopic,
}

#[derive(Debug)]
struct CompiledRule {
    filter: Arc<str>,
    acl: Arc<str>,
    rule: usize,
}

/// The rules that apply to one set of ACLs. Shared between tokens with the
/// same ACLs, so thousands of tokens under one selector cost one copy.
#[derive(Debug, Default)]
struct Permissions {
    publish_allow: Vec<CompiledRule>,
    publish_deny: Vec<CompiledRule>,
    subscribe_allow: Vec<CompiledRule>,
    subscribe_deny: Vec<CompiledRule>,
    default_allow: bool,
}

enum Verdict<'a> {
    Rule(&'a CompiledRule, bool),
    Default(bool),
    Invalid,
}

impl Verdict<'_> {
    fn allowed(&self) -> bool {
        match self {
            Verdict::Rule(_, a) | Verdict::Default(a) => *a,
            Verdict::Invalid => false,
        }
    }

    fn decision(&self) -> Decision {
        let reason = match self {
            Verdict::Rule(r, _) => Reason::Rule {
                acl: r.acl.clone(),
                rule: r.rule,
                filter: r.filter.clone(),
            },
            Verdict::Default(_) => Reason::DefaultPolicy,
            Verdict::Invalid => Reason::InvalidTopic,
        };
        Decision {
            allowed: self.allowed(),
            reason,
        }
    }
}

impl Permissions {
    /// Deny wins: any deny rule matching the topic refuses it, whatever allows it.
    fn publish(&self, topic_name: &str) -> Verdict<'_> {
        if topic::validate_name(topic_name).is_err() {
            return Verdict::Invalid;
        }
        if let Some(r) = find(&self.publish_deny, |f| topic::matches(f, topic_name)) {
            return Verdict::Rule(r, false);
        }
        if let Some(r) = find(&self.publish_allow, |f| topic::matches(f, topic_name)) {
            return Verdict::Rule(r, true);
        }
        Verdict::Default(self.default_allow)
    }

    /// A subscription is granted when one allow rule covers its filter
    /// (or, with no such rule, the default allows) and no deny rule covers
    /// it. A deny rule that only overlaps it does not refuse it: it makes
    /// the grant [`Grant::Filtered`], and messages on the denied topics are
    /// withheld from it one by one ([`Permissions::receive`]).
    fn subscribe(&self, raw: &str) -> (Verdict<'_>, Grant) {
        let Ok(sub) = topic::parse_subscription(raw) else {
            return (Verdict::Invalid, Grant::Refused);
        };
        let filter = sub.filter;
        if let Some(r) = find(&self.subscribe_deny, |f| topic::covers(f, filter)) {
            return (Verdict::Rule(r, false), Grant::Refused);
        }
        let verdict = match find(&self.subscribe_allow, |f| topic::covers(f, filter)) {
            Some(r) => Verdict::Rule(r, true),
            None => Verdict::Default(self.default_allow),
        };
        let grant = if !verdict.allowed() {
            Grant::Refused
        } else if self
            .subscribe_deny
            .iter()
            .any(|r| topic::overlaps(&r.filter, filter))
        {
            Grant::Filtered
        } else {
            Grant::Whole
        };
        (verdict, grant)
    }

    /// [`Permissions::subscribe`] for a single topic name, where overlap and
    /// coverage both reduce to matching.
    fn receive(&self, topic_name: &str) -> Verdict<'_> {
        if topic::validate_name(topic_name).is_err() {
            return Verdict::Invalid;
        }
        if let Some(r) = find(&self.subscribe_deny, |f| topic::matches(f, topic_name)) {
            return Verdict::Rule(r, false);
        }
        if let Some(r) = find(&self.subscribe_allow, |f| topic::matches(f, topic_name)) {
            return Verdict::Rule(r, true);
        }
        Verdict::Default(self.default_allow)
    }
}

fn find(rules: &[CompiledRule], pred: impl Fn(&str) -> bool) -> Option<&CompiledRule> {
    rules.iter().find(|r| pred(&r.filter))
}

/// What a granted subscription may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// No allow rule covers the filter (and the default policy denies), a
    /// deny rule covers all of it, or it is malformed.
    Refused,
    /// Every topic the filter matches may be read: nothing to check per
    /// message, the common case.
    Whole,
    /// Granted, but a deny rule overlaps the filter (allow `sensors/#`, deny
    /// `sensors/private/#`): each message's topic must pass
    /// [`Principal::may_receive`] before it is delivered.
    Filtered,
}

impl Grant {
    pub fn allowed(self) -> bool {
        self != Grant::Refused
    }
}

/// Who a connection is: a token from the bundle, or anonymous.
pub struct Principal {
    name: Option<Arc<str>>,
    hash: [u8; HASH_LEN],
    expires_at: Option<SystemTime>,
    disabled: bool,
    labels: BTreeMap<String, String>,
    perms: Arc<Permissions>,
    generation: u64,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("expires_at", &self.expires_at)
            .field("disabled", &self.disabled)
            .field("labels", &self.labels)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// The token's name; `None` for anonymous connections.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn is_anonymous(&self) -> bool {
        self.name.is_none()
    }

    /// When the token stops working; the broker schedules a disconnect for it.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Not disabled and not expired at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        !self.disabled && self.expires_at.is_none_or(|t| now < t)
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The [`AuthState::generation`] this principal was compiled in. A
    /// per-connection decision cache is valid while this equals the current
    /// state's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// May this principal publish to topic name `topic`? Malformed names are
    /// refused.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.perms.publish(topic).allowed()
    }

    /// The publish verdict when no rule names a topic (anonymous access,
    /// a token with only a default): the same for every valid topic name,
    /// so the caller need not look the topic up at all.
    pub fn publish_for_every_topic(&self) -> Option<bool> {
        let p = &self.perms;
        (p.publish_allow.is_empty() && p.publish_deny.is_empty()).then_some(p.default_allow)
    }

    /// May this principal subscribe to `filter`? A `$share/group/` prefix is
    /// removed first; the rules apply to the filter inside it.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.perms.subscribe(filter).1.allowed()
    }

    /// [`Principal::may_subscribe`], telling also whether messages on the
    /// filter must be checked one by one ([`Grant::Filtered`]).
    pub fn grant_subscribe(&self, filter: &str) -> Grant {
        self.perms.subscribe(filter).1
    }

    /// May this principal receive a message on topic name `topic`? For
    /// retained messages and `?pubStates` values delivered to a filter the
    /// principal subscribed to under older rules.
    pub fn may_receive(&self, topic: &str) -> bool {
        self.perms.receive(topic).allowed()
    }

    /// [`Principal::may_publish`] with the rule that decided.
    pub fn check_publish(&self, topic: &str) -> Decision {
        self.perms.publish(topic).decision()
    }

    /// [`Principal::may_subscribe`] with the rule that decided.
    pub fn check_subscribe(&self, filter: &str) -> Decision {
        self.perms.subscribe(filter).0.decision()
    }

    /// [`Principal::may_receive`] with the rule that decided.
    pub fn check_receive(&self, topic: &str) -> Decision {
        self.perms.receive(topic).decision()
    }
}

/// A compiled auth bundle. Immutable: a new bundle makes a new state.
pub struct AuthState {
    generation: u64,
    broker: String,
    key: HashKey,
    default_policy: Effect,
    /// In bundle order.
    tokens: Vec<Arc<Principal>>,
    by_hash: HashMap<[u8; HASH_LEN], usize>,
    by_name: HashMap<Arc<str>, usize>,
    anonymous: Arc<Principal>,
    acl_count: usize,
}

impl fmt::Debug for AuthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthState")
            .field("generation", &self.generation)
            .field("broker", &self.broker)
            .field("default_policy", &self.default_policy)
            .field("tokens", &self.tokens.len())
            .field("acls", &self.acl_count)
            .finish_non_exhaustive()
    }
}

impl AuthState {
    /// Parses, validates and compiles bundle bytes (the broker's reload path).
    pub fn load(bytes: &[u8]) -> Result<AuthState, BundleError> {
        AuthState::compile(&AuthBundle::parse(bytes)?)
    }

    /// Validates and compiles; any error rejects the whole bundle.
    pub fn compile(bundle: &AuthBundle) -> Result<AuthState, BundleError> {
        let checked = bundle.check()?;
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let default_policy = bundle.effective_default_policy();
        let default_allow = default_policy == Effect::Allow;

        let by_name: HashMap<Arc<str>, usize> = bundle
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (Arc::from(t.name.as_str()), i))
            .collect();

        // For each token, the ACLs that apply to it, in bundle order.
        let mut acls_of: Vec<Vec<usize>> = vec![Vec::new(); bundle.tokens.len()];
        for (a, acl) in bundle.acls.iter().enumerate() {
            let mut applies = vec![false; bundle.tokens.len()];
            for name in &acl.tokens {
                if let Some(&i) = by_name.get(name.as_str()) {
                    applies[i] = true;
                }
            }
            if let Some(sel) = &acl.selector {
                for (i, t) in bundle.tokens.iter().enumerate() {
                    applies[i] |= sel.matches(&t.labels);
                }
            }
            for (i, yes) in applies.into_iter().enumerate() {
                if yes {
                    acls_of[i].push(a);
                }
            }
        }

        let acl_names: Vec<Arc<str>> = bundle
            .acls
            .iter()
            .map(|a| Arc::from(a.name.as_str()))
            .collect();
        let anonymous_acls: Vec<usize> = bundle
            .acls
            .iter()
            .enumerate()
            .filter(|(_, a)| a.anonymous)
            .map(|(i, _)| i)
            .collect();
        let mut shared: HashMap<Vec<usize>, Arc<Permissions>> = HashMap::new();
        let mut tokens = Vec::with_capacity(bundle.tokens.len());
        let mut by_hash = HashMap::with_capacity(bundle.tokens.len());
        for (i, (t, c)) in bundle.tokens.iter().zip(&checked.tokens).enumerate() {
            let acls = std::mem::take(&mut acls_of[i]);
            let perms = shared
                .entry(acls)
                .or_insert_with_key(|acls| {
                    Arc::new(build_permissions(bundle, acls, &acl_names, default_allow))
                })
                .clone();
            by_hash.insert(c.hash, i);
            tokens.push(Arc::new(Principal {
                name: Some(Arc::from(t.name.as_str())),
                hash: c.hash,
                expires_at: c.expires_at,
                disabled: t.disabled,
                labels: t.labels.clone(),
                perms,
                generation,
            }));
        }

        Ok(AuthState {
            generation,
            broker: bundle.broker.clone(),
            key: checked.key,
            default_policy,
            tokens,
            by_hash,
            by_name,
            anonymous: anonymous(
                build_permissions(bundle, &anonymous_acls, &acl_names, default_allow),
                generation,
            ),
            acl_count: bundle.acls.len(),
        })
    }

    /// The state without any bundle: no tokens, everything allowed. Whether
    /// anonymous clients may connect at all is the broker config's decision.
    pub fn open(broker: impl Into<String>) -> AuthState {
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        AuthState {
            generation,
            broker: broker.into(),
            // No token exists, so no secret can verify under any key.
            key: HashKey(vec![0; HASH_LEN]),
            default_policy: Effect::Allow,
            tokens: Vec::new(),
            by_hash: HashMap::new(),
            by_name: HashMap::new(),
            anonymous: anonymous(
                Permissions {
                    default_allow: true,
                    ..Permissions::default()
                },
                generation,
            ),
            acl_count: 0,
        }
    }

    /// Unique per compiled state within the process; changes on every reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// The policy applied when no rule decides (after the bundle's default
    /// has been resolved).
    pub fn default_policy(&self) -> Effect {
        self.default_policy
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn acl_count(&self) -> usize {
        self.acl_count
    }

    /// Checks a password against the bundle. `username` may be `None` or
    /// empty (HTTP bearer tokens, MQTT clients that send no username), the
    /// broker's name, `authorization`, or the token's own name; with any of
    /// the first three the secret alone picks the token.
    ///
    /// Cost is one HMAC and one hash-map probe whatever the number of tokens;
    /// the final comparison is constant-time.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: &[u8],
        now: SystemTime,
    ) -> Result<Arc<Principal>, AuthError> {
        let digest = self.key.digest(password);
        let token = self
            .by_hash
            .get(&digest)
            .and_then(|&i| self.tokens.get(i))
            .filter(|p| bool::from(p.hash.ct_eq(&digest)))
            .ok_or(AuthError::UnknownOrWrongSecret)?;
        let name = token.name().unwrap_or_default();
        match username {
            None | Some("") => {}
            Some(u) if u == self.broker || u == AUTHORIZATION_USERNAME || u == name => {}
            Some(_) => {
                return Err(AuthError::UsernameMismatch {
                    token: name.to_owned(),
                });
            }
        }
        if token.disabled {
            return Err(AuthError::Disabled {
                token: name.to_owned(),
            });
        }
        if !token.is_valid_at(now) {
            return Err(AuthError::Expired {
                token: name.to_owned(),
            });
        }
        Ok(token.clone())
    }

    /// The principal for connections without a token: the ACLs marked
    /// `anonymous`, then the default policy.
    pub fn anonymous(&self) -> Arc<Principal> {
        self.anonymous.clone()
    }

    /// The token named `name`, valid or not.
    pub fn token(&self, name: &str) -> Option<&Arc<Principal>> {
        self.by_name.get(name).and_then(|&i| self.tokens.get(i))
    }

    /// All tokens in bundle order.
    pub fn tokens(&self) -> impl Iterator<Item = &Arc<Principal>> {
        self.tokens.iter()
    }

    /// Re-resolves a principal from an older state against this one after a
    /// reload: the same token with its new rules, or why the connection
    /// must be closed. The token must still exist with the same secret hash
    /// (a rotated secret or hash key revokes it), be enabled and unexpired.
    /// Anonymous principals map to this state's anonymous principal.
    pub fn refresh(&self, old: &Principal, now: SystemTime) -> Result<Arc<Principal>, AuthError> {
        let Some(name) = old.name() else {
            return Ok(self.anonymous());
        };
        let revoked = || AuthError::Revoked {
            token: name.to_owned(),
        };
        let new = self.token(name).ok_or_else(revoked)?;
        if !bool::from(new.hash.ct_eq(&old.hash)) {
            return Err(revoked());
        }
        if new.disabled {
            return Err(AuthError::Disabled {
                token: name.to_owned(),
            });
        }
        if !new.is_valid_at(now) {
            return Err(AuthError::Expired {
                token: name.to_owned(),
            });
        }
        Ok(new.clone())
    }

    /// Names of the tokens that were enabled in `old` and can no longer be
    /// used in this state at `now` (removed, disabled, expired, or secret
    /// changed): the connections to close after a reload. Tokens that were
    /// already disabled in `old` are left out; an expired one is listed
    /// again, in case its expiry timer has not fired yet.
    pub fn revoked_since(&self, old: &AuthState, now: SystemTime) -> Vec<String> {
        old.tokens
            .iter()
            .filter(|p| !p.disabled && self.refresh(p, now).is_err())
            .filter_map(|p| p.name().map(str::to_owned))
            .collect()
    }

    /// The earliest expiry strictly after `after` among enabled tokens, so
    /// the broker can sleep until the next one without polling.
    pub fn next_expiry(&self, after: SystemTime) -> Option<SystemTime> {
        self.tokens
            .iter()
            .filter(|p| !p.disabled)
            .filter_map(|p| p.expires_at)
            .filter(|&t| t > after)
            .min()
    }
}

fn anonymous(perms: Permissions, generation: u64) -> Arc<Principal> {
    Arc::new(Principal {
        name: None,
        hash: [0; HASH_LEN],
        expires_at: None,
        disabled: false,
        labels: BTreeMap::new(),
        perms: Arc::new(perms),
        generation,
    })
}

fn build_permissions(
    bundle: &AuthBundle,
    acls: &[usize],
    acl_names: &[Arc<str>],
    default_allow: bool,
) -> Permissions {
    let mut perms = Permissions {
        default_allow,
        ..Permissions::default()
    };
    // The first rule naming a filter is kept for the log; duplicates would
    // only lengthen the scans.
    let mut seen: HashSet<(Action, Effect, &str)> = HashSet::new();
    for &a in acls {
        let Some(acl) = bundle.acls.get(a) else {
            continue;
        };
        let acl_name = acl_names.get(a).cloned().unwrap_or_else(|| Arc::from(""));
        for (rule_index, rule) in acl.rules.iter().enumerate() {
            for filter in &rule.topics {
                for &action in &rule.actions {
                    if !seen.insert((action, rule.effect, filter)) {
                        continue;
                    }
                    let list = match (action, rule.effect) {
                        (Action::Publish, Effect::Allow) => &mut perms.publish_allow,
                        (Action::Publish, Effect::Deny) => &mut perms.publish_deny,
                        (Action::Subscribe, Effect::Allow) => &mut perms.subscribe_allow,
                        (Action::Subscribe, Effect::Deny) => &mut perms.subscribe_deny,
                    };
                    list.push(CompiledRule {
                        filter: Arc::from(filter.as_str()),
                        acl: acl_name.clone(),
                        rule: rule_index,
                    });
                }
            }
        }
    }
    perms
}

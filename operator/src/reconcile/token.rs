//! Token controller: the secret (generated once, or brought via secretRef),
//! the credentials Secret owned by the Token, and the Token's status. The
//! Broker controller watches Tokens and puts their hashes in the bundle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use starling_model::bundle::{format_rfc3339, parse_rfc3339};
use starling_model::token;

use super::{Context, Error, RESYNC, apply, apply_status, now};
use crate::build::token::{Credentials, credentials_secret, existing_secret, token_owner};
use crate::build::{BrokerCtx, Names, secret_keys, token_secret_name};
use crate::crd::common::{Condition, condition_is_true, merge_conditions, types};
use crate::crd::{Broker, Token, TokenStatus};

pub const KIND: &str = "token";

/// How the Token stands, for its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Active,
    BrokerNotFound,
    Expired,
    Disabled,
    /// The secretRef Secret or key is missing.
    SecretNotFound(String),
    /// The secret value does not meet the minimum.
    InvalidSecret(String),
    InvalidExpiry(String),
}

impl Verdict {
    fn conditions(&self, broker: &str) -> Vec<Condition> {
        use Verdict::*;
        let ready = match self {
            Active => Condition::new(
                types::READY,
                true,
                "Active",
                format!("usable on broker {broker}"),
            ),
            BrokerNotFound => Condition::new(
                types::READY,
                false,
                "BrokerNotFound",
                format!("Broker {broker} does not exist in this namespace"),
            ),
            Expired => Condition::new(types::READY, false, "Expired", "the token has expired"),
            Disabled => Condition::new(types::READY, false, "Disabled", "spec.disabled is true"),
            SecretNotFound(m) => Condition::new(types::READY, false, "SecretNotFound", m.clone()),
            InvalidSecret(m) => Condition::new(types::READY, false, "InvalidSecret", m.clone()),
            InvalidExpiry(m) => Condition::new(types::READY, false, "InvalidExpiresAt", m.clone()),
        };
        let degraded = match self {
            SecretNotFound(m) => Condition::new(types::DEGRADED, true, "SecretNotFound", m.clone()),
            InvalidSecret(m) => Condition::new(types::DEGRADED, true, "InvalidSecret", m.clone()),
            InvalidExpiry(m) => {
                Condition::new(types::DEGRADED, true, "InvalidExpiresAt", m.clone())
            }
            BrokerNotFound => Condition::new(
                types::DEGRADED,
                true,
                "BrokerNotFound",
                format!("Broker {broker} does not exist in this namespace"),
            ),
            _ => Condition::new(types::DEGRADED, false, "AsExpected", ""),
        };
        vec![ready, degraded]
    }
}

#[tracing::instrument(
    skip_all,
    fields(
        kind = "Token",
        name = %token.name_any(),
        namespace = %token.namespace().unwrap_or_default(),
    )
)]
pub async fn reconcile(token: Arc<Token>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(KIND);
    if token.metadata.deletion_timestamp.is_some() {
        // The credentials Secret is owned by the Token; the Broker controller
        // sees the deletion and drops the token from the bundle.
        return Ok(Action::await_change());
    }
    match run(&token, &ctx).await {
        Ok(a) => {
            ctx.succeeded(token.as_ref());
            Ok(a)
        }
        Err(e) => {
            let mut status = token.status.clone().unwrap_or_default();
            let fresh = vec![Condition::new(
                types::DEGRADED,
                true,
                e.reason(),
                e.message(),
            )];
            status.observed_generation = token.metadata.generation;
            let mut conds: Vec<Condition> = status
                .conditions
                .iter()
                .filter(|c| c.type_ != types::DEGRADED)
                .cloned()
                .collect();
            conds.extend(fresh);
            status.conditions =
                merge_conditions(&status.conditions, conds, token.metadata.generation, &now());
            write_status(&ctx.client, &token, status).await.ok();
            Err(e)
        }
    }
}

async fn run(token: &Token, ctx: &Context) -> Result<Action, Error> {
    let (_, ns) = token_owner(token)?;
    let name = token.name_any();
    let client = &ctx.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let broker_name = token.spec.broker_ref.name.clone();

    // read
    let broker = Api::<Broker>::namespaced(client.clone(), &ns)
        .get_opt(&broker_name)
        .await?;
    let existing = secrets.get_opt(&token_secret_name(&name)).await?;
    let brought = match &token.spec.secret_ref {
        Some(r) => Some((r, secrets.get_opt(&r.name).await?)),
        None => None,
    };
    let ca_crt = secrets
        .get_opt(&Names::new(&broker_name).ca_secret())
        .await?
        .and_then(|s| s.data?.get(secret_keys::CA_CRT).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .filter(|s| !s.is_empty());

    // validate and decide the secret
    let now_t = SystemTime::now();
    let mut generated = false;
    let (secret, mut verdict) = match brought {
        Some((r, secret)) => {
            let value = secret
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get(&r.key).cloned())
                .and_then(|b| String::from_utf8(b.0).ok())
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string());
            match value {
                None => (
                    None,
                    Verdict::SecretNotFound(format!("Secret {} has no key {}", r.name, r.key)),
                ),
                Some(v) => match token::check_secret(&v) {
                    Ok(()) => (Some(v), Verdict::Active),
                    Err(e) => (
                        None,
                        Verdict::InvalidSecret(format!("Secret {}: {e}", r.name)),
                    ),
                },
            }
        }
        None => match existing_secret(existing.as_ref()) {
            Some(s) => (Some(s), Verdict::Active),
            None => {
                generated = true;
                (Some(token::generate_secret()), Verdict::Active)
            }
        },
    };
    let mut requeue = RESYNC;
    if verdict == Verdict::Active
        && let Some(at) = &token.spec.expires_at
    {
        match parse_rfc3339(at) {
            Err(e) => verdict = Verdict::InvalidExpiry(format!("expiresAt {at:?}: {e}")),
            Ok(t) if t <= now_t => verdict = Verdict::Expired,
            // Look again when it expires, so status turns to Expired on time.
            Ok(t) => {
                requeue = requeue
                    .min(t.duration_since(now_t).unwrap_or_default() + Duration::from_secs(1))
            }
        }
    }
    if verdict == Verdict::Active && token.spec.disabled {
        verdict = Verdict::Disabled;
    }
    if verdict == Verdict::Active && broker.is_none() {
        verdict = Verdict::BrokerNotFound;
    }

    // build and apply
    let mut secret_name = None;
    if let Some(secret) = secret {
        let bctx = broker.as_ref().and_then(|b| BrokerCtx::new(b).ok());
        let creds = Credentials::new(&broker_name, secret, bctx.as_ref(), ca_crt);
        let desired = credentials_secret(token, &creds)?;
        apply(&secrets, &desired).await?;
        secret_name = Some(token_secret_name(&name));
        if generated {
            ctx.event(
                token,
                EventType::Normal,
                "SecretGenerated",
                format!("credentials written to Secret {}", token_secret_name(&name)),
            )
            .await;
        }
    }

    // status
    let previous = token.status.clone().unwrap_or_default();
    let status = TokenStatus {
        observed_generation: token.metadata.generation,
        conditions: merge_conditions(
            &previous.conditions,
            verdict.conditions(&broker_name),
            token.metadata.generation,
            &now(),
        ),
        secret_name,
        expires_at: token
            .spec
            .expires_at
            .as_deref()
            .and_then(|a| parse_rfc3339(a).ok())
            .map(format_rfc3339),
    };
    if condition_is_true(&status.conditions, types::DEGRADED)
        && !condition_is_true(&previous.conditions, types::DEGRADED)
    {
        let msg = status
            .conditions
            .iter()
            .find(|c| c.type_ == types::DEGRADED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.event(token, EventType::Warning, "Degraded", msg).await;
    }
    write_status(client, token, status).await?;
    Ok(Action::requeue(match verdict {
        Verdict::SecretNotFound(_) | Verdict::BrokerNotFound => Duration::from_secs(30),
        _ => requeue,
    }))
}

async fn write_status(client: &Client, token: &Token, status: TokenStatus) -> Result<(), Error> {
    if token.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<Token> = Api::namespaced(client.clone(), &token.namespace().unwrap_or_default());
    apply_status(&api, &token.name_any(), &status).await?;
    Ok(())
}

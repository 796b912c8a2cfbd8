//! ACL controller: validates the rules with the broker's own checks and
//! reports them in status. The ACL itself reaches brokers through the
//! Broker controller, which watches ACLs and merges them into the bundle.

use std::sync::Arc;

use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use starling_model::bundle::LabelSelector;

use super::{Context, Error, RESYNC, apply_status, now};
use crate::build::BuildError;
use crate::build::acl::{AclCheck, check};
use crate::crd::common::{Condition, condition_is_true, merge_conditions, types};
use crate::crd::{Acl, AclStatus, Broker, Token};

pub const KIND: &str = "acl";

/// The ACL's status from its check and what exists around it (pure).
pub fn status(
    acl: &Acl,
    check: &AclCheck,
    broker_exists: bool,
    matched_tokens: usize,
    now: &str,
) -> AclStatus {
    let broker = &acl.spec.broker_ref.name;
    let (ready, degraded) = if !check.is_valid() {
        let msg = check.problems.join("; ");
        let kept = match &check.entry {
            Some(e) => format!(
                " (only its {} valid deny rule(s) are applied)",
                e.rules.len()
            ),
            None => " (it is not applied)".into(),
        };
        (
            Condition::new(types::READY, false, "InvalidRules", format!("{msg}{kept}")),
            Condition::new(types::DEGRADED, true, "InvalidRules", msg),
        )
    } else if !broker_exists {
        let msg = format!("Broker {broker} does not exist in this namespace");
        (
            Condition::new(types::READY, false, "BrokerNotFound", msg.clone()),
            Condition::new(types::DEGRADED, true, "BrokerNotFound", msg),
        )
    } else {
        (
            Condition::new(
                types::READY,
                true,
                "Applied",
                format!("in the auth bundle of broker {broker}"),
            ),
            Condition::new(types::DEGRADED, false, "AsExpected", ""),
        )
    };
    let previous = acl
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    AclStatus {
        observed_generation: acl.metadata.generation,
        conditions: merge_conditions(
            previous,
            vec![ready, degraded],
            acl.metadata.generation,
            now,
        ),
        rules: i32::try_from(check.rules).unwrap_or(i32::MAX),
        matched_tokens: i32::try_from(matched_tokens).unwrap_or(i32::MAX),
    }
}

#[tracing::instrument(
    skip_all,
    fields(
        kind = "ACL",
        name = %acl.name_any(),
        namespace = %acl.namespace().unwrap_or_default(),
    )
)]
pub async fn reconcile(acl: Arc<Acl>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(KIND);
    if acl.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let r = run(&acl, &ctx).await;
    if r.is_ok() {
        ctx.succeeded(acl.as_ref());
    }
    r
}

async fn run(acl: &Acl, ctx: &Context) -> Result<Action, Error> {
    let ns = acl
        .namespace()
        .ok_or_else(|| BuildError::NoNamespace(format!("ACL {}", acl.name_any())))?;
    let client = &ctx.client;
    let broker_name = &acl.spec.broker_ref.name;

    // read
    let broker_exists = Api::<Broker>::namespaced(client.clone(), &ns)
        .get_opt(broker_name)
        .await?
        .is_some();
    let tokens = Api::<Token>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?;

    // validate
    let check = check(acl);
    let selector = acl.spec.token_selector.as_ref().map(|s| LabelSelector {
        match_labels: s.match_labels.clone(),
    });
    let matched = tokens
        .items
        .iter()
        .filter(|t| &t.spec.broker_ref.name == broker_name)
        .filter(|t| {
            acl.spec.tokens.contains(&t.name_any())
                || selector.as_ref().is_some_and(|s| s.matches(t.labels()))
        })
        .count();

    // status
    let status = status(acl, &check, broker_exists, matched, &now());
    let was_degraded = acl
        .status
        .as_ref()
        .is_some_and(|s| condition_is_true(&s.conditions, types::DEGRADED));
    if !check.is_valid() && !was_degraded {
        ctx.event(
            acl,
            EventType::Warning,
            "InvalidRules",
            check.problems.join("; "),
        )
        .await;
    }
    write_status(client, acl, status).await?;
    Ok(Action::requeue(RESYNC))
}

async fn write_status(client: &Client, acl: &Acl, status: AclStatus) -> Result<(), Error> {
    if acl.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<Acl> = Api::namespaced(client.clone(), &acl.namespace().unwrap_or_default());
    apply_status(&api, &acl.name_any(), &status).await?;
    Ok(())
}

//! Broker controller: everything a Broker becomes, and its status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use starling_model::token;

use super::{Context, Error, RESYNC, apply, apply_status, now};
use crate::build::broker::{
    BrokerInputs, BrokerObjects, Observed, TlsInputs, failed_status, objects, status,
};
use crate::build::bundle::{TokenSource, existing_hash_key};
use crate::build::tls::{TlsSource, server_secret_name};
use crate::build::{
    BrokerCtx, BuildError, admin, certificate, keys, secret_keys, token_secret_name,
};
use crate::crd::common::{condition_is_true, types};
use crate::crd::{Acl, Broker, BrokerStatus, Token};
use crate::tls::{self, Issued, x509};

pub const KIND: &str = "broker";

/// Reconciles one Broker. Errors are written to its status before they go
/// to the error policy.
#[tracing::instrument(
    skip_all,
    fields(
        kind = "Broker",
        name = %broker.name_any(),
        namespace = %broker.namespace().unwrap_or_default(),
    )
)]
pub async fn reconcile(broker: Arc<Broker>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(KIND);
    if broker.metadata.deletion_timestamp.is_some() {
        // Everything it made carries an owner reference to it: the garbage
        // collector removes them; deleting by hand would only race it.
        return Ok(Action::await_change());
    }
    match run(&broker, &ctx).await {
        Ok(action) => {
            ctx.succeeded(broker.as_ref());
            Ok(action)
        }
        Err(e) => {
            let message = e.message();
            let status = failed_status(
                broker.status.as_ref(),
                broker.metadata.generation,
                e.reason(),
                &message,
                &now(),
            );
            write_status(&ctx.client, &broker, status).await.ok();
            ctx.event(broker.as_ref(), EventType::Warning, e.reason(), message)
                .await;
            Err(e)
        }
    }
}

/// What was read from the cluster for one Broker.
struct Read {
    bundle: Option<Secret>,
    admin: Option<Secret>,
    ca_key: Option<Secret>,
    /// The Secret the pods mount as their server certificate.
    tls: Option<Secret>,
    tokens: Vec<TokenSource>,
    acls: Vec<Acl>,
}

async fn run(broker: &Broker, ctx: &Context) -> Result<Action, Error> {
    let bctx = BrokerCtx::new(broker)?;
    let client = &ctx.client;

    // validate what the schema cannot
    if let Err(msg) = bctx.listeners.validate() {
        return invalid(broker, ctx, &msg).await;
    }

    // read
    let read = read(client, &bctx).await?;

    // generate what does not exist yet (impure, kept out of build)
    let now_t = SystemTime::now();
    let hash_key = existing_hash_key(read.bundle.as_ref()).unwrap_or_else(token::generate_hash_key);
    let admin_password =
        admin::existing_password(read.admin.as_ref()).unwrap_or_else(token::generate_secret);
    let source = TlsSource::of(&bctx.spec.tls);
    let mut observed = Observed::default();
    let (tls_inputs, issued) = match &source {
        TlsSource::Operator => {
            let (ca, server, issued) = tls::ensure(
                &bctx.name,
                &bctx.namespace,
                &bctx.dns_names(),
                read.ca_key.as_ref(),
                read.tls.as_ref(),
                now_t,
            )?;
            observed.certificate_expires_at = Some(server.not_after);
            (TlsInputs::Operator { ca, server }, issued)
        }
        TlsSource::CertManager | TlsSource::Existing(_) => {
            let text = |key: &str| {
                read.tls
                    .as_ref()
                    .and_then(|s| s.data.as_ref())
                    .and_then(|d| d.get(key))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            };
            observed.certificate_expires_at = text(secret_keys::TLS_CRT)
                .as_deref()
                .and_then(|pem| x509::not_after(pem).ok());
            if read.tls.is_none() {
                observed.tls_problem = Some(match &source {
                    TlsSource::Existing(name) => format!("TLS Secret {name} does not exist"),
                    _ => format!(
                        "waiting for cert-manager to issue Secret {}",
                        bctx.names.tls_secret()
                    ),
                });
            }
            (
                TlsInputs::External {
                    ca_crt: text(secret_keys::CA_CRT),
                },
                Issued::Nothing,
            )
        }
    };

    // build
    let inputs = BrokerInputs {
        tokens: &read.tokens,
        acls: &read.acls,
        hash_key,
        admin_password,
        tls: tls_inputs,
    };
    let objs = match objects(&bctx, &inputs) {
        Ok(o) => o,
        Err(BuildError::InvalidSpec(msg)) => return invalid(broker, ctx, &msg).await,
        Err(e) => return Err(e.into()),
    };

    // apply (the bundle only if the API server can take it)
    let bundle_size = crate::build::bundle::data_size(&objs.bundle_secret);
    if bundle_size > ctx.secret_limit {
        observed.bundle_too_large = Some(format!(
            "The auth bundle Secret {} would hold {bundle_size} bytes, over the {} byte limit of a Secret, \
             so it is left as it was; remove Tokens or ACLs of this Broker or spread them over more Brokers",
            bctx.names.bundle_secret(),
            ctx.secret_limit
        ));
    }
    // Objects of this Broker that are no longer wanted go first (before the
    // TLS Secret is applied: a Certificate left in place would have
    // cert-manager write its certificate over the operator's).
    let unwanted = delete_unwanted_certificates(client, &bctx, objs.certificate.as_ref()).await?;
    for name in unwanted {
        ctx.event(
            broker,
            EventType::Normal,
            "Deleted",
            format!("Certificate {name}: no longer wanted, the Broker does not use cert-manager"),
        )
        .await;
    }
    let bundle_changed = observed.bundle_too_large.is_none()
        && read.bundle.as_ref().and_then(|s| s.data.as_ref()) != objs.bundle_secret.data.as_ref();
    let sts = apply_all(client, &bctx, &objs, observed.bundle_too_large.is_none()).await?;
    observed.statefulset = Some(sts);

    if issued != Issued::Nothing {
        ctx.event(
            broker,
            EventType::Normal,
            "CertificateIssued",
            format!(
                "{} for {}",
                match issued {
                    Issued::CaAndServerCertificate => "new CA and server certificate",
                    _ => "new server certificate",
                },
                bctx.dns_names().join(", ")
            ),
        )
        .await;
    }
    if bundle_changed {
        ctx.event(
            broker,
            EventType::Normal,
            "AuthBundleUpdated",
            format!(
                "{} tokens, {} ACLs",
                objs.bundle.bundle.tokens.len(),
                objs.bundle.bundle.acls.len()
            ),
        )
        .await;
    }

    // status
    let new_status = status(
        &bctx,
        &objs,
        &observed,
        broker.status.as_ref(),
        broker.metadata.generation,
        &now(),
    );
    let was_degraded = broker
        .status
        .as_ref()
        .is_some_and(|s| condition_is_true(&s.conditions, types::DEGRADED));
    if condition_is_true(&new_status.conditions, types::DEGRADED) && !was_degraded {
        let message = new_status
            .conditions
            .iter()
            .find(|c| c.type_ == types::DEGRADED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.event(broker, EventType::Warning, "Degraded", message)
            .await;
    }
    let waiting = !objs.bundle.pending.is_empty() || observed.tls_problem.is_some();
    write_status(client, broker, new_status).await?;
    Ok(Action::requeue(if waiting {
        Duration::from_secs(15)
    } else {
        RESYNC
    }))
}

/// The spec cannot be built: say so in status and wait for a change.
async fn invalid(broker: &Broker, ctx: &Context, msg: &str) -> Result<Action, Error> {
    let status = failed_status(
        broker.status.as_ref(),
        broker.metadata.generation,
        "InvalidSpec",
        msg,
        &now(),
    );
    let was = broker
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == types::DEGRADED))
        .map(|c| c.message.clone());
    if was.as_deref() != Some(msg) {
        ctx.event(broker, EventType::Warning, "InvalidSpec", msg.to_string())
            .await;
    }
    write_status(&ctx.client, broker, status).await?;
    Ok(Action::await_change())
}

/// Writes the status unless it is already what the object shows.
async fn write_status(client: &Client, broker: &Broker, status: BrokerStatus) -> Result<(), Error> {
    if broker.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = broker.namespace().unwrap_or_default();
    let api: Api<Broker> = Api::namespaced(client.clone(), &ns);
    apply_status(&api, &broker.name_any(), &status).await?;
    Ok(())
}

async fn read(client: &Client, b: &BrokerCtx<'_>) -> Result<Read, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &b.namespace);
    let tls_name = server_secret_name(b);
    let (bundle, admin, ca_key, tls) = (
        secrets.get_opt(&b.names.bundle_secret()).await?,
        secrets.get_opt(&b.names.admin_secret()).await?,
        match TlsSource::of(&b.spec.tls) {
            TlsSource::Operator => secrets.get_opt(&b.names.ca_key_secret()).await?,
            _ => None,
        },
        secrets.get_opt(&tls_name).await?,
    );

    // Tokens of this broker, and their secrets: generated ones from the
    // credentials Secrets (one list call), brought ones from their Secret.
    let tokens: Api<Token> = Api::namespaced(client.clone(), &b.namespace);
    let tokens: Vec<Token> = tokens
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|t| t.spec.broker_ref.name == b.name && t.metadata.deletion_timestamp.is_none())
        .collect();
    let creds = secrets
        .list(&ListParams::default().labels(&format!(
            "{}=token,{}={}",
            keys::COMPONENT,
            keys::BROKER,
            b.name
        )))
        .await?;
    let by_name: HashMap<String, Secret> =
        creds.items.into_iter().map(|s| (s.name_any(), s)).collect();
    let mut sources = Vec::with_capacity(tokens.len());
    for t in &tokens {
        let name = t.name_any();
        let secret = match &t.spec.secret_ref {
            Some(r) => secrets
                .get_opt(&r.name)
                .await?
                .and_then(|s| value(&s, &r.key)),
            None => by_name
                .get(&token_secret_name(&name))
                .and_then(|s| value(s, secret_keys::PASSWORD)),
        };
        sources.push(TokenSource {
            labels: t.labels().clone().into_iter().collect::<BTreeMap<_, _>>(),
            expires_at: t.spec.expires_at.clone(),
            disabled: t.spec.disabled,
            secret,
            name,
        });
    }

    let acls: Api<Acl> = Api::namespaced(client.clone(), &b.namespace);
    let acls = acls
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|a| a.spec.broker_ref.name == b.name && a.metadata.deletion_timestamp.is_none())
        .collect();

    Ok(Read {
        bundle,
        admin,
        ca_key,
        tls,
        tokens: sources,
        acls,
    })
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone())
        .ok()
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
}

/// Label selector for every object this Broker owns (the labels
/// [`BrokerCtx::labels`] puts on all of them, whatever the component).
fn owned_selector(b: &BrokerCtx<'_>) -> String {
    format!(
        "{}={},{}={},{}={}",
        keys::NAME,
        crate::build::APP,
        keys::INSTANCE,
        b.name,
        keys::MANAGED_BY,
        crate::build::MANAGER
    )
}

/// Deletes the cert-manager Certificates this Broker made that are no longer
/// wanted (found by its labels and owner reference, as Stackable's
/// operator-rs does; not by name, so a renamed one is found too). Returns
/// the names deleted. Without cert-manager installed (404) there is nothing
/// to delete; without RBAC for it (403) the leftover is logged and the
/// reconcile goes on.
async fn delete_unwanted_certificates(
    client: &Client,
    b: &BrokerCtx<'_>,
    wanted: Option<&DynamicObject>,
) -> Result<Vec<String>, Error> {
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &b.namespace,
        &certificate::api_resource(),
    );
    let listed = match api
        .list(&ListParams::default().labels(&owned_selector(b)))
        .await
    {
        Ok(l) => l,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Vec::new()),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::warn!(
                error = %s.message,
                "cannot list cert-manager Certificates (grant list and delete on certificates.cert-manager.io);                  one this Broker no longer needs would be left in place"
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let wanted = wanted.map(|w| w.name_any());
    let mut deleted = Vec::new();
    for c in listed.items {
        let name = c.name_any();
        let ours = c
            .owner_references()
            .iter()
            .any(|o| o.uid == b.owner.uid && o.controller == Some(true));
        if !ours || wanted.as_deref() == Some(name.as_str()) {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
        tracing::info!(certificate = %name, "deleted a Certificate no longer wanted");
        deleted.push(name);
    }
    Ok(deleted)
}

/// Applies every object (the bundle Secret only with `bundle`); returns the
/// StatefulSet as the server has it. A failed bundle apply does not keep the
/// Services, PodDisruptionBudget and StatefulSet from being applied.
async fn apply_all(
    client: &Client,
    b: &BrokerCtx<'_>,
    o: &BrokerObjects,
    bundle: bool,
) -> Result<StatefulSet, Error> {
    let ns = &b.namespace;
    let c = || client.clone();
    apply(
        &Api::<ServiceAccount>::namespaced(c(), ns),
        &o.service_account,
    )
    .await?;
    apply(&Api::<Role>::namespaced(c(), ns), &o.role).await?;
    apply(&Api::<RoleBinding>::namespaced(c(), ns), &o.role_binding).await?;
    apply(&Api::<ConfigMap>::namespaced(c(), ns), &o.config_map).await?;
    let secrets = Api::<Secret>::namespaced(c(), ns);
    for s in o.ca_key_secret.iter().chain(o.tls_secret.iter()) {
        apply(&secrets, s).await?;
    }
    if let Some(cert) = &o.certificate {
        let api = Api::<DynamicObject>::namespaced_with(c(), ns, &certificate::api_resource());
        apply(&api, cert).await?;
    }
    apply(&secrets, &o.ca_secret).await?;
    apply(&secrets, &o.admin_secret).await?;
    let bundle = if bundle {
        apply(&secrets, &o.bundle_secret).await.map(drop)
    } else {
        Ok(())
    };
    let services = Api::<Service>::namespaced(c(), ns);
    apply(&services, &o.service).await?;
    apply(&services, &o.headless_service).await?;
    apply(&Api::<PodDisruptionBudget>::namespaced(c(), ns), &o.pdb).await?;
    let sts = apply(&Api::<StatefulSet>::namespaced(c(), ns), &o.statefulset).await?;
    bundle?;
    Ok(sts)
}

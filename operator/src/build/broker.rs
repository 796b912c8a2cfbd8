//! Everything a Broker becomes, assembled from the single-object builders,
//! and the Broker's status computed from what was applied.

use std::time::SystemTime;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::DynamicObject;
use starling_model::bundle::format_rfc3339;

use super::bundle::{BundleOutcome, TokenSource, auth_bundle, bundle_secret};
use super::config::{broker_config, config_map};
use super::tls::{TlsSource, ca_key_secret, client_ca_secret, server_secret};
use super::{
    BrokerCtx, BuildError, admin, certificate, pdb, service, service_account, statefulset,
};
use crate::crd::common::{Condition, merge_conditions, types};
use crate::crd::{Acl, BrokerStatus};
use crate::tls::{CaMaterial, ServerMaterial};

/// Certificate material, by source.
#[derive(Debug, Clone)]
pub enum TlsInputs {
    /// The operator's CA and the server certificate it signed.
    Operator {
        ca: CaMaterial,
        server: ServerMaterial,
    },
    /// cert-manager or the user's Secret: only the CA certificate (if that
    /// Secret has one yet) is copied, for clients.
    External { ca_crt: Option<String> },
}

/// What the reconciler read or generated for one Broker.
#[derive(Debug, Clone)]
pub struct BrokerInputs<'a> {
    pub tokens: &'a [TokenSource],
    pub acls: &'a [Acl],
    /// The bundle's HMAC key (kept from the existing bundle).
    pub hash_key: String,
    /// The admin API password (kept from the existing Secret).
    pub admin_password: String,
    pub tls: TlsInputs,
}

/// Every object of a Broker, in apply order.
#[derive(Debug, Clone)]
pub struct BrokerObjects {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub config_map: ConfigMap,
    pub config_hash: String,
    pub ca_key_secret: Option<Secret>,
    pub tls_secret: Option<Secret>,
    pub certificate: Option<DynamicObject>,
    pub ca_secret: Secret,
    pub admin_secret: Secret,
    pub bundle_secret: Secret,
    pub bundle: BundleOutcome,
    pub service: Service,
    pub headless_service: Service,
    pub pdb: PodDisruptionBudget,
    pub statefulset: StatefulSet,
}

/// Builds every object of the Broker.
pub fn objects(ctx: &BrokerCtx, inputs: &BrokerInputs) -> Result<BrokerObjects, BuildError> {
    ctx.listeners.validate().map_err(BuildError::InvalidSpec)?;
    let cfg = broker_config(ctx)?;
    let (config_map, config_hash) = config_map(ctx, &cfg)?;
    let bundle = auth_bundle(
        &ctx.name,
        &inputs.hash_key,
        ctx.spec.auth.default_policy,
        inputs.tokens,
        inputs.acls,
    )?;
    let (ca_key_secret, tls_secret, ca_pem) = match &inputs.tls {
        TlsInputs::Operator { ca, server } => (
            Some(ca_key_secret(ctx, ca)),
            Some(server_secret(ctx, server, ca)),
            Some(ca.trust_bundle()),
        ),
        TlsInputs::External { ca_crt } => (None, None, ca_crt.clone()),
    };
    let certificate = match (&ctx.spec.tls.cert_manager, TlsSource::of(&ctx.spec.tls)) {
        (Some(cm), TlsSource::CertManager) => Some(certificate::certificate(ctx, cm)),
        _ => None,
    };
    Ok(BrokerObjects {
        service_account: service_account::service_account(ctx),
        role: service_account::role(ctx),
        role_binding: service_account::role_binding(ctx),
        statefulset: statefulset::statefulset(ctx, &config_hash),
        config_map,
        config_hash,
        ca_key_secret,
        tls_secret,
        certificate,
        ca_secret: client_ca_secret(ctx, ca_pem.as_deref()),
        admin_secret: admin::admin_secret(ctx, &inputs.admin_password),
        bundle_secret: bundle_secret(ctx, &bundle.bundle),
        bundle,
        service: service::client_service(ctx),
        headless_service: service::headless_service(ctx),
        pdb: pdb::pdb(ctx),
    })
}

/// What the status is computed from besides the built objects.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The StatefulSet as the API server returned it (with status).
    pub statefulset: Option<StatefulSet>,
    /// Expiry of the certificate the pods mount, if readable.
    pub certificate_expires_at: Option<SystemTime>,
    /// Problems with the certificate source (e.g. the user's Secret is missing).
    pub tls_problem: Option<String>,
    /// The bundle Secret was not applied: it is over the Secret size limit.
    pub bundle_too_large: Option<String>,
}

/// The Broker's status after a successful apply.
pub fn status(
    ctx: &BrokerCtx,
    objs: &BrokerObjects,
    observed: &Observed,
    previous: Option<&BrokerStatus>,
    generation: Option<i64>,
    now: &str,
) -> BrokerStatus {
    let want = ctx.spec.replicas;
    let sts_status = observed.statefulset.as_ref().and_then(|s| s.status.clone());
    let ready = sts_status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let current = sts_status.as_ref().map(|s| s.replicas).unwrap_or(0);
    let updated = sts_status
        .as_ref()
        .and_then(|s| s.updated_replicas)
        .unwrap_or(0);
    let sts_generation = observed
        .statefulset
        .as_ref()
        .and_then(|s| s.metadata.generation);
    let sts_observed = sts_status.as_ref().and_then(|s| s.observed_generation);

    let mut problems: Vec<String> = objs.bundle.problems.clone();
    if let Some(p) = &observed.tls_problem {
        problems.insert(0, p.clone());
    }
    if let Some(p) = &observed.bundle_too_large {
        problems.insert(0, p.clone());
    }
    let degraded = if problems.is_empty() {
        Condition::new(types::DEGRADED, false, "AsExpected", "")
    } else {
        let reason = if observed.bundle_too_large.is_some() {
            "AuthBundleTooLarge"
        } else if observed.tls_problem.is_some() {
            "CertificateUnavailable"
        } else {
            "InvalidTokensOrACLs"
        };
        Condition::new(types::DEGRADED, true, reason, problems.join("; "))
    };

    let rolling = sts_generation.is_some() && sts_observed < sts_generation
        || updated < want
        || current != want;
    let progressing = if rolling {
        Condition::new(
            types::PROGRESSING,
            true,
            "RollingOut",
            format!("{updated} of {want} pods updated"),
        )
    } else if ready < want {
        Condition::new(
            types::PROGRESSING,
            true,
            "WaitingForPods",
            format!("{ready} of {want} pods ready"),
        )
    } else if !objs.bundle.pending.is_empty() {
        Condition::new(
            types::PROGRESSING,
            true,
            "WaitingForTokens",
            format!(
                "waiting for the secrets of: {}",
                objs.bundle.pending.join(", ")
            ),
        )
    } else {
        Condition::new(types::PROGRESSING, false, "Stable", "")
    };
    let ready_cond = if ready >= want && want > 0 {
        Condition::new(
            types::READY,
            true,
            "Available",
            format!("{ready} of {want} pods ready"),
        )
    } else {
        Condition::new(
            types::READY,
            false,
            "PodsNotReady",
            format!("{ready} of {want} pods ready"),
        )
    };

    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    BrokerStatus {
        observed_generation: generation,
        conditions: merge_conditions(
            previous_conditions,
            vec![ready_cond, progressing, degraded],
            generation,
            now,
        ),
        endpoints: ctx.endpoints(),
        replicas: current,
        ready_replicas: ready,
        selector: Some(
            ctx.selector_labels()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        tokens: count(objs.bundle.bundle.tokens.len()),
        acls: count(objs.bundle.bundle.acls.len()),
        certificate_expires_at: observed.certificate_expires_at.map(format_rfc3339),
        config_hash: Some(objs.config_hash.clone()),
    }
}

/// Status when the Broker could not be reconciled: the previous status plus
/// a Degraded condition carrying the error (Ready is kept as it was, or added
/// as False when there was none).
pub fn failed_status(
    previous: Option<&BrokerStatus>,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: &str,
) -> BrokerStatus {
    let mut status = previous.cloned().unwrap_or_default();
    // Failure is an outcome of this generation too: kstatus, Flux and Argo
    // then report it instead of "in progress".
    status.observed_generation = generation;
    let mut fresh: Vec<Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != types::DEGRADED)
        .cloned()
        .collect();
    if !fresh.iter().any(|c| c.type_ == types::READY) {
        fresh.push(Condition::new(types::READY, false, reason, message));
    }
    fresh.push(Condition::new(types::DEGRADED, true, reason, message));
    status.conditions = merge_conditions(&status.conditions, fresh, generation, now);
    status
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::broker;
    use crate::crd::BrokerSpec;
    use crate::crd::common::ConditionStatus;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use kube::Resource;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn inputs<'a>(tokens: &'a [TokenSource]) -> BrokerInputs<'a> {
        BrokerInputs {
            tokens,
            acls: &[],
            hash_key: KEY.into(),
            admin_password: "admin-password-0123".into(),
            tls: TlsInputs::External {
                ca_crt: Some("CA".into()),
            },
        }
    }

    fn names(o: &BrokerObjects) -> Vec<String> {
        fn n<K: Resource<DynamicType = ()>>(k: &K) -> String {
            format!(
                "{}/{}",
                K::kind(&()),
                k.meta().name.clone().unwrap_or_default()
            )
        }
        let mut v = vec![
            n(&o.service_account),
            n(&o.role),
            n(&o.role_binding),
            n(&o.config_map),
        ];
        v.extend(o.ca_key_secret.iter().map(n));
        v.extend(o.tls_secret.iter().map(n));
        v.extend(o.certificate.iter().map(|c| {
            format!(
                "Certificate/{}",
                c.metadata.name.clone().unwrap_or_default()
            )
        }));
        v.extend([
            n(&o.ca_secret),
            n(&o.admin_secret),
            n(&o.bundle_secret),
            n(&o.service),
            n(&o.headless_service),
            n(&o.pdb),
            n(&o.statefulset),
        ]);
        v
    }

    #[test]
    fn a_broker_becomes_these_objects() {
        let mut spec = BrokerSpec::default();
        spec.tls.cert_manager = Some(Default::default());
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        let o = objects(&ctx, &inputs(&[])).unwrap();
        assert_eq!(
            names(&o),
            [
                "ServiceAccount/demo",
                "Role/demo",
                "RoleBinding/demo",
                "ConfigMap/demo-config",
                "Certificate/demo-tls",
                "Secret/demo-ca",
                "Secret/demo-admin",
                "Secret/demo-auth",
                "Service/demo",
                "Service/demo-headless",
                "PodDisruptionBudget/demo",
                "StatefulSet/demo",
            ]
        );
        // Every object is owned by the Broker, so deleting it deletes them.
        let uid = |o: &Option<
            Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
        >| { o.as_ref().unwrap()[0].uid.clone() };
        assert_eq!(uid(&o.statefulset.metadata.owner_references), "uid-demo");
        assert_eq!(uid(&o.bundle_secret.metadata.owner_references), "uid-demo");
        assert_eq!(
            uid(&o.certificate.as_ref().unwrap().metadata.owner_references),
            "uid-demo"
        );
    }

    #[test]
    fn tokens_change_only_the_bundle() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let before = objects(&ctx, &inputs(&[])).unwrap();
        let tokens = [TokenSource {
            name: "t".into(),
            labels: Default::default(),
            expires_at: None,
            disabled: false,
            secret: Some("a-long-enough-secret-value".into()),
        }];
        let after = objects(&ctx, &inputs(&tokens)).unwrap();
        assert_ne!(before.bundle_secret, after.bundle_secret);
        assert_eq!(before.config_map, after.config_map);
        assert_eq!(
            before.statefulset, after.statefulset,
            "pods do not roll for tokens"
        );
        assert_eq!(before.config_hash, after.config_hash);
    }

    #[test]
    fn invalid_listeners_are_spec_errors() {
        let spec: BrokerSpec = serde_json::from_value(serde_json::json!({
            "listeners": {"mqtts": {"enabled": false}, "https": {"enabled": false}}
        }))
        .unwrap();
        let b = broker("demo", spec);
        let ctx = BrokerCtx::new(&b).unwrap();
        assert!(matches!(
            objects(&ctx, &inputs(&[])),
            Err(BuildError::InvalidSpec(_))
        ));
    }

    #[test]
    fn status_follows_the_statefulset() {
        let b = broker("demo", BrokerSpec::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let objs = objects(&ctx, &inputs(&[])).unwrap();
        let mut sts = objs.statefulset.clone();
        sts.metadata.generation = Some(1);
        sts.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: 1,
            ready_replicas: Some(1),
            updated_replicas: Some(1),
            ..Default::default()
        });
        let observed = Observed {
            statefulset: Some(sts),
            ..Default::default()
        };
        let s = status(
            &ctx,
            &objs,
            &observed,
            None,
            Some(1),
            "2026-01-01T00:00:00Z",
        );
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Ready").status, ConditionStatus::True);
        assert_eq!(get("Progressing").status, ConditionStatus::False);
        assert_eq!(get("Degraded").status, ConditionStatus::False);
        assert_eq!(s.endpoints["mqtts"], "mqtts://demo.ns.svc:8883");
        assert_eq!(s.endpoints["https"], "https://demo.ns.svc:443");
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=starling")
        );

        // Same state later: nothing changes, not even transition times.
        let again = status(
            &ctx,
            &objs,
            &observed,
            Some(&s),
            Some(1),
            "2026-01-02T00:00:00Z",
        );
        assert_eq!(again, s);

        // No pods yet: not ready, progressing.
        let s = status(&ctx, &objs, &Observed::default(), None, Some(1), "t");
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Ready").status, ConditionStatus::False);
        assert_eq!(get("Progressing").status, ConditionStatus::True);
    }

    #[test]
    fn failures_show_as_degraded() {
        let s = failed_status(None, Some(3), "ApiError", "boom", "t");
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(d.status, ConditionStatus::True);
        assert_eq!(d.message, "boom");
        assert_eq!(d.observed_generation, Some(3));
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.conditions.iter().any(|c| c.type_ == "Ready"));
    }
}

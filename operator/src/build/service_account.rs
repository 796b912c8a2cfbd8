//! The broker pods' identity: a ServiceAccount, and a Role that lets them
//! read (and watch) exactly their auth-bundle and TLS Secrets, so a revoked
//! token bites in seconds instead of at the kubelet's next Secret sync.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::BrokerCtx;
use super::tls::server_secret_name;

pub fn service_account(ctx: &BrokerCtx) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(ctx.names.service_account(), "broker"),
        ..ServiceAccount::default()
    }
}

pub fn role(ctx: &BrokerCtx) -> Role {
    Role {
        metadata: ctx.meta(ctx.names.service_account(), "broker"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![ctx.names.bundle_secret(), server_secret_name(ctx)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

pub fn role_binding(ctx: &BrokerCtx) -> RoleBinding {
    RoleBinding {
        metadata: ctx.meta(ctx.names.service_account(), "broker"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: ctx.names.service_account(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: ctx.names.service_account(),
            namespace: Some(ctx.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};

    #[test]
    fn identity_snapshots() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let owner = r#"
  labels:
    app.kubernetes.io/component: broker
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo"#;
        assert_yaml(
            &service_account(&ctx),
            &format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:{owner}\n"),
        );
        assert_yaml(
            &role(&ctx),
            &format!(
                r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:{owner}
rules:
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [demo-auth, demo-tls]
  verbs: [get, list, watch]
"#
            ),
        );
        assert_yaml(
            &role_binding(&ctx),
            &format!(
                r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:{owner}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: demo
subjects:
- kind: ServiceAccount
  name: demo
  namespace: ns
"#
            ),
        );
    }
}

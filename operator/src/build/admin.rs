//! The admin API credentials Secret (HTTP Basic on the admin listener).

use k8s_openapi::api::core::v1::Secret;

use super::{BrokerCtx, secret_data, secret_keys};

/// Username of the admin API.
pub const ADMIN_USER: &str = "admin";

/// The admin credentials; `password` is generated once by the reconciler and
/// read back from this Secret afterwards.
pub fn admin_secret(ctx: &BrokerCtx, password: &str) -> Secret {
    Secret {
        metadata: ctx.meta(ctx.names.admin_secret(), "admin"),
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(secret_data([
            (secret_keys::USERNAME, ADMIN_USER.to_string()),
            (secret_keys::PASSWORD, password.to_string()),
        ])),
        ..Secret::default()
    }
}

/// The password in an existing admin Secret, if usable.
pub fn existing_password(secret: Option<&Secret>) -> Option<String> {
    let bytes = secret?.data.as_ref()?.get(secret_keys::PASSWORD)?;
    let password = String::from_utf8(bytes.0.clone()).ok()?;
    (password.len() >= 16).then_some(password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};

    #[test]
    fn admin_secret_snapshot_and_reuse() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let s = admin_secret(&ctx, "0123456789abcdef0123");
        assert_eq!(
            existing_password(Some(&s)).as_deref(),
            Some("0123456789abcdef0123")
        );
        assert_eq!(existing_password(Some(&admin_secret(&ctx, "short"))), None);
        assert_yaml(
            &s,
            r#"
apiVersion: v1
kind: Secret
metadata:
  labels:
    app.kubernetes.io/component: admin
    app.kubernetes.io/instance: demo
    app.kubernetes.io/managed-by: starling-operator
    app.kubernetes.io/name: starling
  name: demo-admin
  namespace: ns
  ownerReferences:
  - apiVersion: starling.dev/v1alpha1
    controller: true
    kind: Broker
    name: demo
    uid: uid-demo
type: kubernetes.io/basic-auth
data:
  password: <redacted>
  username: <redacted>
"#,
        );
    }
}

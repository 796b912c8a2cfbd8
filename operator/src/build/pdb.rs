//! PodDisruptionBudget: voluntary evictions (node drains) take one broker
//! pod at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::BrokerCtx;

pub fn pdb(ctx: &BrokerCtx) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(ctx.names.pdb(), "broker"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.selector_labels()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::{assert_yaml, broker};

    #[test]
    fn pdb_snapshot() {
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        assert_yaml(
            &pdb(&ctx),
            r#"
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
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
    uid: uid-demo
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      app.kubernetes.io/instance: demo
      app.kubernetes.io/name: starling
"#,
        );
    }
}

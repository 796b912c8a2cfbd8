//! ACL resource → the bundle's `AclEntry`, validated rule by rule with the
//! broker's own rules (the shared model), so what the operator accepts the
//! broker accepts too.

use starling_model::bundle::{
    AclEntry, Action, AuthBundle, BUNDLE_VERSION, BundleError, Effect, LabelSelector, Rule,
};

use crate::crd::Acl;
use crate::crd::acl::{AclAction, AclEffect, AclRule};
use kube::ResourceExt;

/// The verdict on one ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclCheck {
    /// What goes into the bundle. An ACL with an invalid rule contributes
    /// only its valid *deny* rules (failing closed: a typo never grants
    /// access, and never lifts a restriction that was meant); `None` when
    /// nothing is left.
    pub entry: Option<AclEntry>,
    /// One line per invalid rule, for the ACL's status.
    pub problems: Vec<String>,
    /// Rules in the spec.
    pub rules: usize,
}

impl AclCheck {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The model's rule for one spec rule.
pub fn rule(r: &AclRule) -> Rule {
    Rule {
        topics: r.topics.iter().map(|t| t.0.clone()).collect(),
        actions: r
            .actions
            .iter()
            .map(|a| match a {
                AclAction::Publish => Action::Publish,
                AclAction::Subscribe => Action::Subscribe,
            })
            .collect(),
        effect: match r.effect {
            AclEffect::Allow => Effect::Allow,
            AclEffect::Deny => Effect::Deny,
        },
    }
}

/// Checks every rule of `acl` and builds its bundle entry.
pub fn check(acl: &Acl) -> AclCheck {
    let name = acl.name_any();
    let mut problems = Vec::new();
    let mut valid = Vec::new();
    for (i, r) in acl.spec.rules.iter().enumerate() {
        let rule = rule(r);
        match check_rule(&rule) {
            Ok(()) => valid.push(rule),
            Err(problem) => problems.push(format!("rules[{i}]: {problem}")),
        }
    }
    let rules = if problems.is_empty() {
        valid
    } else {
        valid
            .into_iter()
            .filter(|r| r.effect == Effect::Deny)
            .collect()
    };
    let entry = (!rules.is_empty()).then(|| AclEntry {
        name,
        tokens: acl.spec.tokens.clone(),
        selector: acl.spec.token_selector.as_ref().map(|s| LabelSelector {
            match_labels: s.match_labels.clone(),
        }),
        anonymous: acl.spec.anonymous,
        rules,
    });
    AclCheck {
        entry,
        problems,
        rules: acl.spec.rules.len(),
    }
}

/// Validates one rule exactly as the broker will: inside a throwaway bundle.
fn check_rule(rule: &Rule) -> Result<(), String> {
    let probe = AuthBundle {
        version: BUNDLE_VERSION,
        broker: "probe".into(),
        // 16 zero bytes: a well-formed key, never used to hash anything.
        hash_key: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
        default_policy: None,
        tokens: Vec::new(),
        acls: vec![AclEntry {
            name: "probe".into(),
            tokens: Vec::new(),
            selector: None,
            anonymous: false,
            rules: vec![rule.clone()],
        }],
    };
    match probe.validate() {
        Ok(()) => Ok(()),
        Err(BundleError::Rule { problem, .. }) => Err(problem.to_string()),
        Err(other) => Err(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BrokerRef;
    use crate::crd::acl::{AclSpec, TokenSelector, TopicFilter};
    use std::collections::BTreeMap;

    pub fn acl(name: &str, rules: Vec<AclRule>) -> Acl {
        let mut a = Acl::new(
            name,
            AclSpec {
                anonymous: false,
                broker_ref: BrokerRef {
                    name: "demo".into(),
                },
                tokens: vec!["sensor".into()],
                token_selector: Some(TokenSelector {
                    match_labels: BTreeMap::from([("team".into(), "a".into())]),
                }),
                rules,
            },
        );
        a.metadata.namespace = Some("ns".into());
        a
    }

    fn r(topics: &[&str], actions: &[AclAction], effect: AclEffect) -> AclRule {
        AclRule {
            topics: topics.iter().map(|t| TopicFilter(t.to_string())).collect(),
            actions: actions.to_vec(),
            effect,
        }
    }

    #[test]
    fn valid_acl_becomes_an_entry() {
        let a = acl(
            "sensors",
            vec![
                r(&["sensors/+/temp"], &[AclAction::Publish], AclEffect::Allow),
                r(
                    &["sensors/#"],
                    &[AclAction::Subscribe, AclAction::Publish],
                    AclEffect::Deny,
                ),
            ],
        );
        let c = check(&a);
        assert!(c.is_valid());
        assert_eq!(c.rules, 2);
        let e = c.entry.unwrap();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({
                "name": "sensors",
                "tokens": ["sensor"],
                "selector": {"match_labels": {"team": "a"}},
                "rules": [
                    {"topics": ["sensors/+/temp"], "actions": ["publish"], "effect": "allow"},
                    {"topics": ["sensors/#"], "actions": ["subscribe", "publish"], "effect": "deny"},
                ],
            })
        );
    }

    #[test]
    fn invalid_rules_keep_only_valid_denies() {
        let a = acl(
            "broken",
            vec![
                r(&["a/#/b"], &[AclAction::Publish], AclEffect::Allow),
                r(&["ok/+"], &[AclAction::Publish], AclEffect::Allow),
                r(&["secret/#"], &[AclAction::Subscribe], AclEffect::Deny),
                r(&["$share/g/x"], &[AclAction::Subscribe], AclEffect::Deny),
            ],
        );
        let c = check(&a);
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert!(c.problems[0].starts_with("rules[0]: "), "{:?}", c.problems);
        assert!(c.problems[1].contains("$share"), "{:?}", c.problems);
        let e = c.entry.unwrap();
        assert_eq!(e.rules.len(), 1);
        assert_eq!(e.rules[0].topics, vec!["secret/#".to_string()]);
    }

    #[test]
    fn invalid_allow_only_acl_contributes_nothing() {
        let a = acl(
            "bad",
            vec![r(&["x/#/y"], &[AclAction::Publish], AclEffect::Allow)],
        );
        let c = check(&a);
        assert!(!c.is_valid());
        assert_eq!(c.entry, None);
    }

    /// The CRD's pattern and the model's filter check agree on typical and
    /// edge-case filters, so the schema refuses at apply time what the
    /// broker would refuse anyway.
    #[test]
    fn schema_pattern_agrees_with_the_model() {
        let re = regex_lite::Regex::new(crate::crd::acl::TOPIC_FILTER_PATTERN).unwrap();
        for f in [
            "a", "a/b", "a/+/c", "+", "#", "a/#", "/", "/a", "a//b", "+/+", "$SYS/#", "a/b#",
            "a/#/b", "a+", "a/+b", "##", "#/a", "+#", "a\0b", "café/+",
        ] {
            let model = starling_model::topic::validate_filter(f).is_ok();
            assert_eq!(re.is_match(f), model, "filter {f:?}");
        }
    }
}

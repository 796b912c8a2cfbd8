//! Pure functions from a custom resource (plus what was read for it) to the
//! objects that should exist. No client, no clock, no randomness: everything
//! variable (generated secrets, certificates, the time) comes in as input, so
//! each function is tested by comparing its output with an expected snapshot.

pub mod acl;
pub mod admin;
pub mod broker;
pub mod bundle;
pub mod certificate;
pub mod config;
pub mod listeners;
pub mod pdb;
pub mod service;
pub mod service_account;
pub mod statefulset;
pub mod tls;
pub mod token;

#[cfg(test)]
pub(crate) mod snapshot;

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use thiserror::Error;

use crate::crd::{Broker, BrokerSpec};
use listeners::Listeners;

/// Label and annotation keys.
pub mod keys {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Names the Broker a Token's credentials Secret belongs to.
    pub const BROKER: &str = "starling.dev/broker";
    /// Names the Token a credentials Secret belongs to.
    pub const TOKEN: &str = "starling.dev/token";
    /// Pod template annotation: hash of the settings that need a restart.
    pub const CONFIG_HASH: &str = "starling.dev/config-hash";
    /// On operator-issued certificates: hash of the DNS names they cover.
    pub const DNS_HASH: &str = "starling.dev/dns-names-hash";
    /// On operator-issued certificates: hash of the CA certificate that signed them.
    pub const CA_HASH: &str = "starling.dev/ca-hash";
}

/// `app.kubernetes.io/name` of everything the operator makes.
pub const APP: &str = "starling";
/// `app.kubernetes.io/managed-by` (also the server-side apply field manager).
pub const MANAGER: &str = "starling-operator";

/// Secret keys.
pub mod secret_keys {
    pub const BUNDLE: &str = "bundle.json";
    pub const TLS_CRT: &str = "tls.crt";
    pub const TLS_KEY: &str = "tls.key";
    pub const CA_CRT: &str = "ca.crt";
    /// In the CA Secret during a CA rollover: the CA being replaced ...
    pub const PREVIOUS_CA_CRT: &str = "previous.crt";
    /// ... and the new CA's certificate signed by it (sent after the server
    /// certificate, so clients that trust only the old CA still verify).
    pub const CROSS_CRT: &str = "cross.crt";
    pub const USERNAME: &str = "username";
    pub const PASSWORD: &str = "password";
    pub const MQTTS_URL: &str = "mqtts-url";
    pub const HTTPS_URL: &str = "https-url";
    pub const WSS_URL: &str = "wss-url";
    pub const HOST: &str = "host";
    pub const PORT: &str = "port";
    pub const BROKER: &str = "broker";
}

/// Why desired objects cannot be built for a resource.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BuildError {
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("{0} has no uid yet")]
    NoUid(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

/// Names of the objects a Broker owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub broker: String,
}

impl Names {
    pub fn new(broker: &str) -> Names {
        Names {
            broker: broker.to_string(),
        }
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.broker)
    }
    pub fn bundle_secret(&self) -> String {
        format!("{}-auth", self.broker)
    }
    /// Operator-issued or cert-manager certificate (not for a user's Secret).
    pub fn tls_secret(&self) -> String {
        format!("{}-tls", self.broker)
    }
    /// The operator's CA, with its private key (never mounted into pods).
    pub fn ca_key_secret(&self) -> String {
        format!("{}-ca-key", self.broker)
    }
    /// The CA certificate alone, for clients.
    pub fn ca_secret(&self) -> String {
        format!("{}-ca", self.broker)
    }
    pub fn admin_secret(&self) -> String {
        format!("{}-admin", self.broker)
    }
    pub fn service(&self) -> String {
        self.broker.clone()
    }
    pub fn headless_service(&self) -> String {
        format!("{}-headless", self.broker)
    }
    pub fn statefulset(&self) -> String {
        self.broker.clone()
    }
    pub fn pdb(&self) -> String {
        self.broker.clone()
    }
    pub fn service_account(&self) -> String {
        self.broker.clone()
    }
    pub fn certificate(&self) -> String {
        format!("{}-tls", self.broker)
    }
}

/// Name of the credentials Secret of a Token.
pub fn token_secret_name(token: &str) -> String {
    format!("{token}-credentials")
}

/// What every builder for a Broker needs: identity, owner reference and the
/// resolved listeners.
#[derive(Debug, Clone)]
pub struct BrokerCtx<'a> {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
    pub spec: &'a BrokerSpec,
    pub listeners: Listeners,
    pub names: Names,
}

impl<'a> BrokerCtx<'a> {
    pub fn new(broker: &'a Broker) -> Result<BrokerCtx<'a>, BuildError> {
        let name = broker.name_any();
        let namespace = broker
            .namespace()
            .ok_or_else(|| BuildError::NoNamespace(format!("Broker {name}")))?;
        let owner = broker
            .controller_owner_ref(&())
            .filter(|o| !o.uid.is_empty())
            .ok_or_else(|| BuildError::NoUid(format!("Broker {name}")))?;
        Ok(BrokerCtx {
            names: Names::new(&name),
            listeners: Listeners::resolve(&broker.spec),
            name,
            namespace,
            owner,
            spec: &broker.spec,
        })
    }

    /// Labels selecting this broker's pods.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (keys::NAME.to_string(), APP.to_string()),
            (keys::INSTANCE.to_string(), self.name.clone()),
        ])
    }

    /// Labels on every object this broker owns.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector_labels();
        l.insert(keys::COMPONENT.into(), component.into());
        l.insert(keys::MANAGED_BY.into(), MANAGER.into());
        l
    }

    /// Metadata of an owned object.
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// In-cluster DNS name of the client Service.
    pub fn service_host(&self) -> String {
        format!("{}.{}.svc", self.names.service(), self.namespace)
    }

    /// `scheme://host:port` of every enabled listener, by listener name.
    pub fn endpoints(&self) -> BTreeMap<String, String> {
        let host = self.service_host();
        self.listeners
            .enabled()
            .map(|l| {
                (
                    l.kind.name().to_string(),
                    format!("{}://{host}:{}", l.kind.scheme(), l.port),
                )
            })
            .collect()
    }

    /// DNS names the server certificate must cover.
    pub fn dns_names(&self) -> Vec<String> {
        let svc = self.names.service();
        let headless = self.names.headless_service();
        let ns = &self.namespace;
        let mut names = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
            format!("*.{headless}.{ns}.svc"),
            format!("*.{headless}.{ns}.svc.cluster.local"),
        ];
        for extra in &self.spec.tls.dns_names {
            if !names.contains(extra) {
                names.push(extra.clone());
            }
        }
        names
    }
}

/// Secret data from string pairs.
pub fn secret_data<'k>(
    pairs: impl IntoIterator<Item = (&'k str, String)>,
) -> BTreeMap<String, ByteString> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
        .collect()
}

/// Short hex SHA-256, for annotations that change when their input does.
pub fn short_hash(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

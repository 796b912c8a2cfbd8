//! Certificate material for Brokers without cert-manager or their own Secret:
//! one CA per Broker, kept in a Secret, and a server certificate it signs.
//!
//! This is the one impure corner of the build step (key generation needs
//! randomness, renewal needs the clock), so it is kept apart: the reconciler
//! asks [`ensure`] for material, given what exists, and hands the result to
//! the pure builders. Existing material is reused byte for byte while it is
//! valid, so reconciling twice changes nothing.

pub mod x509;

use std::fmt;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

use crate::build::{keys, secret_keys, short_hash};

/// Lifetime of an operator CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of a server certificate.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Certificates are replaced this long before they expire.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("reading a certificate: {0}")]
    X509(#[from] x509::X509Error),
}

/// A CA certificate and its private key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial").finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// Identifies this CA on the certificates it signed.
    pub fn hash(&self) -> String {
        short_hash(self.cert_pem.as_bytes())
    }
}

/// A server certificate, its key, and what it was issued for.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
    /// Hash of the DNS names it covers.
    pub dns_hash: String,
    /// Hash of the CA that signed it.
    pub ca_hash: String,
}

impl fmt::Debug for ServerMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerMaterial")
            .field("not_after", &self.not_after)
            .field("dns_hash", &self.dns_hash)
            .finish_non_exhaustive()
    }
}

/// What [`ensure`] did, for events and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    Nothing,
    ServerCertificate,
    CaAndServerCertificate,
}

/// The operator CA's subject. Signed certificates name it as issuer, so it
/// must be derivable again from the Broker alone.
fn ca_params(broker: &str, namespace: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Starling");
    dn.push(
        DnType::CommonName,
        format!("Starling CA {namespace}/{broker}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    // An hour of slack for clocks that are behind.
    let start = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    params.not_before = start.into();
    params.not_after = (now + lifetime).into();
}

/// A new CA for `namespace/broker`.
pub fn issue_ca(broker: &str, namespace: &str, now: SystemTime) -> Result<CaMaterial, TlsError> {
    let mut params = ca_params(broker, namespace);
    validity(&mut params, now, CA_VALIDITY);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A server certificate for `dns_names`, signed by `ca`.
pub fn issue_server(
    ca: &CaMaterial,
    broker: &str,
    namespace: &str,
    dns_names: &[String],
    now: SystemTime,
) -> Result<ServerMaterial, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::new(ca_params(broker, namespace), ca_key);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Starling");
    dn.push(
        DnType::CommonName,
        dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| broker.to_string()),
    );
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, now, SERVER_VALIDITY);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let cert_pem = cert.pem();
    Ok(ServerMaterial {
        not_after: x509::not_after(&cert_pem)?,
        cert_pem,
        key_pem: key.serialize_pem(),
        dns_hash: dns_hash(dns_names),
        ca_hash: ca.hash(),
    })
}

/// Hash of a list of DNS names (order matters: it is the SAN order).
pub fn dns_hash(dns_names: &[String]) -> String {
    short_hash(dns_names.join(",").as_bytes())
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn annotation(secret: &Secret, key: &str) -> Option<String> {
    secret.metadata.annotations.as_ref()?.get(key).cloned()
}

fn fresh(not_after: SystemTime, now: SystemTime) -> bool {
    not_after > now + RENEW_BEFORE
}

/// The CA in `secret`, if it is complete and not about to expire.
pub fn existing_ca(secret: Option<&Secret>, now: SystemTime) -> Option<CaMaterial> {
    let secret = secret?;
    let cert_pem = text(secret, secret_keys::TLS_CRT)?;
    let key_pem = text(secret, secret_keys::TLS_KEY)?;
    KeyPair::from_pem(&key_pem).ok()?;
    let not_after = x509::not_after(&cert_pem).ok()?;
    fresh(not_after, now).then_some(CaMaterial { cert_pem, key_pem })
}

/// The server certificate in `secret`, if `ca` signed it for exactly
/// `dns_names` and it is not about to expire.
pub fn existing_server(
    secret: Option<&Secret>,
    ca: &CaMaterial,
    dns_names: &[String],
    now: SystemTime,
) -> Option<ServerMaterial> {
    let secret = secret?;
    let cert_pem = text(secret, secret_keys::TLS_CRT)?;
    let key_pem = text(secret, secret_keys::TLS_KEY)?;
    let not_after = x509::not_after(&cert_pem).ok()?;
    let wanted_dns = dns_hash(dns_names);
    let ok = annotation(secret, keys::DNS_HASH).as_deref() == Some(wanted_dns.as_str())
        && annotation(secret, keys::CA_HASH) == Some(ca.hash())
        && fresh(not_after, now);
    ok.then_some(ServerMaterial {
        cert_pem,
        key_pem,
        not_after,
        dns_hash: wanted_dns,
        ca_hash: ca.hash(),
    })
}

/// CA and server certificate for a Broker using the operator's CA: the
/// existing ones when still good, new ones otherwise.
pub fn ensure(
    broker: &str,
    namespace: &str,
    dns_names: &[String],
    ca_secret: Option<&Secret>,
    tls_secret: Option<&Secret>,
    now: SystemTime,
) -> Result<(CaMaterial, ServerMaterial, Issued), TlsError> {
    let (ca, new_ca) = match existing_ca(ca_secret, now) {
        Some(ca) => (ca, false),
        None => (issue_ca(broker, namespace, now)?, true),
    };
    if let Some(server) = existing_server(tls_secret, &ca, dns_names, now) {
        return Ok((ca, server, Issued::Nothing));
    }
    let server = issue_server(&ca, broker, namespace, dns_names, now)?;
    let issued = if new_ca {
        Issued::CaAndServerCertificate
    } else {
        Issued::ServerCertificate
    };
    Ok((ca, server, issued))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tls::{ca_key_secret, server_secret};
    use crate::build::{BrokerCtx, snapshot::broker};

    fn names() -> Vec<String> {
        vec!["demo".into(), "demo.ns.svc".into()]
    }

    #[test]
    fn material_is_reused_until_something_changes() {
        let now = SystemTime::now();
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let (ca, server, issued) = ensure("demo", "ns", &names(), None, None, now).unwrap();
        assert_eq!(issued, Issued::CaAndServerCertificate);
        assert!(server.not_after > now + SERVER_VALIDITY - Duration::from_secs(60));
        let ca_secret = ca_key_secret(&ctx, &ca);
        let tls_secret = server_secret(&ctx, &server, &ca);

        // Same inputs: same bytes.
        let (ca2, server2, issued) = ensure(
            "demo",
            "ns",
            &names(),
            Some(&ca_secret),
            Some(&tls_secret),
            now,
        )
        .unwrap();
        assert_eq!(issued, Issued::Nothing);
        assert_eq!(ca2, ca);
        assert_eq!(server2, server);

        // New DNS name: new server certificate, same CA.
        let mut more = names();
        more.push("mqtt.example.com".into());
        let (ca3, server3, issued) = ensure(
            "demo",
            "ns",
            &more,
            Some(&ca_secret),
            Some(&tls_secret),
            now,
        )
        .unwrap();
        assert_eq!(issued, Issued::ServerCertificate);
        assert_eq!(ca3, ca);
        assert_ne!(server3.cert_pem, server.cert_pem);

        // Close to expiry: renewed.
        let later = server.not_after - Duration::from_secs(86_400);
        let (_, _, issued) = ensure(
            "demo",
            "ns",
            &names(),
            Some(&ca_secret),
            Some(&tls_secret),
            later,
        )
        .unwrap();
        assert_eq!(issued, Issued::ServerCertificate);
    }

    #[test]
    fn debug_output_hides_keys() {
        let ca = issue_ca("demo", "ns", SystemTime::now()).unwrap();
        let shown = format!("{ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
}

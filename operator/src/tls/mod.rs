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
    /// The CA this one replaced, while that one is still valid: the overlap
    /// in which clients holding only the old `ca.crt` keep working.
    pub previous: Option<PreviousCa>,
}

/// The replaced CA during a rollover. Its key is not kept: it was needed
/// once, to sign [`PreviousCa::cross_pem`].
#[derive(Clone, PartialEq, Eq)]
pub struct PreviousCa {
    pub cert_pem: String,
    /// The new CA's certificate (same subject and key) signed by the old
    /// CA. The server sends it after its own certificate, so a client that
    /// trusts only the old CA builds leaf → cross → old CA, and one that
    /// trusts the new CA stops at the new CA.
    pub cross_pem: String,
    pub not_after: SystemTime,
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

    /// What clients should trust (`ca.crt`): this CA, and during a rollover
    /// the previous one too, so a client given this bundle works before and
    /// after the switch.
    pub fn trust_bundle(&self) -> String {
        match &self.previous {
            Some(p) => format!("{}{}", self.cert_pem, p.cert_pem),
            None => self.cert_pem.clone(),
        }
    }

    /// What follows the server certificate in `tls.crt`: the cross-signed
    /// CA during a rollover, nothing otherwise.
    pub fn chain_extra(&self) -> &str {
        self.previous.as_ref().map_or("", |p| p.cross_pem.as_str())
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
        previous: None,
    })
}

/// A new CA replacing `old` (still valid, near its end): the new CA and the
/// cross-signed copy of it that keeps clients of `old` working until `old`
/// expires.
pub fn roll_ca(
    old: &CaMaterial,
    broker: &str,
    namespace: &str,
    now: SystemTime,
) -> Result<CaMaterial, TlsError> {
    let mut new = issue_ca(broker, namespace, now)?;
    let old_not_after = x509::not_after(&old.cert_pem)?;
    let old_issuer = Issuer::new(
        ca_params(broker, namespace),
        KeyPair::from_pem(&old.key_pem)?,
    );
    let new_key = KeyPair::from_pem(&new.key_pem)?;
    let mut params = ca_params(broker, namespace);
    params.use_authority_key_identifier_extension = true;
    // Valid no longer than the CA that signs it.
    let start = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    params.not_before = start.into();
    params.not_after = old_not_after.into();
    let cross = params.signed_by(&new_key, &old_issuer)?;
    new.previous = Some(PreviousCa {
        cert_pem: old.cert_pem.clone(),
        cross_pem: cross.pem(),
        not_after: old_not_after,
    });
    Ok(new)
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

/// The first PEM block of `pem`, with its line end.
fn first_pem(pem: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let end = pem.find(END)? + END.len();
    let end = pem[end..].find('\n').map_or(pem.len(), |i| end + i + 1);
    Some(pem[..end].to_string())
}

fn fresh(not_after: SystemTime, now: SystemTime) -> bool {
    not_after > now + RENEW_BEFORE
}

/// The CA in `secret` if it is complete and still valid at `now` (about to
/// expire or not), with its rollover overlap while the previous CA lasts.
fn stored_ca(secret: Option<&Secret>, now: SystemTime) -> Option<(CaMaterial, SystemTime)> {
    let secret = secret?;
    let cert_pem = text(secret, secret_keys::TLS_CRT)?;
    let key_pem = text(secret, secret_keys::TLS_KEY)?;
    KeyPair::from_pem(&key_pem).ok()?;
    let not_after = x509::not_after(&cert_pem).ok()?;
    if not_after <= now {
        return None;
    }
    let previous = match (
        text(secret, secret_keys::PREVIOUS_CA_CRT),
        text(secret, secret_keys::CROSS_CRT),
    ) {
        (Some(cert_pem), Some(cross_pem)) => x509::not_after(&cert_pem)
            .ok()
            .filter(|t| *t > now)
            .map(|not_after| PreviousCa {
                cert_pem,
                cross_pem,
                not_after,
            }),
        _ => None,
    };
    Some((
        CaMaterial {
            cert_pem,
            key_pem,
            previous,
        },
        not_after,
    ))
}

/// The CA in `secret`, if it is complete and not about to expire.
pub fn existing_ca(secret: Option<&Secret>, now: SystemTime) -> Option<CaMaterial> {
    stored_ca(secret, now).and_then(|(ca, not_after)| fresh(not_after, now).then_some(ca))
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
    // `tls.crt` is the server certificate, then (during a CA rollover) the
    // cross-signed CA, which is the CA's to add, not part of this material.
    let cert_pem = first_pem(&text(secret, secret_keys::TLS_CRT)?)?;
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
        // About to expire but still valid: roll over with an overlap.
        None => match stored_ca(ca_secret, now) {
            Some((old, _)) => (roll_ca(&old, broker, namespace, now)?, true),
            None => (issue_ca(broker, namespace, now)?, true),
        },
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

    /// Does a TLS client trusting `roots` accept `chain` for `demo` at `at`?
    /// rustls' own verifier (webpki), as the broker's clients use.
    fn verifies(chain: &str, roots: &str, at: SystemTime) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        use std::sync::Arc;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let mut store = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(roots.as_bytes()) {
            store.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .unwrap();
        let now = UnixTime::since_unix_epoch(at.duration_since(std::time::UNIX_EPOCH).unwrap());
        let name = ServerName::try_from("demo").unwrap();
        v.verify_server_cert(&certs[0], &certs[1..], &name, &[], now)
            .is_ok()
    }

    #[test]
    fn a_ca_rollover_keeps_clients_of_the_old_and_the_new_ca_working() {
        let t0 = SystemTime::now();
        let b = broker("demo", Default::default());
        let ctx = BrokerCtx::new(&b).unwrap();
        let (ca, server, _) = ensure("demo", "ns", &names(), None, None, t0).unwrap();
        let tls0 = server_secret(&ctx, &server, &ca);
        let old_client = text(&tls0, secret_keys::CA_CRT).unwrap();
        assert!(verifies(
            &text(&tls0, secret_keys::TLS_CRT).unwrap(),
            &old_client,
            t0
        ));

        // Inside the CA's renewal window: a new CA, cross-signed by the old.
        let ca_end = x509::not_after(&ca.cert_pem).unwrap();
        let t1 = ca_end - RENEW_BEFORE + Duration::from_secs(86_400);
        let (ca1, server1, issued) = ensure(
            "demo",
            "ns",
            &names(),
            Some(&ca_key_secret(&ctx, &ca)),
            Some(&tls0),
            t1,
        )
        .unwrap();
        assert_eq!(issued, Issued::CaAndServerCertificate);
        assert_ne!(ca1.cert_pem, ca.cert_pem);
        assert_eq!(ca1.previous.as_ref().unwrap().cert_pem, ca.cert_pem);
        let tls1 = server_secret(&ctx, &server1, &ca1);
        let chain = text(&tls1, secret_keys::TLS_CRT).unwrap();
        let bundle = text(&tls1, secret_keys::CA_CRT).unwrap();
        assert!(
            verifies(&chain, &old_client, t1),
            "a client with the old ca.crt"
        );
        assert!(
            verifies(&chain, &ca1.cert_pem, t1),
            "a client with only the new CA"
        );
        assert!(
            verifies(&chain, &bundle, t1),
            "a client with the new ca.crt"
        );
        // Without the cross certificate the old client would be cut off.
        assert!(!verifies(&server1.cert_pem, &old_client, t1));

        // Reconciling again during the overlap changes nothing.
        let ca_secret1 = ca_key_secret(&ctx, &ca1);
        let (ca2, server2, issued) =
            ensure("demo", "ns", &names(), Some(&ca_secret1), Some(&tls1), t1).unwrap();
        assert_eq!(issued, Issued::Nothing);
        assert_eq!((ca2.clone(), server2), (ca1.clone(), server1.clone()));

        // Once the old CA has expired the overlap ends: ca.crt and tls.crt
        // carry the new CA alone, and new-CA clients still verify.
        let t2 = ca_end + Duration::from_secs(86_400);
        let (ca3, server3, _) =
            ensure("demo", "ns", &names(), Some(&ca_secret1), Some(&tls1), t2).unwrap();
        assert!(ca3.previous.is_none());
        assert_eq!(ca3.cert_pem, ca1.cert_pem);
        let tls3 = server_secret(&ctx, &server3, &ca3);
        assert_eq!(text(&tls3, secret_keys::CA_CRT).unwrap(), ca1.cert_pem);
        assert!(verifies(
            &text(&tls3, secret_keys::TLS_CRT).unwrap(),
            &ca1.cert_pem,
            t2
        ));
    }

    #[test]
    fn debug_output_hides_keys() {
        let ca = issue_ca("demo", "ns", SystemTime::now()).unwrap();
        let shown = format!("{ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
}

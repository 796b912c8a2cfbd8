//! TLS server configuration with certificates that can change under a
//! running broker: a cert-manager renewal or a rewritten Secret takes effect
//! for new handshakes without a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use crate::file_stamp::stamp;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what` names the file, or the Secret and key, it came from.
    #[error("cannot read certificate chain {what}: {source}")]
    Cert {
        what: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCert(String),
    #[error("cannot read private key {what}: {source}")]
    Key {
        what: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("private key {what} is not usable: {source}")]
    KeyType { what: String, source: rustls::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM chain and key into a rustls certified key.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    parse_pem(
        &read(cert)?,
        &read(key)?,
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// [`load_pem`] for PEM bytes from `origin` (a Secret's `tls.crt`/`tls.key`).
pub fn load_pem_bytes(cert: &[u8], key: &[u8], origin: &str) -> Result<CertifiedKey, TlsError> {
    parse_pem(
        cert,
        key,
        &format!("{origin} tls.crt"),
        &format!("{origin} tls.key"),
    )
}

fn parse_pem(
    cert: &[u8],
    key: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Cert {
            what: cert_name.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(cert_name.to_owned()));
    }
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Key {
        what: key_name.to_owned(),
        source,
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::KeyType {
            what: key_name.to_owned(),
            source,
        })?;
    Ok(CertifiedKey::new(chain, signing))
}

/// A development certificate for localhost, made at startup.
pub fn self_signed() -> Result<CertifiedKey, TlsError> {
    let made = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    let der = PrivateKeyDer::try_from(made.signing_key.serialize_der())
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let signing = provider().key_provider.load_private_key(der)?;
    Ok(CertifiedKey::new(vec![made.cert.der().clone()], signing))
}

/// Hands out whichever certificate is current.
#[derive(Debug)]
pub struct ReloadingResolver {
    current: RwLock<Arc<CertifiedKey>>,
    /// The TLS Secret is watched through the API server and current: the
    /// mounted files, which lag, are then not read.
    api_live: AtomicBool,
}

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(ReloadingResolver {
            current: RwLock::new(Arc::new(key)),
            api_live: AtomicBool::new(false),
        })
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// Replaces the certificate unless `key` carries the same chain; says
    /// whether it did (the Secret watch and the file poll see each
    /// rotation, one of them only should log it).
    pub fn replace_if_new(&self, key: CertifiedKey) -> bool {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        if cur.cert == key.cert {
            return false;
        }
        *cur = Arc::new(key);
        true
    }

    pub fn set_api_live(&self, live: bool) {
        self.api_live.store(live, Ordering::Relaxed);
    }

    fn api_live(&self) -> bool {
        self.api_live.load(Ordering::Relaxed)
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A rustls server config using `resolver`, offering `alpn` protocols.
pub fn server_config(
    resolver: Arc<ReloadingResolver>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Polls the certificate and key files and swaps them in when they change.
/// A broken new pair is logged and the old one stays in use.
pub fn watch(resolver: Arc<ReloadingResolver>, cert: PathBuf, key: PathBuf, every: Duration) {
    tokio::spawn(async move {
        let mut last = (stamp(&cert), stamp(&key));
        loop {
            tokio::time::sleep(every).await;
            let now = (stamp(&cert), stamp(&key));
            if now == last {
                continue;
            }
            last = now;
            if resolver.api_live() {
                continue;
            }
            match load_pem(&cert, &key) {
                Ok(k) => {
                    if resolver.replace_if_new(k) {
                        tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate rejected; keeping the old one")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair(name: &str) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    #[test]
    fn pem_from_a_secret_loads_and_only_a_new_chain_replaces() {
        let (c1, k1) = pem_pair("one.example");
        let (c2, k2) = pem_pair("two.example");
        let first = load_pem_bytes(c1.as_bytes(), k1.as_bytes(), "Secret ns/x").unwrap();
        let r = ReloadingResolver::new(first);
        let same = load_pem_bytes(c1.as_bytes(), k1.as_bytes(), "Secret ns/x").unwrap();
        assert!(
            !r.replace_if_new(same),
            "the same chain again is not a rotation"
        );
        let second = load_pem_bytes(c2.as_bytes(), k2.as_bytes(), "Secret ns/x").unwrap();
        assert!(r.replace_if_new(second));
        let e = load_pem_bytes(b"not pem", k1.as_bytes(), "Secret ns/x")
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "Secret ns/x tls.crt holds no certificate");
        let e = load_pem_bytes(c1.as_bytes(), b"", "Secret ns/x")
            .err()
            .unwrap();
        assert!(e.to_string().contains("Secret ns/x tls.key"), "{e}");
    }
}

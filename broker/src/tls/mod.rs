//! TLS server configuration with certificates that can change under a
//! running broker: a cert-manager renewal or a rewritten Secret takes effect
//! for new handshakes without a restart.

use std::path::{Path, PathBuf};
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
    #[error("cannot read certificate chain {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate file {0} holds no certificate")]
    NoCert(PathBuf),
    #[error("cannot read private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("private key {path} is not usable: {source}")]
    KeyType {
        path: PathBuf,
        source: rustls::Error,
    },
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
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(cert.to_path_buf()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::KeyType {
            path: key.to_path_buf(),
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
}

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(ReloadingResolver {
            current: RwLock::new(Arc::new(key)),
        })
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
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
            match load_pem(&cert, &key) {
                Ok(k) => {
                    resolver.replace(k);
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate rejected; keeping the old one")
                }
            }
        }
    });
}

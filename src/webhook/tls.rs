//! The serving certificate, reloaded when its files change: new connections get the new
//! certificate, open connections keep theirs, nothing restarts. A pair that fails to load is
//! reported and the last good one kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

/// A certificate or key that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("cannot read TLS key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS key {path} is not a supported ECDSA, Ed25519 or RSA key: {message}")]
    KeyType { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a PEM certificate chain and key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_path_buf(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            message: "no PEM certificate in the file".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    let signing = any_supported_type(&private).map_err(|e| TlsError::KeyType {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: format!("the key does not belong to the certificate: {e}"),
    })?;
    Ok(certified)
}

/// The current certificate, swapped in place on reload.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Whether a reload found new files.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
}

impl ReloadingCert {
    /// Loads the pair; fails when it cannot be used, so a server never starts without one.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let stamp = (modified(cert_path), modified(key_path));
        let key = Arc::new(load_certified_key(cert_path, key_path)?);
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Loaded { key, stamp }),
        })
    }

    /// When the serving certificate (the first of the chain) expires, in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        let loaded = self.current.read().ok()?;
        let leaf = loaded.key.cert.first()?;
        let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        Some(certificate.validity().not_after.timestamp())
    }

    /// Reloads the pair when either file changed. On error the last good pair stays.
    pub fn reload_if_changed(&self) -> Result<Reload, TlsError> {
        let stamp = (modified(&self.cert_path), modified(&self.key_path));
        let unchanged = self
            .current
            .read()
            .map(|loaded| loaded.stamp == stamp)
            .unwrap_or(false);
        if unchanged {
            return Ok(Reload::Unchanged);
        }
        let result = load_certified_key(&self.cert_path, &self.key_path);
        if let Ok(mut loaded) = self.current.write() {
            // Remember the stamp either way: a bad pair is reported once, not on every poll.
            loaded.stamp = stamp;
            if let Ok(key) = &result {
                loaded.key = Arc::new(key.clone());
            }
        }
        result.map(|_| Reload::Reloaded)
    }

    /// A rustls server configuration (TLS 1.2 and 1.3, HTTP/1.1) serving this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|loaded| loaded.key.clone())
    }
}

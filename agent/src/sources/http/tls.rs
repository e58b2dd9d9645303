//! HTTPS for http sources: rustls (TLS 1.2 and 1.3, ALPN http/1.1) with a
//! certificate that is re-read when its files change, and optional client
//! certificates whose subject becomes the events' `client_id`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::HttpTlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}; it must exist and be readable by silt's user")]
    Read { path: PathBuf, error: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("key {key} does not serve certificate {cert}: {error}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    #[error("client_ca_file {path} cannot verify clients: {error}")]
    ClientCa { path: PathBuf, error: String },
}

/// How often a handshake may look at the certificate files for a change.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The acceptor for a source's `tls` table; fails at start on any file
/// that does not load, so a typo never turns into a plain-text port.
pub fn acceptor(config: &HttpTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = crate::tls::provider();
    let certificate = RotatingCertificate::load(config, provider.clone())?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring serves TLS 1.2 and 1.3");
    let builder = match &config.client_ca_file {
        Some(path) => {
            let client_ca = |error: String| TlsError::ClientCa {
                path: path.clone(),
                error,
            };
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(path)? {
                roots.add(cert).map_err(|e| client_ca(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| client_ca(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(Arc::new(certificate));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The identity of a verified client certificate: its subject's CN, else
/// its first DNS, URI or e-mail SAN.
pub fn client_id(connection: &rustls::ServerConnection) -> Option<String> {
    let der = connection.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok().map(str::to_string));
    common_name.or_else(|| {
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(s)
            | x509_parser::extensions::GeneralName::URI(s)
            | x509_parser::extensions::GeneralName::RFC822Name(s) => Some(s.to_string()),
            _ => None,
        })
    })
}

/// Serves the certificate in `cert_file`/`key_file` and loads them again
/// when either file changes. A pair that does not load (a rotation caught
/// halfway, between the two writes) keeps the previous certificate in use.
#[derive(Debug)]
struct RotatingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    loaded: Stamp,
    /// The last pair that failed to load, so it is reported once.
    failed: Option<Stamp>,
    checked: Instant,
}

/// Modification time and length of both files.
type Stamp = [(Option<SystemTime>, u64); 2];

impl RotatingCertificate {
    fn load(
        config: &HttpTlsConfig,
        provider: Arc<CryptoProvider>,
    ) -> Result<RotatingCertificate, TlsError> {
        let loaded = stamp(&config.cert_file, &config.key_file);
        let key = load_pair(&config.cert_file, &config.key_file, &provider)?;
        Ok(RotatingCertificate {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider,
            current: Mutex::new(Current {
                key: Arc::new(key),
                loaded,
                failed: None,
                checked: Instant::now(),
            }),
        })
    }
}

impl ResolvesServerCert for RotatingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() >= RECHECK_EVERY {
            current.checked = Instant::now();
            let now = stamp(&self.cert_file, &self.key_file);
            if now != current.loaded && current.failed != Some(now) {
                match load_pair(&self.cert_file, &self.key_file, &self.provider) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert_file.display(), "tls certificate changed on disk; new connections get the new one");
                        current.key = Arc::new(key);
                        current.loaded = now;
                        current.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "tls certificate files changed but do not load; still serving the previous certificate");
                        current.failed = Some(now);
                    }
                }
            }
        }
        Some(current.key.clone())
    }
}

fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    [cert_file, key_file].map(|path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    })
}

fn load_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = read_certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Read {
        path: key_file.to_path_buf(),
        error: e.to_string(),
    })?;
    CertifiedKey::from_der(certs, key, provider).map_err(|error| TlsError::Key {
        cert: cert_file.to_path_buf(),
        key: key_file.to_path_buf(),
        error,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |e: rustls::pki_types::pem::Error| TlsError::Read {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

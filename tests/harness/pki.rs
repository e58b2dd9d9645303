//! Certificates made per test (rcgen) and a minimal HTTPS/1.1 client
//! (tokio-rustls) that can present a client certificate and report the
//! certificate the server showed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority whose files live in a test's directory.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert_file: PathBuf,
    dir: PathBuf,
}

/// A certificate and key written as PEM files.
#[derive(Clone)]
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let cert_file = dir.join(format!("{name}.crt"));
        std::fs::write(&cert_file, issuer.pem()).unwrap();
        Ca {
            issuer,
            cert_file,
            dir: dir.to_path_buf(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, files `{file}.crt/.key`.
    pub fn server(&self, file: &str) -> Issued {
        self.issue(
            file,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with subject CN `common_name`.
    pub fn client(&self, file: &str, common_name: &str) -> Issued {
        self.issue(file, common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        file: &str,
        common_name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            cert_file: self.dir.join(format!("{file}.crt")),
            key_file: self.dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&issued.cert_file, cert.pem()).unwrap();
        std::fs::write(&issued.key_file, key.serialize_pem()).unwrap();
        issued
    }
}

/// What one HTTPS request got: the status, and the DER certificate the
/// server presented.
pub struct TlsReply {
    pub status: u16,
    pub server_cert: Vec<u8>,
}

/// A TLS connection to 127.0.0.1:`port` trusting `ca_file`, presenting
/// `client` when given; Err when the handshake fails.
pub async fn connect(
    port: u16,
    ca_file: &Path,
    client: Option<&Issued>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let provider = silt::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let chain = CertificateDer::pem_file_iter(&c.cert_file)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(&c.key_file).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// Sends one `POST path` with `body` on `stream` (keep-alive) and reads the
/// reply's status; Err when the server refuses or closes.
pub async fn post(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<TlsReply, String> {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let server_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let head = read_head(stream).await?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    Ok(TlsReply {
        status,
        server_cert,
    })
}

/// Reads a reply's head and its `content-length` body.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<String, String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(0) => return Err(format!("connection closed after {} bytes", buf.len())),
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("read body: {e}"))?;
    Ok(head)
}

/// One connection, one request: [`connect`] then [`post`].
pub async fn post_once(
    port: u16,
    ca_file: &Path,
    client: Option<&Issued>,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<TlsReply, String> {
    let mut stream = connect(port, ca_file, client).await?;
    post(&mut stream, path, token, body).await
}

/// A TLS acceptor serving `cert` (server side of a test's HTTPS/TLS peer).
pub fn acceptor(cert: &Issued) -> tokio_rustls::TlsAcceptor {
    let chain = CertificateDer::pem_file_iter(&cert.cert_file)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key_file).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(silt::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

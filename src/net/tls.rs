//! The only rustls setup code: certificates and keys from PEM files, SNI selection, the
//! server and client configurations. Loaded at startup and on SIGHUP, never on the hot path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// A certificate chain file and its private key file (`--cert`/`--key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A TLS setup problem; `Display` names the file at fault in one line.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read or held no usable item.
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        why: String,
    },
    /// rustls refused the combination (e.g. key does not match the certificate).
    Config(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::File { path, why } => write!(f, "{}: {why}", path.display()),
            TlsError::Config(why) => write!(f, "tls: {why}"),
        }
    }
}

impl std::error::Error for TlsError {}

fn file_error(path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// Loads one pair into a signing-ready key, checking that key and certificate match.
fn certified_key(pair: &CertPair) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&pair.cert)?;
    let key = load_key(&pair.key)?;
    let ck = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        file_error(
            &pair.key,
            format!("does not fit {}: {e}", pair.cert.display()),
        )
    })?;
    Ok(Arc::new(ck))
}

/// Picks the certificate whose names cover the client's SNI; the first pair otherwise.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

fn covers(key: &CertifiedKey, name: &str) -> bool {
    let (Some(leaf), Ok(server_name)) = (key.cert.first(), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&server_name).is_ok())
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            if let Some(k) = self.keys.iter().find(|k| covers(k, name)) {
                return Some(k.clone());
            }
        }
        self.keys.first().cloned()
    }
}

/// Server configuration for the TLS listeners: TLS 1.2 and 1.3, ALPN `http/1.1`, one
/// certificate per SNI name.
pub fn server_config(pairs: &[CertPair]) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(pairs, None)
}

/// The control listener's configuration: the same certificates and, with `client_ca`
/// (`--control-client-ca`), client certificates verified against that CA. They stay
/// optional at the TLS layer (the admin API and token holders need none); a verified one
/// names the only guid its holder may register.
pub fn control_server_config(
    pairs: &[CertPair],
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let Some(path) = client_ca else {
        return build_server_config(pairs, None);
    };
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| file_error(path, e))?;
    build_server_config(pairs, Some(verifier))
}

fn build_server_config(
    pairs: &[CertPair],
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let keys = pairs
        .iter()
        .map(certified_key)
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(TlsError::Config("no --cert/--key pair given".into()));
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver { keys }));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption by stateless tickets (TLS 1.2 and 1.3): a returning client skips the
    // signature, the dearest part of a handshake on a small host, and the balancer keeps no
    // per-session memory (the default cache holds 256 sessions). Keys rotate every 6 hours.
    cfg.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The name a client certificate (already verified by rustls against
/// `--control-client-ca`) carries: its first DNS subject alternative name. The subject CN is
/// not read: webpki, which verified the chain, ignores CN for names, and so do we.
pub fn client_cert_name(conn: &rustls::CommonState) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    let ee = webpki::EndEntityCert::try_from(leaf).ok()?;
    ee.valid_dns_names().next().map(str::to_string)
}

/// Accepts any server certificate, still checking the handshake signatures: for
/// `--backend-insecure` (development only) and the benchmark's self-signed certificates.
#[derive(Debug)]
pub struct AcceptAnything(Arc<CryptoProvider>);

impl AcceptAnything {
    /// With the ring provider's signature algorithms.
    pub fn new() -> Arc<Self> {
        Arc::new(AcceptAnything(provider()))
    }
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Client configuration for `wss://`/`https://` backends: `ca` file, or the platform's roots;
/// `insecure` skips verification.
pub fn client_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(AcceptAnything::new())
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in load_certs(path)? {
                    roots.add(cert).map_err(|e| file_error(path, e))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    crate::observe::log::error(
                        "no platform trust roots found: wss:// backends need --backend-ca",
                        &[],
                    );
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client-side rustls connection to a backend named `name` (sent as SNI).
pub fn connect(
    cfg: &Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<rustls::Connection, rustls::Error> {
    rustls::ClientConnection::new(cfg.clone(), name).map(rustls::Connection::from)
}

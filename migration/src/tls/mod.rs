//! Mutual TLS 1.3 for `tcp:` migrations (rustls on ring, in user space).
//!
//! Both ends load a directory in Cloud Hypervisor's layout: `ca.pem` (the CA that signs every
//! host's certificate), `cert.pem` (this host's certificate chain), `key.pem` (its private key,
//! mode 0600: a key that group or others may read is refused). The source verifies the
//! destination's certificate against the CA and against the name it connected to (the `HOST`
//! of `tcp:HOST:PORT`, or `--tls-name`); the destination verifies the source's against the CA
//! and, when given an [`AllowList`], requires the certificate's subject CN or one of its DNS
//! subject alternative names to be on it.
//!
//! ```text
//!  source                                   destination
//!  connect (tcp)                            accept (tcp)
//!  ClientHello ───────────────────────────▶ first byte not a TLS record: plaintext source,
//!                                           told so in a plaintext Error record
//!            ◀───────────────────────────── ServerHello … Certificate, CertificateRequest,
//!  verify: CA, name                         Finished
//!  Certificate, Finished ─────────────────▶ verify: CA, allow-list (alert access_denied)
//!  the migration stream, encrypted ◀──────▶ the replies, encrypted
//! ```
//!
//! The handshake runs under the caller's deadline, each read and write re-armed with what is
//! left of it like every other wait on a [`Connection`](crate::Connection). A failure names its
//! cause on both ends: a certificate not signed by the CA, expired, not valid for the name, not
//! allowed; a peer that speaks plaintext to a TLS endpoint or TLS to a plaintext one. No
//! session resumption, no tickets, no TLS 1.2: each migration is one full handshake. The
//! connection is never closed with `close_notify`: the stream's own framing (`End`, the
//! checksum chain, the replies) tells a complete migration from a truncated one.
//!
//! Kernel TLS (handing the record layer to the kernel after the handshake) is not used: the
//! kernel this was developed on has no `tls` module (see the README's figures).
//!
//! Nothing here logs key material: keys are read into a buffer that is wiped after parsing,
//! and rustls keeps them to itself.
//!
//! Here: loading and checking a TLS directory and the rustls configurations of both ends
//! ([`TlsClient`], [`TlsServer`], the allow-list verifier); in `identity.rs` who a peer is
//! ([`AllowList`], [`PeerIdentity`]); in `stream.rs` the connection itself (handshake under a
//! deadline, failures explained, bounded reads and writes).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use zeroize::Zeroize;

mod identity;
mod stream;
#[cfg(test)]
mod tests;

pub use identity::{AllowList, AllowMatch, PeerIdentity};
pub(crate) use stream::TlsStream;

/// The CA certificate(s) in a TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// This host's certificate (chain) in a TLS directory.
pub const CERT_FILE: &str = "cert.pem";
/// This host's private key in a TLS directory.
pub const KEY_FILE: &str = "key.pem";
/// Largest PEM file read.
pub const MAX_PEM_LEN: u64 = 1 << 20;
/// Encrypted bytes rustls may hold before they must go to the socket (its default, 64 KiB,
/// costs a `sendmsg` every four records).
const SEND_BUFFER: usize = 4 << 20;

/// Errors loading a TLS directory or making a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error("{} is {size} bytes, the limit is {MAX_PEM_LEN}", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "{} has mode {mode:04o}: a private key must not be readable or writable by group or \
         others (chmod 600 it)", path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("The CA certificate in {} cannot be used", .0.display())]
    Ca(PathBuf, #[source] rustls::Error),
    #[error("The certificate and key in {} cannot be used", .0.display())]
    Identity(PathBuf, #[source] rustls::Error),
    #[error("{0:?} is not a TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    #[error("TLS needs a tcp: connection, not {0}")]
    NotTcp(String),
    #[error("{} does not verify against {}", cert.display(), ca.display())]
    Check {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS handshake with {peer} failed: {cause}")]
    Handshake {
        peer: String,
        cause: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "TLS peer {peer} presented a certificate for {identity}, which --tls-allow does not \
         name (allowed: {allowed})"
    )]
    NotAllowed {
        peer: String,
        identity: PeerIdentity,
        allowed: String,
    },
    #[error(
        "{peer} sent a plaintext migration stream to this TLS endpoint: the source must \
         migrate with --tls-dir (it was told so)"
    )]
    PlaintextSource { peer: String },
    #[error(
        "The destination {peer} does not speak TLS: it listens without --tls-dir{}",
        said.as_ref().map(|s| format!("; it said: {s}")).unwrap_or_default()
    )]
    PlaintextDestination { peer: String, said: Option<String> },
    #[error("{peer} closed the connection during the TLS handshake")]
    Closed { peer: String },
    #[error("{peer} closed the connection before sending anything")]
    Empty { peer: String },
    #[error("TLS handshake with {peer} failed")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
}

impl TlsError {
    /// A connection that closed before sending a byte: a probe (a health check), not a
    /// migration attempt.
    pub fn is_empty_connection(&self) -> bool {
        matches!(self, TlsError::Empty { .. })
    }
}

/// What a TLS directory holds, parsed.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    dir: PathBuf,
}

impl Material {
    fn load(dir: &Path) -> Result<Material, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let mut roots = RootCertStore::empty();
        for ca in certificates(&ca_path)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Ca(ca_path.clone(), e))?;
        }
        let chain = certificates(&dir.join(CERT_FILE))?;
        let key = private_key(&dir.join(KEY_FILE))?;
        Ok(Material {
            roots: Arc::new(roots),
            chain,
            key,
            dir: dir.to_path_buf(),
        })
    }

    fn ca(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first: it moves more bytes per CPU second than
/// AES-256-GCM (the README has the figures), and both ends prefer it.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// Reads a PEM file of at most [`MAX_PEM_LEN`] bytes from an open file.
fn read_pem(path: &Path, mut file: File) -> Result<Vec<u8>, TlsError> {
    let size = file
        .metadata()
        .map_err(|e| TlsError::Read(path.to_path_buf(), e))?
        .len();
    if size > MAX_PEM_LEN {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_PEM_LEN)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::Read(path.to_path_buf(), e))?;
    Ok(bytes)
}

fn open(path: &Path) -> Result<File, TlsError> {
    File::open(path).map_err(|e| TlsError::Read(path.to_path_buf(), e))
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path, open(path)?)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The private key in a PEM file, which group and others must not be able to read or write.
/// The mode is checked on the file that is then read (no window between the two).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = open(path)?;
    let mode = file
        .metadata()
        .map_err(|e| TlsError::Read(path.to_path_buf(), e))?
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut pem = read_pem(path, file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem);
    pem.zeroize();
    key.map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_path_buf()),
        // The error names the PEM problem, never the key's bytes.
        e => TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// The source's side: this host's certificate and key, and the CA the destination's
/// certificate must be signed by.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    ca: PathBuf,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient").field("ca", &self.ca).finish()
    }
}

impl TlsClient {
    /// Loads `dir` (`ca.pem`, `cert.pem`, `key.pem`).
    pub fn load(dir: &Path) -> Result<TlsClient, TlsError> {
        let m = Material::load(dir)?;
        let key_path = dir.join(KEY_FILE);
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Identity(key_path.clone(), e))?
            .with_root_certificates(m.roots.clone())
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
            .map_err(|e| TlsError::Identity(key_path, e))?;
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            ca: m.ca(),
        })
    }

    /// A client session that expects the destination's certificate to be valid for `name`
    /// (a DNS name or an IP address).
    fn session(&self, name: &str) -> Result<rustls::ClientConnection, TlsError> {
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::ServerName(name.to_string()))?;
        let mut c = rustls::ClientConnection::new(self.config.clone(), server_name)
            .map_err(|e| TlsError::Identity(self.ca.clone(), e))?;
        c.set_buffer_limit(Some(SEND_BUFFER));
        Ok(c)
    }

    /// The CA file, for messages.
    fn ca(&self) -> &Path {
        &self.ca
    }
}

/// The destination's side: this host's certificate and key, the CA every source's certificate
/// must be signed by, and the subjects allowed to connect.
pub struct TlsServer {
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    allow: AllowList,
    dir: PathBuf,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("dir", &self.dir)
            .field("allow", &self.allow)
            .finish()
    }
}

impl TlsServer {
    /// Loads `dir` (`ca.pem`, `cert.pem`, `key.pem`); `allow` restricts the sources (empty:
    /// any certificate the CA signed).
    pub fn load(dir: &Path, allow: AllowList) -> Result<TlsServer, TlsError> {
        let m = Material::load(dir)?;
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Ca(m.ca(), rustls::Error::General(e.to_string())))?;
        let server = TlsServer {
            provider,
            verifier,
            chain: m.chain,
            key: m.key,
            allow,
            dir: m.dir,
        };
        // The certificate and key are checked now, not at the first connection.
        server.session()?;
        Ok(server)
    }

    /// A server session for one connection, and where its verifier puts the identity of a
    /// source it refused for the allow-list.
    fn session(&self) -> Result<(rustls::ServerConnection, Refused), TlsError> {
        let refused = Refused::default();
        let verifier = Arc::new(AllowListVerifier {
            inner: self.verifier.clone(),
            allow: self.allow.clone(),
            refused: refused.clone(),
        });
        let key_path = self.dir.join(KEY_FILE);
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Identity(key_path.clone(), e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Identity(key_path.clone(), e))?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        let mut c = rustls::ServerConnection::new(Arc::new(config))
            .map_err(|e| TlsError::Identity(key_path, e))?;
        c.set_buffer_limit(Some(SEND_BUFFER));
        Ok((c, refused))
    }

    /// The subjects allowed to connect.
    pub fn allow(&self) -> &AllowList {
        &self.allow
    }

    /// The CA file, for messages.
    fn ca(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }
}

/// Whether `name` is a name a destination can be reached by: a DNS name or an IP address.
pub fn server_name_ok(name: &str) -> bool {
    ServerName::try_from(name).is_ok()
}

/// The identity of the first certificate in a PEM text.
pub fn pem_identity(pem: &[u8]) -> Option<PeerIdentity> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    Some(PeerIdentity::from_der(&der))
}

/// Checks a TLS directory as both ends will: its key is private and fits its certificate, and
/// the certificate is signed by the CA for both uses (a destination valid for `name`, a
/// source). Returns the certificate's identity.
pub fn check_dir(dir: &Path, name: &str) -> Result<PeerIdentity, TlsError> {
    TlsClient::load(dir)?;
    TlsServer::load(dir, AllowList::default())?;
    let m = Material::load(dir)?;
    let (leaf, intermediates) = m
        .chain
        .split_first()
        .ok_or_else(|| TlsError::NoCertificate(dir.join(CERT_FILE)))?;
    let failed = |source| TlsError::Check {
        cert: dir.join(CERT_FILE),
        ca: m.ca(),
        source,
    };
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.into()))?;
    let now = UnixTime::now();
    rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| failed(rustls::Error::General(e.to_string())))?
        .verify_server_cert(leaf, intermediates, &server_name, &[], now)
        .map_err(failed)?;
    WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| failed(rustls::Error::General(e.to_string())))?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(failed)?;
    Ok(PeerIdentity::from_der(leaf))
}

/// Where the verifier of one connection leaves the identity it refused.
#[derive(Clone, Debug, Default)]
struct Refused(Arc<Mutex<Option<PeerIdentity>>>);

impl Refused {
    fn take(&self) -> Option<PeerIdentity> {
        crate::sync::lock(&self.0).take()
    }
}

/// The CA's verdict (webpki), then the allow-list's.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: AllowList,
    refused: Refused,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let identity = PeerIdentity::from_der(end_entity);
        if self.allow.check(&identity).is_some() {
            return Ok(verified);
        }
        *crate::sync::lock(&self.refused.0) = Some(identity);
        // Sent to the source as the alert access_denied.
        Err(CertificateError::ApplicationVerificationFailure.into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

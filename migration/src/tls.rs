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

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
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
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use zeroize::Zeroize;

use crate::deadline::Bound;
use crate::wire::{RecordHeader, RecordKind, MAX_MESSAGE_LEN, RECORD_HEADER_LEN};

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
/// Longest certificate subject shown.
const MAX_SUBJECT_LEN: usize = 512;

/// TLS record content types (the first byte of a record): alert and handshake.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

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

/// The certificate subjects a destination accepts (`--tls-allow`): a name matches a
/// certificate whose subject common name (CN) is that name, or that lists it as a DNS subject
/// alternative name. Exact matches, ASCII case-insensitive; no wildcards. Empty: any
/// certificate the CA signed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(Vec<String>);

/// Which part of a certificate matched an [`AllowList`] entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowMatch {
    /// The subject's common name.
    CommonName(String),
    /// A DNS subject alternative name.
    DnsName(String),
}

impl fmt::Display for AllowMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowMatch::CommonName(n) => write!(f, "--tls-allow {n} by subject CN"),
            AllowMatch::DnsName(n) => write!(f, "--tls-allow {n} by DNS name"),
        }
    }
}

impl AllowList {
    pub fn new(names: Vec<String>) -> AllowList {
        AllowList(names)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entry `identity` matches, and by what; `None` if it matches none.
    pub fn check(&self, identity: &PeerIdentity) -> Option<AllowMatch> {
        let named = |n: &str| self.0.iter().find(|a| a.eq_ignore_ascii_case(n));
        if let Some(a) = identity.common_name.as_deref().and_then(named) {
            return Some(AllowMatch::CommonName(a.clone()));
        }
        identity
            .dns_names
            .iter()
            .find_map(|n| named(n))
            .map(|a| AllowMatch::DnsName(a.clone()))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "any certificate the CA signed");
        }
        write!(f, "{}", self.0.join(", "))
    }
}

/// Who the peer's certificate says it is: its subject (the attributes known by name, as
/// `CN=…, O=…`), and its DNS subject alternative names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub subject: String,
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subject.is_empty() {
            write!(f, "an empty subject")?;
        } else {
            write!(f, "{}", self.subject)?;
        }
        if !self.dns_names.is_empty() {
            write!(f, " (DNS {})", self.dns_names.join(", "))?;
        }
        Ok(())
    }
}

impl PeerIdentity {
    /// Reads the subject and the DNS names of a DER certificate; what cannot be read stays
    /// empty (the certificate was verified before: this is for the allow-list and the logs).
    pub fn from_der(cert: &[u8]) -> PeerIdentity {
        x509::identity(cert).unwrap_or_default()
    }
}

/// Just enough DER to read a certificate's subject and DNS names.
mod x509 {
    use super::{printable, PeerIdentity, MAX_SUBJECT_LEN};

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const INTEGER: u8 = 0x02;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    /// `[0] EXPLICIT Version`.
    const VERSION: u8 = 0xa0;
    /// `[3] EXPLICIT Extensions`.
    const EXTENSIONS: u8 = 0xa3;
    /// `GeneralName` `dNSName [2] IA5String`.
    const DNS_NAME: u8 = 0x82;
    /// id-ce-subjectAltName, 2.5.29.17.
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

    /// DER elements one after another.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        /// The next element's tag and contents (`None` at the end or on malformed input).
        fn next(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.0.split_first()?;
            let (&first, rest) = rest.split_first()?;
            let (len, rest) = if first < 0x80 {
                (usize::from(first), rest)
            } else {
                let n = usize::from(first & 0x7f);
                if n == 0 || n > 4 || rest.len() < n {
                    return None;
                }
                let len = rest[..n]
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                (len, &rest[n..])
            };
            if rest.len() < len {
                return None;
            }
            let (contents, rest) = rest.split_at(len);
            self.0 = rest;
            Some((tag, contents))
        }

        /// The next element's contents if it has `tag`.
        fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
            match self.next()? {
                (t, contents) if t == tag => Some(contents),
                _ => None,
            }
        }
    }

    pub(super) fn identity(cert: &[u8]) -> Option<PeerIdentity> {
        let cert = Reader(cert).expect(SEQUENCE)?;
        let mut tbs = Reader(Reader(cert).expect(SEQUENCE)?);
        let (mut tag, _) = tbs.next()?;
        if tag == VERSION {
            tag = tbs.next()?.0;
        }
        if tag != INTEGER {
            return None;
        }
        tbs.expect(SEQUENCE)?; // signature algorithm
        tbs.expect(SEQUENCE)?; // issuer
        tbs.expect(SEQUENCE)?; // validity
        let subject = tbs.expect(SEQUENCE)?;
        tbs.expect(SEQUENCE)?; // public key
        let (subject, common_name) = name(subject);
        let mut dns_names = Vec::new();
        while let Some((tag, contents)) = tbs.next() {
            if tag == EXTENSIONS {
                dns_names = alt_dns_names(contents);
            }
        }
        Some(PeerIdentity {
            subject,
            common_name,
            dns_names,
        })
    }

    /// A `Name` as `CN=…, O=…` (attributes in their order), and its first common name.
    fn name(der: &[u8]) -> (String, Option<String>) {
        let mut parts = Vec::new();
        let mut common_name = None;
        let mut rdns = Reader(der);
        while let Some((SET, set)) = rdns.next() {
            let mut attributes = Reader(set);
            while let Some((SEQUENCE, attribute)) = attributes.next() {
                let mut a = Reader(attribute);
                let (Some(oid), Some((tag, value))) = (a.expect(OID), a.next()) else {
                    continue;
                };
                let value = string(tag, value);
                let label = match oid {
                    [0x55, 0x04, 0x03] => "CN".to_string(),
                    [0x55, 0x04, 0x06] => "C".to_string(),
                    [0x55, 0x04, 0x07] => "L".to_string(),
                    [0x55, 0x04, 0x08] => "ST".to_string(),
                    [0x55, 0x04, 0x0a] => "O".to_string(),
                    [0x55, 0x04, 0x0b] => "OU".to_string(),
                    other => dotted(other),
                };
                if label == "CN" && common_name.is_none() {
                    common_name = Some(value.clone());
                }
                parts.push(format!("{label}={value}"));
            }
        }
        let mut subject = parts.join(", ");
        if subject.len() > MAX_SUBJECT_LEN {
            let mut end = MAX_SUBJECT_LEN;
            while !subject.is_char_boundary(end) {
                end -= 1;
            }
            subject.truncate(end);
            subject.push('…');
        }
        (subject, common_name)
    }

    /// The DNS names of the subjectAltName extension, in `[3] EXPLICIT Extensions`.
    fn alt_dns_names(extensions: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let Some(list) = Reader(extensions).expect(SEQUENCE) else {
            return names;
        };
        let mut list = Reader(list);
        while let Some((SEQUENCE, extension)) = list.next() {
            let mut e = Reader(extension);
            let Some(oid) = e.expect(OID) else { continue };
            let Some(mut value) = e.next() else { continue };
            if value.0 == BOOLEAN {
                let Some(v) = e.next() else { continue };
                value = v;
            }
            if oid != SUBJECT_ALT_NAME || value.0 != OCTET_STRING {
                continue;
            }
            let Some(general_names) = Reader(value.1).expect(SEQUENCE) else {
                continue;
            };
            let mut general_names = Reader(general_names);
            while let Some((tag, name)) = general_names.next() {
                if tag == DNS_NAME {
                    names.push(printable(&String::from_utf8_lossy(name)));
                }
            }
        }
        names
    }

    /// A directory string's text (UTF8String, PrintableString, IA5String, TeletexString as
    /// Latin-1, BMPString), control characters escaped; others in hex.
    fn string(tag: u8, value: &[u8]) -> String {
        let text = match tag {
            0x0c | 0x13 | 0x16 => String::from_utf8_lossy(value).into_owned(),
            0x14 => value.iter().map(|&b| char::from(b)).collect(),
            0x1e => {
                let units: Vec<u16> = value
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            }
            _ => return value.iter().map(|b| format!("{b:02x}")).collect(),
        };
        printable(&text)
    }

    /// An OID's dotted form.
    fn dotted(oid: &[u8]) -> String {
        let mut arcs: Vec<u64> = Vec::new();
        let mut value: u64 = 0;
        for &b in oid {
            value = (value << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (value / 40).min(2);
                    arcs.push(first);
                    arcs.push(value - first * 40);
                } else {
                    arcs.push(value);
                }
                value = 0;
            }
        }
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn dotted_oids() {
            assert_eq!(dotted(&[0x55, 0x04, 0x03]), "2.5.4.3");
            assert_eq!(
                dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
                "1.2.840.113549.1.9.1"
            );
        }

        #[test]
        fn malformed_der_reads_as_nothing() {
            for bad in [
                &[][..],
                &[0x30],
                &[0x30, 0x85, 1, 2, 3, 4, 5],
                &[0x30, 0x82, 0xff, 0xff, 0],
                &[0x30, 0x03, 0x30, 0x01],
            ] {
                assert_eq!(identity(bad), None, "{bad:x?}");
            }
        }

        #[test]
        fn control_characters_are_escaped() {
            assert_eq!(string(0x0c, b"a\nb"), "a\\nb");
            assert_eq!(string(0x14, &[0x41, 0xe9]), "Aé");
            assert_eq!(string(0x1e, &[0, 0x41, 0, 0x42]), "AB");
        }
    }
}

/// Why a handshake stopped.
#[derive(Debug)]
enum Stop {
    /// rustls refused (a certificate, an alert from the peer, a malformed message).
    Tls(rustls::Error),
    /// The peer's first byte is not a TLS record's: it speaks something else.
    NotTls,
    /// The peer closed the connection, having sent something (`true`) or nothing.
    Closed { sent: bool },
    /// A socket error or the deadline.
    Io(io::Error),
}

/// A TLS connection: the TCP socket and rustls's state. Every read and write goes to the
/// socket, re-armed with the caller's bounds before each call.
pub(crate) struct TlsStream {
    pub(crate) tcp: TcpStream,
    conn: rustls::Connection,
    /// Records read from the socket ahead of rustls, which takes one at a time.
    ahead: ReadAhead,
    peer: Option<PeerIdentity>,
    allowed_by: Option<AllowMatch>,
}

/// Bytes read from a socket in large reads and handed on in small ones: rustls asks for one
/// record (16 KiB) at a time, and a read syscall per record costs more than the decryption
/// (the README has the figures).
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Size of [`ReadAhead`].
const READ_AHEAD: usize = 1 << 20;

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never rustls's state: it holds the traffic keys.
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TlsStream {
    fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            tcp,
            conn: conn.into(),
            ahead: ReadAhead {
                buf: vec![0; READ_AHEAD],
                start: 0,
                end: 0,
            },
            peer: None,
            allowed_by: None,
        }
    }

    /// Source side: the handshake over `tcp`, the destination's certificate checked against
    /// the CA and `name`.
    pub(crate) fn connect(
        tcp: TcpStream,
        tls: &TlsClient,
        name: &str,
        read: Bound,
        write: Bound,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_of(&tcp);
        let mut t = TlsStream::new(tcp, tls.session(name)?);
        match t.handshake(read, write) {
            Ok(()) => Ok(t),
            // Most likely a plaintext destination's Error record: read what it says.
            Err(Stop::NotTls) => Err(TlsError::PlaintextDestination {
                peer,
                said: read_plain_error(&t.tcp, read),
            }),
            Err(stop) => Err(stop.into_error(peer, tls.ca(), None)),
        }
    }

    /// Destination side: the handshake over `tcp`, the source's certificate checked against
    /// the CA and the allow-list. A source that speaks plaintext is told so in plaintext.
    pub(crate) fn accept(
        tcp: TcpStream,
        tls: &TlsServer,
        read: Bound,
        write: Bound,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_of(&tcp);
        let (session, refused) = tls.session()?;
        let mut t = TlsStream::new(tcp, session);
        match t.handshake(read, write) {
            Ok(()) => {
                t.allowed_by = t.peer.as_ref().and_then(|id| tls.allow().check(id));
                Ok(t)
            }
            Err(Stop::NotTls) => {
                send_plain_error(
                    &t.tcp,
                    "this destination takes only TLS connections (it was started with \
                     --tls-dir): migrate with --tls-dir",
                    write,
                );
                Err(TlsError::PlaintextSource { peer })
            }
            Err(stop) => Err(stop.into_error(peer, &tls.ca(), Some((refused, tls.allow())))),
        }
    }

    /// The peer's certificate identity (after the handshake).
    pub(crate) fn peer(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }

    /// Which allow-list entry admitted the peer (destination, with `--tls-allow`).
    pub(crate) fn allowed_by(&self) -> Option<&AllowMatch> {
        self.allowed_by.as_ref()
    }

    /// Runs the handshake to its end (or the first failure), each socket call bounded.
    fn handshake(&mut self, read: Bound, write: Bound) -> Result<(), Stop> {
        let mut first = true;
        loop {
            self.flush(write).map_err(Stop::Io)?;
            if !self.conn.is_handshaking() {
                break;
            }
            if self.ahead.is_empty() {
                read.arm(|t| self.tcp.set_read_timeout(t))
                    .map_err(Stop::Io)?;
            }
            if first {
                let mut b = [0u8; 1];
                let n = retry(|| self.tcp.peek(&mut b)).map_err(|e| Stop::Io(read.timed_out(e)))?;
                if n == 0 {
                    return Err(Stop::Closed { sent: false });
                }
                if b[0] != HANDSHAKE && b[0] != ALERT {
                    return Err(Stop::NotTls);
                }
                first = false;
            }
            let n = self
                .read_tls(false)
                .map_err(|e| Stop::Io(read.timed_out(e)))?;
            if n == 0 {
                return Err(Stop::Closed { sent: true });
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert that tells the peer why, if it can be sent.
                let _ = self.flush(write);
                return Err(Stop::Tls(e));
            }
        }
        let leaf = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| PeerIdentity::from_der(c));
        self.peer = leaf;
        Ok(())
    }

    /// Encrypts and writes all `parts`.
    pub(crate) fn send(&mut self, parts: &[&[u8]], write: Bound) -> io::Result<()> {
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let n = self.conn.writer().write(rest)?;
                rest = &rest[n..];
                if n == 0 {
                    // rustls holds SEND_BUFFER of records: on the wire with them.
                    self.flush(write)?;
                }
            }
        }
        self.flush(write)
    }

    /// Reads at least one decrypted byte, or 0 at the end of the stream (the peer closed the
    /// connection, with or without `close_notify`).
    pub(crate) fn recv(&mut self, buf: &mut [u8], read: Bound, write: Bound) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.ahead.is_empty() {
                read.arm(|t| self.tcp.set_read_timeout(t))?;
            }
            self.read_tls(false).map_err(|e| read.timed_out(e))?;
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.flush(write);
                return Err(record_error(e));
            }
            // A key update's answer, say.
            self.flush(write)?;
        }
    }

    /// Hands rustls the next bytes from the socket: from what was read ahead, else from one
    /// large read (`dont_wait`: only what already arrived). 0 at the end of the stream.
    fn read_tls(&mut self, dont_wait: bool) -> io::Result<usize> {
        let a = &mut self.ahead;
        if a.is_empty() {
            let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
            let n = retry(|| recv(&self.tcp, &mut a.buf, flags))?;
            (a.start, a.end) = (0, n);
            if n == 0 {
                // rustls learns of the end of the stream from an empty read.
                return self.conn.read_tls(&mut io::empty());
            }
        }
        let mut pending = &a.buf[a.start..a.end];
        let n = self.conn.read_tls(&mut pending)?;
        a.start += n;
        Ok(n)
    }

    /// Writes every record rustls holds.
    fn flush(&mut self, write: Bound) -> io::Result<()> {
        while self.conn.wants_write() {
            write.arm(|t| self.tcp.set_write_timeout(t))?;
            match retry(|| self.conn.write_tls(&mut NoSigPipe(&self.tcp))) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(write.timed_out(e)),
                // A peer that refused us closed the connection: its alert says why.
                Err(e) => return Err(self.alert_received().unwrap_or(e)),
            }
        }
        Ok(())
    }

    /// After a failed write: the alert the peer sent before it closed, if it did (reads only
    /// what already arrived).
    fn alert_received(&mut self) -> Option<io::Error> {
        for _ in 0..8 {
            match self.read_tls(true) {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
            if let Err(e) = self.conn.process_new_packets() {
                return Some(record_error(e));
            }
        }
        None
    }
}

impl Stop {
    /// The error that names the cause. `ca` is this side's CA file; `allow` (destination) is
    /// where the verifier left an identity it refused, and the list.
    fn into_error(self, peer: String, ca: &Path, allow: Option<(Refused, &AllowList)>) -> TlsError {
        match self {
            Stop::Tls(e) => {
                if let Some((identity, list)) = allow.and_then(|(r, list)| Some((r.take()?, list)))
                {
                    return TlsError::NotAllowed {
                        peer,
                        identity,
                        allowed: list.to_string(),
                    };
                }
                TlsError::Handshake {
                    peer,
                    cause: explain(&e, Some(ca)),
                    source: e,
                }
            }
            Stop::NotTls => TlsError::Handshake {
                peer,
                cause: "the peer does not speak TLS".into(),
                source: rustls::Error::General("not a TLS record".into()),
            },
            Stop::Closed { sent: false } => TlsError::Empty { peer },
            Stop::Closed { sent: true } => TlsError::Closed { peer },
            Stop::Io(source) => TlsError::Io { peer, source },
        }
    }
}

/// The address of a TCP peer, for messages.
fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "the peer".to_string(), |a| a.to_string())
}

/// Tells a peer that speaks the plaintext migration stream why it is refused: a migration
/// `Error` record, in plaintext (best effort, bounded).
fn send_plain_error(tcp: &TcpStream, msg: &str, write: Bound) {
    let mut end = msg.len().min(MAX_MESSAGE_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let payload = &msg.as_bytes()[..end];
    let header = RecordHeader {
        kind: RecordKind::Error,
        len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
    }
    .encode();
    let mut record = header.to_vec();
    record.extend_from_slice(payload);
    let mut rest = &record[..];
    while !rest.is_empty() {
        if write.arm(|t| tcp.set_write_timeout(t)).is_err() {
            return;
        }
        match retry(|| NoSigPipe(tcp).write(rest)) {
            Ok(n) if n > 0 => rest = &rest[n..],
            _ => return,
        }
    }
}

/// Reads what a peer that answered a ClientHello in plaintext said: the message of a
/// migration `Error` record, if that is what it sent (bounded).
fn read_plain_error(tcp: &TcpStream, read: Bound) -> Option<String> {
    let fill = |buf: &mut [u8]| -> Option<()> {
        let mut done = 0;
        while done < buf.len() {
            read.arm(|t| tcp.set_read_timeout(t)).ok()?;
            match retry(|| (&*tcp).read(&mut buf[done..])) {
                Ok(n) if n > 0 => done += n,
                _ => return None,
            }
        }
        Some(())
    };
    let mut raw = [0u8; RECORD_HEADER_LEN];
    fill(&mut raw)?;
    let header = RecordHeader::decode(&raw, 0).ok()?;
    if header.kind != RecordKind::Error || header.len as usize > MAX_MESSAGE_LEN {
        return None;
    }
    let mut payload = vec![0u8; header.len as usize];
    fill(&mut payload)?;
    (crc32c::crc32c(&payload) == header.payload_crc)
        .then(|| printable(&String::from_utf8_lossy(&payload)))
}

/// `text` with control characters escaped (it goes into logs and replies).
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// `f` again while it is interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A TLS error in the data phase, as an I/O error that says what it means.
fn record_error(e: rustls::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        RecordError(explain(&e, None), e),
    )
}

/// `recv(2)` on a socket with `flags`.
fn recv(tcp: &TcpStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A TLS error in the data phase: what it means, then rustls's words.
#[derive(Debug)]
struct RecordError(String, rustls::Error);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {} ({})", self.0, self.1)
    }
}

impl std::error::Error for RecordError {}

/// Writes to a socket with `sendmsg(MSG_NOSIGNAL)`: a closed peer is `EPIPE`, not `SIGPIPE`.
struct NoSigPipe<'a>(&'a TcpStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; only the iovec fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on unix; sendmsg does not write through it.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024);
        // SAFETY: the iovecs point into the caller's live slices for the whole call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a rustls error means, in the words an operator needs; `ca` is this side's CA file.
fn explain(e: &rustls::Error, ca: Option<&Path>) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let our_ca = ca.map_or_else(
        || "our CA".to_string(),
        |p| format!("the CA in {}", p.display()),
    );
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!("the peer's certificate is not signed by {our_ca}"),
            // The issuer's name is our CA's, its key is not: another CA of the same name.
            C::BadSignature => format!(
                "the peer's certificate is not signed by {our_ca} (but by another CA of the \
                 same name)"
            ),
            C::Expired | C::ExpiredContext { .. } => "the peer's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the peer's certificate is not valid for the name we connected to (connecting \
                 by address, --tls-name names the host its certificate is for)"
                    .into()
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the peer's certificate is not for this use (its extended key usage)".into()
            }
            C::ApplicationVerificationFailure => {
                "the peer's certificate subject is not in --tls-allow".into()
            }
            _ => "the peer's certificate was refused".into(),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA => {
                "the peer refused our certificate: it is not signed by the peer's CA".into()
            }
            AlertDescription::CertificateExpired => {
                "the peer refused our certificate as expired or not yet valid".into()
            }
            AlertDescription::AccessDenied => {
                "the peer refused our certificate: its subject is not in the peer's --tls-allow"
                    .into()
            }
            AlertDescription::BadCertificate => {
                "the peer refused our certificate as bad (malformed, or not valid for the name \
                 it was reached by)"
                    .into()
            }
            AlertDescription::DecryptError => {
                "the peer refused our certificate: its signature does not verify (signed by \
                 another CA of the same name as the peer's?)"
                    .into()
            }
            AlertDescription::CertificateRequired => {
                "the peer requires a certificate from us".into()
            }
            AlertDescription::UnsupportedCertificate | AlertDescription::CertificateUnknown => {
                "the peer refused our certificate".into()
            }
            AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
                "the peer and we agree on no TLS 1.3 parameters".into()
            }
            other => format!("the peer ended the TLS session (alert {other:?})"),
        },
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::PeerIncompatible(_) => "the peer cannot do TLS 1.3 as we require".into(),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the peer sent something that is not valid TLS here".into()
        }
        E::DecryptError => "a record from the peer did not decrypt (tampered with?)".into(),
        _ => "TLS failed".into(),
    }
}

/// Certificates made for the tests.
#[cfg(test)]
pub(crate) mod test_pki {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// A CA and the host certificates it signs.
    pub(crate) struct Pki {
        pub ca_pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        pub fn new() -> Pki {
            Pki::named("test CA")
        }

        /// A CA whose subject CN is `name`.
        pub fn named(name: &str) -> Pki {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca = params.self_signed(&key).unwrap();
            Pki {
                ca_pem: ca.pem(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// Writes `ca.pem`, `cert.pem`, `key.pem` (0600) for `names` (the first is the CN)
        /// into `dir`.
        pub fn host(&self, dir: &Path, names: &[&str]) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(
                names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, names[0]);
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, "minivmm tests");
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(CA_FILE), &self.ca_pem).unwrap();
            std::fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(KEY_FILE))
                .unwrap()
                .write_all(key.serialize_pem().as_bytes())
                .unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::Pki;
    use super::*;

    fn identity(names: &[&str]) -> PeerIdentity {
        let dir = tempfile::tempdir().unwrap();
        Pki::new().host(dir.path(), names);
        let pem = std::fs::read(dir.path().join(CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        PeerIdentity::from_der(&der)
    }

    #[test]
    fn the_subject_and_dns_names_are_read() {
        let id = identity(&["src.example", "alias.example", "10.0.0.1"]);
        assert_eq!(id.subject, "CN=src.example, O=minivmm tests");
        assert_eq!(id.common_name.as_deref(), Some("src.example"));
        assert_eq!(id.dns_names, ["src.example", "alias.example"]);
        assert_eq!(
            id.to_string(),
            "CN=src.example, O=minivmm tests (DNS src.example, alias.example)"
        );
    }

    #[test]
    fn the_allow_list_matches_the_cn_or_a_dns_name() {
        let id = PeerIdentity {
            subject: "CN=host-a".into(),
            common_name: Some("host-a".into()),
            dns_names: vec!["a.example".into(), "b.example".into()],
        };
        let allow = |names: &[&str]| AllowList::new(names.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            allow(&["HOST-A"]).check(&id),
            Some(AllowMatch::CommonName("HOST-A".into()))
        );
        assert_eq!(
            allow(&["x", "b.example"]).check(&id),
            Some(AllowMatch::DnsName("b.example".into()))
        );
        assert_eq!(allow(&["host"]).check(&id), None, "no prefix matches");
        assert_eq!(allow(&["*.example"]).check(&id), None, "no wildcards");
        assert_eq!(allow(&["CN=host-a"]).check(&id), None);
        let no_cn = PeerIdentity {
            common_name: None,
            ..id.clone()
        };
        assert_eq!(allow(&["host-a"]).check(&no_cn), None);
        assert!(allow(&[]).is_empty());
        assert_eq!(
            AllowMatch::CommonName("h".into()).to_string(),
            "--tls-allow h by subject CN"
        );
    }

    #[test]
    fn a_directory_loads_for_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        Pki::new().host(dir.path(), &["h.example"]);
        TlsClient::load(dir.path()).expect("client");
        let s = TlsServer::load(dir.path(), AllowList::new(vec!["x".into()])).expect("server");
        assert_eq!(s.allow().to_string(), "x");
        // Debug output shows paths, never key material.
        assert!(!format!("{s:?}").contains("PRIVATE"), "{s:?}");
    }

    #[test]
    fn a_key_readable_by_others_is_refused_naming_file_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Pki::new().host(dir.path(), &["h"]);
        let key = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = TlsClient::load(dir.path()).unwrap_err();
            assert!(matches!(e, TlsError::KeyMode { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&key.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(TlsServer::load(dir.path(), AllowList::default()).is_err());
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            TlsClient::load(dir.path()).expect("owner-only key");
        }
    }

    #[test]
    fn a_directory_is_checked_as_both_ends_use_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        Pki::new().host(&a, &["h.example", "10.1.1.1"]);
        let id = check_dir(&a, "10.1.1.1").unwrap();
        assert_eq!(id.common_name.as_deref(), Some("h.example"));
        let e = check_dir(&a, "other.example").unwrap_err();
        assert!(matches!(e, TlsError::Check { .. }), "{e}");
        // A certificate from another CA than the directory's.
        Pki::new().host(&b, &["h.example"]);
        std::fs::copy(b.join(CA_FILE), a.join(CA_FILE)).unwrap();
        let e = crate::error_chain(&check_dir(&a, "h.example").unwrap_err());
        assert!(e.contains("does not verify against"), "{e}");
    }

    #[test]
    fn missing_or_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsClient::load(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&dir.path().join(CA_FILE).display().to_string()),
            "{e}"
        );
        Pki::new().host(dir.path(), &["h"]);
        std::fs::write(dir.path().join(CERT_FILE), "no pem here\n").unwrap();
        let e = TlsClient::load(dir.path()).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");
        Pki::new().host(&dir.path().join("b"), &["h"]);
        let b = dir.path().join("b");
        std::fs::write(b.join(CA_FILE), vec![b'x'; MAX_PEM_LEN as usize + 1]).unwrap();
        let e = TlsClient::load(&b).unwrap_err();
        assert!(matches!(e, TlsError::TooLarge { .. }), "{e}");
        // A key that is not the certificate's.
        let c = dir.path().join("c");
        let d = dir.path().join("d");
        let pki = Pki::new();
        pki.host(&c, &["h"]);
        pki.host(&d, &["h"]);
        std::fs::copy(d.join(KEY_FILE), c.join(KEY_FILE)).unwrap();
        let e = TlsServer::load(&c, AllowList::default()).unwrap_err();
        assert!(matches!(e, TlsError::Identity(..)), "{e}");
    }

    // --- Connections over loopback TCP ---

    use crate::fake::{fake_target, FakeVm};
    use crate::transport::{Connection, Endpoint, Transport};
    use crate::{receive_migration, send_migration, Deadline, ReceiveOptions, SendOptions};
    use std::time::{Duration, Instant};

    /// Two hosts' directories signed by one CA, and a third signed by another.
    struct Hosts {
        _dir: tempfile::TempDir,
        src: PathBuf,
        dst: PathBuf,
        stranger: PathBuf,
    }

    fn hosts() -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (src, dst, stranger) = (
            dir.path().join("src"),
            dir.path().join("dst"),
            dir.path().join("stranger"),
        );
        pki.host(&src, &["src.example"]);
        pki.host(&dst, &["dst.example", "127.0.0.1"]);
        Pki::new().host(&stranger, &["src.example"]);
        Hosts {
            _dir: dir,
            src,
            dst,
            stranger,
        }
    }

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(10), "handshake")
    }

    /// The destination on a thread (`server` with its connection), the source's handshake
    /// here.
    fn handshake<T: Send + 'static>(
        client: &TlsClient,
        name: &str,
        server: impl FnOnce(Connection) -> T + Send + 'static,
    ) -> (Result<Connection, TlsError>, std::thread::JoinHandle<T>) {
        let mut l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .listen()
            .unwrap();
        let ep = l.local_endpoint().unwrap();
        let t = std::thread::spawn(move || server(l.accept().unwrap()));
        let c = ep.connect(Duration::from_secs(5)).unwrap();
        (c.tls_client(client, name, deadline()), t)
    }

    fn accept(
        dir: PathBuf,
        allow: &[&str],
    ) -> impl FnOnce(Connection) -> Result<Connection, TlsError> {
        let allow = AllowList::new(allow.iter().map(|s| s.to_string()).collect());
        move |c| c.tls_server(&TlsServer::load(&dir, allow).unwrap(), deadline())
    }

    fn recv_all(c: &mut Connection, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        let mut at = 0;
        while at < n {
            let k = c.recv(&mut got[at..]).unwrap();
            assert!(k > 0, "early end at {at}");
            at += k;
        }
        got
    }

    #[test]
    fn mutual_tls_carries_the_stream_and_names_the_peers() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, s) = handshake(&client, "dst.example", {
            let accept = accept(h.dst.clone(), &["SRC.example"]);
            move |c| {
                let mut c = accept(c).unwrap();
                let who = (c.tls_peer().cloned(), c.tls_allowed_by().cloned());
                let got = recv_all(&mut c, 3 * (5 << 20));
                c.send(&[b"bye"]).unwrap();
                (who, got)
            }
        });
        let mut c = c.unwrap();
        assert_eq!(
            c.tls_peer().unwrap().to_string(),
            "CN=dst.example, O=minivmm tests (DNS dst.example)"
        );
        // Large vectored sends: more than rustls buffers at once.
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 5 << 20]).collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        c.send(&refs).unwrap();
        assert_eq!(recv_all(&mut c, 3), b"bye");
        let ((peer, allowed), got) = s.join().unwrap();
        assert_eq!(got, parts.concat());
        assert_eq!(peer.unwrap().common_name.as_deref(), Some("src.example"));
        assert_eq!(allowed, Some(AllowMatch::CommonName("SRC.example".into())));
        // The end of the stream reads as 0, like a plain socket's.
        let mut b = [0u8; 1];
        assert_eq!(c.recv(&mut b).unwrap(), 0);
    }

    #[test]
    fn a_whole_migration_runs_over_tls() {
        let h = hosts();
        let layout = [(0u64, 4usize << 20)];
        let mut src = FakeVm::new(&layout);
        src.writer().fill(0x1000, 0x3000, 0x5a);
        let client = TlsClient::load(&h.src).unwrap();
        let (c, dst) = handshake(&client, "127.0.0.1", {
            let accept = accept(h.dst.clone(), &[]);
            move |c| {
                let mut c = accept(c).unwrap();
                let mut dst = fake_target(&layout);
                receive_migration(&mut dst, &mut c, &ReceiveOptions::default()).unwrap();
                dst
            }
        });
        let mut c = c.unwrap();
        send_migration(&mut src, &mut c, SendOptions::default()).unwrap();
        let dst = dst.join().unwrap();
        assert_eq!(src.first_difference(&dst), None);
        assert!(dst.running);
    }

    #[test]
    fn a_certificate_from_another_ca_fails_on_both_ends() {
        let h = hosts();
        // Another CA of the same name (the issuer is found, its signature fails), and one of
        // another name (no issuer at all).
        let other = h.stranger.parent().unwrap().join("other-name");
        Pki::named("another CA").host(&other, &["src.example"]);
        for (dir, peer_says) in [
            (&h.stranger, "its signature does not verify"),
            (&other, "not signed by the peer's CA"),
        ] {
            let client = TlsClient::load(dir).unwrap();
            let (c, s) = handshake(&client, "dst.example", accept(h.dst.clone(), &[]));
            let c = c.unwrap_err().to_string();
            let s = s.join().unwrap().unwrap_err().to_string();
            assert!(c.contains("is not signed by the CA in"), "{c}");
            assert!(s.contains(peer_says), "{s}");
        }
    }

    #[test]
    fn a_destination_not_valid_for_the_name_is_refused() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, s) = handshake(&client, "other.example", accept(h.dst.clone(), &[]));
        let c = crate::error_chain(&c.unwrap_err());
        assert!(c.contains("not valid for the name"), "{c}");
        assert!(c.contains("other.example"), "{c}");
        let s = s.join().unwrap().unwrap_err().to_string();
        assert!(s.contains("refused our certificate as bad"), "{s}");
        // An invalid name is refused before connecting anywhere.
        let e = client.session("not a name!").unwrap_err();
        assert!(matches!(e, TlsError::ServerName(_)), "{e}");
    }

    #[test]
    fn a_source_not_on_the_allow_list_is_refused_on_both_ends() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, s) = handshake(
            &client,
            "dst.example",
            accept(h.dst.clone(), &["other", "x.example"]),
        );
        let s = s.join().unwrap().unwrap_err();
        assert!(matches!(s, TlsError::NotAllowed { .. }), "{s}");
        let s = s.to_string();
        assert!(s.contains("CN=src.example"), "{s}");
        assert!(s.contains("(allowed: other, x.example)"), "{s}");
        // TLS 1.3: the client finished first and learns of the refusal at its first read.
        let mut c = c.unwrap();
        let e = c.recv(&mut [0u8; 16]).unwrap_err().to_string();
        assert!(e.contains("not in the peer's --tls-allow"), "{e}");
        assert!(e.contains("AccessDenied"), "{e}");
        // Or at a write the closed connection fails: the alert that arrived before says why.
        let (c, s) = handshake(&client, "dst.example", accept(h.dst.clone(), &["other"]));
        let mut c = c.unwrap();
        assert!(s.join().unwrap().is_err());
        let big = vec![0u8; 32 << 20];
        let e = c.send(&[&big]).unwrap_err().to_string();
        assert!(e.contains("not in the peer's --tls-allow"), "{e}");
    }

    #[test]
    fn an_expired_certificate_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        for (name, expired) in [("src", false), ("dst", true)] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec![format!("{name}.example")]).unwrap();
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = p.signed_by(&key, &issuer).unwrap();
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join(CA_FILE), ca_cert.pem()).unwrap();
            std::fs::write(d.join(CERT_FILE), cert.pem()).unwrap();
            std::fs::write(d.join(KEY_FILE), key.serialize_pem()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join(KEY_FILE), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let client = TlsClient::load(&dir.path().join("src")).unwrap();
        let (c, s) = handshake(&client, "dst.example", accept(dir.path().join("dst"), &[]));
        let c = c.unwrap_err().to_string();
        assert!(c.contains("certificate has expired"), "{c}");
        let s = s.join().unwrap().unwrap_err().to_string();
        assert!(s.contains("refused our certificate as expired"), "{s}");
    }

    #[test]
    fn a_plaintext_source_at_a_tls_destination_is_told_why() {
        let h = hosts();
        let mut l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .listen()
            .unwrap();
        let ep = l.local_endpoint().unwrap();
        let dst = h.dst.clone();
        let t = std::thread::spawn(move || accept(dst, &[])(l.accept().unwrap()));
        let mut c = ep.connect(Duration::from_secs(5)).unwrap();
        c.send(&[&crate::wire::encode_stream_header()]).unwrap();
        let (kind, msg) = crate::stream::read_reply(&mut c).unwrap();
        assert_eq!(kind, crate::wire::RecordKind::Error);
        let msg = String::from_utf8(msg).unwrap();
        assert!(msg.contains("takes only TLS connections"), "{msg}");
        let s = t.join().unwrap().unwrap_err();
        assert!(matches!(s, TlsError::PlaintextSource { .. }), "{s}");
    }

    #[test]
    fn a_tls_source_at_a_plaintext_destination_reports_what_it_said() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, r) = handshake(&client, "dst.example", |mut c| {
            let mut dst = fake_target(&[(0, 1 << 20)]);
            receive_migration(&mut dst, &mut c, &ReceiveOptions::default())
        });
        let r = crate::error_chain(&r.join().unwrap().unwrap_err());
        assert!(r.contains("started without --tls-dir"), "{r}");
        let c = c.unwrap_err();
        assert!(matches!(c, TlsError::PlaintextDestination { .. }), "{c}");
        let c = c.to_string();
        assert!(c.contains("does not speak TLS"), "{c}");
        assert!(c.contains("it said: Invalid migration stream"), "{c}");
        assert!(c.contains("The peer opened a TLS connection"), "{c}");
    }

    #[test]
    fn a_silent_peer_fails_the_handshake_at_the_deadline() {
        let h = hosts();
        let mut l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .listen()
            .unwrap();
        let ep = l.local_endpoint().unwrap();
        let _silent = std::thread::spawn(move || {
            let c = ep.connect(Duration::from_secs(5)).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(c);
        });
        let mut c = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let server = TlsServer::load(&h.dst, AllowList::default()).unwrap();
        let started = Instant::now();
        let e = c
            .tls_server(
                &server,
                Deadline::after(Duration::from_millis(300), "handshake"),
            )
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{e}");
        assert!(
            crate::error_chain(&e).contains("the handshake deadline passed"),
            "{}",
            crate::error_chain(&e)
        );
    }

    #[test]
    fn an_empty_connection_is_a_probe() {
        let h = hosts();
        let mut l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .listen()
            .unwrap();
        let ep = l.local_endpoint().unwrap();
        drop(ep.connect(Duration::from_secs(5)).unwrap());
        let server = TlsServer::load(&h.dst, AllowList::default()).unwrap();
        let e = l
            .accept()
            .unwrap()
            .tls_server(&server, deadline())
            .unwrap_err();
        assert!(e.is_empty_connection(), "{e}");
    }

    #[test]
    fn the_wake_handle_ends_a_blocked_tls_read() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, s) = handshake(&client, "dst.example", move |c| {
            accept(h.dst, &[])(c).unwrap()
        });
        let _c = c.unwrap();
        let mut s = s.join().unwrap();
        let handle = s.wake_handle().expect("a TLS connection has a wake handle");
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: shutdown(2) on a socket descriptor we own; no memory is involved.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&handle), libc::SHUT_RD) };
            handle
        });
        let started = Instant::now();
        assert_eq!(s.recv(&mut [0u8; 8]).unwrap_or(0), 0, "read woken");
        assert!(started.elapsed() < Duration::from_secs(5));
        waker.join().unwrap();
    }

    #[test]
    fn one_tls_send_finishes_within_the_write_timeout_or_fails() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        // The destination reads 1 MiB every 50 ms (20 MB/s for 4 s): each write makes
        // progress within the socket's timeout; the 64 MiB send as a whole must still fail
        // soon.
        let (c, s) = handshake(&client, "dst.example", move |c| {
            let mut c = accept(h.dst, &[])(c).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..80 {
                let mut got = 0;
                while got < buf.len() {
                    match c.recv(&mut buf[got..]) {
                        Ok(n) if n > 0 => got += n,
                        _ => return,
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut c = c.unwrap();
        c.set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let data = vec![7u8; 64 << 20];
        let started = Instant::now();
        let e = c.send(&[&data]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(c);
        s.join().unwrap();
    }

    #[test]
    fn a_tls_read_keeps_its_deadline() {
        let h = hosts();
        let client = TlsClient::load(&h.src).unwrap();
        let (c, s) = handshake(&client, "dst.example", move |c| {
            accept(h.dst, &[])(c).unwrap()
        });
        let _c = c.unwrap();
        let mut s = s.join().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_deadline(Some(Deadline::after(Duration::from_millis(200), "test")));
        let started = Instant::now();
        let e = s.recv(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.to_string(), "the test deadline passed");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

//! `minivmm tls-init DIR --name HOST [--name HOST]... [--ca CADIR] [--days N]`: a TLS
//! directory for `migrate --tls-dir` and `receive --tls-dir`, for people who have no PKI.
//!
//! ```text
//! DIR/ca.pem       the CA certificate (copied from CADIR with --ca)
//! DIR/ca-key.pem   the CA's key, 0600 (only when a new CA is made: keep it off the hosts)
//! DIR/cert.pem     this host's certificate: CN and subject alternative names from --name,
//!                  for both ends (server and client authentication)
//! DIR/key.pem      this host's key, 0600
//! ```
//!
//! Keys are ECDSA P-256. Key files are created with mode 0600 (never widened, then narrowed),
//! and nothing is overwritten: if any of the files exists, nothing is written. What was
//! written is then checked as both ends will use it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use migration::tls::{
    check_dir, pem_identity, server_name_ok, PeerIdentity, TlsError, CA_FILE, CERT_FILE, KEY_FILE,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::cli::TlsInitArgs;

/// The CA's key, beside its certificate.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Years a new CA is valid.
const CA_YEARS: i64 = 10;
/// Subject CN of the CAs this command makes, before an id of the CA's key (two CAs never share
/// a name, so a certificate from the wrong one is reported as such); the only CAs `--ca`
/// takes.
const CA_NAME: &str = "minivmm migration CA";

/// Errors of `minivmm tls-init`.
#[derive(Debug, thiserror::Error)]
pub enum TlsInitError {
    #[error("{0:?} is not a host name: give a DNS name or an IP address")]
    Name(String),
    #[error("{} exists: tls-init never overwrites a file (remove it, or choose another directory)", .0.display())]
    Exists(PathBuf),
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error(
        "{} has mode {mode:04o}: a private key must not be readable or writable by group or \
         others (chmod 600 it)", path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error(
        "{} was not made by tls-init (its subject is {subject:?}): sign this host's certificate \
         with the tools that made it", .path.display()
    )]
    ForeignCa { path: PathBuf, subject: String },
    #[error("cannot make the certificate")]
    Generate(#[source] rcgen::Error),
    #[error("what was written does not work")]
    Check(#[source] TlsError),
}

/// What `tls-init` wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
    /// The host certificate's identity, as a destination's `--tls-allow` sees it.
    pub identity: PeerIdentity,
    /// A new CA was made (its key is in `ca-key.pem`).
    pub new_ca: bool,
}

/// Runs `tls-init`.
pub fn tls_init(args: &TlsInitArgs) -> Result<Written, TlsInitError> {
    if let Some(bad) = args.name.iter().find(|n| !server_name_ok(n)) {
        return Err(TlsInitError::Name(bad.clone()));
    }
    let dir = &args.dir;
    let mut targets = vec![dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE)];
    if args.ca.is_none() {
        targets.push(dir.join(CA_KEY_FILE));
    }
    if let Some(existing) = targets.iter().find(|p| p.symlink_metadata().is_ok()) {
        return Err(TlsInitError::Exists(existing.clone()));
    }
    let now = OffsetDateTime::now_utc();
    let (ca_pem, ca_key_pem, issuer) = match &args.ca {
        Some(ca_dir) => {
            let (pem, issuer) = load_ca(ca_dir)?;
            (pem, None, issuer)
        }
        None => {
            let (pem, key_pem, issuer) = new_ca(now)?;
            (pem, Some(key_pem), issuer)
        }
    };
    let key = KeyPair::generate().map_err(TlsInitError::Generate)?;
    let mut params = CertificateParams::new(args.name.clone()).map_err(TlsInitError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, args.name[0].as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(args.days));
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(TlsInitError::Generate)?;

    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TlsInitError::Create(dir.clone(), e))?;
    let mut files = Files::default();
    files.write(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    files.write(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    files.write(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    if let Some(k) = &ca_key_pem {
        files.write(&dir.join(CA_KEY_FILE), k.as_bytes(), 0o600)?;
    }
    let identity = check_dir(dir, &args.name[0]).map_err(TlsInitError::Check)?;
    Ok(Written {
        files: files.keep(),
        identity,
        new_ca: ca_key_pem.is_some(),
    })
}

/// A new CA: its certificate, its key (PEM), and the issuer that signs with it.
fn new_ca(now: OffsetDateTime) -> Result<(String, String, Issuer<'static, KeyPair>), TlsInitError> {
    let key = KeyPair::generate().map_err(TlsInitError::Generate)?;
    let mut params = ca_params(now, "")?;
    let id: String = params
        .key_identifier(&key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params = ca_params(now, &format!("{CA_NAME} {id}"))?;
    let cert = params.self_signed(&key).map_err(TlsInitError::Generate)?;
    let key_pem = key.serialize_pem();
    Ok((cert.pem(), key_pem, Issuer::new(params, key)))
}

fn ca_params(now: OffsetDateTime, name: &str) -> Result<CertificateParams, TlsInitError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(TlsInitError::Generate)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365 * CA_YEARS);
    Ok(params)
}

/// The CA of an earlier `tls-init` in `ca_dir`: its certificate (PEM) and an issuer with its
/// key. Only such CAs: the new certificate's issuer name must be the CA's subject byte for
/// byte, and this command writes that subject the one way it knows.
fn load_ca(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), TlsInitError> {
    let cert_path = ca_dir.join(CA_FILE);
    let pem = String::from_utf8_lossy(&read_file(&cert_path, false)?).into_owned();
    let key_path = ca_dir.join(CA_KEY_FILE);
    let key_pem = String::from_utf8_lossy(&read_file(&key_path, true)?).into_owned();
    let key = KeyPair::from_pem(&key_pem).map_err(TlsInitError::Generate)?;
    let identity = pem_identity(pem.as_bytes()).unwrap_or_default();
    let name = match identity.common_name {
        Some(cn) if identity.subject == format!("CN={cn}") && cn.starts_with(CA_NAME) => cn,
        _ => {
            return Err(TlsInitError::ForeignCa {
                path: cert_path,
                subject: identity.subject,
            })
        }
    };
    // Only the name and the key usages go into what it signs; the check after writing proves
    // the chain.
    let params = ca_params(OffsetDateTime::now_utc(), &name)?;
    Ok((pem, Issuer::new(params, key)))
}

/// A file of at most 1 MiB; a key's mode is checked first (on the file then read).
fn read_file(path: &Path, key: bool) -> Result<Vec<u8>, TlsInitError> {
    let failed = |e| TlsInitError::Read(path.to_path_buf(), e);
    let file = File::open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.mode();
    if key && mode & 0o077 != 0 {
        return Err(TlsInitError::KeyMode {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut bytes = Vec::new();
    file.take(migration::tls::MAX_PEM_LEN)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    Ok(bytes)
}

/// Files being written: removed again unless [`Files::keep`] (all or nothing).
#[derive(Default)]
struct Files(Vec<PathBuf>);

impl Files {
    /// Creates `path` with `mode` (never an existing file, never through a link) and writes it.
    fn write(&mut self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsInitError> {
        let failed = |e: io::Error| match e.kind() {
            io::ErrorKind::AlreadyExists => TlsInitError::Exists(path.to_path_buf()),
            _ => TlsInitError::Create(path.to_path_buf(), e),
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(failed)?;
        self.0.push(path.to_path_buf());
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(failed)
    }

    fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn args(dir: &Path, names: &[&str], ca: Option<&Path>) -> TlsInitArgs {
        TlsInitArgs {
            dir: dir.to_path_buf(),
            name: names.iter().map(|s| s.to_string()).collect(),
            ca: ca.map(Path::to_path_buf),
            days: 825,
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_ca_and_a_host_then_a_second_host_from_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let w = tls_init(&args(&a, &["src.example", "10.0.0.1"], None)).unwrap();
        assert!(w.new_ca);
        assert_eq!(w.files.len(), 4);
        assert_eq!(w.identity.common_name.as_deref(), Some("src.example"));
        assert_eq!(mode(&a), 0o700);
        assert_eq!(mode(&a.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&a.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&a.join(CERT_FILE)), 0o644);

        let b = tmp.path().join("b");
        let w = tls_init(&args(&b, &["dst.example"], Some(&a))).unwrap();
        assert!(!w.new_ca);
        assert!(
            !b.join(CA_KEY_FILE).exists(),
            "the CA key stays where it was"
        );
        assert_eq!(
            std::fs::read(b.join(CA_FILE)).unwrap(),
            std::fs::read(a.join(CA_FILE)).unwrap()
        );
        // b's certificate verifies against the shared CA as both ends.
        check_dir(&b, "dst.example").unwrap();
    }

    #[test]
    fn nothing_is_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(KEY_FILE), b"precious").unwrap();
        let e = tls_init(&args(&d, &["h"], None)).unwrap_err();
        assert!(matches!(e, TlsInitError::Exists(_)), "{e}");
        assert!(e.to_string().contains("key.pem exists"), "{e}");
        assert_eq!(std::fs::read(d.join(KEY_FILE)).unwrap(), b"precious");
        let written: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(written.len(), 1, "nothing else was written");
        // A second run over a complete directory is refused too.
        let e2 = tmp.path().join("e");
        tls_init(&args(&e2, &["h"], None)).unwrap();
        let before = std::fs::read(e2.join(KEY_FILE)).unwrap();
        assert!(matches!(
            tls_init(&args(&e2, &["h"], None)),
            Err(TlsInitError::Exists(_))
        ));
        assert_eq!(std::fs::read(e2.join(KEY_FILE)).unwrap(), before);
    }

    #[test]
    fn bad_names_and_foreign_or_open_cas_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let e = tls_init(&args(&tmp.path().join("x"), &["not a name"], None)).unwrap_err();
        assert!(matches!(e, TlsInitError::Name(_)), "{e}");
        assert!(!tmp.path().join("x").exists());

        let a = tmp.path().join("a");
        tls_init(&args(&a, &["h"], None)).unwrap();
        std::fs::set_permissions(a.join(CA_KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = tls_init(&args(&tmp.path().join("b"), &["h2"], Some(&a))).unwrap_err();
        assert!(e.to_string().contains("ca-key.pem has mode 0644"), "{e}");

        std::fs::set_permissions(a.join(CA_KEY_FILE), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        // A CA made elsewhere (its host certificate standing in for one).
        std::fs::copy(a.join(CERT_FILE), a.join(CA_FILE)).unwrap();
        let e = tls_init(&args(&tmp.path().join("c"), &["h3"], Some(&a))).unwrap_err();
        assert!(matches!(e, TlsInitError::ForeignCa { .. }), "{e}");
    }
}

//! Tests of the TLS module, and certificates made for them.

use super::*;

/// Certificates made for the tests.
mod test_pki {
    use super::*;
    use std::io::Write;
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

use test_pki::Pki;

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
use crate::transport::{Connection, Endpoint, Listener, Transport};
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

/// A TCP listener on a free loopback port, and its endpoint.
fn loopback() -> (Listener, Endpoint) {
    let l = Endpoint::parse("tcp:127.0.0.1:0")
        .unwrap()
        .listen()
        .unwrap();
    let ep = l.local_endpoint().unwrap();
    (l, ep)
}

/// The destination on a thread (`server` with its connection), the source's handshake
/// here.
fn handshake<T: Send + 'static>(
    client: &TlsClient,
    name: &str,
    server: impl FnOnce(Connection) -> T + Send + 'static,
) -> (Result<Connection, TlsError>, std::thread::JoinHandle<T>) {
    let (mut l, ep) = loopback();
    let t = std::thread::spawn(move || server(l.accept().unwrap()));
    let c = ep.connect(Duration::from_secs(5)).unwrap();
    (c.tls_client(client, name, deadline()), t)
}

fn accept(dir: PathBuf, allow: &[&str]) -> impl FnOnce(Connection) -> Result<Connection, TlsError> {
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
        std::fs::set_permissions(d.join(KEY_FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
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
    let (mut l, ep) = loopback();
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
    let (mut l, ep) = loopback();
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
    let (mut l, ep) = loopback();
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

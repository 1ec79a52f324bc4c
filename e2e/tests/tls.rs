//! Migrations over mutual TLS between real minivmm processes: one that succeeds (its guest
//! verifies at the destination, which names the source's certificate), and every refusal,
//! each named on both ends, with the source's guest running on: a certificate from another
//! CA, an expired one, one not valid for the name, a source not allowed, plaintext to a TLS
//! port and TLS to a plaintext port, a key others may read; and a network listener without
//! TLS refused unless asked for, then warned about.
//!
//! Certificates come from `minivmm tls-init` (and, for the expired one, from rcgen).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::migrate::{
    assert_hashes_match, assert_keeps_verifying, assert_no_guest_ran, migrate, migrate_ok, Vm, T,
};
use e2e::{free_tcp_port, require_kvm, vm_status, Proc, TempDir};
use vmm::control::protocol::{IncomingState, IncomingStatus, Reply, Request};
use vmm::RunState;

const GUEST: &str = "touch=32M rate=2000 seed=21";

/// `minivmm tls-init DIR --name NAME... [--ca CA]`, which must succeed.
fn tls_init(dir: &Path, names: &[&str], ca: Option<&Path>) -> PathBuf {
    let mut args = vec!["tls-init".to_string(), dir.display().to_string()];
    for n in names {
        args.extend(["--name".to_string(), n.to_string()]);
    }
    if let Some(ca) = ca {
        args.extend(["--ca".to_string(), ca.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Proc::minivmm("tls-init", &args);
    let st = p.wait_exit(T).expect("tls-init finished");
    assert!(st.success(), "tls-init failed: {}", p.stderr());
    dir.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits until `p`'s stderr contains `text`.
fn wait_stderr(p: &mut Proc, text: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let err = p.stderr();
        if err.contains(text) {
            return err;
        }
        if Instant::now() > deadline || !p.alive() {
            panic!("{}: no {text:?} in its stderr:\n{err}", p.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A destination that refused a connection goes back to waiting for the next.
fn assert_waiting(dst: &mut Vm) {
    let deadline = Instant::now() + T;
    loop {
        let r = e2e::control::<IncomingStatus>(&dst.api, &Request::Status).expect("status");
        if matches!(
            r,
            Reply::Ok(IncomingStatus {
                state: IncomingState::Waiting,
                ..
            })
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the destination still receives: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dst.proc.alive(), "the destination keeps waiting");
    assert_no_guest_ran(&dst.proc);
}

/// A migration that must fail fast (within the handshake's bounds) with `cause` in the
/// source's error; the source's guest runs on.
fn refused(src: &mut Vm, to: &str, extra: &[&str], cause: &str) {
    let started = Instant::now();
    let m = migrate(&src.api, to, extra);
    assert!(!m.ok, "migrate to {to} {extra:?} succeeded");
    let said = format!("{}{:?}", m.stderr, m.reply);
    assert!(
        said.contains(cause),
        "no {cause:?} in what migrate said: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused after {:?}",
        started.elapsed()
    );
    src.rounds(0, 1);
    assert_eq!(vm_status(&src.api).state, RunState::Running);
}

#[test]
fn tls_migration_after_refusals_names_the_source() {
    require_kvm!();
    let dir = TempDir::new("tls-ok");
    let a = tls_init(&dir.join("a"), &["src.example"], None);
    let b = tls_init(&dir.join("b"), &["dst.example", "127.0.0.1"], Some(&a));
    let stranger = tls_init(&dir.join("stranger"), &["src.example"], None);
    let mut src = Vm::run(&dir, "src", "256M", 1, GUEST);
    src.rounds(0, 1);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Vm::receive_env(
        &dir,
        "dst",
        &uri,
        &["--tls-dir", s(&b), "--tls-allow", "src.example"],
        &[("RUST_LOG", "info")],
    );

    // A certificate from another CA.
    refused(
        &mut src,
        &uri,
        &["--tls-dir", s(&stranger)],
        "is not signed by the CA in",
    );
    wait_stderr(&mut dst.proc, "it is not signed by the peer's CA");
    assert_waiting(&mut dst);

    // A destination whose certificate is not for the name asked for.
    refused(
        &mut src,
        &uri,
        &["--tls-dir", s(&a), "--tls-name", "other.example"],
        "not valid for the name we connected to",
    );
    wait_stderr(&mut dst.proc, "refused our certificate as bad");
    assert_waiting(&mut dst);

    // Plaintext to the TLS port: the source is told in plaintext.
    refused(
        &mut src,
        &uri,
        &[],
        "this destination takes only TLS connections",
    );
    wait_stderr(
        &mut dst.proc,
        "sent a plaintext migration stream to this TLS endpoint",
    );
    assert_waiting(&mut dst);

    // Then the real one, by the certificate's DNS name, with a data connection beside the
    // control connection (both through the same TLS checks).
    let stats = migrate_ok(
        &mut src,
        &uri,
        &[
            "--tls-dir",
            s(&a),
            "--tls-name",
            "dst.example",
            "--verify-memory",
            "--connections",
            "2",
        ],
    );
    assert_hashes_match(&stats);
    assert_eq!(stats.stats["data_connections"], 1, "{:?}", stats.stats);
    let report = stats.destination.as_ref().expect("destination report");
    assert_eq!(
        report.tls_peer.as_deref(),
        Some("CN=src.example (DNS src.example)")
    );
    let err = wait_stderr(&mut dst.proc, "TLS source 127.0.0.1:");
    assert!(
        err.contains(
            "CN=src.example (DNS src.example), allowed by --tls-allow src.example by subject CN"
        ),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    assert_keeps_verifying(&mut dst, 1);
}

/// A CA and a destination certificate that expired, a source certificate that did not.
fn expired_pki(dir: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "expiry test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut out = Vec::new();
    for (name, expired) in [("src.example", false), ("127.0.0.1", true)] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(
            d.join("cert.pem"),
            p.signed_by(&key, &issuer).unwrap().pem(),
        )
        .unwrap();
        write_key(&d.join("key.pem"), &key.serialize_pem(), 0o600);
        out.push(d);
    }
    (out.remove(0), out.remove(0))
}

fn write_key(path: &Path, pem: &str, mode: u32) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
}

#[test]
fn refusals_name_their_cause_on_both_ends_and_the_source_runs_on() {
    require_kvm!();
    let dir = TempDir::new("tls-refused");
    let a = tls_init(&dir.join("a"), &["src.example"], None);
    let b = tls_init(&dir.join("b"), &["127.0.0.1"], Some(&a));
    let mut src = Vm::run(&dir, "src", "256M", 1, GUEST);
    src.rounds(0, 1);

    // A source whose certificate the destination's --tls-allow does not name.
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Vm::receive(
        &dir,
        "dst-allow",
        &uri,
        &["--tls-dir", s(&b), "--tls-allow", "other.example"],
    );
    refused(
        &mut src,
        &uri,
        &["--tls-dir", s(&a)],
        "not in the peer's --tls-allow",
    );
    let err = wait_stderr(&mut dst.proc, "which --tls-allow does not name");
    assert!(err.contains("CN=src.example"), "{err}");
    assert_waiting(&mut dst);
    drop(dst);

    // A destination whose certificate expired.
    let (src_dir, dst_dir) = expired_pki(&dir.join("expired"));
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Vm::receive(&dir, "dst-expired", &uri, &["--tls-dir", s(&dst_dir)]);
    refused(
        &mut src,
        &uri,
        &["--tls-dir", s(&src_dir)],
        "certificate has expired",
    );
    wait_stderr(&mut dst.proc, "refused our certificate as expired");
    assert_waiting(&mut dst);
    drop(dst);

    // TLS to a plaintext port: the source reports what the destination said; for the
    // destination it was no stream at all (garbage before a stream header: not an attempt),
    // and it goes on waiting.
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Vm::receive(&dir, "dst-plain", &uri, &[]);
    refused(&mut src, &uri, &["--tls-dir", s(&a)], "does not speak TLS");
    wait_stderr(&mut dst.proc, "The peer opened a TLS connection");
    assert_waiting(&mut dst);
    drop(dst);

    // A key that group or others may read: refused by both commands, naming file and mode.
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    for f in ["ca.pem", "cert.pem"] {
        std::fs::copy(a.join(f), open.join(f)).unwrap();
    }
    write_key(
        &open.join("key.pem"),
        &std::fs::read_to_string(a.join("key.pem")).unwrap(),
        0o640,
    );
    let named = format!("{} has mode 0640", open.join("key.pem").display());
    refused(&mut src, &uri, &["--tls-dir", s(&open)], &named);
    let api = dir.join("dst-open.api");
    let mut p = Proc::minivmm(
        "dst-open",
        &[
            "receive",
            "--listen",
            &format!("tcp:127.0.0.1:{}", free_tcp_port()),
            "--tls-dir",
            s(&open),
            "--api-socket",
            s(&api),
        ],
    );
    let st = p.wait_exit(T).expect("receive refuses to start");
    assert_eq!(st.code(), Some(1));
    assert!(p.stderr().contains(&named), "{}", p.stderr());
    assert!(!api.exists(), "no control socket: it never started");
}

#[test]
fn a_network_listener_needs_tls_or_says_it_is_insecure() {
    require_kvm!();
    let dir = TempDir::new("tls-plain");
    let port = free_tcp_port();
    let any = format!("tcp:0.0.0.0:{port}");
    let api = dir.join("dst.api");
    let mut p = Proc::minivmm(
        "dst-refused",
        &["receive", "--listen", &any, "--api-socket", s(&api)],
    );
    let st = p.wait_exit(T).expect("receive refuses to start");
    assert_eq!(st.code(), Some(2));
    let err = p.stderr();
    assert!(
        err.contains(&format!("refusing to listen on {any} without TLS")),
        "{err}"
    );
    assert!(err.contains("--insecure-plaintext"), "{err}");
    assert!(!api.exists());

    // Asked for: it starts, and warns about every connection with the peer's address.
    let mut dst = Vm::receive(&dir, "dst-insecure", &any, &["--insecure-plaintext"]);
    for _ in 0..2 {
        let probe = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let local = probe.local_addr().expect("address");
        drop(probe);
        let err = wait_stderr(&mut dst.proc, &format!("from {local}"));
        assert!(
            err.contains(&format!(
                "plaintext migration connection from {local}: not authenticated, not encrypted"
            )),
            "{err}"
        );
    }
}

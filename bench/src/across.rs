//! Across hosts: the rig's scenarios (`scripts/rig.sh`: source and destination in two network
//! namespaces over a veth pair shaped like 10 GbE or 1 GbE), each migrated four ways over TCP
//! on the same namespaces and shaping: minivmm plain and with mutual TLS (when the binary has
//! `--tls-dir`), QEMU plain and with `tls-creds-x509` (`verify-peer=on`). One certificate
//! authority (openssl, P-256) signs both hosts' certificates, named by their addresses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::rig::{Host, Link, Rig};
use e2e::{Proc, TempDir};
use serde_json::{json, Value};
use vmm::control::protocol::ListeningLine;

use crate::qmp::Qmp;
use crate::scenario::{
    cpu_ms, first_verify, migrate_and_measure, p, settle, strings, verified_after, Measure,
    Scenario, T,
};

/// The rig's scenarios: idle 4 GiB and the 20,000 pages/s writer, over each link.
pub fn all() -> Vec<(Scenario, Link)> {
    let base: Vec<Scenario> = crate::scenario::all()
        .into_iter()
        .filter(|s| s.name == "idle-4G" || s.name == "writer-20k")
        .collect();
    let mut v = Vec::new();
    for link in [Link::TenGbE, Link::OneGbE] {
        for s in &base {
            v.push((s.clone(), link));
        }
    }
    v
}

/// The scenario's name with its link, as `--only` takes it: `idle-4G@10GbE`.
pub fn name(s: &Scenario, link: Link) -> String {
    format!("{}@{}", s.name, link.label())
}

/// One of the four ways a scenario is migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Minivmm,
    MinivmmTls,
    Qemu,
    QemuTls,
}

impl Way {
    pub const ALL: [Way; 4] = [Way::Minivmm, Way::MinivmmTls, Way::Qemu, Way::QemuTls];

    pub fn label(self) -> &'static str {
        match self {
            Way::Minivmm => "minivmm",
            Way::MinivmmTls => "minivmm TLS",
            Way::Qemu => "QEMU",
            Way::QemuTls => "QEMU TLS",
        }
    }
}

/// What the minivmm under test offers: mutual TLS (`--tls-dir`), and whether a plaintext
/// `receive` on a non-loopback address must say `--insecure-plaintext`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub tls: bool,
    pub insecure_plaintext_flag: bool,
}

impl Caps {
    pub fn of(bin: &Path) -> Caps {
        let help = |sub: &str| {
            Command::new(bin)
                .args([sub, "--help"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        Caps {
            tls: help("migrate").contains("--tls-dir"),
            insecure_plaintext_flag: help("receive").contains("--insecure-plaintext"),
        }
    }
}

/// Certificates for both hosts: QEMU's names (`ca-cert.pem`, `server-*.pem`,
/// `client-*.pem`) in `qemu`, and minivmm's (`ca.pem`, `cert.pem`, `key.pem`) per host.
pub struct Certs {
    _dir: TempDir,
    pub qemu: PathBuf,
    pub minivmm_src: PathBuf,
    pub minivmm_dst: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Certs {
    pub fn make(rig: &Rig) -> Result<Certs, String> {
        let dir = TempDir::new("bench-certs");
        let qemu = dir.join("qemu");
        std::fs::create_dir_all(&qemu).map_err(|e| e.to_string())?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &qemu,
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca-key.pem",
                    "-out",
                    "ca-cert.pem",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=minivmm bench CA",
                ],
            ]
            .concat(),
        )?;
        for (role, host) in [("server", Host::Dst), ("client", Host::Src)] {
            let ip = rig.addr(host);
            let ext = format!(
                "subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            );
            std::fs::write(qemu.join(format!("{role}.ext")), ext).map_err(|e| e.to_string())?;
            let (key, csr, cert) = (
                format!("{role}-key.pem"),
                format!("{role}.csr"),
                format!("{role}-cert.pem"),
            );
            let subj = format!("/CN={ip}");
            openssl(
                &qemu,
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &subj],
                ]
                .concat(),
            )?;
            let extfile = format!("{role}.ext");
            openssl(
                &qemu,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca-cert.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "30",
                    "-extfile",
                    &extfile,
                ],
            )?;
        }
        let mut ours = Vec::new();
        for (host, role) in [("src", "client"), ("dst", "server")] {
            let d = dir.join(host);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            for (from, to) in [
                ("ca-cert.pem".to_string(), "ca.pem"),
                (format!("{role}-cert.pem"), "cert.pem"),
                (format!("{role}-key.pem"), "key.pem"),
            ] {
                std::fs::copy(qemu.join(from), d.join(to)).map_err(|e| e.to_string())?;
            }
            ours.push(d);
        }
        let minivmm_dst = ours.pop().ok_or("no dst dir")?;
        let minivmm_src = ours.pop().ok_or("no src dir")?;
        Ok(Certs {
            _dir: dir,
            qemu,
            minivmm_src,
            minivmm_dst,
        })
    }
}

/// `program args` in `host`'s namespace.
fn spawn_in(rig: &Rig, host: Host, name: &str, program: &Path, args: &[String]) -> Proc {
    let mut full = strings(&["netns", "exec", &rig.netns(host), p(program)]);
    full.extend_from_slice(args);
    Proc::spawn(name, Path::new("/usr/sbin/ip"), &full)
}

/// Migrates the test guest from minivmm in the source namespace to minivmm in the
/// destination's, over TCP (with mutual TLS when `tls` names the certificates).
pub fn run_minivmm(
    rig: &Rig,
    s: &Scenario,
    bin: &Path,
    downtime_ms: u64,
    caps: Caps,
    tls: Option<&Certs>,
) -> Result<Measure, String> {
    let dir = TempDir::new(&format!("bench-rig-ours-{}", s.name));
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let started = Instant::now();
    let cpus = s.cpus.to_string();
    let mut src = spawn_in(
        rig,
        Host::Src,
        "minivmm-src",
        bin,
        &strings(&[
            "run",
            "--mem",
            s.mem,
            "--cpus",
            &cpus,
            "--cmdline",
            s.cmdline,
            "--api-socket",
            p(&src_api),
        ]),
    );
    let boot = first_verify(&mut src, started)?;
    settle(&mut src, s)?;
    let listen = format!("tcp:{}:0", rig.addr(Host::Dst));
    let mut dst_args = strings(&[
        "receive",
        "--mem",
        s.mem,
        "--cpus",
        &cpus,
        "--listen",
        &listen,
        "--api-socket",
        p(&dst_api),
    ]);
    let mut src_flags = Vec::new();
    match tls {
        Some(c) => {
            dst_args.extend(strings(&["--tls-dir", p(&c.minivmm_dst)]));
            src_flags.extend(strings(&["--tls-dir", p(&c.minivmm_src)]));
        }
        None if caps.insecure_plaintext_flag => dst_args.push("--insecure-plaintext".into()),
        None => {}
    }
    let mut dst = spawn_in(rig, Host::Dst, "minivmm-dst", bin, &dst_args);
    let line = dst.try_wait_line_from(0, T, &|l| l.starts_with("{\"listening\""))?;
    let to = serde_json::from_str::<ListeningLine>(&line)
        .map_err(|e| format!("listening line {line:?}: {e}"))?
        .listening;
    e2e::wait_for_socket(&mut dst, &dst_api, T);
    let cpu0 = cpu_ms(src.pid());
    let mut args = strings(&[
        "migrate",
        "--to",
        &to,
        "--api-socket",
        p(&src_api),
        "--downtime-ms",
        &downtime_ms.to_string(),
        "--json",
    ]);
    args.extend(src_flags);
    migrate_and_measure(bin, &args, &src, &mut dst, cpu0, boot)
}

/// The port QEMU's destination listens on (each rig has namespaces of its own).
const QEMU_PORT: u16 = 4444;

/// The same migration between two QEMU processes in the two namespaces, over TCP (with
/// `tls-creds-x509` and `verify-peer=on` when `tls` names the certificates).
pub fn run_qemu(
    rig: &Rig,
    s: &Scenario,
    qemu: &Path,
    image: &Path,
    downtime_ms: u64,
    tls: Option<&Certs>,
) -> Result<Measure, String> {
    let dir = TempDir::new(&format!("bench-rig-qemu-{}", s.name));
    let (qs, qd) = (dir.join("qmp-src"), dir.join("qmp-dst"));
    let uri = format!("tcp:{}:{QEMU_PORT}", rig.addr(Host::Dst));
    let creds = |endpoint: &str| -> Vec<String> {
        tls.map(|c| {
            vec![
                "-object".to_string(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
                    p(&c.qemu)
                ),
            ]
        })
        .unwrap_or_default()
    };
    let started = Instant::now();
    let mut src_args = e2e::qemu::args(s.mem, s.cpus, image, s.cmdline, Some(&qs), None);
    src_args.extend(creds("client"));
    let mut src = spawn_in(rig, Host::Src, "qemu-src", qemu, &src_args);
    let boot = first_verify(&mut src, started)?;
    settle(&mut src, s)?;
    let mut dst_args = e2e::qemu::args(s.mem, s.cpus, image, s.cmdline, Some(&qd), None);
    dst_args.extend(creds("server"));
    dst_args.extend(strings(&["-incoming", "defer"]));
    let mut dst = spawn_in(rig, Host::Dst, "qemu-dst", qemu, &dst_args);
    let mut qsrc = Qmp::connect(&qs, T)?;
    let mut qdst = Qmp::connect(&qd, T)?;
    if tls.is_some() {
        qdst.execute("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
    }
    qdst.execute("migrate-incoming", json!({"uri": uri}))?;
    let mut params = json!({"downtime-limit": downtime_ms, "max-bandwidth": 1u64 << 40});
    if tls.is_some() {
        params["tls-creds"] = json!("tls0");
        params["tls-hostname"] = json!(rig.addr(Host::Dst));
    }
    qsrc.execute("migrate-set-parameters", params)?;
    let cpu0 = cpu_ms(src.pid());
    let from = dst.line_count();
    qsrc.execute("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + T;
    let info = loop {
        let info = qsrc.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => return Err(format!("QEMU migration: {info}")),
            _ if Instant::now() > deadline => return Err("QEMU migration timed out".into()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let src_cpu = cpu_ms(src.pid()) - cpu0;
    let stopped = qsrc.event_time("STOP")?;
    let resumed = qdst.event_time("RESUME")?;
    verified_after(&mut dst, from)?;
    let n = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(Measure {
        boot_to_verify_ms: boot,
        total_ms: n(&info["total-time"]),
        downtime_ms: resumed.saturating_sub(stopped) as f64 / 1000.0,
        reported_downtime_ms: n(&info["downtime"]),
        bytes: n(&info["ram"]["transferred"]),
        passes: n(&info["ram"]["dirty-sync-count"]),
        src_rss_mib: src.rss_kib() as f64 / 1024.0,
        dst_rss_mib: dst.rss_kib() as f64 / 1024.0,
        src_cpu_ms: src_cpu,
        stats: None,
        dirty_log_on_ms: f64::NAN,
        bulk_pass_ms: f64::NAN,
        final_fetch_ms: f64::NAN,
    })
}

//! `bench --tls`: what mutual TLS costs, side by side in one run.
//!
//! - the scenarios (default `idle-4G`) migrated over loopback TCP in plaintext and over TLS
//!   (rustls in user space), the runs interleaved (plain, TLS, plain, TLS, …) so that the
//!   machine's load falls on both alike;
//! - raw throughput of a `migration::Connection` over loopback TCP, plaintext vs TLS: 2 GiB in 4 MiB
//!   sends into 4 MiB reads, with the CPU time of both ends;
//! - whether the kernel offers TLS offload (kTLS) here: `setsockopt(TCP_ULP, "tls")` on a
//!   connected socket, and `/proc/sys/net/ipv4/tcp_available_ulp`.

use std::path::Path;
use std::time::{Duration, Instant};

use migration::tls::{AllowList, TlsClient, TlsServer};
use migration::{Deadline, Endpoint, Transport};
use serde_json::{json, Value};

use crate::scenario::{run_minivmm_over, Link, Measure, Scenario};
use crate::{cell, summarize, METRICS};

/// Raw throughput: bytes per run, and runs of each kind.
const RAW_BYTES: usize = 2 << 30;
const RAW_CHUNK: usize = 4 << 20;
const RAW_REPS: usize = 5;

/// Runs the comparison; prints tables when `print`, and returns the same figures.
pub fn run(
    bin: &Path,
    scenarios: &[Scenario],
    reps: usize,
    downtime_ms: u64,
    print: bool,
) -> Result<Value, String> {
    let dir = e2e::TempDir::new("bench-tls");
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    init(&src, "src.bench", None)?;
    init(&dst, "127.0.0.1", Some(&src))?;
    let tls = Link::Tls {
        src: src.clone(),
        dst: dst.clone(),
    };
    let mut report = Vec::new();
    for s in scenarios {
        let (mut plain, mut secure, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..reps {
            for (link, out) in [(&Link::Tcp, &mut plain), (&tls, &mut secure)] {
                match run_minivmm_over(s, bin, downtime_ms, link, None) {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        eprintln!(
                            "bench: {} over {link:?}, run {}: FAILED: {e}",
                            s.name,
                            i + 1
                        );
                        failed.push(e);
                    }
                }
            }
        }
        if print {
            print_scenario(s, reps, downtime_ms, &plain, &secure);
        }
        report.push(json!({
            "scenario": s, "tcp": plain, "tls": secure, "failures": failed,
        }));
    }
    let raw = raw_throughput(&src, &dst)?;
    let ktls = ktls_probe();
    if print {
        print_raw(&raw);
        println!("kernel TLS offload here: {ktls}");
    }
    Ok(json!({"scenarios": report, "raw": raw, "ktls": ktls}))
}

fn init(dir: &Path, name: &str, ca: Option<&Path>) -> Result<(), String> {
    vmm::tls_init::tls_init(&vmm::cli::TlsInitArgs {
        dir: dir.to_path_buf(),
        name: vec![name.to_string()],
        ca: ca.map(Path::to_path_buf),
        days: 1,
    })
    .map(|_| ())
    .map_err(|e| vmm::error_chain(&e))
}

fn print_scenario(s: &Scenario, reps: usize, downtime_ms: u64, plain: &[Measure], tls: &[Measure]) {
    println!(
        "\n== {} over loopback TCP, plaintext vs mutual TLS (mem {}, \"{}\", downtime limit {} ms, \
         {} interleaved reps; ok {}/{} and {}/{})",
        s.name,
        s.mem,
        s.cmdline,
        downtime_ms,
        reps,
        plain.len(),
        reps,
        tls.len(),
        reps
    );
    println!(
        "{:<22} {:>30} {:>30} {:>12}",
        "metric", "tcp plaintext", "tcp + TLS (rustls)", "TLS/plain"
    );
    for (label, f) in METRICS {
        let p = summarize(&plain.iter().map(f).collect::<Vec<_>>());
        let t = summarize(&tls.iter().map(f).collect::<Vec<_>>());
        let ratio = match (p, t) {
            (Some(p), Some(t)) if p.median > 0.0 => format!("{:.2}", t.median / p.median),
            _ => "-".into(),
        };
        println!(
            "{:<22} {:>30} {:>30} {:>12}",
            label,
            cell(p),
            cell(t),
            ratio
        );
    }
}

/// One raw transfer: GB/s, and CPU seconds per GB of both ends.
fn transfer(tls: Option<(&TlsClient, &Path)>) -> Result<(f64, f64), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut l = Endpoint::parse("tcp:127.0.0.1:0")
        .map_err(|x| e(&x))?
        .listen()
        .map_err(|x| e(&x))?;
    let ep = l.local_endpoint().map_err(|x| e(&x))?;
    let server = tls
        .map(|(_, dir)| TlsServer::load(dir, AllowList::default()))
        .transpose()
        .map_err(|x| e(&x))?;
    let deadline = || Deadline::after(Duration::from_secs(10), "handshake");
    let receiver = std::thread::spawn(move || -> Result<usize, String> {
        let c = l.accept().map_err(|x| x.to_string())?;
        let mut c = match &server {
            Some(s) => c.tls_server(s, deadline()).map_err(|x| x.to_string())?,
            None => c,
        };
        let mut buf = vec![0u8; RAW_CHUNK];
        let mut got = 0;
        loop {
            match c.recv(&mut buf).map_err(|x| x.to_string())? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let c = ep.connect(Duration::from_secs(5)).map_err(|x| e(&x))?;
    let mut c = match tls {
        Some((client, _)) => c
            .tls_client(client, "127.0.0.1", deadline())
            .map_err(|x| e(&x))?,
        None => c,
    };
    let data: Vec<u8> = (0..RAW_CHUNK).map(|i| (i * 131 % 251) as u8).collect();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    for _ in 0..RAW_BYTES / RAW_CHUNK {
        c.send(&[&data]).map_err(|x| e(&x))?;
    }
    c.shutdown();
    let got = receiver
        .join()
        .map_err(|_| "the receiver panicked".to_string())??;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    if got != RAW_BYTES {
        return Err(format!("received {got} of {RAW_BYTES} bytes"));
    }
    let gb = RAW_BYTES as f64 / 1e9;
    Ok((gb / secs, cpu / gb))
}

fn raw_throughput(src: &Path, dst: &Path) -> Result<Value, String> {
    let client = TlsClient::load(src).map_err(|e| vmm::error_chain(&e))?;
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..RAW_REPS {
        plain.push(transfer(None)?);
        tls.push(transfer(Some((&client, dst)))?);
    }
    Ok(json!({
        "bytes": RAW_BYTES, "chunk": RAW_CHUNK,
        "plain_gbps": plain.iter().map(|r| r.0).collect::<Vec<_>>(),
        "plain_cpu_s_per_gb": plain.iter().map(|r| r.1).collect::<Vec<_>>(),
        "tls_gbps": tls.iter().map(|r| r.0).collect::<Vec<_>>(),
        "tls_cpu_s_per_gb": tls.iter().map(|r| r.1).collect::<Vec<_>>(),
    }))
}

fn print_raw(raw: &Value) {
    let col = |k: &str| -> String {
        let v: Vec<f64> = raw[k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        match summarize(&v) {
            Some(s) => format!("{:.2} [{:.2}-{:.2}]", s.median, s.min, s.max),
            None => "-".into(),
        }
    };
    println!(
        "\n== raw Connection throughput over loopback TCP: {} GiB in {} MiB sends, {} interleaved \
         runs (GB = 10^9 bytes; CPU of both ends)",
        RAW_BYTES >> 30,
        RAW_CHUNK >> 20,
        RAW_REPS
    );
    println!("{:<24} {:>24} {:>24}", "", "GB/s", "CPU s per GB");
    println!(
        "{:<24} {:>24} {:>24}",
        "tcp plaintext",
        col("plain_gbps"),
        col("plain_cpu_s_per_gb")
    );
    println!(
        "{:<24} {:>24} {:>24}",
        "tcp + TLS (rustls)",
        col("tls_gbps"),
        col("tls_cpu_s_per_gb")
    );
}

/// This process's user + system CPU time, seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live rusage the call writes into.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Whether this kernel takes the TLS upper-layer protocol on a TCP socket.
fn ktls_probe() -> String {
    let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    let attached = (|| -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let c = std::net::TcpStream::connect(l.local_addr()?)?;
        let _peer = l.accept()?;
        let name = b"tls";
        // SAFETY: setsockopt on a socket we own, with a live 3-byte option value.
        let rc = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_ULP,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })();
    match attached {
        Ok(()) => format!("available (tcp_available_ulp: {ulps})"),
        Err(e) => {
            format!("unavailable: setsockopt(TCP_ULP, \"tls\"): {e} (tcp_available_ulp: {ulps})")
        }
    }
}

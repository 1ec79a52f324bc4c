//! `make bench`: every scenario migrated by minivmm and by QEMU on the same test guest image and
//! command line, side by side, plus microbenchmarks of the pieces that bound migration speed.
//!
//! Usage: `bench [--reps N] [--only NAME[,NAME]] [--downtime-ms N] [--dirty-tracker KIND]
//! [--json] [--no-qemu] [--no-micro] [--no-rig] [--report PATH]` (`--dirty-tracker` is passed to
//! minivmm's `run` and `receive`), or `bench --tls [--reps N] [--only NAME[,NAME]]`: plaintext
//! TCP vs mutual TLS (default scenario `idle-4G`), and raw TLS throughput (see `tls.rs`).
//!
//! Besides the tables it writes `bench/report.html` (or `--report PATH`): the same figures as
//! charts, and each scenario's median minivmm migration as a timeline (`report.rs`).
//!
//! Across hosts (as root): the rig's scenarios (`idle-4G@10GbE`, `writer-20k@1GbE`, …), each
//! migrated by minivmm plain and with TLS and by QEMU plain and with TLS, over TCP between two
//! network namespaces shaped like the link named ([`across`]).
//!
//! The `minivmm` measured is `$MINIVMM_BIN` (`make bench` sets it), else the one beside this
//! executable (`target/release/minivmm` for `cargo run --release -p bench`, which does not
//! build it).

mod across;
mod micro;
mod qmp;
mod report;
mod scenario;
mod tls;

use std::path::{Path, PathBuf};
use std::process::Command;

use scenario::{Measure, Scenario};
use serde_json::json;

struct Args {
    reps: usize,
    only: Option<Vec<String>>,
    downtime_ms: u64,
    dirty_tracker: Option<String>,
    json: bool,
    qemu: bool,
    micro: bool,
    tls: bool,
    report: PathBuf,
    rig: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        reps: 3,
        only: None,
        downtime_ms: 50,
        dirty_tracker: None,
        json: false,
        qemu: true,
        micro: true,
        tls: false,
        report: Path::new(env!("CARGO_MANIFEST_DIR")).join("report.html"),
        rig: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--reps" => a.reps = val("--reps")?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--only" => a.only = Some(val("--only")?.split(',').map(String::from).collect()),
            "--downtime-ms" => {
                a.downtime_ms = val("--downtime-ms")?
                    .parse()
                    .map_err(|e| format!("--downtime-ms: {e}"))?
            }
            "--dirty-tracker" => a.dirty_tracker = Some(val("--dirty-tracker")?),
            "--json" => a.json = true,
            "--no-qemu" => a.qemu = false,
            "--no-micro" => a.micro = false,
            "--tls" => a.tls = true,
            "--report" => a.report = PathBuf::from(val("--report")?),
            "--no-rig" => a.rig = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(a)
}

/// The `minivmm` to measure, or why there is none.
fn minivmm_bin() -> Result<PathBuf, String> {
    let bin = match std::env::var_os("MINIVMM_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot tell where this executable is: {e}"))?;
            exe.parent().unwrap_or(Path::new(".")).join("minivmm")
        }
    };
    if !bin.is_file() {
        return Err(format!(
            "{} is missing: build it first (`make bench` does, or `cargo build --release -p vmm`), \
             or name one with MINIVMM_BIN",
            bin.display()
        ));
    }
    Ok(bin)
}

fn ensure_qemu() -> Option<PathBuf> {
    if let Some(q) = scenario::qemu_path() {
        return Some(q);
    }
    eprintln!("bench: qemu-system-x86_64 is missing; installing Debian's qemu-system-x86");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("bench: could not install QEMU; comparing nothing");
    }
    scenario::qemu_path()
}

/// Median, min and max of one metric over the repetitions.
#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(v: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(Summary {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    })
}

type Metric = (&'static str, fn(&Measure) -> f64);

const METRICS: &[Metric] = &[
    ("boot to VERIFY-OK ms", |m| m.boot_to_verify_ms),
    ("total migration ms", |m| m.total_ms),
    ("downtime ms", |m| m.downtime_ms),
    ("  VMM's own figure ms", |m| m.reported_downtime_ms),
    ("MiB transferred", |m| m.bytes / (1024.0 * 1024.0)),
    ("passes", |m| m.passes),
    ("source RSS MiB", |m| m.src_rss_mib),
    ("dest RSS MiB", |m| m.dst_rss_mib),
    ("source CPU ms", |m| m.src_cpu_ms),
    ("dirty-log switch-on ms", |m| m.dirty_log_on_ms),
    ("bulk pass ms", |m| m.bulk_pass_ms),
    ("final dirty-log fetch ms", |m| m.final_fetch_ms),
];

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) if s.min == s.max => format!("{:.1}", s.median),
        Some(s) => format!("{:.1} [{:.1}-{:.1}]", s.median, s.min, s.max),
        None => "-".into(),
    }
}

fn run_reps(
    name: &str,
    reps: usize,
    mut f: impl FnMut() -> Result<Measure, String>,
) -> (Vec<Measure>, Vec<String>) {
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for i in 0..reps {
        match f() {
            Ok(m) => ok.push(m),
            Err(e) => {
                eprintln!("bench: {name} run {}: FAILED: {e}", i + 1);
                failed.push(e);
            }
        }
    }
    (ok, failed)
}

/// The rig's scenarios, each migrated the four ways, the ways interleaved in every repetition
/// (so that drift of the host hits them alike). Returns the JSON report and whether a minivmm
/// run failed.
fn run_across(
    args: &Args,
    bin: &Path,
    image: &Path,
    qemu: Option<&Path>,
) -> (Vec<serde_json::Value>, bool) {
    use across::Way;
    let scenarios: Vec<_> = across::all()
        .into_iter()
        .filter(|(s, link)| {
            args.only
                .as_ref()
                .is_none_or(|o| o.iter().any(|n| *n == across::name(s, *link)))
        })
        .collect();
    if scenarios.is_empty() {
        return (Vec::new(), false);
    }
    // SAFETY: geteuid(2) reads the process's credentials and has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench: across hosts: skipped, the rig needs root");
        return (Vec::new(), false);
    }
    let caps = across::Caps::of(bin);
    let rig = e2e::rig::Rig::up();
    let certs = match across::Certs::make(&rig) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("bench: across hosts: no certificates, so no TLS runs: {e}");
            None
        }
    };
    let ways: Vec<Way> = Way::ALL
        .into_iter()
        .filter(|w| match w {
            Way::Minivmm => true,
            Way::MinivmmTls => caps.tls && certs.is_some(),
            Way::Qemu => qemu.is_some(),
            Way::QemuTls => qemu.is_some() && certs.is_some(),
        })
        .collect();
    if !caps.tls {
        eprintln!("bench: across hosts: this minivmm has no --tls-dir; minivmm TLS not measured");
    }
    let mut report = Vec::new();
    let mut any_failed = false;
    for (s, link) in &scenarios {
        let name = across::name(s, *link);
        rig.shape(*link);
        eprintln!("bench: {name} (mem {}, cmdline {:?})", s.mem, s.cmdline);
        let mut measured: Vec<(Vec<scenario::Measure>, Vec<String>)> =
            ways.iter().map(|_| (Vec::new(), Vec::new())).collect();
        for rep in 0..args.reps {
            for (i, way) in ways.iter().enumerate() {
                let tls = matches!(way, Way::MinivmmTls | Way::QemuTls)
                    .then_some(certs.as_ref())
                    .flatten();
                let r = match (way, qemu) {
                    (Way::Minivmm | Way::MinivmmTls, _) => {
                        across::run_minivmm(&rig, s, bin, args.downtime_ms, caps, tls)
                    }
                    (Way::Qemu | Way::QemuTls, Some(q)) => {
                        across::run_qemu(&rig, s, q, image, args.downtime_ms, tls)
                    }
                    (_, None) => continue,
                };
                match r {
                    Ok(m) => measured[i].0.push(m),
                    Err(e) => {
                        eprintln!("bench: {name} {} run {}: FAILED: {e}", way.label(), rep + 1);
                        any_failed |= matches!(way, Way::Minivmm | Way::MinivmmTls);
                        measured[i].1.push(e);
                    }
                }
            }
        }
        if !args.json {
            println!(
                "\n== {name} (mem {}, {} vCPU, \"{}\", TCP over the rig, downtime limit {} ms, {} reps)",
                s.mem, s.cpus, s.cmdline, args.downtime_ms, args.reps
            );
            let mut header = format!("{:<22}", "metric");
            for (w, (ok, _)) in ways.iter().zip(&measured) {
                header.push_str(&format!(
                    " {:>26}",
                    format!("{} ({} ok)", w.label(), ok.len())
                ));
            }
            println!("{header}");
            for (label, f) in METRICS {
                let mut row = format!("{label:<22}");
                for (ok, _) in &measured {
                    row.push_str(&format!(
                        " {:>26}",
                        cell(summarize(&ok.iter().map(f).collect::<Vec<_>>()))
                    ));
                }
                println!("{row}");
            }
            let total = |w: Way| {
                ways.iter().position(|x| *x == w).and_then(|i| {
                    summarize(&measured[i].0.iter().map(|m| m.total_ms).collect::<Vec<_>>())
                })
            };
            for (plain, tls, who) in [
                (Way::Minivmm, Way::MinivmmTls, "minivmm"),
                (Way::Qemu, Way::QemuTls, "QEMU"),
            ] {
                if let (Some(p), Some(t)) = (total(plain), total(tls)) {
                    println!(
                        "TLS cost, {who}: total time {:+.0} % (median {:.1} vs {:.1} ms)",
                        (t.median / p.median - 1.0) * 100.0,
                        t.median,
                        p.median
                    );
                }
            }
        }
        let mut entry = json!({"scenario": s, "link": link.label(), "name": name});
        for (w, (ok, failed)) in ways.iter().zip(&measured) {
            entry[w.label()] = json!({"runs": ok, "failures": failed});
        }
        report.push(entry);
    }
    (report, any_failed)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let bin = match minivmm_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if args.tls {
        let only = args.only.clone().unwrap_or_else(|| vec!["idle-4G".into()]);
        let scenarios: Vec<Scenario> = scenario::all()
            .into_iter()
            .filter(|s| only.iter().any(|n| n == s.name))
            .collect();
        match tls::run(&bin, &scenarios, args.reps, args.downtime_ms, !args.json) {
            Ok(v) if args.json => println!("{v}"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("bench: --tls: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let dir = e2e::TempDir::new("bench-image");
    let image = dir.join("testguest.elf");
    if let Err(e) = std::fs::write(&image, guest::TEST_GUEST_ELF) {
        eprintln!("bench: writing the test guest image: {e}");
        std::process::exit(1);
    }
    let qemu = if args.qemu { ensure_qemu() } else { None };
    let scenarios: Vec<Scenario> = scenario::all()
        .into_iter()
        .filter(|s| {
            args.only
                .as_ref()
                .is_none_or(|o| o.iter().any(|n| n == s.name))
        })
        .collect();

    let mut report = Vec::new();
    let mut measured = Vec::new();
    let mut any_failed = false;
    for s in &scenarios {
        eprintln!("bench: {} (mem {}, cmdline {:?})", s.name, s.mem, s.cmdline);
        let (ours, ours_failed) = run_reps(s.name, args.reps, || {
            scenario::run_minivmm(s, &bin, args.downtime_ms, args.dirty_tracker.as_deref())
        });
        let (theirs, theirs_failed) = match &qemu {
            Some(q) if !s.local => run_reps(s.name, args.reps, || {
                scenario::run_qemu(s, q, &image, args.downtime_ms)
            }),
            _ => (Vec::new(), Vec::new()),
        };
        any_failed |= !ours_failed.is_empty();
        let mut rows = Vec::new();
        for (label, f) in METRICS {
            let o = summarize(&ours.iter().map(f).collect::<Vec<_>>());
            let t = summarize(&theirs.iter().map(f).collect::<Vec<_>>());
            let ratio = match (o, t) {
                (Some(o), Some(t)) if o.median > 0.0 => format!("{:.2}", t.median / o.median),
                _ => "-".into(),
            };
            rows.push((label, o, t, ratio));
        }
        if !args.json {
            println!(
                "\n== {} (mem {}, {} vCPU, \"{}\", downtime limit {} ms, {} reps; ours ok {}/{}, QEMU ok {}/{})",
                s.name, s.mem, s.cpus, s.cmdline, args.downtime_ms, args.reps,
                ours.len(), args.reps, theirs.len(), if qemu.is_some() { args.reps } else { 0 }
            );
            println!(
                "{:<22} {:>30} {:>30} {:>12}",
                "metric", "minivmm", "QEMU", "QEMU/ours"
            );
            for (label, o, t, ratio) in &rows {
                println!(
                    "{:<22} {:>30} {:>30} {:>12}",
                    label,
                    cell(*o),
                    cell(*t),
                    ratio
                );
            }
        }
        report.push(json!({
            "scenario": s,
            "minivmm": ours, "minivmm_failures": ours_failed,
            "qemu": theirs, "qemu_failures": theirs_failed,
        }));
        measured.push((s, ours, theirs));
    }
    let runs: Vec<report::Runs<'_>> = measured
        .iter()
        .map(|(s, ours, theirs)| report::Runs {
            scenario: s,
            ours,
            theirs,
        })
        .collect();
    let header = format!(
        "`make bench` ({}), {} reps, downtime limit {} ms, on {} ({} CPUs), unix-time {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        args.reps,
        args.downtime_ms,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    match report::write(&args.report, &header, &runs) {
        Ok(()) => eprintln!("bench: report written to {}", args.report.display()),
        Err(e) => eprintln!("bench: writing {}: {e}", args.report.display()),
    }
    let across = if args.rig {
        let (r, failed) = run_across(&args, &bin, &image, qemu.as_deref());
        any_failed |= failed;
        r
    } else {
        Vec::new()
    };
    let micro = if args.micro {
        micro::run(!args.json)
    } else {
        json!(null)
    };
    if args.json {
        println!(
            "{}",
            json!({"scenarios": report, "across_hosts": across, "micro": micro})
        );
    }
    if any_failed {
        eprintln!("bench: some minivmm runs failed (see above)");
        std::process::exit(1);
    }
}

//! The migration scenarios and one measured run of each VMM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::guest::{assert_no_failure, VerifyOk};
use e2e::{Proc, TempDir};
use serde::Serialize;
use serde_json::json;
use vmm::control::protocol::{MigrateSummary, Reply};

use crate::qmp::Qmp;

/// One scenario: the same guest image and command line for both VMMs.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub mem: &'static str,
    pub cpus: u32,
    pub cmdline: &'static str,
    /// Extra time the workload runs after its first VERIFY-OK before the migration starts.
    pub settle: Duration,
    /// Local migration: guest RAM in memfds (`run --mem-shared`) handed over by descriptor
    /// (`migrate --local`). QEMU 7.2 has no counterpart here (`cpr-transfer` is 9.2's).
    pub local: bool,
}

pub fn all() -> Vec<Scenario> {
    let s = |name, mem, cmdline, settle_ms| Scenario {
        name,
        mem,
        cpus: 1,
        cmdline,
        settle: Duration::from_millis(settle_ms),
        local: false,
    };
    let local = |name, mem| Scenario {
        local: true,
        ..s(name, mem, "touch=64M rate=0 seed=1", 0)
    };
    vec![
        s("idle-1G", "1G", "touch=64M rate=0 seed=1", 0),
        s("idle-4G", "4G", "touch=64M rate=0 seed=1", 0),
        s("idle-16G", "16G", "touch=64M rate=0 seed=1", 0),
        s("scrub-1G", "2G", "touch=1G scrub=1G rate=0 seed=2", 0),
        s("writer-20k", "1G", "touch=256M rate=20000 seed=3", 1000),
        s("writer-max", "1G", "touch=256M rate=max seed=4", 1000),
        local("local-1G", "1G"),
        local("local-4G", "4G"),
        local("local-16G", "16G"),
        Scenario {
            local: true,
            ..s("local-writer-max", "1G", "touch=256M rate=max seed=4", 1000)
        },
    ]
}

/// What one migration cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measure {
    pub boot_to_verify_ms: f64,
    pub total_ms: f64,
    /// Guest stopped on the source until running on the destination.
    pub downtime_ms: f64,
    /// The VMM's own downtime figure (QEMU's stops counting before the destination runs).
    pub reported_downtime_ms: f64,
    pub bytes: f64,
    pub passes: f64,
    pub src_rss_mib: f64,
    pub dst_rss_mib: f64,
    pub src_cpu_ms: f64,
    /// minivmm: the `stats` of `migrate --json` (passes, phases), for the report's timeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    /// minivmm's phases (NaN for QEMU): switching dirty logging on before the bulk pass,
    /// the bulk pass end to end, and the dirty-log fetch inside the downtime.
    pub dirty_log_on_ms: f64,
    pub bulk_pass_ms: f64,
    pub final_fetch_ms: f64,
}

/// Phase `name` of a `[[name, us], ...]` list in migrate's JSON statistics, in ms.
pub(crate) fn phase_ms(phases: &serde_json::Value, name: &str) -> f64 {
    phases
        .as_array()
        .and_then(|a| a.iter().find(|p| p[0] == name))
        .and_then(|p| p[1].as_f64())
        .map_or(f64::NAN, |us| us / 1000.0)
}

pub(crate) const T: Duration = Duration::from_secs(120);

pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

pub(crate) fn first_verify(p: &mut Proc, started: Instant) -> Result<f64, String> {
    p.try_wait_line_from(0, T, &|l| VerifyOk::parse(l).is_some())
        .map_err(|e| format!("{}: no VERIFY-OK: {e}", p.name))?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// After the migration the destination's guest must verify again, with nothing failed.
pub(crate) fn verified_after(dst: &mut Proc, from: usize) -> Result<(), String> {
    for _ in 0..2 {
        let n = dst.line_count();
        dst.try_wait_line_from(from.max(n), T, &|l| VerifyOk::parse(l).is_some())
            .map_err(|e| format!("{}: no VERIFY-OK after migration: {e}", dst.name))?;
    }
    if dst
        .lines()
        .iter()
        .any(|l| l.contains("VERIFY-FAIL") || l.starts_with("EXC "))
    {
        return Err(format!(
            "{}: guest verification failed after migration",
            dst.name
        ));
    }
    Ok(())
}

pub(crate) fn settle(p: &mut Proc, s: &Scenario) -> Result<(), String> {
    if s.cmdline.contains("rate=0") {
        // Idle guests: wait until every CPU has filled its slice and verified once.
        p.try_wait_line_from(0, T, &|l| l.starts_with("FILL-DONE"))?;
    }
    std::thread::sleep(s.settle);
    if p.lines().iter().any(|l| l.contains("VERIFY-FAIL")) {
        return Err("guest verification failed before migration".into());
    }
    Ok(())
}

/// What a minivmm migration runs over.
#[derive(Clone, Debug)]
pub enum Link {
    Unix,
    /// Plaintext TCP over loopback.
    Tcp,
    /// Mutual TLS over loopback TCP: the source's and the destination's TLS directories.
    Tls {
        src: PathBuf,
        dst: PathBuf,
    },
}

/// Migrate the test guest from one minivmm process to another over a unix socket.
/// `dirty_tracker` is passed to `run` and `receive` (`--dirty-tracker`).
pub fn run_minivmm(
    s: &Scenario,
    bin: &Path,
    downtime_ms: u64,
    dirty_tracker: Option<&str>,
) -> Result<Measure, String> {
    run_minivmm_over(s, bin, downtime_ms, &Link::Unix, dirty_tracker)
}

/// Migrate the test guest from one minivmm process to another over `link`.
pub fn run_minivmm_over(
    s: &Scenario,
    bin: &Path,
    downtime_ms: u64,
    link: &Link,
    dirty_tracker: Option<&str>,
) -> Result<Measure, String> {
    let tracker: Vec<&str> = dirty_tracker
        .map(|t| vec!["--dirty-tracker", t])
        .unwrap_or_default();
    let dir = TempDir::new(&format!("bench-ours-{}", s.name));
    let (src_api, dst_api) = (dir.join("src.sock"), dir.join("dst.sock"));
    let uri = match link {
        Link::Unix => format!("unix:{}", p(&dir.join("mig.sock"))),
        Link::Tcp | Link::Tls { .. } => format!("tcp:127.0.0.1:{}", e2e::free_tcp_port()),
    };
    let (receive_tls, migrate_tls) = match link {
        Link::Tls { src, dst } => (
            vec!["--tls-dir".to_string(), p(dst).to_string()],
            vec!["--tls-dir".to_string(), p(src).to_string()],
        ),
        _ => (Vec::new(), Vec::new()),
    };
    let started = Instant::now();
    let cpus = s.cpus.to_string();
    let mut run = strings(&[
        "run",
        "--mem",
        s.mem,
        "--cpus",
        &cpus,
        "--cmdline",
        s.cmdline,
        "--api-socket",
        p(&src_api),
    ]);
    run.extend(strings(&tracker));
    if s.local {
        run.push("--mem-shared".into());
    }
    let mut src = Proc::spawn("minivmm-src", bin, &run);
    let boot = first_verify(&mut src, started)?;
    settle(&mut src, s)?;
    let mut dst = Proc::spawn(
        "minivmm-dst",
        bin,
        // Told the VM's shape up front, as QEMU's destination is by its -m and -smp.
        &[
            strings(&[
                "receive",
                "--mem",
                s.mem,
                "--cpus",
                &cpus,
                "--listen",
                &uri,
                "--api-socket",
                p(&dst_api),
            ]),
            strings(&tracker),
            receive_tls,
        ]
        .concat(),
    );
    e2e::wait_for_socket(&mut dst, &dst_api, T);
    let cpu0 = cpu_ms(src.pid());
    let mut args = [
        strings(&[
            "migrate",
            "--to",
            &uri,
            "--api-socket",
            p(&src_api),
            "--downtime-ms",
            &downtime_ms.to_string(),
            "--json",
        ]),
        migrate_tls,
    ]
    .concat();
    if s.local {
        args.push("--local".into());
    }
    let m = migrate_and_measure(bin, &args, &src, &mut dst, cpu0, boot)?;
    assert_no_failure(&dst);
    Ok(m)
}

/// Runs `minivmm migrate ARGS` (`--json`) from `src` (its CPU time `cpu0` ms before), waits
/// for the destination `dst` to verify once more, and returns the run's figures from the
/// summary (`boot`: the source's boot to its first verification).
pub(crate) fn migrate_and_measure(
    bin: &Path,
    args: &[String],
    src: &Proc,
    dst: &mut Proc,
    cpu0: f64,
    boot: f64,
) -> Result<Measure, String> {
    let mut m = Proc::spawn("minivmm-migrate", bin, args);
    let st = m.wait_exit(T).ok_or("migrate did not finish")?;
    let src_cpu = cpu_ms(src.pid()) - cpu0;
    let out = m.lines().join("\n");
    if !st.success() {
        return Err(format!("migrate failed: {}\n{}", m.stderr(), out));
    }
    let summary = match serde_json::from_str::<Reply<MigrateSummary>>(&out) {
        Ok(Reply::Ok(s)) => s,
        Ok(Reply::Error(e)) => return Err(format!("migrate failed: {e}")),
        Err(e) => return Err(format!("migrate --json output: {e}: {out}")),
    };
    verified_after(dst, 0)?;
    Ok(Measure {
        boot_to_verify_ms: boot,
        total_ms: summary.total_ms,
        downtime_ms: summary.downtime_ms,
        reported_downtime_ms: summary.downtime_ms,
        bytes: summary.bytes_sent as f64,
        passes: summary.passes as f64,
        src_rss_mib: summary.source_rss_kib as f64 / 1024.0,
        dst_rss_mib: dst.rss_kib() as f64 / 1024.0,
        src_cpu_ms: src_cpu,
        dirty_log_on_ms: phase_ms(&summary.stats["setup_phases_us"], "start dirty log"),
        bulk_pass_ms: summary.stats["passes"][0]["duration_us"]
            .as_f64()
            .map_or(f64::NAN, |us| us / 1000.0),
        final_fetch_ms: phase_ms(&summary.stats["downtime_phases_us"], "dirty log"),
        stats: Some(summary.stats),
    })
}

fn qemu_args(s: &Scenario, image: &Path, qmp: &Path, incoming: Option<&Path>) -> Vec<String> {
    e2e::qemu::args(s.mem, s.cpus, image, s.cmdline, Some(qmp), incoming)
}

/// The same migration between two QEMU processes, driven over QMP.
pub fn run_qemu(
    s: &Scenario,
    qemu: &Path,
    image: &Path,
    downtime_ms: u64,
) -> Result<Measure, String> {
    let dir = TempDir::new(&format!("bench-qemu-{}", s.name));
    let (qs, qd, mig) = (
        dir.join("qmp-src"),
        dir.join("qmp-dst"),
        dir.join("mig.sock"),
    );
    let started = Instant::now();
    let mut src = Proc::spawn("qemu-src", qemu, &qemu_args(s, image, &qs, None));
    let boot = first_verify(&mut src, started)?;
    settle(&mut src, s)?;
    let mut dst = Proc::spawn("qemu-dst", qemu, &qemu_args(s, image, &qd, Some(&mig)));
    let mut qsrc = Qmp::connect(&qs, T)?;
    let mut qdst = Qmp::connect(&qd, T)?;
    qsrc.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": downtime_ms, "max-bandwidth": 1u64 << 40}),
    )?;
    let cpu0 = cpu_ms(src.pid());
    let from = dst.line_count();
    qsrc.execute("migrate", json!({"uri": format!("unix:{}", p(&mig))}))?;
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
    // The guest's own downtime: stopped on the source until running on the destination, from
    // the host timestamps of the two QMP events. QEMU's `downtime` figure ends on the source.
    let stopped = qsrc.event_time("STOP")?;
    let resumed = qdst.event_time("RESUME")?;
    verified_after(&mut dst, from)?;
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
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

pub(crate) fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

pub(crate) fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Where QEMU lives (installed by `make deps`).
pub fn qemu_path() -> Option<PathBuf> {
    let q = PathBuf::from("/usr/bin/qemu-system-x86_64");
    q.exists().then_some(q)
}

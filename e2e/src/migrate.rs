//! Live-migration helpers: start a source VM, a destination, run `minivmm migrate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::control::protocol::{
    IncomingProgress, IncomingState, IncomingStatus, ListeningLine, MigrateSummary, Reply, Request,
};

use crate::guest::{assert_no_failure, wait_rounds, VerifyOk};
use crate::linux::{self, Boot};
use crate::{wait_for_socket, Proc, TempDir};

pub const T: Duration = Duration::from_secs(90);

/// A running VMM with its control socket.
pub struct Vm {
    pub proc: Proc,
    pub api: PathBuf,
}

impl Vm {
    /// `minivmm run` with the test guest.
    pub fn run(dir: &TempDir, name: &str, mem: &str, cpus: u32, cmdline: &str) -> Vm {
        Vm::run_env(dir, name, mem, cpus, cmdline, &[])
    }

    /// [`Vm::run`] with extra environment variables (`MINIVMM_FAULT=...`).
    pub fn run_env(
        dir: &TempDir,
        name: &str,
        mem: &str,
        cpus: u32,
        cmdline: &str,
        env: &[(&str, &str)],
    ) -> Vm {
        Vm::run_with(dir, name, mem, cpus, cmdline, &[], env)
    }

    /// [`Vm::run`] with extra flags (`--mem-shared`, `--dirty-tracker`) and environment
    /// variables.
    pub fn run_with(
        dir: &TempDir,
        name: &str,
        mem: &str,
        cpus: u32,
        cmdline: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vm {
        let api = dir.join(&format!("{name}.api"));
        let cpus = cpus.to_string();
        let mut args = vec![
            "run",
            "--mem",
            mem,
            "--cpus",
            &cpus,
            "--cmdline",
            cmdline,
            "--api-socket",
            api.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::minivmm_env(name, &args, env);
        wait_for_socket(&mut proc, &api, T);
        Vm { proc, api }
    }

    /// `minivmm run` with a Linux kernel ([`linux::run_kernel`]), once its control socket is up.
    pub fn run_kernel(dir: &TempDir, name: &str, boot: &Boot) -> Vm {
        let api = dir.join(&format!("{name}.api"));
        let mut proc = linux::run_kernel(name, boot, &api);
        wait_for_socket(&mut proc, &api, T);
        Vm { proc, api }
    }

    /// `minivmm receive --listen URI` (plus extra flags).
    pub fn receive(dir: &TempDir, name: &str, uri: &str, extra: &[&str]) -> Vm {
        Vm::receive_env(dir, name, uri, extra, &[])
    }

    /// [`Vm::receive`] with extra environment variables (`MINIVMM_FAULT=...`).
    pub fn receive_env(
        dir: &TempDir,
        name: &str,
        uri: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vm {
        let api = dir.join(&format!("{name}.api"));
        let mut args = vec![
            "receive",
            "--listen",
            uri,
            "--api-socket",
            api.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::minivmm_env(name, &args, env);
        wait_for_socket(&mut proc, &api, T);
        Vm { proc, api }
    }

    /// Wait for `n` more VERIFY-OK rounds of `cpu`.
    pub fn rounds(&mut self, cpu: u64, n: usize) -> VerifyOk {
        let from = self.proc.line_count();
        wait_rounds(&mut self.proc, from, cpu, n, T)
    }
}

/// Result of one `minivmm migrate` run.
pub struct Migration {
    pub ok: bool,
    /// What `--json` printed; `None` when it printed no reply.
    pub reply: Option<Reply<MigrateSummary>>,
    pub stderr: String,
}

/// Run `minivmm migrate --to URI --api-socket API --json [extra…]` to completion.
pub fn migrate(api: &Path, to: &str, extra: &[&str]) -> Migration {
    let mut args = vec![
        "migrate",
        "--to",
        to,
        "--api-socket",
        api.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let mut m = Proc::minivmm("migrate", &args);
    let st = m
        .wait_exit(Duration::from_secs(300))
        .expect("migrate finished");
    let out = m.lines().join("\n");
    Migration {
        ok: st.success(),
        reply: serde_json::from_str(&out).ok(),
        stderr: m.stderr(),
    }
}

/// Migrate and require success; the source must exit 0 afterwards (its VM moved).
pub fn migrate_ok(src: &mut Vm, to: &str, extra: &[&str]) -> MigrateSummary {
    let m = migrate(&src.api, to, extra);
    assert!(m.ok, "migrate to {to} failed: {}\n{:?}", m.stderr, m.reply);
    let s = match m.reply {
        Some(Reply::Ok(s)) => s,
        other => panic!("migrate to {to} printed no summary: {other:?}"),
    };
    let st = src.proc.wait_exit(T);
    assert!(
        st.is_some_and(|s| s.success()),
        "source exits 0 after migration: {st:?}"
    );
    eprintln!(
        "migrated to {to}: total {} ms, downtime {} ms, passes {}, bytes {}, zero-elided {}, untouched {}",
        s.total_ms, s.downtime_ms, s.passes, s.bytes_sent, s.pages_zero_elided,
        s.pages_untouched_skipped
    );
    s
}

/// The memory hashes taken at the source's final pause and on the destination before resume.
pub fn assert_hashes_match(stats: &MigrateSummary) {
    let (s, d) = (&stats.mem_hash_source, &stats.mem_hash_dest);
    assert!(
        s.as_deref().is_some_and(|h| !h.is_empty()),
        "no source hash: {stats:?}"
    );
    assert_eq!(s, d, "guest memory differs between source and destination");
}

/// After a migration, the destination's guest keeps verifying with nothing failed.
pub fn assert_keeps_verifying(dst: &mut Vm, cpus: u64) {
    for cpu in 0..cpus {
        dst.rounds(cpu, 2);
    }
    assert_no_failure(&dst.proc);
}

/// No guest ever ran in `p` (it printed no VERIFY line): a destination that refused.
pub fn assert_no_guest_ran(p: &Proc) {
    assert!(
        !p.lines().iter().any(|l| l.contains("VERIFY")),
        "no guest ran at the destination"
    );
}

/// The endpoint a `receive --listen` announced on stdout (with the port it picked for
/// `tcp:HOST:0`).
pub fn listening(dst: &mut Vm) -> String {
    let line = dst
        .proc
        .wait_line("the listening line", T, |l| l.starts_with("{\"listening\""));
    let parsed: ListeningLine =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("listening line {line:?}: {e}"));
    parsed.listening
}

/// Waits (up to [`T`]) until the destination behind `api` reports its bulk pass flowing:
/// receiving, in pass 0, with bytes in.
pub fn wait_bulk_pass_flows(api: &Path) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let r =
            crate::control::<IncomingStatus>(api, &Request::Status).expect("destination status");
        if let Reply::Ok(IncomingStatus {
            state: IncomingState::Receiving,
            progress:
                Some(IncomingProgress {
                    pass: Some(0),
                    received_bytes,
                }),
            ..
        }) = r
        {
            if received_bytes > 0 {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bulk pass never started: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

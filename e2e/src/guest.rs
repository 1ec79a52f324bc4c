//! The test guest's serial protocol (see guest/README.md), parsed for assertions.

use std::time::Duration;

use crate::{kv, Proc};

/// One `VERIFY-OK` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOk {
    pub round: u64,
    pub cpu: u64,
    pub ticks: u64,
    pub writes: u64,
    pub tsc_ms: u64,
}

impl VerifyOk {
    pub fn parse(line: &str) -> Option<VerifyOk> {
        let rest = line.trim().strip_prefix("VERIFY-OK")?;
        let m = kv(rest);
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
        Some(VerifyOk {
            round: num("round")?,
            cpu: num("cpu")?,
            ticks: num("ticks")?,
            writes: num("writes").unwrap_or(0),
            tsc_ms: num("tsc_ms").unwrap_or(0),
        })
    }
}

/// All `VERIFY-OK` reports of `cpu` in `lines`.
pub fn verify_oks(lines: &[String], cpu: u64) -> Vec<VerifyOk> {
    lines
        .iter()
        .filter_map(|l| VerifyOk::parse(l))
        .filter(|v| v.cpu == cpu)
        .collect()
}

/// CPUs that loaded their `fpu=1` register values, with whether AVX was on
/// (`TESTGUEST fpu cpu=<c> avx=<0|1> ...` lines).
pub fn fpu_loaded(lines: &[String]) -> Vec<(u64, bool)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("TESTGUEST fpu "))
        .filter_map(|rest| {
            let m = kv(rest);
            Some((m.get("cpu")?.parse().ok()?, m.get("avx")? == "1"))
        })
        .collect()
}

/// Panics if any line reports a verification failure or an unexpected exception.
pub fn assert_no_failure(p: &Proc) {
    let lines = p.lines();
    if let Some(bad) = lines
        .iter()
        .find(|l| l.contains("VERIFY-FAIL") || l.starts_with("EXC "))
    {
        panic!(
            "{}: guest reported a failure: {bad}\n{}",
            p.name,
            crate::tail(&lines, 30)
        );
    }
}

/// Wait for a `VERIFY-OK` of `cpu` at or after line index `from`; returns it. A failure line
/// (of any CPU) ends the wait at once with the failure.
pub fn wait_verify(p: &mut Proc, from: usize, cpu: u64, timeout: Duration) -> VerifyOk {
    let l = p.wait_line_from(from, &format!("VERIFY-OK of cpu {cpu}"), timeout, |l| {
        VerifyOk::parse(l).is_some_and(|v| v.cpu == cpu)
            || l.contains("VERIFY-FAIL")
            || l.starts_with("EXC ")
    });
    assert_no_failure(p);
    VerifyOk::parse(&l).expect("parsed above")
}

/// Wait for `n` more `VERIFY-OK` rounds of `cpu` after line index `from`; returns the last.
pub fn wait_rounds(p: &mut Proc, from: usize, cpu: u64, n: usize, timeout: Duration) -> VerifyOk {
    let mut cursor = from;
    let mut last = None;
    for _ in 0..n {
        let v = wait_verify(p, cursor, cpu, timeout);
        cursor = p
            .lines()
            .iter()
            .enumerate()
            .skip(cursor)
            .find(|(_, l)| VerifyOk::parse(l) == Some(v))
            .map(|(i, _)| i + 1)
            .unwrap_or(cursor + 1);
        last = Some(v);
    }
    last.expect("n > 0")
}

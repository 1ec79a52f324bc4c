//! Per-pass and total migration statistics, serialisable to JSON and printable.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::wire::PAGE_SIZE_U64;

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The remaining dirty memory is expected to go out within the downtime limit.
    #[default]
    Converged,
    /// The pass limit was reached first: the guest is paused anyway, downtime may be longer.
    MaxPasses,
    /// The migration's deadline passed with action `switchover`.
    Deadline,
}

/// Which pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassKind {
    /// Every page, guest running; zero pages elided when the destination is pristine.
    #[default]
    Bulk,
    /// Pages dirtied during the previous pass, guest running.
    Iterative,
    /// Pages dirtied during the last pass, guest paused.
    Final,
}

/// What one pass did. Every scanned page is exactly one of sent, zero-elided or zero-sent;
/// `untouched_skipped` counts the zero pages found without reading them (pagemap).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassStats {
    pub pass: u32,
    pub kind: PassKind,
    pub pages_scanned: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Zero pages left out (bulk pass into a pristine destination only).
    pub zero_elided: u64,
    /// Zero pages sent as zero records (no data).
    pub zero_sent: u64,
    /// Zero pages known from pagemap without being read.
    pub untouched_skipped: u64,
    /// Stream bytes written during the pass.
    pub bytes: u64,
    pub duration_us: u64,
    /// Pages the dirty log reported right after the pass (to send next).
    pub dirty_pages: u64,
    /// Dirtying rate during the pass, bytes per second.
    pub dirty_rate_bps: u64,
    /// Stream bytes per second during the pass.
    pub bandwidth_bps: u64,
    /// Pages the destination held torn after the pass (sent again in the next one).
    pub torn_pages: u64,
}

impl PassStats {
    /// Bytes still to send after this pass.
    pub fn remaining_bytes(&self) -> u64 {
        self.dirty_pages * PAGE_SIZE_U64
    }

    /// Fills duration, rates and `dirty_pages` once the pass is over.
    pub fn close(&mut self, duration: Duration, dirty_pages: u64) {
        let secs = duration.as_secs_f64().max(1e-6);
        self.duration_us = duration.as_micros() as u64;
        self.dirty_pages = dirty_pages;
        self.dirty_rate_bps = ((dirty_pages * PAGE_SIZE_U64) as f64 / secs) as u64;
        self.bandwidth_bps = (self.bytes as f64 / secs) as u64;
    }
}

impl fmt::Display for PassStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pass {} ({:?}): {} pages scanned, {} sent, {} zero elided, {} zero sent, \
             {} untouched; {} in {:.1} ms ({}/s); {} pages dirtied ({}/s)",
            self.pass,
            self.kind,
            self.pages_scanned,
            self.pages_sent,
            self.zero_elided,
            self.zero_sent,
            self.untouched_skipped,
            Bytes(self.bytes),
            self.duration_us as f64 / 1000.0,
            Bytes(self.bandwidth_bps),
            self.dirty_pages,
            Bytes(self.dirty_rate_bps),
        )
    }
}

/// Sums over all passes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub pages_scanned: u64,
    pub pages_sent: u64,
    pub zero_elided: u64,
    pub zero_sent: u64,
    pub untouched_skipped: u64,
    pub bytes: u64,
    pub torn_pages: u64,
}

/// The result of a successful send.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationStats {
    pub passes: Vec<PassStats>,
    pub totals: Totals,
    /// Whether the bulk pass elided zero pages (destination declared pristine memory).
    pub zero_elision: bool,
    /// Whether the remaining dirty memory fit the downtime limit when pre-copy stopped.
    pub converged: bool,
    pub stop_reason: StopReason,
    /// Highest share of vCPU time auto-converge took away, in percent.
    pub max_throttle_pct: u32,
    /// Predicted downtime when pre-copy stopped.
    pub expected_downtime_us: u64,
    /// Guest paused until the destination reported it running (or the stream was sealed,
    /// for a snapshot file).
    pub downtime_us: u64,
    /// Before the bulk pass, in order: (phase, microseconds).
    pub setup_phases_us: Vec<(&'static str, u64)>,
    /// Where the downtime went, in order: (phase, microseconds).
    pub downtime_phases_us: Vec<(&'static str, u64)>,
    pub total_duration_us: u64,
    /// Device and vCPU state bytes.
    pub state_bytes: u64,
    /// What the destination reported with its `Running` acknowledgement.
    pub destination_report: Option<String>,
    /// A local migration: memory went across by descriptor, no RAM pass.
    pub local: bool,
    /// Every byte of the stream, `End` included (data connections' too).
    pub stream_bytes: u64,
    /// Data connections that carried the live passes' pages (0: the one connection did).
    pub data_connections: u32,
}

impl Totals {
    /// Adds a pass.
    pub fn add(&mut self, p: &PassStats) {
        self.pages_scanned += p.pages_scanned;
        self.pages_sent += p.pages_sent;
        self.zero_elided += p.zero_elided;
        self.zero_sent += p.zero_sent;
        self.untouched_skipped += p.untouched_skipped;
        self.bytes += p.bytes;
        self.torn_pages += p.torn_pages;
    }
}

impl MigrationStats {
    /// Adds a finished pass to the list and the totals.
    pub fn push(&mut self, p: PassStats) {
        self.totals.add(&p);
        self.passes.push(p);
    }

    /// JSON text of the whole structure.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.passes {
            writeln!(f, "{p}")?;
        }
        let t = &self.totals;
        write!(
            f,
            "total: {} passes, {} sent, {} pages with data, {} zero elided, {} zero sent, \
             {} untouched; zero elision {}; stopped: {:?} (converged: {}); downtime {:.1} ms \
             (expected {:.1} ms); {:.1} ms overall",
            self.passes.len(),
            Bytes(t.bytes),
            t.pages_sent,
            t.zero_elided,
            t.zero_sent,
            t.untouched_skipped,
            if self.zero_elision { "on" } else { "off" },
            self.stop_reason,
            self.converged,
            self.downtime_us as f64 / 1000.0,
            self.expected_downtime_us as f64 / 1000.0,
            self.total_duration_us as f64 / 1000.0,
        )
    }
}

/// What the destination did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReceiveStats {
    pub records: u64,
    pub bytes: u64,
    pub passes: u32,
    /// Live passes acknowledged with `PassDone` (all of them, over a socket).
    pub passes_acknowledged: u32,
    /// Pages written from data runs.
    pub pages_written: u64,
    /// Pages covered by zero runs.
    pub zero_pages: u64,
    /// Of those, pages that had been written and were given back (`MADV_DONTNEED`).
    pub zero_pages_freed: u64,
    /// Data pages of live passes that failed their checksum (torn) and were sent again.
    pub torn_pages: u64,
    /// Memory was all zero when loading began (after a reset, if one was needed).
    pub pristine: bool,
    /// Memory was not pristine and was reset before loading.
    pub reset: bool,
    pub device_states: u32,
    pub duration_us: u64,
    /// After the last byte arrived: restoring state, resuming, reporting (µs each).
    pub restore_us: u64,
    pub resume_us: u64,
    pub report_us: u64,
    /// A local migration: guest memory was adopted by descriptor, nothing was copied.
    pub local: bool,
    /// Local: checking the descriptors and mapping the memory (µs).
    pub adopt_us: u64,
    /// Data connections that carried the live passes' pages (0: the one connection did).
    pub data_connections: u32,
}

impl ReceiveStats {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl fmt::Display for ReceiveStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {} in {} records over {} passes: {} pages written ({} torn), {} zero \
             pages ({} freed), {} device states; pristine {}, reset {}; {:.1} ms (adopt {} us, \
             restore {} us, resume {} us, report {} us)",
            Bytes(self.bytes),
            self.records,
            self.passes,
            self.pages_written,
            self.torn_pages,
            self.zero_pages,
            self.zero_pages_freed,
            self.device_states,
            self.pristine,
            self.reset,
            self.duration_us as f64 / 1000.0,
            self.adopt_us,
            self.restore_us,
            self.resume_us,
            self.report_us
        )
    }
}

/// A byte count printed with a binary unit.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_json_and_display() {
        let mut s = MigrationStats::default();
        let mut p = PassStats {
            pages_scanned: 10,
            pages_sent: 4,
            zero_elided: 6,
            untouched_skipped: 5,
            bytes: 4 * 4096 + 100,
            ..Default::default()
        };
        p.close(Duration::from_millis(2), 3);
        assert_eq!(p.remaining_bytes(), 3 * 4096);
        assert_eq!(p.dirty_rate_bps, 3 * 4096 * 500);
        s.push(p.clone());
        s.push(p);
        assert_eq!(s.totals.pages_sent, 8);
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["totals"]["zero_elided"], 12);
        assert_eq!(v["passes"][0]["kind"], "bulk");
        assert!(s.to_string().contains("2 passes"));
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
    }
}

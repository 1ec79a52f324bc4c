//! The `events` stream and the migration figures in the terms of QEMU's `query-migrate` and
//! libvirt's job info (README, "Across hosts", has the table side by side).
//!
//! `{"cmd":"events"}` is answered with `{"ok":true}`, then the recent history (up to
//! [`EVENT_HISTORY`] lines) and every new event, one [`EventLine`] per line, until the client
//! closes the connection or falls too far behind. Every line carries the side of the migration
//! it belongs to, so one process that received a guest and later sends it on tells both:
//!
//! ```text
//! source:      setup ─▶ pass (0, 1, …) ─▶ paused ─▶ committed ─▶ completed
//!                 └──────────┴──────────────┴─▶ failed | cancelled      └─▶ outcome-unknown
//! destination: waiting ─▶ receiving ─▶ restored ─▶ committed ─▶ running
//!                 ▲            └────────────┴─▶ failed (another attempt: waiting again)
//!                 └───────────────────────────────┘
//! ```

use serde::{Deserialize, Serialize};

use super::{MigrateSummary, PassProgress};

/// Event lines a new subscriber gets from before it subscribed.
pub const EVENT_HISTORY: usize = 32;

/// Which side of a migration an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

/// One line of the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLine {
    /// Numbered from 1 in each process, without gaps: a gap means lines were missed (a
    /// [`Event::Lagged`] line says how many).
    pub seq: u64,
    /// Wall-clock time, microseconds since the Unix epoch (to line the two sides up).
    pub time_us: u64,
    /// The side the event belongs to (`null` for [`Event::Lagged`]).
    pub side: Option<Side>,
    /// What happened (its fields sit at the top level, beside `"event"`).
    #[serde(flatten)]
    pub event: Event,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Source: a migration to `to` started (connecting, handshake).
    Setup { to: String },
    /// Source: a live pass ended (0 is the bulk pass).
    Pass {
        progress: PassProgress,
        stats: MigrationFigures,
    },
    /// Source: the guest is paused for the final pass.
    Paused,
    /// Source: `Go` went out. Destination: `Go` arrived. The guest is the destination's.
    Committed,
    /// Source: the destination runs the guest; this process ends.
    Completed { summary: Box<MigrateSummary> },
    /// The migration failed. Source: its guest runs on here. Destination: no guest was
    /// started (`waiting` follows when another attempt is allowed).
    Failed { reason: String },
    /// Source: the migration was given up (`cancel`, or the process was told to end); the
    /// guest runs on here.
    Cancelled { reason: String },
    /// Source: the guest was handed over but the destination never confirmed it runs; it
    /// stays paused here until the operator decides (`resume --force` or `shutdown`).
    OutcomeUnknown { to: String, reason: String },
    /// Destination: waiting for a source on `listen`.
    Waiting { listen: String },
    /// Destination: a source connected (`peer`, when the transport names it).
    Receiving { peer: Option<String> },
    /// Destination: the whole stream arrived and every state is restored; waiting for `Go`.
    Restored,
    /// Destination: the guest runs here.
    Running,
    /// This subscriber read too slowly and missed `missed` lines.
    Lagged { missed: u64 },
}

impl Event {
    /// The event's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Setup { .. } => "setup",
            Event::Pass { .. } => "pass",
            Event::Paused => "paused",
            Event::Committed => "committed",
            Event::Completed { .. } => "completed",
            Event::Failed { .. } => "failed",
            Event::Cancelled { .. } => "cancelled",
            Event::OutcomeUnknown { .. } => "outcome-unknown",
            Event::Waiting { .. } => "waiting",
            Event::Receiving { .. } => "receiving",
            Event::Restored => "restored",
            Event::Running => "running",
            Event::Lagged { .. } => "lagged",
        }
    }

    /// Whether the event ends a migration on its side.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Completed { .. }
                | Event::Failed { .. }
                | Event::Cancelled { .. }
                | Event::OutcomeUnknown { .. }
                | Event::Running
        )
    }
}

/// A migration's figures with the meanings QEMU's `query-migrate` (and libvirt's job info,
/// which copies them) gives them; ours carry their units in their names. Pages are 4 KiB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationFigures {
    /// From the start of the migration, milliseconds (`total-time`; libvirt `time_elapsed`).
    pub total_time_ms: u64,
    /// From the start to the first byte of guest memory (`setup-time`).
    pub setup_time_ms: f64,
    /// Stream bytes sent so far (`ram.transferred`; libvirt `memory_processed`).
    pub transferred_bytes: u64,
    /// Guest memory still to send (`ram.remaining`; libvirt `memory_remaining`): the dirty
    /// pages of the last pass, or the whole memory before the bulk pass ended.
    pub remaining_bytes: u64,
    /// Guest memory (`ram.total`; libvirt `memory_total`).
    pub total_bytes: u64,
    /// Zero pages, sent as zero records or left out (`ram.duplicate`; libvirt
    /// `memory_constant`).
    pub duplicate_pages: u64,
    /// Pages sent with their data (`ram.normal`; libvirt `memory_normal`).
    pub normal_pages: u64,
    /// Bytes of those pages (`ram.normal-bytes`; libvirt `memory_normal_bytes`).
    pub normal_bytes: u64,
    /// Throughput of the last pass, megabits per second (`ram.mbps`; libvirt `memory_bps`
    /// in bytes).
    pub mbps: f64,
    /// Pages the guest dirtied per second during the last pass (`ram.dirty-pages-rate`;
    /// libvirt `memory_dirty_rate`).
    pub dirty_pages_rate: u64,
    /// Dirty-log fetches so far, one per pass (`ram.dirty-sync-count`; libvirt
    /// `memory_iteration`).
    pub dirty_sync_count: u64,
    /// Downtime if the guest were paused now, milliseconds (`expected-downtime`); `null` once
    /// completed.
    pub expected_downtime_ms: Option<f64>,
    /// The guest's pause until the destination ran it, milliseconds (`downtime`); `null`
    /// until completed.
    pub downtime_ms: Option<f64>,
}

const PAGE: u64 = migration::PAGE_SIZE as u64;

impl MigrationFigures {
    /// The figures after a live pass, `total_time_ms` since the migration started.
    pub fn after_pass(p: &migration::Progress, total_time_ms: u64) -> MigrationFigures {
        let t = &p.totals;
        MigrationFigures {
            total_time_ms,
            setup_time_ms: p.setup_us as f64 / 1000.0,
            transferred_bytes: t.bytes,
            remaining_bytes: p.remaining_bytes,
            total_bytes: p.ram_bytes,
            duplicate_pages: t.zero_elided + t.zero_sent,
            normal_pages: t.pages_sent,
            normal_bytes: t.pages_sent * PAGE,
            mbps: p.bandwidth_bps as f64 * 8.0 / 1e6,
            dirty_pages_rate: p.dirty_rate_bps / PAGE,
            dirty_sync_count: u64::from(p.pass) + 1,
            expected_downtime_ms: Some(p.expected_downtime.as_secs_f64() * 1000.0),
            downtime_ms: None,
        }
    }

    /// The figures of a completed migration.
    pub fn completed(s: &migration::MigrationStats, ram_bytes: u64) -> MigrationFigures {
        let t = &s.totals;
        let live = s
            .passes
            .iter()
            .rev()
            .find(|p| p.kind != migration::PassKind::Final);
        MigrationFigures {
            total_time_ms: s.total_duration_us / 1000,
            setup_time_ms: s.setup_phases_us.iter().map(|(_, us)| us).sum::<u64>() as f64 / 1000.0,
            // A local migration sends no page: its bytes are the whole (small) stream.
            transferred_bytes: if s.local { s.stream_bytes } else { t.bytes },
            remaining_bytes: 0,
            total_bytes: ram_bytes,
            duplicate_pages: t.zero_elided + t.zero_sent,
            normal_pages: t.pages_sent,
            normal_bytes: t.pages_sent * PAGE,
            mbps: live.map_or(0.0, |p| p.bandwidth_bps as f64 * 8.0 / 1e6),
            dirty_pages_rate: live.map_or(0, |p| p.dirty_rate_bps / PAGE),
            dirty_sync_count: s.passes.len() as u64,
            expected_downtime_ms: None,
            downtime_ms: Some(s.downtime_us as f64 / 1000.0),
        }
    }
}

/// The line `receive --listen` prints on stdout once it listens (before any guest output):
/// `{"listening":"tcp:10.0.0.2:40133"}`, with the port the system picked for `tcp:HOST:0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningLine {
    pub listening: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn line(side: Option<Side>, event: Event) -> EventLine {
        EventLine {
            seq: 7,
            time_us: 1_700_000_000_000_000,
            side,
            event,
        }
    }

    fn figures() -> MigrationFigures {
        MigrationFigures {
            total_time_ms: 12,
            setup_time_ms: 1.5,
            transferred_bytes: 8192,
            remaining_bytes: 4096,
            total_bytes: 1 << 30,
            duplicate_pages: 3,
            normal_pages: 2,
            normal_bytes: 8192,
            mbps: 80.0,
            dirty_pages_rate: 100,
            dirty_sync_count: 1,
            expected_downtime_ms: Some(0.5),
            downtime_ms: None,
        }
    }

    #[test]
    fn event_lines_keep_the_wire_format() {
        let cases = [
            (
                line(
                    Some(Side::Source),
                    Event::Setup {
                        to: "tcp:h:1".into(),
                    },
                ),
                json!({"seq": 7, "time_us": 1_700_000_000_000_000u64, "side": "source",
                       "event": "setup", "to": "tcp:h:1"}),
            ),
            (
                line(Some(Side::Destination), Event::Committed),
                json!({"seq": 7, "time_us": 1_700_000_000_000_000u64,
                       "side": "destination", "event": "committed"}),
            ),
            (
                line(None, Event::Lagged { missed: 4 }),
                json!({"seq": 7, "time_us": 1_700_000_000_000_000u64, "side": null,
                       "event": "lagged", "missed": 4}),
            ),
            (
                line(
                    Some(Side::Source),
                    Event::OutcomeUnknown {
                        to: "tcp:h:1".into(),
                        reason: "no Running".into(),
                    },
                ),
                json!({"seq": 7, "time_us": 1_700_000_000_000_000u64, "side": "source",
                       "event": "outcome-unknown", "to": "tcp:h:1", "reason": "no Running"}),
            ),
            (
                line(Some(Side::Destination), Event::Receiving { peer: None }),
                json!({"seq": 7, "time_us": 1_700_000_000_000_000u64,
                       "side": "destination", "event": "receiving", "peer": null}),
            ),
        ];
        for (value, wire) in cases {
            assert_eq!(serde_json::to_value(&value).expect("serialise"), wire);
            assert_eq!(wire["event"], value.event.name(), "name() matches the wire");
            let back: EventLine = serde_json::from_value(wire).expect("deserialise");
            assert_eq!(back, value);
        }
    }

    #[test]
    fn a_pass_event_carries_its_progress_and_figures() {
        let progress = PassProgress {
            pass: 1,
            remaining_bytes: 4096,
            bandwidth_bps: 10_000_000,
            dirty_rate_bps: 409_600,
            expected_downtime_ms: 0.5,
            diverging: false,
        };
        let l = line(
            Some(Side::Source),
            Event::Pass {
                progress,
                stats: figures(),
            },
        );
        let wire: Value = serde_json::to_value(&l).expect("serialise");
        assert_eq!(wire["event"], "pass");
        assert_eq!(wire["progress"]["pass"], 1);
        assert_eq!(wire["stats"]["dirty_sync_count"], 1);
        assert_eq!(wire["stats"]["downtime_ms"], Value::Null);
        assert_eq!(serde_json::from_value::<EventLine>(wire).expect("back"), l);
    }

    #[test]
    fn unknown_events_and_missing_fields_are_refused() {
        let bad = [
            json!({"seq": 1, "time_us": 1, "side": "source", "event": "exploded"}),
            json!({"seq": 1, "time_us": 1, "side": "source", "event": "setup"}),
            json!({"seq": 1, "time_us": 1, "side": "sideways", "event": "paused"}),
            json!({"seq": 1, "side": "source", "event": "paused"}),
        ];
        for wire in bad {
            assert!(
                serde_json::from_value::<EventLine>(wire.clone()).is_err(),
                "{wire}"
            );
        }
    }

    #[test]
    fn final_events_end_a_side() {
        let finals: Vec<&str> = [
            Event::Setup { to: String::new() },
            Event::Paused,
            Event::Committed,
            Event::Failed {
                reason: String::new(),
            },
            Event::Cancelled {
                reason: String::new(),
            },
            Event::OutcomeUnknown {
                to: String::new(),
                reason: String::new(),
            },
            Event::Waiting {
                listen: String::new(),
            },
            Event::Restored,
            Event::Running,
            Event::Lagged { missed: 1 },
        ]
        .iter()
        .filter(|e| e.is_final())
        .map(Event::name)
        .collect();
        assert_eq!(
            finals,
            ["failed", "cancelled", "outcome-unknown", "running"]
        );
    }

    #[test]
    fn figures_after_a_pass_use_qemu_meanings() {
        let mut totals = migration::stats::Totals::default();
        totals.add(&migration::PassStats {
            pages_sent: 10,
            zero_elided: 5,
            zero_sent: 2,
            bytes: 41_000,
            ..Default::default()
        });
        let p = migration::Progress {
            pass: 2,
            remaining_bytes: 8192,
            bandwidth_bps: 125_000_000,
            dirty_rate_bps: 40960,
            expected_downtime: std::time::Duration::from_micros(1500),
            diverging: false,
            totals,
            ram_bytes: 1 << 20,
            setup_us: 2500,
        };
        let f = MigrationFigures::after_pass(&p, 99);
        assert_eq!(
            (f.duplicate_pages, f.normal_pages, f.normal_bytes),
            (7, 10, 40960)
        );
        assert_eq!(
            (f.mbps, f.dirty_pages_rate, f.dirty_sync_count),
            (1000.0, 10, 3)
        );
        assert_eq!((f.setup_time_ms, f.expected_downtime_ms), (2.5, Some(1.5)));
        assert_eq!((f.transferred_bytes, f.total_bytes), (41_000, 1 << 20));
    }

    #[test]
    fn the_listening_line_parses() {
        let l: ListeningLine =
            serde_json::from_str(r#"{"listening":"tcp:10.0.0.2:40133"}"#).expect("parse");
        assert_eq!(l.listening, "tcp:10.0.0.2:40133");
    }
}

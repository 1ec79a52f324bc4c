//! The receiving side of a migration: [`receive_migration`], which drives a
//! [`MigrationTarget`] (the contract in `vm.rs`, implemented by the vmm).
//!
//! Receiver states:
//!
//! ```text
//! Header ─▶ Config ─▶ Layout ─▶ (prove or reset pristine memory, reply Ready)
//!   ─▶ { PassBegin RamPages* }+  (last pass flagged final)
//!   ─▶ DeviceState* ─▶ End (counts + checksum chain verified)
//!   ─▶ restore_state ─▶ resume ─▶ reply Running
//! ```
//!
//! Any error, in any state, returns `Err` without resuming (a half-restored guest never runs)
//! and, when there is a peer, tells the source why.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::memory::layout_of;
use crate::ram_recv::{RamLoadError, RamReceiver};
use crate::records::{
    decode_layout, encode_message, EndRecord, PassBegin, PassMark, Ready, StateBlob,
};
use crate::stats::ReceiveStats;
use crate::stream::{send_reply, RecordReader};
use crate::transport::Transport;
use crate::vm::{MigrationTarget, VmOpError};
use crate::wire::{
    RecordHeader, RecordKind, WireError, FORMAT_VERSION, MAX_MESSAGE_LEN, PASS_FINAL,
    PASS_ZERO_ELIDED,
};

/// Options of [`receive_migration`].
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// When guest memory is not provably zero: reset it (`MADV_DONTNEED` everything) so the
    /// source may elide zero pages; if false, declare it not pristine and receive every page.
    pub reset_if_not_pristine: bool,
    /// Longest wait for stream bytes (sockets).
    pub read_timeout: Option<Duration>,
    /// Set (with the connection's reading side shut down to wake the reader) to give the
    /// migration up: it fails as [`DestinationError::GivenUp`], which the source is told.
    pub give_up: Cancel,
    /// Updated as records arrive, for whoever reports on the receive meanwhile.
    pub progress: Arc<ReceiveProgress>,
}

/// How far a receive has come, readable from other threads while it runs.
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    /// Passes begun.
    passes: AtomicU32,
    /// Stream offset of the last record header read.
    bytes: AtomicU64,
}

impl ReceiveProgress {
    /// The pass being received (`None` before the first).
    pub fn pass(&self) -> Option<u32> {
        self.passes.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Stream bytes received up to the last record header.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            reset_if_not_pristine: true,
            read_timeout: Some(Duration::from_secs(60)),
            give_up: Cancel::default(),
            progress: Arc::default(),
        }
    }
}

/// Errors of the destination side; the guest was not resumed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("Invalid migration stream")]
    Wire(#[from] WireError),
    #[error("The source gave the migration up: {0}")]
    Aborted(String),
    #[error("The destination gave the migration up (it was told to end)")]
    GivenUp,
    #[error("Loading guest RAM failed")]
    Ram(#[from] RamLoadError),
    #[error("Unexpected {kind} record at offset {offset}: expected {expected}")]
    Unexpected {
        offset: u64,
        kind: RecordKind,
        expected: &'static str,
    },
    #[error("Pass {found} at offset {offset} out of order: expected pass {expected}")]
    PassOrder {
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("Pass {pass} at offset {offset} elides zero pages, only the bulk pass may")]
    LateElision { offset: u64, pass: u32 },
    #[error("Duplicate device state {id:?} at offset {offset}")]
    DuplicateState { offset: u64, id: String },
    #[error("Configuration rejected")]
    Config(#[source] VmOpError),
    #[error("Memory layout differs: {0}")]
    Layout(String),
    #[error("Resetting guest memory failed")]
    Reset(#[source] RamLoadError),
    #[error("Sending a reply to the source failed")]
    Reply(#[source] std::io::Error),
    #[error("Restoring device state failed")]
    Restore(#[source] VmOpError),
    #[error("Resuming the guest failed")]
    Resume(#[source] VmOpError),
}

impl DestinationError {
    /// The connection closed before sending a byte: a probe (a health check, a second
    /// destination asking whether the socket is live), not a migration attempt.
    pub fn is_empty_stream(&self) -> bool {
        matches!(
            self,
            DestinationError::Wire(WireError::Truncated { offset: 0, .. })
        )
    }
}

/// Receives a migration (or loads a snapshot) into `target`, then resumes it.
pub fn receive_migration<T: MigrationTarget + ?Sized>(
    target: &mut T,
    transport: &mut dyn Transport,
    options: &ReceiveOptions,
) -> Result<ReceiveStats, DestinationError> {
    let peer = transport.has_peer();
    if peer {
        transport
            .set_read_timeout(options.read_timeout)
            .map_err(DestinationError::Reply)?;
    }
    let mut reader = RecordReader::new(transport);
    let result = match receive(target, &mut reader, options) {
        Err(e) if options.give_up.is_cancelled() => {
            log::debug!("given up while: {e}");
            Err(DestinationError::GivenUp)
        }
        other => other,
    };
    if let Err(e) = &result {
        if e.is_empty_stream() {
            log::info!("a connection closed without sending anything");
            return result;
        }
        log::error!("Receiving the migration failed: {e}");
        if peer {
            let _ = send_reply(
                reader.transport(),
                RecordKind::Error,
                &encode_message(&crate::error_chain(e)),
            );
        }
    }
    result
}

fn receive<T: MigrationTarget + ?Sized>(
    target: &mut T,
    reader: &mut RecordReader<'_>,
    options: &ReceiveOptions,
) -> Result<ReceiveStats, DestinationError> {
    let started = Instant::now();
    reader.read_stream_header()?;
    let config = expect(reader, RecordKind::Config, "Config")?;
    target
        .validate_config(&config)
        .map_err(DestinationError::Config)?;
    let (layout, offset) = expect_at(reader, RecordKind::MemoryLayout, "MemoryLayout")?;
    let layout = decode_layout(&layout, offset)?;
    let regions = target.ram_regions();
    let ours = layout_of(&regions);
    if ours != layout {
        return Err(DestinationError::Layout(format!(
            "stream has {layout:x?}, guest has {ours:x?}"
        )));
    }

    let mut rx = RamReceiver::new(regions);
    if !rx.is_pristine() && options.reset_if_not_pristine {
        log::info!("Guest memory is not pristine: resetting it before loading");
        rx.reset().map_err(DestinationError::Reset)?;
    }
    let pristine = rx.is_pristine();
    if reader.transport().has_peer() {
        let ready = Ready {
            version: FORMAT_VERSION,
            pristine,
        };
        send_reply(reader.transport(), RecordKind::Ready, &ready.encode())
            .map_err(DestinationError::Reply)?;
    }

    let states = load_body(reader, &mut rx, &options.progress)?;
    let mut stats = rx.stats().clone();
    stats.pristine = pristine;
    stats.device_states = states.len() as u32;
    stats.bytes = reader.offset();
    stats.records = reader.records() + 1;

    let t = Instant::now();
    target
        .restore_state(states)
        .map_err(DestinationError::Restore)?;
    stats.restore_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    target.resume().map_err(DestinationError::Resume)?;
    stats.resume_us = t.elapsed().as_micros() as u64;
    if reader.transport().has_peer() {
        let t = Instant::now();
        // If this fails the source resumes its copy; failing here makes the vmm exit.
        let mut report = target.running_report(&stats);
        report.truncate(MAX_MESSAGE_LEN);
        send_reply(reader.transport(), RecordKind::Running, &report)
            .map_err(DestinationError::Reply)?;
        stats.report_us = t.elapsed().as_micros() as u64;
    }
    stats.duration_us = started.elapsed().as_micros() as u64;
    log::info!("{stats}");
    Ok(stats)
}

/// RAM passes, device states and `End`; returns the states once `End` checked out.
fn load_body(
    reader: &mut RecordReader<'_>,
    rx: &mut RamReceiver,
    progress: &ReceiveProgress,
) -> Result<Vec<StateBlob>, DestinationError> {
    let mut next_pass = 0u32;
    let mut in_pass = false;
    let mut final_seen = false;
    let mut states: Vec<StateBlob> = Vec::new();
    let mut ids = HashSet::new();
    loop {
        let (h, offset) = reader.next_header()?;
        progress.bytes.store(offset, Ordering::Relaxed);
        let unexpected = |expected| DestinationError::Unexpected {
            offset,
            kind: h.kind,
            expected,
        };
        match h.kind {
            RecordKind::PassBegin => {
                if final_seen {
                    return Err(unexpected("device state or End after the final pass"));
                }
                let p = PassBegin::decode(&reader.read_payload(&h, offset)?, offset)?;
                if p.pass != next_pass {
                    return Err(DestinationError::PassOrder {
                        offset,
                        found: p.pass,
                        expected: next_pass,
                    });
                }
                if p.pass != 0 && p.flags & PASS_ZERO_ELIDED != 0 {
                    return Err(DestinationError::LateElision {
                        offset,
                        pass: p.pass,
                    });
                }
                rx.begin_pass(&p, offset)?;
                progress.passes.store(p.pass + 1, Ordering::Relaxed);
                next_pass += 1;
                in_pass = true;
                final_seen = p.flags & PASS_FINAL != 0;
            }
            RecordKind::PassEnd if in_pass && !final_seen => {
                let m = PassMark::decode(&reader.read_payload(&h, offset)?, offset, h.kind)?;
                if m.pass + 1 != next_pass {
                    return Err(DestinationError::PassOrder {
                        offset,
                        found: m.pass,
                        expected: next_pass - 1,
                    });
                }
                // Everything read is in guest memory once the allocating thread is idle.
                rx.finish();
                if reader.transport().has_peer() {
                    send_reply(reader.transport(), RecordKind::PassDone, &m.encode())
                        .map_err(DestinationError::Reply)?;
                    rx.acknowledged();
                }
                in_pass = false;
            }
            RecordKind::RamPages if in_pass && states.is_empty() => {
                rx.load_batch(reader, &h, offset)?;
            }
            RecordKind::RamPages => return Err(unexpected("PassBegin before RAM pages")),
            RecordKind::DeviceState if final_seen => {
                let s = StateBlob::decode(&reader.read_payload(&h, offset)?, offset)?;
                if !ids.insert(s.id.clone()) {
                    return Err(DestinationError::DuplicateState { offset, id: s.id });
                }
                states.push(s);
            }
            RecordKind::DeviceState => return Err(unexpected("the final RAM pass first")),
            RecordKind::End if final_seen => {
                let end = EndRecord::decode(&reader.read_payload(&h, offset)?, offset)?;
                reader.check_end(&end, offset)?;
                rx.finish();
                log::debug!("End at offset {offset} after {} records", reader.records());
                return Ok(states);
            }
            RecordKind::Abort => return Err(aborted(reader, &h, offset)),
            _ => return Err(unexpected("a RAM pass, device state or End")),
        }
    }
}

/// The source's `Abort` record as an error (or the error reading it).
fn aborted(reader: &mut RecordReader<'_>, h: &RecordHeader, offset: u64) -> DestinationError {
    match reader.read_payload(h, offset) {
        Ok(reason) => DestinationError::Aborted(String::from_utf8_lossy(&reason).into_owned()),
        Err(e) => e.into(),
    }
}

fn expect(
    reader: &mut RecordReader<'_>,
    kind: RecordKind,
    what: &'static str,
) -> Result<Vec<u8>, DestinationError> {
    Ok(expect_at(reader, kind, what)?.0)
}

fn expect_at(
    reader: &mut RecordReader<'_>,
    kind: RecordKind,
    what: &'static str,
) -> Result<(Vec<u8>, u64), DestinationError> {
    let (h, offset): (RecordHeader, u64) = reader.next_header()?;
    if h.kind == RecordKind::Abort {
        return Err(aborted(reader, &h, offset));
    }
    if h.kind != kind {
        return Err(DestinationError::Unexpected {
            offset,
            kind: h.kind,
            expected: what,
        });
    }
    Ok((reader.read_payload(&h, offset)?, offset))
}

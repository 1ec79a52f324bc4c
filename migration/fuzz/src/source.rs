//! The source under a hostile destination: [`SourceCase`] is a fake VM (its memory, device
//! states, guest writes between passes, a VM operation that fails), the migration's options,
//! and the destination's whole script of replies (`Ready`, `PassDone`, `Restored`, `Running`,
//! `Error`, records of any kind, raw bytes), each framed by the crate's `send_reply`; the
//! destination may also stop taking the stream after some bytes. `send_migration` runs
//! against it (`stream::read_reply` and everything `send.rs` does with the replies).
//!
//! The oracle is the invariant the source owes its guest: after success the guest stays
//! paused (it runs at the destination); after "outcome unknown" it stays paused (an operator
//! decides); after any other failure it runs here again (unless resuming itself failed); and
//! dirty logging ends either way (unless stopping it is the operation that fails).

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use migration::fake::{FailAt, FakeVm};
use migration::records::{PassDone, Ready, Restored};
use migration::stream::send_reply;
use migration::transport::Transport;
use migration::wire::{RecordKind, FORMAT_VERSION, READY_PRISTINE};
use migration::{send_migration, Limits, SendOptions, SourceError, StateBlob};

use crate::{page_addr, Id, Num, LAYOUT};

#[derive(Arbitrary, Debug)]
pub struct SourceCase {
    /// Guest memory before the migration: (page, value).
    pub memory: Vec<(u8, u8)>,
    /// One guest write after each pass (cycled): (page, value).
    pub writes: Vec<(u8, u8)>,
    pub states: Vec<(Id, u32, Vec<u8>)>,
    pub fail_at: Option<Fail>,
    pub zero_elision: bool,
    pub use_pagemap: bool,
    pub max_passes: u8,
    pub batch_pages: u8,
    /// Stream bytes the destination takes before the link breaks.
    pub takes: Option<u16>,
    pub replies: Vec<Reply>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Fail {
    StartDirtyLog,
    FetchDirtyLog,
    Pause,
    SaveState,
    StopDirtyLog,
    Resume,
}

#[derive(Arbitrary, Debug)]
pub enum Reply {
    Ready {
        version: Num,
        pristine: bool,
        extra_flags: Option<u32>,
    },
    /// For the next live pass (`Expected`) or another.
    PassDone(Num),
    Restored {
        ms: u32,
    },
    Running(Vec<u8>),
    Error(Vec<u8>),
    Kind {
        kind: u16,
        payload: Vec<u8>,
    },
    Bytes(Vec<u8>),
}

/// The destination's side of the socket: takes the stream (up to a limit), answers from the
/// script, then reads as closed.
struct Dest {
    script: Vec<u8>,
    pos: usize,
    takes: Option<usize>,
    taken: usize,
}

impl Transport for Dest {
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        self.taken += n;
        match self.takes {
            Some(limit) if self.taken > limit => Err(std::io::ErrorKind::BrokenPipe.into()),
            _ => Ok(()),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.script.len() - self.pos);
        buf[..n].copy_from_slice(&self.script[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    fn has_peer(&self) -> bool {
        true
    }
}

/// Collects what `send_reply` writes.
struct Capture(Vec<u8>);

impl Transport for Capture {
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        for p in parts {
            self.0.extend_from_slice(p);
        }
        Ok(())
    }

    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }

    fn has_peer(&self) -> bool {
        false
    }
}

/// The reply script as bytes.
pub fn script(replies: &[Reply]) -> Vec<u8> {
    let mut out = Capture(Vec::new());
    let mut pass = 0u32;
    for r in replies {
        let framed = |kind: RecordKind, payload: Vec<u8>| Some((kind, payload));
        let record = match r {
            Reply::Ready {
                version,
                pristine,
                extra_flags,
            } => {
                let mut p = Ready {
                    version: version.value(FORMAT_VERSION),
                    pristine: *pristine,
                    local: false,
                }
                .encode()
                .to_vec();
                if let Some(f) = extra_flags {
                    let flags = (u32::from(*pristine) * READY_PRISTINE) | f;
                    p[4..].copy_from_slice(&flags.to_le_bytes());
                }
                framed(RecordKind::Ready, p)
            }
            Reply::PassDone(n) => {
                let m = PassDone {
                    pass: n.value(pass),
                    torn: Vec::new(),
                    more: false,
                };
                pass = pass.wrapping_add(1);
                framed(RecordKind::PassDone, m.encode())
            }
            Reply::Restored { ms } => {
                let r = Restored {
                    go_timeout: std::time::Duration::from_millis(u64::from(*ms)),
                };
                framed(RecordKind::Restored, r.encode().to_vec())
            }
            Reply::Running(m) => framed(RecordKind::Running, m.clone()),
            Reply::Error(m) => framed(RecordKind::Error, m.clone()),
            Reply::Kind { kind, payload } => match RecordKind::from_u16(*kind) {
                Some(k) if payload.len() <= k.max_payload() => framed(k, payload.clone()),
                _ => {
                    out.0.extend_from_slice(payload);
                    None
                }
            },
            Reply::Bytes(v) => {
                out.0.extend_from_slice(v);
                None
            }
        };
        if let Some((kind, payload)) = record {
            let payload = &payload[..payload.len().min(kind.max_payload())];
            let _ = send_reply(&mut out, kind, payload);
        }
    }
    out.0
}

fn fail(f: Fail) -> FailAt {
    match f {
        Fail::StartDirtyLog => FailAt::StartDirtyLog,
        Fail::FetchDirtyLog => FailAt::FetchDirtyLog,
        Fail::Pause => FailAt::Pause,
        Fail::SaveState => FailAt::SaveState,
        Fail::StopDirtyLog => FailAt::StopDirtyLog,
        Fail::Resume => FailAt::Resume,
    }
}

/// Runs one case; panics when the source leaves its guest in the wrong state.
pub fn run(case: &SourceCase) {
    let mut vm = FakeVm::new(LAYOUT);
    let w = vm.writer();
    for &(page, value) in case.memory.iter().take(64) {
        w.write(page_addr(usize::from(page)), &[value]);
    }
    vm.states = case
        .states
        .iter()
        .take(8)
        .map(|(id, version, data)| StateBlob {
            id: id.text(),
            version: *version,
            data: data.clone(),
        })
        .collect();
    vm.fail_at = case.fail_at.map(fail);
    let writes: Vec<(u8, u8)> = case.writes.iter().take(16).copied().collect();
    if !writes.is_empty() {
        vm.between_passes = Some(Box::new(move |w, last| {
            let (page, value) = writes[last.pass as usize % writes.len()];
            w.write(page_addr(usize::from(page)), &[value]);
        }));
    }
    let mut dest = Dest {
        script: script(&case.replies),
        pos: 0,
        takes: case.takes.map(usize::from),
        taken: 0,
    };
    let options = SendOptions {
        limits: Limits {
            max_passes: u32::from(case.max_passes % 4) + 1,
            ..Limits::default()
        },
        zero_elision: case.zero_elision,
        use_pagemap: case.use_pagemap,
        batch_pages: usize::from(case.batch_pages).max(1),
        ..SendOptions::default()
    };
    let result = send_migration(&mut vm, &mut dest, options);
    if std::env::var_os("FUZZ_SHOW").is_some() {
        eprintln!(
            "OUTCOME {:?}",
            result.as_ref().map(|_| "ok").map_err(|e| e.to_string())
        );
    }
    let resume_failed = matches!(result, Err(SourceError::Resume { .. }));
    let log_stops = !matches!(case.fail_at, Some(Fail::StopDirtyLog));
    match &result {
        Ok(_) => {
            assert!(
                vm.paused && !vm.running,
                "after a completed migration the source guest stays paused"
            );
            assert!(!log_stops || !vm.logging(), "dirty logging off when done");
        }
        Err(e) if e.is_outcome_unknown() => {
            assert!(
                vm.paused,
                "outcome unknown ({e}) but the guest was resumed here"
            )
        }
        Err(e) if !resume_failed => {
            let _ = migration::error_chain(e);
            assert!(
                vm.running && !vm.paused,
                "after {e} the source guest must run here again"
            );
            if log_stops {
                assert!(!vm.logging(), "after {e} dirty logging must be off");
            }
        }
        Err(_) => {}
    }
}

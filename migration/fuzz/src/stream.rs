//! The destination under a hostile stream: [`StreamCase`] is a sequence of records with
//! hostile values (sizes, counts, overlapping and out-of-range runs, records out of order,
//! passes misnumbered, bad `End` counts, raw bytes), encoded with the crate's own
//! `RecordWriter`, and fed to `receive_migration` into a fake VM, over a memory stream (a
//! snapshot) or a fake socket that takes the replies (a live migration).
//!
//! Oracles besides "no panic, no stray write" (guard pages surround the fake's RAM):
//! - every reply the destination sent decodes; after a failure the last one is `Error`, after
//!   success `Running`;
//! - a stream the destination accepted left exactly the memory its page records describe
//!   (applied in order onto zeroed memory) and handed over exactly its device states;
//! - a destination that refused never resumed its guest.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use migration::fake::{fake_target, FakeVm};
use migration::records::{
    encode_batch_prefix, encode_layout, Connections, EndRecord, Join, LayoutRegion, PassBegin,
    PassMark, RunDesc,
};
use migration::stream::{read_reply, RecordWriter};
use migration::transport::Transport;
use migration::wire::{RecordHeader, RecordKind, PAGE_SIZE, PASS_FINAL, PASS_ZERO_ELIDED};
use migration::{
    receive_migration, Connection, GuestRam, MigrationTarget, RamRegion, ReceiveOptions, StateBlob,
    VmOpError,
};

use crate::{page_addr, Id, Num, LAYOUT, PAGES};

/// Most data pages one batch carries (larger claims are made through counts, not data).
const MAX_DATA_PAGES: usize = 32;

#[derive(Arbitrary, Debug)]
pub struct StreamCase {
    /// A socket (replies, the commit step) rather than a snapshot file.
    pub peer: bool,
    /// Replaces the 16-byte stream header.
    pub header: Option<[u8; 16]>,
    /// Leaves out the usual start (`Config`, then `MemoryLayout` with the destination's
    /// layout), so that the records say how the stream begins.
    pub no_prelude: bool,
    pub target: TargetCase,
    pub records: Vec<Rec>,
}

/// How the fake destination behaves.
#[derive(Arbitrary, Debug, Default)]
pub struct TargetCase {
    pub refuse_config: bool,
    pub fail_restore: bool,
    pub fail_resume: bool,
    /// A byte the destination wrote into its own memory before the stream, as firmware
    /// would (page, value): its memory is not pristine.
    pub firmware: Option<(u8, u8)>,
    pub no_reset: bool,
}

#[derive(Arbitrary, Debug)]
pub enum Rec {
    /// A whole pass: `PassBegin` with the expected number, its batches, and `PassEnd` unless
    /// it is the final pass.
    Pass {
        elided: bool,
        last: bool,
        batches: Vec<Batch>,
    },
    Config(Vec<u8>),
    Layout(Layout),
    PassBegin {
        pass: Num,
        elided: bool,
        last: bool,
        extra_flags: Option<u32>,
    },
    PassEnd(Num),
    Pages(Batch),
    State {
        id: Id,
        version: u32,
        data: Vec<u8>,
    },
    Abort(Vec<u8>),
    Go,
    /// `Connections` (several connections; a receive without an acceptor refuses it).
    Connections {
        count: u32,
        token: [u8; 16],
    },
    /// `Join` (a data connection's first record, never valid inside a stream).
    Join {
        index: u32,
        token: [u8; 16],
    },
    /// `End` with the writer's own counts and chain.
    End,
    /// `End` with counts and chain off by these amounts.
    BadEnd {
        records: i8,
        bytes: i16,
        chain: u32,
    },
    /// A record of any kind (replies included) with any payload, framed and checksummed.
    Kind {
        kind: u16,
        payload: Vec<u8>,
    },
    /// Bytes straight into the stream.
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum Layout {
    /// The destination's own layout.
    Same,
    Regions(Vec<(u64, u64)>),
    PageSize(u32),
    Payload(Vec<u8>),
}

/// A `RamPages` record.
#[derive(Arbitrary, Debug)]
pub struct Batch {
    pub runs: Vec<RunCase>,
    /// Run and data-page counts announced in place of the true ones.
    pub claim_runs: Option<u32>,
    pub claim_data: Option<u32>,
    /// The payload checksum is off by one.
    pub bad_crc: bool,
}

#[derive(Arbitrary, Debug)]
pub struct RunCase {
    pub at: Addr,
    pub pages: Count,
    pub zero: bool,
    /// Flags in place of the encoder's (unknown bits).
    pub flags: Option<u32>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Page `page` of the layout (wrapping), so runs land in memory.
    Page(u8),
    /// Page `page` past the start of region `region` (may run off its end).
    Region {
        region: u8,
        page: u16,
    },
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Count {
    Small(u8),
    Raw(u32),
}

/// A stream ready to feed, and what an accepting destination must end up with.
pub struct Built {
    pub bytes: Vec<u8>,
    /// Guest memory (regions concatenated) if the stream is accepted, when it is knowable.
    pub image: Option<Vec<u8>>,
    pub states: Vec<StateBlob>,
}

fn addr(a: Addr) -> u64 {
    match a {
        Addr::Page(p) => page_addr(usize::from(p)),
        Addr::Region { region, page } => {
            let (base, _) = LAYOUT[usize::from(region) % LAYOUT.len()];
            base + u64::from(page) * PAGE_SIZE as u64
        }
        Addr::Raw(v) => v,
    }
}

fn pages(c: Count) -> u32 {
    match c {
        Count::Small(n) => u32::from(n % 32),
        Count::Raw(n) => n,
    }
}

/// Index of the page at guest address `gpa` in the concatenated image, if it is RAM.
fn image_page(gpa: u64) -> Option<usize> {
    let mut first = 0;
    for &(base, len) in LAYOUT {
        if gpa >= base && gpa < base + len as u64 {
            return Some(first + ((gpa - base) as usize) / PAGE_SIZE);
        }
        first += len / PAGE_SIZE;
    }
    None
}

/// The data byte of page `k` of batch `b`: never zero, so a data page never reads as zero.
fn fill(b: usize, k: usize) -> u8 {
    (1 + (b * 31 + k * 7) % 255) as u8
}

/// Encodes `case` as a stream. The image is kept while every record before `End` is one
/// whose effect is known (no raw bytes or records of arbitrary kind, no doctored counts).
pub fn build(case: &StreamCase) -> Built {
    let mut conn = Connection::memory();
    let mut image = Some(vec![0u8; PAGES * PAGE_SIZE]);
    let mut states = Vec::new();
    {
        let Ok(mut w) = RecordWriter::start(&mut conn) else {
            unreachable!("a memory stream takes every write")
        };
        // Next pass number as the destination counts them.
        let mut next_pass = 0u32;
        let mut ended = false;
        if !case.no_prelude {
            let _ = w.write_record(RecordKind::Config, &[b"{}"]).and_then(|_| {
                w.write_record(RecordKind::MemoryLayout, &[&encode_layout(&layout(LAYOUT))])
            });
        }
        for (b, rec) in case.records.iter().enumerate() {
            let live = !ended;
            let unknown = move |image: &mut Option<Vec<u8>>| {
                if live {
                    *image = None;
                }
            };
            let _ = match rec {
                Rec::Pass {
                    elided,
                    last,
                    batches,
                } => {
                    let flags = pass_flags(*elided, *last);
                    let p = PassBegin {
                        pass: next_pass,
                        flags,
                    };
                    next_pass = next_pass.wrapping_add(1);
                    let mut r = w.write_record(RecordKind::PassBegin, &[&p.encode()]);
                    for (k, batch) in batches.iter().take(8).enumerate() {
                        let (payload, crc) =
                            pages_payload(b * 8 + k + 1_000, batch, &mut image, ended);
                        r = r.and_then(|_| {
                            w.write_record_with_crc(RecordKind::RamPages, &[&payload], crc)
                        });
                    }
                    if !*last {
                        let m = PassMark { pass: p.pass };
                        r = r.and_then(|_| w.write_record(RecordKind::PassEnd, &[&m.encode()]));
                    }
                    r
                }
                Rec::Config(c) => put(&mut w, RecordKind::Config, c),
                Rec::Layout(l) => {
                    let payload = match l {
                        Layout::Same => encode_layout(&layout(LAYOUT)),
                        Layout::Regions(r) => encode_layout(
                            &r.iter()
                                .take(70)
                                .map(|&(guest_addr, size)| LayoutRegion { guest_addr, size })
                                .collect::<Vec<_>>(),
                        ),
                        Layout::PageSize(p) => {
                            let mut v = encode_layout(&layout(LAYOUT));
                            v[..4].copy_from_slice(&p.to_le_bytes());
                            v
                        }
                        Layout::Payload(v) => v.clone(),
                    };
                    put(&mut w, RecordKind::MemoryLayout, &payload)
                }
                Rec::PassBegin {
                    pass,
                    elided,
                    last,
                    extra_flags,
                } => {
                    let flags = pass_flags(*elided, *last) | extra_flags.unwrap_or(0);
                    let p = PassBegin {
                        pass: pass.value(next_pass),
                        flags,
                    };
                    next_pass = next_pass.wrapping_add(1);
                    w.write_record(RecordKind::PassBegin, &[&p.encode()])
                }
                Rec::PassEnd(pass) => {
                    let m = PassMark {
                        pass: pass.value(next_pass.wrapping_sub(1)),
                    };
                    w.write_record(RecordKind::PassEnd, &[&m.encode()])
                }
                Rec::Pages(batch) => {
                    let (payload, crc) = pages_payload(b, batch, &mut image, ended);
                    w.write_record_with_crc(RecordKind::RamPages, &[&payload], crc)
                }
                Rec::State { id, version, data } => {
                    let blob = StateBlob {
                        id: id.text(),
                        version: *version,
                        data: data.clone(),
                    };
                    if !ended {
                        states.push(blob.clone());
                    }
                    w.write_record(RecordKind::DeviceState, &[&blob.encode_head(), data])
                }
                Rec::Abort(m) => put(&mut w, RecordKind::Abort, m),
                Rec::Go => w.write_record(RecordKind::Go, &[]),
                Rec::Connections { count, token } => {
                    unknown(&mut image);
                    let c = Connections {
                        count: *count,
                        token: *token,
                    };
                    w.write_record(RecordKind::Connections, &[&c.encode()])
                }
                Rec::Join { index, token } => {
                    unknown(&mut image);
                    let j = Join {
                        index: *index,
                        token: *token,
                    };
                    w.write_record(RecordKind::Join, &[&j.encode()])
                }
                Rec::End => {
                    ended = true;
                    w.finish().map(|()| 0)
                }
                Rec::BadEnd {
                    records,
                    bytes,
                    chain,
                } => {
                    unknown(&mut image);
                    // The counts the writer would seal, then doctored.
                    let sealed = w.sealed();
                    let end = EndRecord {
                        records: sealed.records.wrapping_add_signed(i64::from(*records)),
                        bytes: sealed.bytes.wrapping_add_signed(i64::from(*bytes)),
                        chain_crc: sealed.chain_crc ^ chain,
                    };
                    w.write_record(RecordKind::End, &[&end.encode()])
                }
                Rec::Kind { kind, payload } => {
                    unknown(&mut image);
                    match RecordKind::from_u16(*kind) {
                        Some(k) if payload.len() <= k.max_payload() => {
                            w.write_record(k, &[payload])
                        }
                        _ => w.transport().send(&[payload]).map(|()| 0),
                    }
                }
                Rec::Bytes(v) => {
                    unknown(&mut image);
                    w.transport().send(&[v]).map(|()| 0)
                }
            };
        }
    }
    let mut bytes = conn.into_bytes();
    if let Some(h) = case.header {
        bytes[..16].copy_from_slice(&h);
        image = None;
    }
    Built {
        bytes,
        image,
        states,
    }
}

/// Writes a record; one longer than its kind allows gets a header that says so (checksummed,
/// the payload follows), which the destination must refuse by its length alone.
fn put(w: &mut RecordWriter<'_>, kind: RecordKind, payload: &[u8]) -> std::io::Result<u64> {
    if payload.len() <= kind.max_payload() {
        return w.write_record(kind, &[payload]);
    }
    let header = RecordHeader {
        kind,
        len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
    }
    .encode();
    w.transport().send(&[&header, payload]).map(|()| 0)
}

fn pass_flags(elided: bool, last: bool) -> u32 {
    let mut flags = 0;
    if elided {
        flags |= PASS_ZERO_ELIDED;
    }
    if last {
        flags |= PASS_FINAL;
    }
    flags
}

fn layout(l: &[(u64, usize)]) -> Vec<LayoutRegion> {
    l.iter()
        .map(|&(guest_addr, len)| LayoutRegion {
            guest_addr,
            size: len as u64,
        })
        .collect()
}

/// The payload of a `RamPages` record and its CRC; applies it to `image` (when still known
/// and the batch is one the destination must accept or refuse whole).
fn pages_payload(
    b: usize,
    batch: &Batch,
    image: &mut Option<Vec<u8>>,
    ended: bool,
) -> (Vec<u8>, u32) {
    let runs: Vec<RunDesc> = batch
        .runs
        .iter()
        .take(64)
        .map(|r| RunDesc {
            guest_addr: addr(r.at),
            pages: pages(r.pages),
            zero: r.zero,
        })
        .collect();
    let announced: u64 = runs
        .iter()
        .filter(|r| !r.zero)
        .map(|r| u64::from(r.pages))
        .sum();
    let attached = (announced as usize).min(MAX_DATA_PAGES);
    let claims = batch.claim_runs.is_some() || batch.claim_data.is_some();
    let flags = batch.runs.iter().any(|r| r.flags.is_some());
    let mut payload = Vec::new();
    encode_batch_prefix(
        batch.claim_runs.unwrap_or(runs.len() as u32),
        batch.claim_data.unwrap_or(attached as u32),
        &mut payload,
    );
    for (r, case) in runs.iter().zip(&batch.runs) {
        r.encode_into(&mut payload);
        if let Some(f) = case.flags {
            let at = payload.len() - 4;
            payload[at..].copy_from_slice(&f.to_le_bytes());
        }
    }
    // One checksum per data page after the run table; the header's covers the head only.
    for k in 0..attached {
        let page = [fill(b, k); PAGE_SIZE];
        payload.extend_from_slice(&crc32c::crc32c(&page).to_le_bytes());
    }
    let mut crc = crc32c::crc32c(&payload);
    for k in 0..attached {
        payload.extend(std::iter::repeat_n(fill(b, k), PAGE_SIZE));
    }
    if batch.bad_crc {
        crc ^= 1;
    }
    if ended {
        return (payload, crc);
    }
    if claims || flags || batch.bad_crc || attached as u64 != announced {
        // Refused by the destination (or: its effect is not modelled here).
        *image = None;
        return (payload, crc);
    }
    if let Some(img) = image.as_mut() {
        let mut k = 0;
        for r in &runs {
            let first = image_page(r.guest_addr);
            let len = u64::from(r.pages) * PAGE_SIZE as u64;
            let last = r
                .guest_addr
                .checked_add(len.saturating_sub(1))
                .and_then(image_page);
            let (Some(first), Some(last)) = (first, last) else {
                // Outside guest memory: the destination refuses the batch.
                *image = None;
                break;
            };
            if last + 1 - first != r.pages as usize {
                // Across two regions: refused as well.
                *image = None;
                break;
            }
            for (p, i) in (first..=last).enumerate() {
                let byte = if r.zero { 0 } else { fill(b, k + p) };
                img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(byte);
            }
            if !r.zero {
                k += r.pages as usize;
            }
        }
    }
    (payload, crc)
}

/// The fake destination: a [`FakeVm`] that takes any configuration unless told to refuse.
struct Target {
    vm: FakeVm,
    case: (bool, bool, bool),
    resumed: bool,
}

impl GuestRam for Target {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.vm.ram_regions()
    }
}

impl MigrationTarget for Target {
    fn validate_config(&mut self, _config: &[u8]) -> Result<(), VmOpError> {
        if self.case.0 {
            return Err("configuration refused".into());
        }
        Ok(())
    }

    fn accepts_state(&self, id: &str) -> bool {
        self.vm.accepts_state(id)
    }

    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmOpError> {
        if self.case.1 {
            return Err("restore failed".into());
        }
        self.vm.restore_state(states)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        if self.case.2 {
            return Err("resume failed".into());
        }
        self.resumed = true;
        Ok(())
    }
}

/// A socket peer: reads the stream from a buffer, keeps every reply.
struct Peer {
    input: Vec<u8>,
    pos: usize,
    replies: Vec<u8>,
}

impl Transport for Peer {
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        for p in parts {
            self.replies.extend_from_slice(p);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    fn has_peer(&self) -> bool {
        true
    }
}

/// Runs one case; panics when an oracle fails.
pub fn run(case: &StreamCase) {
    let built = build(case);
    feed(case.peer, &case.target, built);
}

/// Feeds raw bytes as a snapshot file to a destination that takes any configuration.
pub fn run_raw(bytes: Vec<u8>) {
    let built = Built {
        bytes,
        image: None,
        states: Vec::new(),
    };
    feed(false, &TargetCase::default(), built);
}

fn feed(peer: bool, target_case: &TargetCase, built: Built) {
    let vm = fake_target(LAYOUT);
    if let Some((page, value)) = target_case.firmware {
        vm.writer()
            .write(page_addr(usize::from(page)), &[value | 1]);
    }
    let mut target = Target {
        vm,
        case: (
            target_case.refuse_config,
            target_case.fail_restore,
            target_case.fail_resume,
        ),
        resumed: false,
    };
    let options = ReceiveOptions {
        reset_if_not_pristine: !target_case.no_reset,
        ..ReceiveOptions::default()
    };
    let (result, replies) = if peer {
        let mut peer = Peer {
            input: built.bytes,
            pos: 0,
            replies: Vec::new(),
        };
        let r = receive_migration(&mut target, &mut peer, &options);
        (r, Some(peer.replies))
    } else {
        let mut conn = Connection::from_bytes(built.bytes);
        (receive_migration(&mut target, &mut conn, &options), None)
    };
    if std::env::var_os("FUZZ_SHOW").is_some() {
        eprintln!(
            "OUTCOME {:?}",
            result
                .as_ref()
                .map(|_| "ok")
                .map_err(|e| migration::error_chain(e))
        );
    }
    if let Err(e) = &result {
        let _ = migration::error_chain(e);
        assert!(!target.resumed, "a destination that failed ({e}) resumed");
    }
    if let Some(replies) = replies {
        let mut conn = Connection::from_bytes(replies);
        let mut last = None;
        while let Ok((kind, _)) = read_reply(&mut conn) {
            last = Some(kind);
        }
        let expected = match &result {
            Ok(_) => Some(RecordKind::Running),
            Err(e) if e.is_empty_stream() => None,
            Err(_) => Some(RecordKind::Error),
        };
        assert_eq!(
            last,
            expected,
            "last reply after {:?}",
            result.as_ref().err()
        );
    }
    if result.is_ok() {
        assert!(target.resumed, "accepted but not resumed");
        if let Some(image) = &built.image {
            if target_case.firmware.is_none() || !target_case.no_reset {
                let got = target.vm.image();
                if let Some(i) = got.iter().zip(image.iter()).position(|(a, b)| a != b) {
                    panic!(
                        "accepted stream left byte {i:#x} (page {}) = {:#x}, its records say {:#x}",
                        i / PAGE_SIZE,
                        got[i],
                        image[i]
                    );
                }
            }
        }
        if built.image.is_some() {
            assert_eq!(target.vm.states, built.states, "device states handed over");
        }
    }
}

//! Payload codecs of the record kinds (layout, pass, run table, device state, end, replies).
//! Pure: bytes in, checked values out, every error naming the record's stream offset.

use std::time::Duration;

use crate::wire::{
    PayloadReader, RecordKind, WireError, BATCH_PREFIX_LEN, FORMAT_VERSION, JOIN_TOKEN_LEN,
    LOCAL_REGION_LEN, LOCAL_SHARED, MAX_BATCH_DATA_PAGES, MAX_BATCH_RUNS, MAX_DATA_CONNECTIONS,
    MAX_MESSAGE_LEN, MAX_REGIONS, MAX_STATE_ID_LEN, MAX_STATE_LEN, MAX_TORN_RUNS, PAGE_CRC_LEN,
    PAGE_SIZE, PAGE_SIZE_U64, PASS_FINAL, PASS_ZERO_ELIDED, READY_LOCAL, READY_PRISTINE,
    RUN_DESC_LEN, RUN_ZERO, TORN_RUN_LEN,
};

/// One guest-physical RAM region as declared in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayoutRegion {
    pub guest_addr: u64,
    pub size: u64,
}

/// Encodes a `MemoryLayout` payload.
pub fn encode_layout(regions: &[LayoutRegion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + regions.len() * 16);
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        out.extend_from_slice(&r.guest_addr.to_le_bytes());
        out.extend_from_slice(&r.size.to_le_bytes());
    }
    out
}

/// Decodes and validates a `MemoryLayout` payload: page size 4096, 1..=64 regions, each
/// page-aligned, non-empty, not wrapping, sorted and not overlapping.
pub fn decode_layout(payload: &[u8], offset: u64) -> Result<Vec<LayoutRegion>, WireError> {
    let mut r = PayloadReader::new(payload, offset, RecordKind::MemoryLayout);
    let page_size = r.u32("page size")?;
    if page_size as usize != PAGE_SIZE {
        return Err(r.error(format!("page size {page_size}, expected {PAGE_SIZE}")));
    }
    let count = r.u32("region count")? as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(r.error(format!("{count} regions, expected 1..={MAX_REGIONS}")));
    }
    let mut regions: Vec<LayoutRegion> = Vec::with_capacity(count);
    for i in 0..count {
        let guest_addr = r.u64("region address")?;
        let size = r.u64("region size")?;
        if !guest_addr.is_multiple_of(PAGE_SIZE_U64)
            || !size.is_multiple_of(PAGE_SIZE_U64)
            || size == 0
        {
            return Err(r.error(format!(
                "region {i} ({guest_addr:#x}, {size:#x} bytes) is empty or not page-aligned"
            )));
        }
        if guest_addr.checked_add(size).is_none() {
            return Err(r.error(format!("region {i} wraps the address space")));
        }
        if let Some(prev) = regions.last() {
            if guest_addr < prev.guest_addr + prev.size {
                return Err(r.error(format!("region {i} overlaps or precedes region {}", i - 1)));
            }
        }
        regions.push(LayoutRegion { guest_addr, size });
    }
    r.finish()?;
    Ok(regions)
}

/// One region of a `LocalMemory` record: where it is in the guest, and where in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRegion {
    pub guest_addr: u64,
    pub size: u64,
    /// Byte offset of the region in its file.
    pub file_offset: u64,
    /// The region is a file whose descriptor rides on the record; else it is memory of the
    /// source process alone (private anonymous) and nothing is attached for it.
    pub shared: bool,
}

impl LocalRegion {
    pub fn layout(&self) -> LayoutRegion {
        LayoutRegion {
            guest_addr: self.guest_addr,
            size: self.size,
        }
    }
}

/// Encodes a `LocalMemory` payload.
pub fn encode_local_memory(regions: &[LocalRegion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + regions.len() * LOCAL_REGION_LEN);
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        out.extend_from_slice(&r.guest_addr.to_le_bytes());
        out.extend_from_slice(&r.size.to_le_bytes());
        out.extend_from_slice(&r.file_offset.to_le_bytes());
        let flags = if r.shared { LOCAL_SHARED } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

/// Decodes a `LocalMemory` payload: the layout rules of `MemoryLayout`, plus page-aligned
/// file offsets and no unknown flags.
pub fn decode_local_memory(payload: &[u8], offset: u64) -> Result<Vec<LocalRegion>, WireError> {
    let mut r = PayloadReader::new(payload, offset, RecordKind::LocalMemory);
    let page_size = r.u32("page size")?;
    if page_size as usize != PAGE_SIZE {
        return Err(r.error(format!("page size {page_size}, expected {PAGE_SIZE}")));
    }
    let count = r.u32("region count")? as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(r.error(format!("{count} regions, expected 1..={MAX_REGIONS}")));
    }
    let mut layout = Vec::with_capacity(8 + count * 16);
    layout.extend_from_slice(&payload[..8]);
    let mut regions = Vec::with_capacity(count);
    for i in 0..count {
        let guest_addr = r.u64("region address")?;
        let size = r.u64("region size")?;
        let file_offset = r.u64("file offset")?;
        let flags = r.u32("region flags")?;
        let reserved = r.u32("reserved")?;
        if flags & !LOCAL_SHARED != 0 || reserved != 0 {
            return Err(r.error(format!(
                "region {i} has unknown flags {flags:#x}/{reserved:#x}"
            )));
        }
        if !file_offset.is_multiple_of(PAGE_SIZE_U64) || file_offset.checked_add(size).is_none() {
            return Err(r.error(format!(
                "region {i}: file offset {file_offset:#x} is not page-aligned or wraps"
            )));
        }
        layout.extend_from_slice(&guest_addr.to_le_bytes());
        layout.extend_from_slice(&size.to_le_bytes());
        regions.push(LocalRegion {
            guest_addr,
            size,
            file_offset,
            shared: flags & LOCAL_SHARED != 0,
        });
    }
    r.finish()?;
    // The same address rules as a MemoryLayout.
    decode_layout(&layout, offset).map_err(|e| match e {
        WireError::Malformed { offset, reason, .. } => WireError::Malformed {
            offset,
            kind: RecordKind::LocalMemory,
            reason,
        },
        other => other,
    })?;
    Ok(regions)
}

/// A `PassBegin` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassBegin {
    pub pass: u32,
    pub flags: u32,
}

impl PassBegin {
    pub fn encode(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.pass.to_le_bytes());
        out[4..].copy_from_slice(&self.flags.to_le_bytes());
        out
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::PassBegin);
        let pass = r.u32("pass number")?;
        let flags = r.u32("pass flags")?;
        r.finish()?;
        if flags & !(PASS_ZERO_ELIDED | PASS_FINAL) != 0 {
            return Err(r.error(format!("unknown pass flags {flags:#x}")));
        }
        Ok(PassBegin { pass, flags })
    }
}

/// A `PassEnd` payload: the number of the live pass that ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassMark {
    pub pass: u32,
}

impl PassMark {
    pub fn encode(&self) -> [u8; 4] {
        self.pass.to_le_bytes()
    }

    pub fn decode(payload: &[u8], offset: u64, kind: RecordKind) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, kind);
        let pass = r.u32("pass number")?;
        r.finish()?;
        Ok(PassMark { pass })
    }
}

/// A `Connections` payload: `count` data connections join this migration, each presenting
/// `token` in its `Join`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    pub count: u32,
    pub token: [u8; JOIN_TOKEN_LEN],
}

impl std::fmt::Debug for Connections {
    // The token is a credential: never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Connections {
    pub fn encode(&self) -> [u8; 4 + JOIN_TOKEN_LEN] {
        encode_token(self.count, &self.token)
    }

    /// Refuses a count of 0 or above [`MAX_DATA_CONNECTIONS`].
    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let (count, token) = decode_token(payload, offset, RecordKind::Connections, "count")?;
        if count == 0 || count > MAX_DATA_CONNECTIONS {
            return Err(
                PayloadReader::new(payload, offset, RecordKind::Connections).error(format!(
                    "{count} data connections (1 to {MAX_DATA_CONNECTIONS} may join)"
                )),
            );
        }
        Ok(Connections { count, token })
    }
}

/// A `Join` payload: data connection `index` (0-based) of the migration whose token it is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Join {
    pub index: u32,
    pub token: [u8; JOIN_TOKEN_LEN],
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Join {
    pub fn encode(&self) -> [u8; 4 + JOIN_TOKEN_LEN] {
        encode_token(self.index, &self.token)
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let (index, token) = decode_token(payload, offset, RecordKind::Join, "index")?;
        Ok(Join { index, token })
    }
}

/// The payload of `Connections` and `Join`: a number (`what`), then the token.
fn decode_token(
    payload: &[u8],
    offset: u64,
    kind: RecordKind,
    what: &str,
) -> Result<(u32, [u8; JOIN_TOKEN_LEN]), WireError> {
    let mut r = PayloadReader::new(payload, offset, kind);
    let n = r.u32(&format!("data connection {what}"))?;
    let mut token = [0u8; JOIN_TOKEN_LEN];
    token.copy_from_slice(r.bytes(JOIN_TOKEN_LEN, "join token")?);
    r.finish()?;
    Ok((n, token))
}

fn encode_token(n: u32, token: &[u8; JOIN_TOKEN_LEN]) -> [u8; 4 + JOIN_TOKEN_LEN] {
    let mut out = [0u8; 4 + JOIN_TOKEN_LEN];
    out[..4].copy_from_slice(&n.to_le_bytes());
    out[4..].copy_from_slice(token);
    out
}

/// Pages the destination holds torn: `pages` pages from guest address `guest_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornRun {
    pub guest_addr: u64,
    pub pages: u32,
}

/// A `PassDone` payload: the live pass it answers and the pages the destination holds torn
/// (at most [`MAX_TORN_RUNS`] runs; `more` says some were left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassDone {
    pub pass: u32,
    pub torn: Vec<TornRun>,
    pub more: bool,
}

/// `PassDone` flag: more torn pages than the runs listed.
const PASS_DONE_MORE: u32 = 1 << 31;

impl PassDone {
    pub fn encode(&self) -> Vec<u8> {
        let count = self.torn.len().min(MAX_TORN_RUNS);
        let mut out = Vec::with_capacity(8 + count * TORN_RUN_LEN);
        out.extend_from_slice(&self.pass.to_le_bytes());
        let more = if self.more || count < self.torn.len() {
            PASS_DONE_MORE
        } else {
            0
        };
        out.extend_from_slice(&(count as u32 | more).to_le_bytes());
        for run in &self.torn[..count] {
            out.extend_from_slice(&run.guest_addr.to_le_bytes());
            out.extend_from_slice(&run.pages.to_le_bytes());
        }
        out
    }

    /// Decodes and checks the syntax (page-aligned, non-empty, non-wrapping runs, at most
    /// [`MAX_TORN_RUNS`]); the source checks them against its layout.
    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::PassDone);
        let pass = r.u32("pass number")?;
        let word = r.u32("torn run count")?;
        let more = word & PASS_DONE_MORE != 0;
        let count = (word & !PASS_DONE_MORE) as usize;
        if count > MAX_TORN_RUNS {
            return Err(r.error(format!("{count} torn runs, limit is {MAX_TORN_RUNS}")));
        }
        let mut torn = Vec::with_capacity(count);
        for i in 0..count {
            let guest_addr = r.u64("torn run address")?;
            let pages = r.u32("torn run page count")?;
            let wraps = (pages as u64)
                .checked_mul(PAGE_SIZE_U64)
                .and_then(|len| guest_addr.checked_add(len))
                .is_none();
            if pages == 0 || !guest_addr.is_multiple_of(PAGE_SIZE_U64) || wraps {
                return Err(r.error(format!(
                    "torn run {i} ({pages} pages at {guest_addr:#x}) is empty, misaligned or wraps"
                )));
            }
            torn.push(TornRun { guest_addr, pages });
        }
        r.finish()?;
        Ok(PassDone { pass, torn, more })
    }
}

/// One run descriptor of a `RamPages` batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunDesc {
    pub guest_addr: u64,
    pub pages: u32,
    pub zero: bool,
}

impl RunDesc {
    /// Appends the 16-byte encoding.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.guest_addr.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        let flags = if self.zero { RUN_ZERO } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
    }
}

/// Encodes the batch prefix: run count and data page count.
pub fn encode_batch_prefix(runs: u32, data_pages: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&runs.to_le_bytes());
    out.extend_from_slice(&data_pages.to_le_bytes());
}

/// A whole `RamPages` payload for `runs`, with `data` holding the pages of the non-zero runs
/// in order (4096 bytes each), and the checksum its record header carries (of everything but
/// the page data, which the page checksums cover). The sender writes the data from guest
/// memory instead; this is for tests, tools and fuzzing.
pub fn encode_ram_pages(runs: &[RunDesc], data: &[u8]) -> (Vec<u8>, u32) {
    let data_pages = data.len() / PAGE_SIZE;
    let mut payload = Vec::with_capacity(
        BATCH_PREFIX_LEN + runs.len() * RUN_DESC_LEN + data_pages * (PAGE_CRC_LEN + PAGE_SIZE),
    );
    encode_batch_prefix(runs.len() as u32, data_pages as u32, &mut payload);
    for r in runs {
        r.encode_into(&mut payload);
    }
    for page in data.chunks(PAGE_SIZE) {
        payload.extend_from_slice(&crc32c::crc32c(page).to_le_bytes());
    }
    let crc = crc32c::crc32c(&payload);
    payload.extend_from_slice(data);
    (payload, crc)
}

/// Decodes the batch prefix and checks it against the payload length
/// (`8 + 16 * runs + (4 + 4096) * data pages`). Returns (run count, data page count).
pub fn decode_batch_prefix(
    prefix: &[u8; BATCH_PREFIX_LEN],
    payload_len: u32,
    offset: u64,
) -> Result<(usize, usize), WireError> {
    let mut r = PayloadReader::new(prefix, offset, RecordKind::RamPages);
    let runs = r.u32("run count")? as usize;
    let data_pages = r.u32("data page count")? as usize;
    if runs == 0 || runs > MAX_BATCH_RUNS {
        return Err(r.error(format!("{runs} runs, expected 1..={MAX_BATCH_RUNS}")));
    }
    if data_pages > MAX_BATCH_DATA_PAGES {
        return Err(r.error(format!(
            "{data_pages} data pages, limit is {MAX_BATCH_DATA_PAGES}"
        )));
    }
    let expected = BATCH_PREFIX_LEN + runs * RUN_DESC_LEN + data_pages * (PAGE_CRC_LEN + PAGE_SIZE);
    if expected != payload_len as usize {
        return Err(r.error(format!(
            "length {payload_len} does not match {runs} runs and {data_pages} data pages ({expected})"
        )));
    }
    Ok((runs, data_pages))
}

/// Decodes the run table (syntax only; the loader checks it against the layout).
pub fn decode_run_table(table: &[u8], offset: u64) -> Result<Vec<RunDesc>, WireError> {
    let mut r = PayloadReader::new(table, offset, RecordKind::RamPages);
    let mut runs = Vec::with_capacity(table.len() / RUN_DESC_LEN);
    while !r.at_end() {
        let guest_addr = r.u64("run address")?;
        let pages = r.u32("run page count")?;
        let flags = r.u32("run flags")?;
        if flags & !RUN_ZERO != 0 {
            return Err(r.error(format!("run {} has unknown flags {flags:#x}", runs.len())));
        }
        runs.push(RunDesc {
            guest_addr,
            pages,
            zero: flags & RUN_ZERO != 0,
        });
    }
    Ok(runs)
}

/// An opaque device or vCPU state blob with its id and the component's own version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateBlob {
    /// Names the component, e.g. `"vcpu0"`, `"pic"`; 1..=64 printable ASCII bytes, unique.
    pub id: String,
    /// The component's state version, for the component to check on restore.
    pub version: u32,
    pub data: Vec<u8>,
}

impl StateBlob {
    /// Encodes the `DeviceState` payload header (id length, id, version); data follows.
    pub fn encode_head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.id.len());
        out.extend_from_slice(&(self.id.len() as u16).to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out
    }

    /// Checks the id rules and the size cap (used by the sender before writing).
    pub fn check(&self) -> Result<(), String> {
        if !valid_state_id(self.id.as_bytes()) {
            return Err(format!("invalid state id {:?}", self.id));
        }
        let len = 6 + self.id.len() + self.data.len();
        if len > MAX_STATE_LEN {
            return Err(format!(
                "state {:?} is {len} bytes, limit {MAX_STATE_LEN}",
                self.id
            ));
        }
        Ok(())
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::DeviceState);
        let id_len = r.u16("state id length")? as usize;
        let id = r.bytes(id_len, "state id")?;
        if !valid_state_id(id) {
            return Err(r.error("state id is empty, too long or not printable ASCII"));
        }
        let id = String::from_utf8_lossy(id).into_owned();
        let version = r.u32("state version")?;
        let data = r.rest().to_vec();
        Ok(StateBlob { id, version, data })
    }
}

fn valid_state_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_STATE_ID_LEN && id.iter().all(|b| b.is_ascii_graphic())
}

/// The `End` payload: what the reader must have seen before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndRecord {
    /// Records before `End` (the stream header is not a record).
    pub records: u64,
    /// Stream bytes before `End`, stream header included.
    pub bytes: u64,
    /// CRC32C over the concatenated headers of those records (each holds its payload CRC).
    pub chain_crc: u32,
}

impl EndRecord {
    pub fn encode(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.records.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        out[16..].copy_from_slice(&self.chain_crc.to_le_bytes());
        out
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::End);
        let out = EndRecord {
            records: r.u64("record count")?,
            bytes: r.u64("byte count")?,
            chain_crc: r.u32("checksum chain")?,
        };
        r.finish()?;
        Ok(out)
    }
}

/// The destination's `Ready` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    pub version: u32,
    pub pristine: bool,
    /// Local migration: the destination mapped the memory of `LocalMemory`.
    pub local: bool,
}

impl Ready {
    pub fn encode(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.version.to_le_bytes());
        let flags = if self.pristine { READY_PRISTINE } else { 0 }
            | if self.local { READY_LOCAL } else { 0 };
        out[4..].copy_from_slice(&flags.to_le_bytes());
        out
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::Ready);
        let version = r.u32("version")?;
        let flags = r.u32("ready flags")?;
        r.finish()?;
        if version != FORMAT_VERSION {
            return Err(WireError::UnsupportedVersion { offset, version });
        }
        if flags & !(READY_PRISTINE | READY_LOCAL) != 0 {
            return Err(r.error(format!("unknown ready flags {flags:#x}")));
        }
        Ok(Ready {
            version,
            pristine: flags & READY_PRISTINE != 0,
            local: flags & READY_LOCAL != 0,
        })
    }
}

/// The destination's `Restored` reply: the state is restored, the guest is not running, and
/// the destination waits this long for `Go` before it discards the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    pub go_timeout: Duration,
}

impl Restored {
    pub fn encode(&self) -> [u8; 4] {
        let ms = u32::try_from(self.go_timeout.as_millis()).unwrap_or(u32::MAX);
        ms.to_le_bytes()
    }

    pub fn decode(payload: &[u8], offset: u64) -> Result<Self, WireError> {
        let mut r = PayloadReader::new(payload, offset, RecordKind::Restored);
        let ms = r.u32("go timeout")?;
        r.finish()?;
        Ok(Restored {
            go_timeout: Duration::from_millis(u64::from(ms)),
        })
    }
}

/// Truncates an error message to the cap on a character boundary.
pub fn encode_message(msg: &str) -> Vec<u8> {
    let mut end = msg.len().min(MAX_MESSAGE_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.as_bytes()[..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trip_and_validation() {
        let regions = vec![
            LayoutRegion {
                guest_addr: 0,
                size: 0x10_0000,
            },
            LayoutRegion {
                guest_addr: 0x1_0000_0000,
                size: 0x2000,
            },
        ];
        assert_eq!(decode_layout(&encode_layout(&regions), 0).unwrap(), regions);

        let overlapping = [regions[0], regions[0]];
        let err = decode_layout(&encode_layout(&overlapping), 0).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");

        let misaligned = [LayoutRegion {
            guest_addr: 0x800,
            size: 0x1000,
        }];
        assert!(decode_layout(&encode_layout(&misaligned), 0).is_err());
        let wrapping = [LayoutRegion {
            guest_addr: u64::MAX - 0xfff,
            size: 0x2000,
        }];
        assert!(decode_layout(&encode_layout(&wrapping), 0).is_err());
        assert!(decode_layout(&encode_layout(&[]), 0).is_err());
        let mut trailing = encode_layout(&regions);
        trailing.push(0);
        assert!(decode_layout(&trailing, 0).is_err());
    }

    #[test]
    fn batch_prefix_checks_length() {
        let mut p = Vec::new();
        encode_batch_prefix(2, 1, &mut p);
        let prefix: [u8; 8] = p.as_slice().try_into().unwrap();
        let len = (8 + 32 + 4 + 4096) as u32;
        assert_eq!(decode_batch_prefix(&prefix, len, 0).unwrap(), (2, 1));
        assert!(decode_batch_prefix(&prefix, len + 1, 0).is_err());
        assert!(
            decode_batch_prefix(&prefix, len - 4, 0).is_err(),
            "the page checksum is part of the length"
        );
        let mut p = Vec::new();
        encode_batch_prefix(0, 0, &mut p);
        assert!(decode_batch_prefix(&p.as_slice().try_into().unwrap(), 8, 0).is_err());
    }

    #[test]
    fn pass_done_round_trip_and_validation() {
        let done = PassDone {
            pass: 3,
            torn: vec![
                TornRun {
                    guest_addr: 0x1000,
                    pages: 2,
                },
                TornRun {
                    guest_addr: 0x10_0000,
                    pages: 1,
                },
            ],
            more: false,
        };
        let bytes = done.encode();
        assert_eq!(bytes.len(), 8 + 2 * TORN_RUN_LEN);
        assert_eq!(PassDone::decode(&bytes, 0).unwrap(), done);
        let empty = PassDone {
            pass: 9,
            torn: vec![],
            more: true,
        };
        assert_eq!(PassDone::decode(&empty.encode(), 0).unwrap(), empty);
        // Too many runs are cut and flagged.
        let many = PassDone {
            pass: 1,
            torn: vec![
                TornRun {
                    guest_addr: 0,
                    pages: 1
                };
                MAX_TORN_RUNS + 5
            ],
            more: false,
        };
        let decoded = PassDone::decode(&many.encode(), 0).unwrap();
        assert_eq!(decoded.torn.len(), MAX_TORN_RUNS);
        assert!(decoded.more);
        // Bad runs, counts and lengths are refused.
        let mut misaligned = bytes.clone();
        misaligned[8] = 1;
        assert!(PassDone::decode(&misaligned, 0).is_err());
        let mut empty_run = bytes.clone();
        empty_run[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(PassDone::decode(&empty_run, 0).is_err());
        let mut wraps = bytes.clone();
        wraps[8..16].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        assert!(PassDone::decode(&wraps, 0).is_err());
        let mut count = bytes.clone();
        count[4..8].copy_from_slice(&(MAX_TORN_RUNS as u32 + 1).to_le_bytes());
        assert!(PassDone::decode(&count, 0).is_err());
        assert!(PassDone::decode(&bytes[..bytes.len() - 1], 0).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(PassDone::decode(&trailing, 0).is_err());
    }

    #[test]
    fn run_table_rejects_unknown_flags() {
        let mut t = Vec::new();
        RunDesc {
            guest_addr: 0x1000,
            pages: 3,
            zero: true,
        }
        .encode_into(&mut t);
        let runs = decode_run_table(&t, 0).unwrap();
        assert_eq!(runs.len(), 1);
        assert!(runs[0].zero);
        t[12] |= 4;
        assert!(decode_run_table(&t, 0).is_err());
    }

    #[test]
    fn state_blob_and_end_and_ready_round_trip() {
        let blob = StateBlob {
            id: "vcpu0".into(),
            version: 3,
            data: vec![1, 2, 3],
        };
        let mut payload = blob.encode_head();
        payload.extend_from_slice(&blob.data);
        assert_eq!(StateBlob::decode(&payload, 0).unwrap(), blob);
        let bad = StateBlob {
            id: "bad id".into(),
            ..blob.clone()
        };
        assert!(bad.check().is_err());
        assert!(StateBlob::decode(&bad.encode_head(), 0).is_err());

        let end = EndRecord {
            records: 9,
            bytes: 1234,
            chain_crc: 42,
        };
        assert_eq!(EndRecord::decode(&end.encode(), 0).unwrap(), end);
        assert!(EndRecord::decode(&end.encode()[..19], 0).is_err());

        let ready = Ready {
            version: FORMAT_VERSION,
            pristine: true,
            local: false,
        };
        assert_eq!(Ready::decode(&ready.encode(), 0).unwrap(), ready);
        let local = Ready {
            pristine: false,
            local: true,
            ..ready
        };
        assert_eq!(Ready::decode(&local.encode(), 0).unwrap(), local);
    }

    #[test]
    fn local_memory_round_trips_and_keeps_the_layout_rules() {
        let regions = [
            LocalRegion {
                guest_addr: 0,
                size: 3 << 30,
                file_offset: 0,
                shared: true,
            },
            LocalRegion {
                guest_addr: 4 << 30,
                size: 1 << 30,
                file_offset: 1 << 21,
                shared: false,
            },
        ];
        let bytes = encode_local_memory(&regions);
        assert_eq!(bytes.len(), 8 + 2 * LOCAL_REGION_LEN);
        assert_eq!(decode_local_memory(&bytes, 0).unwrap(), regions);
        let bad = |f: &dyn Fn(&mut Vec<u8>), what: &str| {
            let mut b = bytes.clone();
            f(&mut b);
            let e = decode_local_memory(&b, 7).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("LocalMemory"), "{what}: {e}");
        };
        bad(&|b| b[8 + 24] = 0x4, "unknown flags");
        bad(&|b| b[8 + 28] = 0x1, "unknown flags");
        bad(&|b| b[8 + 16] = 0x1, "not page-aligned");
        // The second region moved below the first: overlap.
        bad(&|b| b[8 + 32 + 4] = 0, "overlaps");
        bad(&|b| b.truncate(20), "LocalMemory");
        bad(&|b| b[4] = 0, "0 regions");
    }

    #[test]
    fn message_truncates_on_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let enc = encode_message(&long);
        assert!(enc.len() <= MAX_MESSAGE_LEN);
        assert!(std::str::from_utf8(&enc).is_ok());
    }

    #[test]
    fn connections_and_join_round_trip_and_the_count_is_bounded() {
        let token = [9u8; JOIN_TOKEN_LEN];
        for count in [1, MAX_DATA_CONNECTIONS] {
            let c = Connections { count, token };
            assert_eq!(Connections::decode(&c.encode(), 0).unwrap(), c);
        }
        for count in [0, MAX_DATA_CONNECTIONS + 1, u32::MAX] {
            let bytes = Connections { count, token }.encode();
            let e = Connections::decode(&bytes, 40).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{count} data connections (1 to 15 may join)"))
                    && e.contains("offset 40"),
                "{e}"
            );
        }
        let j = Join { index: 3, token };
        assert_eq!(Join::decode(&j.encode(), 0).unwrap(), j);
        // A short or long payload is refused, not read past.
        assert!(Join::decode(&j.encode()[..19], 0).is_err());
        assert!(Connections::decode(&[0u8; 21], 0).is_err());
    }
}

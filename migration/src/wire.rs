//! The stream format, byte by byte (see `migration/FORMAT.md`): magic and version, the 16-byte
//! record header, the record kinds with their length caps, and [`PayloadReader`] for the
//! payload codecs, which live in [`crate::records`].
//!
//! Everything is little-endian. Every record header carries a CRC32C of its payload and of
//! itself, so a garbled length is caught before the reader trusts it (no hang waiting for bytes
//! that will never come, no huge allocation). This module is pure: no I/O, no guest memory.

use std::fmt;

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"MINIVMM\0";
/// The one version of the whole stream (no per-record versions). Version 2 added the commit
/// step (`Restored`, `Go`); version 1 streams are refused.
pub const FORMAT_VERSION: u32 = 2;
/// Magic, version, CRC32C of both.
pub const STREAM_HEADER_LEN: usize = 16;
/// Kind, flags, payload length, payload CRC32C, header CRC32C.
pub const RECORD_HEADER_LEN: usize = 16;
/// Guest page size; the only one the format knows.
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as a `u64`, for guest addresses.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
/// Most runs in one `RamPages` batch.
pub const MAX_BATCH_RUNS: usize = 4096;
/// Most data pages in one `RamPages` batch (4 MiB).
pub const MAX_BATCH_DATA_PAGES: usize = 1024;
/// Bytes of a `RamPages` payload before the run table.
pub const BATCH_PREFIX_LEN: usize = 8;
/// Bytes of one run descriptor.
pub const RUN_DESC_LEN: usize = 16;
/// Bytes of one page checksum in a `RamPages` batch.
pub const PAGE_CRC_LEN: usize = 4;
/// Most torn runs one `PassDone` lists.
pub const MAX_TORN_RUNS: usize = 1024;
/// Bytes of one torn run in `PassDone`.
pub const TORN_RUN_LEN: usize = 12;
/// Most memory regions in a layout.
pub const MAX_REGIONS: usize = 64;
/// Largest configuration blob.
pub const MAX_CONFIG_LEN: usize = 1 << 20;
/// Largest device-state record.
pub const MAX_STATE_LEN: usize = 16 << 20;
/// Longest device-state id.
pub const MAX_STATE_ID_LEN: usize = 64;
/// Most device-state records in one stream (the destination keeps them until `End`).
pub const MAX_DEVICE_STATES: usize = 1024;
/// Most device-state bytes in one stream, all records together.
pub const MAX_DEVICE_STATE_BYTES: usize = 64 << 20;
/// Longest error message from the destination.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// `PassBegin` flag: zero pages are omitted from this pass (destination memory must be zero).
pub const PASS_ZERO_ELIDED: u32 = 1;
/// `PassBegin` flag: the guest is paused (final pass).
pub const PASS_FINAL: u32 = 2;
/// Run descriptor flag: the run's pages are zero and carry no data.
pub const RUN_ZERO: u32 = 1;
/// `Ready` flag: the destination's guest memory is all zero and only the stream writes it.
pub const READY_PRISTINE: u32 = 1;
/// `Ready` flag: the destination mapped the memory of `LocalMemory` (local migration).
pub const READY_LOCAL: u32 = 2;
/// `LocalMemory` region flag: the region's memory is a file whose descriptor is attached.
pub const LOCAL_SHARED: u32 = 1;
/// Bytes of one `LocalMemory` region entry.
pub const LOCAL_REGION_LEN: usize = 32;
/// Most data connections of one migration (`Connections`), besides the control connection.
pub const MAX_DATA_CONNECTIONS: u32 = 15;
/// Bytes of the token data connections present in `Join`.
pub const JOIN_TOKEN_LEN: usize = 16;

/// Errors found while decoding stream bytes. Offsets count from the first byte of the stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("Bad magic at offset {offset}: not a minivmm migration stream")]
    BadMagic { offset: u64 },
    #[error(
        "The peer opened a TLS connection (a TLS handshake record at offset {offset}) but this \
         endpoint expects the plaintext stream: it was started without --tls-dir"
    )]
    TlsHandshake { offset: u64 },
    #[error("Unsupported format version {version} at offset {offset} (this build reads {FORMAT_VERSION}{})", version_hint(*.version))]
    UnsupportedVersion { offset: u64, version: u32 },
    #[error("Stream header checksum mismatch at offset {offset}")]
    StreamHeaderChecksum { offset: u64 },
    #[error("Record header checksum mismatch at offset {offset}")]
    HeaderChecksum { offset: u64 },
    #[error("{kind} payload checksum mismatch in record at offset {offset}")]
    PayloadChecksum { offset: u64, kind: RecordKind },
    #[error("Unknown record kind {kind:#06x} at offset {offset}")]
    UnknownKind { offset: u64, kind: u16 },
    #[error("{kind} record at offset {offset} has reserved flags {flags:#06x} set")]
    ReservedFlags {
        offset: u64,
        kind: RecordKind,
        flags: u16,
    },
    #[error("{kind} record at offset {offset} is {len} bytes long, limit is {max}")]
    PayloadTooLong {
        offset: u64,
        kind: RecordKind,
        len: u32,
        max: usize,
    },
    #[error("Stream truncated at offset {offset} while reading {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("Malformed {kind} record at offset {offset}: {reason}")]
    Malformed {
        offset: u64,
        kind: RecordKind,
        reason: String,
    },
    #[error("Reading the stream failed at offset {offset}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Record kinds. Source to destination below 0x100, replies from 0x100.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Opaque configuration blob the destination validates before any RAM is sent.
    Config = 0x0001,
    /// Page size and the guest-physical RAM regions.
    MemoryLayout = 0x0002,
    /// Start of a RAM pass: number and flags.
    PassBegin = 0x0003,
    /// A batch of page runs: data runs carry their pages, each with its checksum; zero runs
    /// carry nothing. The header's payload checksum covers everything but the page data.
    RamPages = 0x0004,
    /// One device or vCPU state blob.
    DeviceState = 0x0005,
    /// End of stream: record count, byte count and the checksum chain.
    End = 0x0006,
    /// End of a live pass: the destination replies `PassDone` once it applied it.
    PassEnd = 0x0007,
    /// The source gave the migration up (it was cancelled), with a UTF-8 reason.
    Abort = 0x0008,
    /// The commit: after `Restored`, the destination may resume the guest; the source never
    /// will on its own again.
    Go = 0x0009,
    /// Local migration, in place of `MemoryLayout`: the regions and the files that hold them,
    /// whose descriptors ride on this record (`SCM_RIGHTS`). No RAM pass follows.
    LocalMemory = 0x000a,
    /// After `Ready`, on the control connection of a migration with several connections:
    /// how many data connections join it and the token they present (`Join`).
    Connections = 0x000b,
    /// First record of a data connection: the token of the migration it joins and its index.
    Join = 0x000c,
    /// Destination reply after the layout: version and whether its memory is pristine.
    Ready = 0x0101,
    /// Destination reply after `Go`: the guest runs on the destination.
    Running = 0x0102,
    /// Destination reply: it refused or failed, with a message.
    Error = 0x0103,
    /// Destination reply to `PassEnd`: every page of the pass is in guest memory; lists the
    /// pages it holds torn (a live pass's page whose checksum did not match).
    PassDone = 0x0104,
    /// Destination reply after `End`: the whole state is restored, the guest is not running,
    /// and it waits for `Go`.
    Restored = 0x0105,
    /// Destination reply to `Connections`: every data connection joined.
    Joined = 0x0106,
}

impl RecordKind {
    /// Decodes a kind, `None` if unknown.
    pub fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            0x0001 => RecordKind::Config,
            0x0002 => RecordKind::MemoryLayout,
            0x0003 => RecordKind::PassBegin,
            0x0004 => RecordKind::RamPages,
            0x0005 => RecordKind::DeviceState,
            0x0006 => RecordKind::End,
            0x0007 => RecordKind::PassEnd,
            0x0008 => RecordKind::Abort,
            0x0009 => RecordKind::Go,
            0x000a => RecordKind::LocalMemory,
            0x000b => RecordKind::Connections,
            0x000c => RecordKind::Join,
            0x0101 => RecordKind::Ready,
            0x0102 => RecordKind::Running,
            0x0103 => RecordKind::Error,
            0x0104 => RecordKind::PassDone,
            0x0105 => RecordKind::Restored,
            0x0106 => RecordKind::Joined,
            _ => return None,
        })
    }

    /// Largest payload a record of this kind may have.
    pub fn max_payload(self) -> usize {
        match self {
            RecordKind::Config => MAX_CONFIG_LEN,
            RecordKind::MemoryLayout => 8 + MAX_REGIONS * 16,
            RecordKind::PassBegin => 8,
            RecordKind::RamPages => {
                BATCH_PREFIX_LEN
                    + MAX_BATCH_RUNS * RUN_DESC_LEN
                    + MAX_BATCH_DATA_PAGES * (PAGE_CRC_LEN + PAGE_SIZE)
            }
            RecordKind::DeviceState => MAX_STATE_LEN,
            RecordKind::End => 20,
            RecordKind::Ready => 8,
            RecordKind::Running => MAX_MESSAGE_LEN,
            RecordKind::Error | RecordKind::Abort => MAX_MESSAGE_LEN,
            RecordKind::PassEnd => 4,
            RecordKind::PassDone => 8 + MAX_TORN_RUNS * TORN_RUN_LEN,
            RecordKind::Go => 0,
            RecordKind::LocalMemory => 8 + MAX_REGIONS * LOCAL_REGION_LEN,
            RecordKind::Restored => 4,
            RecordKind::Connections => 4 + JOIN_TOKEN_LEN,
            RecordKind::Join => 4 + JOIN_TOKEN_LEN,
            RecordKind::Joined => 0,
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why an older version cannot be read, for the error message.
fn version_hint(version: u32) -> &'static str {
    match version {
        1 => "; version 1 comes from a minivmm without the commit step, whose migrations and snapshots this one does not take",
        _ => "",
    }
}

/// Encodes the 16-byte stream header.
pub fn encode_stream_header() -> [u8; STREAM_HEADER_LEN] {
    let mut out = [0u8; STREAM_HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&out[..12]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks the stream header (at offset 0).
pub fn decode_stream_header(bytes: &[u8; STREAM_HEADER_LEN]) -> Result<(), WireError> {
    if bytes[..8] != MAGIC {
        // A TLS record: content type handshake (22), protocol version 3.x.
        if bytes[0] == 22 && bytes[1] == 3 {
            return Err(WireError::TlsHandshake { offset: 0 });
        }
        return Err(WireError::BadMagic { offset: 0 });
    }
    if crc32c::crc32c(&bytes[..12]) != le_u32(&bytes[12..16]) {
        return Err(WireError::StreamHeaderChecksum { offset: 0 });
    }
    let version = le_u32(&bytes[8..12]);
    if version != FORMAT_VERSION {
        return Err(WireError::UnsupportedVersion { offset: 8, version });
    }
    Ok(())
}

/// A decoded, checked record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub len: u32,
    pub payload_crc: u32,
}

impl RecordHeader {
    /// Encodes the header (flags are reserved and zero).
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        out[0..2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..12]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header read at stream offset `offset`: its own checksum first, then
    /// the kind, the reserved flags and the length cap.
    pub fn decode(bytes: &[u8; RECORD_HEADER_LEN], offset: u64) -> Result<Self, WireError> {
        if crc32c::crc32c(&bytes[..12]) != le_u32(&bytes[12..16]) {
            return Err(WireError::HeaderChecksum { offset });
        }
        let raw_kind = u16::from_le_bytes([bytes[0], bytes[1]]);
        let kind = RecordKind::from_u16(raw_kind).ok_or(WireError::UnknownKind {
            offset,
            kind: raw_kind,
        })?;
        let flags = u16::from_le_bytes([bytes[2], bytes[3]]);
        if flags != 0 {
            return Err(WireError::ReservedFlags {
                offset,
                kind,
                flags,
            });
        }
        let len = le_u32(&bytes[4..8]);
        let max = kind.max_payload();
        if len as usize > max {
            return Err(WireError::PayloadTooLong {
                offset,
                kind,
                len,
                max,
            });
        }
        Ok(RecordHeader {
            kind,
            len,
            payload_crc: le_u32(&bytes[8..12]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads little-endian fields from a payload, naming the record on failure.
pub struct PayloadReader<'a> {
    buf: &'a [u8],
    pos: usize,
    offset: u64,
    kind: RecordKind,
}

impl<'a> PayloadReader<'a> {
    /// `offset` is the stream offset of the record that holds `buf`.
    pub fn new(buf: &'a [u8], offset: u64, kind: RecordKind) -> Self {
        PayloadReader {
            buf,
            pos: 0,
            offset,
            kind,
        }
    }

    /// A `Malformed` error for this record.
    pub fn error(&self, reason: impl Into<String>) -> WireError {
        WireError::Malformed {
            offset: self.offset,
            kind: self.kind,
            reason: reason.into(),
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| self.error(format!("payload too short for {what}")))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(le_u32(self.bytes(4, what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// True when every byte was read.
    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails unless the whole payload was consumed.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_header_round_trip_and_rejections() {
        let h = encode_stream_header();
        decode_stream_header(&h).unwrap();
        let mut bad = h;
        bad[0] ^= 1;
        assert!(matches!(
            decode_stream_header(&bad),
            Err(WireError::BadMagic { .. })
        ));
        let mut bad = h;
        bad[13] ^= 1;
        assert!(matches!(
            decode_stream_header(&bad),
            Err(WireError::StreamHeaderChecksum { .. })
        ));
        // A TLS ClientHello where the stream should start says so.
        let hello = [22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3, 0, 0, 0, 0, 0];
        let e = decode_stream_header(&hello).unwrap_err();
        assert!(matches!(e, WireError::TlsHandshake { offset: 0 }), "{e}");
        assert!(e.to_string().contains("without --tls-dir"), "{e}");
        // Another version with a valid checksum is refused by version, not checksum; version
        // 1 (before the commit step) with a message that says so.
        for version in [1u32, 3] {
            let mut other = h;
            other[8..12].copy_from_slice(&version.to_le_bytes());
            let e = decode_stream_header(&reseal(other)).unwrap_err();
            assert!(
                matches!(e, WireError::UnsupportedVersion { version: v, .. } if v == version),
                "{e}"
            );
            let commit_hint = e.to_string().contains("without the commit step");
            assert_eq!(commit_hint, version == 1, "{e}");
        }
    }

    fn reseal(mut b: [u8; 16]) -> [u8; 16] {
        let crc = crc32c::crc32c(&b[..12]);
        b[12..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn record_header_round_trip_and_rejections() {
        let h = RecordHeader {
            kind: RecordKind::RamPages,
            len: 4120,
            payload_crc: 0xdead_beef,
        };
        let enc = h.encode();
        assert_eq!(RecordHeader::decode(&enc, 7).unwrap(), h);

        let mut bad = enc;
        bad[5] ^= 0x40;
        assert!(matches!(
            RecordHeader::decode(&bad, 7),
            Err(WireError::HeaderChecksum { offset: 7 })
        ));

        let mut unknown = enc;
        unknown[0..2].copy_from_slice(&0x0077u16.to_le_bytes());
        assert!(matches!(
            RecordHeader::decode(&reseal(unknown), 3),
            Err(WireError::UnknownKind {
                offset: 3,
                kind: 0x77
            })
        ));

        let mut flags = enc;
        flags[2] = 1;
        assert!(matches!(
            RecordHeader::decode(&reseal(flags), 0),
            Err(WireError::ReservedFlags { .. })
        ));

        let mut long = enc;
        long[0..2].copy_from_slice(&(RecordKind::PassBegin as u16).to_le_bytes());
        assert!(matches!(
            RecordHeader::decode(&reseal(long), 0),
            Err(WireError::PayloadTooLong {
                len: 4120,
                max: 8,
                ..
            })
        ));
    }

    #[test]
    fn every_kind_round_trips_through_u16() {
        for v in 0..=u16::MAX {
            if let Some(k) = RecordKind::from_u16(v) {
                assert_eq!(k as u16, v);
            }
        }
    }
}

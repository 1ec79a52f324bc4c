//! Framed record I/O over a [`Transport`]: the writer adds headers, checksums and the
//! checksum chain that `End` seals; the reader checks them and tracks stream offsets so every
//! error names where it happened.

use std::io;

use crate::records::EndRecord;
use crate::transport::{GuestSpan, Transport};
use crate::wire::{
    self, RecordHeader, RecordKind, WireError, RECORD_HEADER_LEN, STREAM_HEADER_LEN,
};

/// Size of the reader's buffer; payload reads at least this large bypass it.
const READ_BUF: usize = 256 * 1024;

/// Writes the source-to-destination stream.
pub struct RecordWriter<'t> {
    t: &'t mut dyn Transport,
    bytes: u64,
    records: u64,
    chain: u32,
}

impl<'t> RecordWriter<'t> {
    /// Writes the stream header.
    pub fn start(t: &'t mut dyn Transport) -> io::Result<Self> {
        t.send(&[&wire::encode_stream_header()])?;
        Ok(RecordWriter {
            t,
            bytes: STREAM_HEADER_LEN as u64,
            records: 0,
            chain: 0,
        })
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes one record whose payload is the concatenation of `parts`, with one vectored
    /// write. Returns the bytes written.
    pub fn write_record(&mut self, kind: RecordKind, parts: &[&[u8]]) -> io::Result<u64> {
        let crc = parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
        self.write_record_with_crc(kind, parts, crc)
    }

    /// [`write_record`](Self::write_record) for a caller that already checksummed the
    /// payload (`crc`: CRC32C of the concatenated `parts`).
    pub fn write_record_with_crc(
        &mut self,
        kind: RecordKind,
        parts: &[&[u8]],
        crc: u32,
    ) -> io::Result<u64> {
        self.write_parts(kind, parts, crc, &[])
    }

    /// [`write_record`](Self::write_record) with `fds` attached to the record's first byte
    /// (`SCM_RIGHTS`; unix sockets only).
    pub fn write_record_with_fds(
        &mut self,
        kind: RecordKind,
        parts: &[&[u8]],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<u64> {
        let crc = parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
        self.write_parts(kind, parts, crc, fds)
    }

    /// One record (header, then `parts`) in one send, `fds` attached if there are any.
    fn write_parts(
        &mut self,
        kind: RecordKind,
        parts: &[&[u8]],
        crc: u32,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<u64> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= kind.max_payload(), "{kind} payload of {len} bytes");
        let header = RecordHeader {
            kind,
            len: len as u32,
            payload_crc: crc,
        }
        .encode();
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&header);
        all.extend_from_slice(parts);
        if fds.is_empty() {
            self.t.send(&all)?;
        } else {
            self.t.send_with_fds(&all, fds)?;
        }
        self.chain = crc32c::crc32c_append(self.chain, &header);
        self.records += 1;
        let written = (RECORD_HEADER_LEN + len) as u64;
        self.bytes += written;
        Ok(written)
    }

    /// Writes one record whose payload is `head` followed by the guest memory `guest`, with
    /// one vectored write, the guest bytes read by the kernel where they are (no copy). The
    /// header's payload checksum covers `head` only: `head` itself must cover the guest bytes
    /// (a `RamPages` record carries one checksum per page). Returns the bytes written.
    pub fn write_record_guest(
        &mut self,
        kind: RecordKind,
        head: &[u8],
        guest: &[GuestSpan],
    ) -> io::Result<u64> {
        let len = head.len() + guest.iter().map(GuestSpan::len).sum::<usize>();
        debug_assert!(len <= kind.max_payload(), "{kind} payload of {len} bytes");
        let header = RecordHeader {
            kind,
            len: len as u32,
            payload_crc: crc32c::crc32c(head),
        }
        .encode();
        self.t.send_guest(&[&header, head], guest)?;
        self.chain = crc32c::crc32c_append(self.chain, &header);
        self.records += 1;
        let written = (RECORD_HEADER_LEN + len) as u64;
        self.bytes += written;
        Ok(written)
    }

    /// The `End` that would seal what was written so far.
    pub fn sealed(&self) -> EndRecord {
        EndRecord {
            records: self.records,
            bytes: self.bytes,
            chain_crc: self.chain,
        }
    }

    /// Writes `End`, sealing everything written before it.
    pub fn finish(&mut self) -> io::Result<()> {
        let payload = self.sealed().encode();
        let header = RecordHeader {
            kind: RecordKind::End,
            len: payload.len() as u32,
            payload_crc: crc32c::crc32c(&payload),
        }
        .encode();
        self.t.send(&[&header, &payload])?;
        self.bytes += (RECORD_HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    /// The transport, to read the destination's replies.
    pub fn transport(&mut self) -> &mut dyn Transport {
        &mut *self.t
    }
}

/// Sends a destination reply (not part of the sealed stream).
pub fn send_reply(t: &mut dyn Transport, kind: RecordKind, payload: &[u8]) -> io::Result<()> {
    let header = RecordHeader {
        kind,
        len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
    }
    .encode();
    t.send(&[&header, payload])
}

/// Reads the source-to-destination stream (or, unbuffered use aside, the replies).
pub struct RecordReader<'t> {
    t: &'t mut dyn Transport,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    offset: u64,
    records: u64,
    chain: u32,
}

/// Where a [`RecordReader`] stopped: its buffered bytes, offset and checksum chain, to go on
/// reading the same stream later (from another thread, through another borrow of the
/// transport) with [`RecordReader::resume`].
pub struct ReaderState {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    offset: u64,
    records: u64,
    chain: u32,
}

impl<'t> RecordReader<'t> {
    pub fn new(t: &'t mut dyn Transport) -> Self {
        RecordReader {
            t,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            offset: 0,
            records: 0,
            chain: 0,
        }
    }

    /// Stops reading here; [`resume`](Self::resume) goes on from the same byte.
    pub fn into_state(self) -> ReaderState {
        ReaderState {
            buf: self.buf,
            start: self.start,
            end: self.end,
            offset: self.offset,
            records: self.records,
            chain: self.chain,
        }
    }

    /// Goes on reading where [`into_state`](Self::into_state) stopped, from `t`, which must
    /// be the same stream.
    pub fn resume(t: &'t mut dyn Transport, state: ReaderState) -> Self {
        RecordReader {
            t,
            buf: state.buf,
            start: state.start,
            end: state.end,
            offset: state.offset,
            records: state.records,
            chain: state.chain,
        }
    }

    /// Stream offset of the next unread byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Records read so far (replies and `End` not counted).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The transport, to send replies.
    pub fn transport(&mut self) -> &mut dyn Transport {
        &mut *self.t
    }

    /// Reads and checks the stream header.
    pub fn read_stream_header(&mut self) -> Result<(), WireError> {
        let mut h = [0u8; STREAM_HEADER_LEN];
        self.read_exact(&mut h, "stream header")?;
        wire::decode_stream_header(&h)
    }

    /// Reads and checks the next record header; returns it with its stream offset. Records
    /// other than `End` and replies join the checksum chain.
    pub fn next_header(&mut self) -> Result<(RecordHeader, u64), WireError> {
        let offset = self.offset;
        let mut raw = [0u8; RECORD_HEADER_LEN];
        self.read_exact(&mut raw, "record header")?;
        let header = RecordHeader::decode(&raw, offset)?;
        if (header.kind as u16) < 0x100 && header.kind != RecordKind::End {
            self.chain = crc32c::crc32c_append(self.chain, &raw);
            self.records += 1;
        }
        Ok((header, offset))
    }

    /// Reads a whole payload (capped by the header check) and verifies its checksum.
    pub fn read_payload(&mut self, h: &RecordHeader, offset: u64) -> Result<Vec<u8>, WireError> {
        let len = h.len as usize;
        let mut out = Vec::new();
        // Grow with the data actually received, not with what the header claims.
        while out.len() < len {
            let chunk = (len - out.len()).min(1 << 20);
            let at = out.len();
            out.resize(at + chunk, 0);
            self.read_exact(&mut out[at..], "record payload")?;
        }
        if crc32c::crc32c(&out) != h.payload_crc {
            return Err(WireError::PayloadChecksum {
                offset,
                kind: h.kind,
            });
        }
        Ok(out)
    }

    /// Checks an `End` payload against what was read before its header.
    pub fn check_end(&self, end: &EndRecord, end_offset: u64) -> Result<(), WireError> {
        let reason = if end.records != self.records {
            format!("{} records announced, {} read", end.records, self.records)
        } else if end.bytes != end_offset {
            format!("{} bytes announced, {} read", end.bytes, end_offset)
        } else if end.chain_crc != self.chain {
            "checksum chain mismatch".to_string()
        } else {
            return Ok(());
        };
        Err(WireError::Malformed {
            offset: end_offset,
            kind: RecordKind::End,
            reason,
        })
    }

    /// Fills `dst` completely: first from the buffer, then straight from the transport for
    /// large reads (guest memory on the destination), refilling the buffer for small ones.
    pub fn read_exact(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), WireError> {
        self.read_exact_crc(dst, what, 0).map(|_| ())
    }

    /// [`read_exact`](Self::read_exact), returning `crc` extended over `dst`; each piece is
    /// checksummed as it lands, while it is still in the cache.
    pub fn read_exact_crc(
        &mut self,
        dst: &mut [u8],
        what: &'static str,
        mut crc: u32,
    ) -> Result<u32, WireError> {
        self.read_exact_with(dst, what, |_, piece| {
            crc = crc32c::crc32c_append(crc, piece)
        })?;
        Ok(crc)
    }

    /// [`read_exact`](Self::read_exact), calling `landed(at, piece)` for each piece as it
    /// lands at `dst[at..]`, while it is still in the cache.
    pub fn read_exact_with(
        &mut self,
        dst: &mut [u8],
        what: &'static str,
        mut landed: impl FnMut(usize, &[u8]),
    ) -> Result<(), WireError> {
        let mut done = 0;
        while done < dst.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                landed(done, &dst[done..done + n]);
                self.start += n;
                done += n;
                self.offset += n as u64;
                continue;
            }
            let rest = &mut dst[done..];
            let n = if rest.len() >= READ_BUF / 2 {
                let n = self.recv(rest)?;
                landed(done, &rest[..n]);
                self.offset += n as u64;
                done += n;
                n
            } else {
                let mut buf = std::mem::take(&mut self.buf);
                let r = self.recv(&mut buf);
                self.buf = buf;
                let n = r?;
                self.start = 0;
                self.end = n;
                n
            };
            if n == 0 {
                return Err(WireError::Truncated {
                    offset: self.offset,
                    what,
                });
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        self.t.recv(buf).map_err(|source| WireError::Read {
            offset: self.offset,
            source,
        })
    }
}

/// Reads one reply record (source side, unbuffered: exactly the reply's bytes).
pub fn read_reply(t: &mut dyn Transport) -> Result<(RecordKind, Vec<u8>), WireError> {
    let mut r = RecordReader {
        t,
        buf: Vec::new(),
        start: 0,
        end: 0,
        offset: 0,
        records: 0,
        chain: 0,
    };
    let (h, offset) = r.next_header_unbuffered()?;
    let payload = r.read_payload_unbuffered(&h, offset)?;
    Ok((h.kind, payload))
}

impl RecordReader<'_> {
    fn fill_unbuffered(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), WireError> {
        let mut done = 0;
        while done < dst.len() {
            let n = self.recv(&mut dst[done..])?;
            if n == 0 {
                return Err(WireError::Truncated {
                    offset: self.offset,
                    what,
                });
            }
            done += n;
            self.offset += n as u64;
        }
        Ok(())
    }

    fn next_header_unbuffered(&mut self) -> Result<(RecordHeader, u64), WireError> {
        let mut raw = [0u8; RECORD_HEADER_LEN];
        self.fill_unbuffered(&mut raw, "reply header")?;
        Ok((RecordHeader::decode(&raw, 0)?, 0))
    }

    fn read_payload_unbuffered(
        &mut self,
        h: &RecordHeader,
        offset: u64,
    ) -> Result<Vec<u8>, WireError> {
        let mut out = vec![0; h.len as usize];
        self.fill_unbuffered(&mut out, "reply payload")?;
        if crc32c::crc32c(&out) != h.payload_crc {
            return Err(WireError::PayloadChecksum {
                offset,
                kind: h.kind,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Connection;

    fn sample_stream() -> Vec<u8> {
        let mut c = Connection::memory();
        let mut w = RecordWriter::start(&mut c).unwrap();
        w.write_record(RecordKind::Config, &[b"{\"a\":", b"1}"])
            .unwrap();
        let big = vec![7u8; 300_000];
        w.write_record(
            RecordKind::DeviceState,
            &[&[3, 0], b"cpu", &[1, 0, 0, 0], &big],
        )
        .unwrap();
        w.finish().unwrap();
        c.into_bytes()
    }

    #[test]
    fn round_trip_with_end_check() {
        let mut c = Connection::from_bytes(sample_stream());
        let mut r = RecordReader::new(&mut c);
        r.read_stream_header().unwrap();
        let (h, off) = r.next_header().unwrap();
        assert_eq!((h.kind, off), (RecordKind::Config, 16));
        assert_eq!(r.read_payload(&h, off).unwrap(), b"{\"a\":1}");
        let (h, off) = r.next_header().unwrap();
        assert_eq!(r.read_payload(&h, off).unwrap().len(), 300_009);
        let (h, off) = r.next_header().unwrap();
        assert_eq!(h.kind, RecordKind::End);
        let end = EndRecord::decode(&r.read_payload(&h, off).unwrap(), off).unwrap();
        r.check_end(&end, off).unwrap();
    }

    #[test]
    fn truncation_names_offset() {
        let bytes = sample_stream();
        let mut c = Connection::from_bytes(bytes[..36].to_vec());
        let mut r = RecordReader::new(&mut c);
        r.read_stream_header().unwrap();
        let (h, off) = r.next_header().unwrap();
        let err = r.read_payload(&h, off).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    offset: 36,
                    what: "record payload"
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn corrupt_payload_is_caught() {
        let mut bytes = sample_stream();
        bytes[16 + 16 + 2] ^= 1;
        let mut c = Connection::from_bytes(bytes);
        let mut r = RecordReader::new(&mut c);
        r.read_stream_header().unwrap();
        let (h, off) = r.next_header().unwrap();
        assert!(matches!(
            r.read_payload(&h, off),
            Err(WireError::PayloadChecksum { offset: 16, .. })
        ));
    }

    #[test]
    fn replies_round_trip() {
        let mut c = Connection::memory();
        send_reply(&mut c, RecordKind::Error, b"no").unwrap();
        let mut c = Connection::from_bytes(c.into_bytes());
        assert_eq!(
            read_reply(&mut c).unwrap(),
            (RecordKind::Error, b"no".to_vec())
        );
    }
}

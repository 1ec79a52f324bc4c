//! Page streaming over a unix socketpair: a real `send_migration` into a real
//! `receive_migration` (destination: fresh, untouched guest RAM, as a new destination VM has),
//! against a raw copy of the same bytes over the same kind of socket into one reused buffer.
//!
//! Diagnostic rows split the difference: the raw copy into fresh memory (every page faulted in
//! and cleared by the kernel as it arrives, as on the destination), the same with
//! `MADV_HUGEPAGE`, the migration into pre-faulted destination memory next to a raw copy into
//! resident memory of the whole size (the same work minus our protocol), the sender alone
//! into a null sink and the receiver alone from a stream held in memory.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use migration::error_chain;
use migration::fake::{fake_target, FakeVm};
use migration::transport::widen_send_buffer;
use migration::GuestSpan;
use migration::{
    receive_migration, send_migration, AnonMapping, Connection, MigrationSource, MigrationStats,
    ReceiveOptions, ReceiveStats, SendOptions, Transport, PAGE_SIZE,
};
use serde_json::json;

use super::{round, Row, Samples, Section};

/// Guest RAM streamed, all of it data pages.
const STREAM: usize = 512 << 20;
/// Write and read size of the raw socket copy (the sender's records are up to 4 MiB too).
const CHUNK: usize = 4 << 20;
pub(super) const STREAM_REPS: usize = 3;
const DIAG_REPS: usize = 2;

/// A real migration over a unix socketpair vs a raw copy over another one.
pub(super) fn streaming() -> Result<Section, String> {
    let data = pattern(STREAM);
    let layout = [(0u64, STREAM)];
    let mut src = FakeVm::new(&layout);
    src.writer().write(0, &data);

    // Interleaved, so a burst of load from elsewhere hits every kind alike.
    let (mut raw, mut raw_fresh, mut raw_huge, mut raw_resident, mut mig) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for rep in 0..STREAM_REPS {
        raw.push(raw_copy(&data, RawDest::Reused)?);
        raw_fresh.push(raw_copy(&data, RawDest::Fresh)?);
        raw_huge.push(raw_copy(&data, RawDest::FreshHuge)?);
        raw_resident.push(raw_copy(&data, RawDest::Resident)?);
        let (d, sent, received, dst) = migrate(&mut src, &layout, false)?;
        mig.push(d);
        if rep + 1 == STREAM_REPS {
            if let Some(gpa) = src.first_difference(&dst) {
                return Err(format!("destination differs from the source at {gpa:#x}"));
            }
            last = Some((sent, received));
        }
    }
    let (sent, received) = last.ok_or("no migration ran")?;
    let (raw, raw_fresh, raw_huge, raw_resident, mig) = (
        Samples(raw),
        Samples(raw_fresh),
        Samples(raw_huge),
        Samples(raw_resident),
        Samples(mig),
    );

    // Where the time goes: into memory that is already resident (the bulk pass's rate, as
    // the whole run includes reading that memory to prove it zero), and each side alone,
    // without the socket.
    let resident = Samples::collect(DIAG_REPS, || {
        let (_, sent, _, _) = migrate(&mut src, &layout, true)?;
        let bulk = sent.passes.first().ok_or("no bulk pass")?;
        Ok(Duration::from_micros(bulk.duration_us))
    })?;
    let (sender, stream) = sender_alone(&mut src)?;
    let receiver = receiver_alone(&stream, &layout)?;
    drop(stream);

    let data_bytes = sent.totals.pages_sent as usize * PAGE_SIZE;
    if data_bytes != STREAM {
        return Err(format!(
            "sent {data_bytes} bytes of page data, expected {STREAM}"
        ));
    }
    let raw_gbps = raw.gbps(STREAM);
    let fresh_gbps = raw_fresh.gbps(STREAM);
    let huge_gbps = raw_huge.gbps(STREAM);
    let resident_raw_gbps = raw_resident.gbps(STREAM);
    let mig_gbps = mig.gbps(data_bytes);
    let sender_gbps = sender.gbps(data_bytes);
    let receiver_gbps = receiver.gbps(data_bytes);
    let resident_gbps = resident.gbps(data_bytes);
    let ratio = mig_gbps / raw_gbps;
    let baseline = format!("raw copy {raw_gbps:.2} GB/s");
    let rows = vec![
        Row::new(
            format!("page streaming {} MiB, unix socketpair", STREAM >> 20),
            format!("{mig_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{ratio:.2}"), ">= 0.80"),
        Row::new(
            "  raw copy into fresh (faulting) memory",
            format!("{fresh_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{:.2}", fresh_gbps / raw_gbps), ""),
        Row::new(
            "  raw copy into fresh MADV_HUGEPAGE memory",
            format!("{huge_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{:.2}", huge_gbps / raw_gbps), ""),
        Row::new(
            "  page streaming vs raw copy into fresh memory",
            format!("{mig_gbps:.2} GB/s"),
            format!("fresh {fresh_gbps:.2} GB/s"),
        )
        .ratio(format!("{:.2}", mig_gbps / fresh_gbps), ""),
        Row::new(
            "  into pre-faulted memory (bulk pass)",
            format!("{resident_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{:.2}", resident_gbps / raw_gbps), ""),
        Row::new(
            "  raw copy into resident 512 MiB (not reused)",
            format!("{resident_raw_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{:.2}", resident_raw_gbps / raw_gbps), ""),
        Row::new(
            "  pre-faulted bulk pass vs that raw copy",
            format!("{resident_gbps:.2} GB/s"),
            format!("resident {resident_raw_gbps:.2} GB/s"),
        )
        .ratio(format!("{:.2}", resident_gbps / resident_raw_gbps), ""),
        Row::new(
            "  sender alone (null sink)",
            format!("{sender_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{:.2}", sender_gbps / raw_gbps), ""),
        Row::new(
            "  receiver alone (stream in memory)",
            format!("{receiver_gbps:.2} GB/s"),
            baseline,
        )
        .ratio(format!("{:.2}", receiver_gbps / raw_gbps), ""),
    ];
    let value = json!({
        "guest_bytes": STREAM,
        "stream_bytes": sent.totals.bytes,
        "migration_gbps": round(mig_gbps, 3),
        "raw_copy_gbps": round(raw_gbps, 3),
        "ratio_vs_raw": round(ratio, 3),
        "raw_copy_fresh_memory_gbps": round(fresh_gbps, 3),
        "raw_copy_fresh_hugepage_memory_gbps": round(huge_gbps, 3),
        "ratio_vs_raw_fresh_memory": round(mig_gbps / fresh_gbps, 3),
        "prefaulted_destination_bulk_pass_gbps": round(resident_gbps, 3),
        "raw_copy_resident_memory_gbps": round(resident_raw_gbps, 3),
        "ratio_prefaulted_vs_raw_resident_memory": round(resident_gbps / resident_raw_gbps, 3),
        "sender_null_sink_gbps": round(sender_gbps, 3),
        "receiver_from_memory_gbps": round(receiver_gbps, 3),
        "destination_identical": true,
        "last_migration": { "source": sent, "destination": received },
        "samples_ms": {
            "raw_copy": raw.ms(),
            "raw_copy_fresh_memory": raw_fresh.ms(),
            "raw_copy_fresh_hugepage_memory": raw_huge.ms(),
            "raw_copy_resident_memory": raw_resident.ms(),
            "migration": mig.ms(),
            "prefaulted_destination_bulk_pass": resident.ms(),
            "sender_null_sink": sender.ms(),
            "receiver_from_memory": receiver.ms(),
        },
    });
    Ok((value, rows))
}

/// `len` bytes of xorshift output: no zero pages, nothing a compressor would shrink.
fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Where the raw copy's reader puts the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawDest {
    /// One `CHUNK` buffer, reused: the socket alone.
    Reused,
    /// A fresh mapping of the whole size, faulted in page by page as the destination's
    /// untouched guest RAM is.
    Fresh,
    /// The same with `MADV_HUGEPAGE`: one fault per 2 MiB where the kernel finds huge pages.
    FreshHuge,
    /// A mapping of the whole size written beforehand: landing the bytes in distinct resident
    /// memory, as the migration into pre-faulted memory does.
    Resident,
}

/// Copies `data` over a fresh socketpair in `CHUNK` writes into `into`, as the sender writes
/// records of up to 4 MiB. Timed from the first write to the last byte read.
fn raw_copy(data: &[u8], into: RawDest) -> Result<Duration, String> {
    // The same kind of socket as the migration's: same send buffer size.
    let (tx, rx) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let (mut tx, mut rx) = (widen_send_buffer(tx), widen_send_buffer(rx));
    let total = data.len();
    let size = if into == RawDest::Reused {
        CHUNK
    } else {
        total
    };
    let map = AnonMapping::new(size).map_err(|e| format!("mapping {size} bytes: {e}"))?;
    if into == RawDest::Resident {
        // SAFETY: `map` is a live, writable mapping of `map.len()` bytes owned here.
        unsafe { std::ptr::write_bytes(map.as_ptr(), 0, map.len()) };
    }
    if into == RawDest::FreshHuge {
        // SAFETY: advice on the whole of a live private anonymous mapping we own; it changes
        // how pages are allocated, not their contents.
        let rc = unsafe { libc::madvise(map.as_ptr().cast(), map.len(), libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(format!(
                "madvise(MADV_HUGEPAGE): {}",
                io::Error::last_os_error()
            ));
        }
    }
    let reader = std::thread::spawn(move || -> io::Result<(Instant, usize, AnonMapping)> {
        // SAFETY: `map` is a live, writable mapping of `map.len()` bytes; only this thread
        // touches it while the slice exists, and the slice ends before `map` is returned.
        let buf = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), map.len()) };
        let mut got = 0;
        while got < total {
            let at = if into == RawDest::Reused { 0 } else { got };
            let end = (at + CHUNK).min(buf.len());
            let n = rx.read(&mut buf[at..end])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        // The mapping goes back to the caller: unmapping it is not part of the copy.
        Ok((Instant::now(), got, map))
    });
    let t = Instant::now();
    for c in data.chunks(CHUNK) {
        tx.write_all(c)
            .map_err(|e| format!("raw copy: writing the socket: {e}"))?;
    }
    let (done, got, map) = reader
        .join()
        .map_err(|_| "raw copy: reader thread panicked".to_string())?
        .map_err(|e| format!("raw copy: reading the socket: {e}"))?;
    drop(map);
    if got != total {
        return Err(format!("raw copy: read {got} of {total} bytes"));
    }
    Ok(done.duration_since(t))
}

/// One live migration of `src` into a fresh target over a socketpair, timed until the
/// destination reported the guest running. With `prefault`, the target's memory is written
/// with zeros first: resident, still provably zero. The source runs again afterwards.
fn migrate(
    src: &mut FakeVm,
    layout: &[(u64, usize)],
    prefault: bool,
) -> Result<(Duration, MigrationStats, ReceiveStats, FakeVm), String> {
    let mut dst = fake_target(layout);
    if prefault {
        let zeros = vec![0u8; CHUNK];
        let w = dst.writer();
        for &(gpa, len) in layout {
            for off in (0..len).step_by(CHUNK) {
                w.write(gpa + off as u64, &zeros[..CHUNK.min(len - off)]);
            }
        }
    }
    let (mut a, mut b) = Connection::pair().map_err(|e| format!("socketpair: {e}"))?;
    let receiver = std::thread::spawn(move || {
        let r = receive_migration(&mut dst, &mut b, &ReceiveOptions::default());
        (r, dst)
    });
    let t = Instant::now();
    let sent = send_migration(src, &mut a, SendOptions::default());
    let d = t.elapsed();
    // On a failed send this ends the destination's wait at once.
    drop(a);
    let (received, dst) = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    let sent = sent.map_err(|e| format!("send_migration: {}", error_chain(&e)))?;
    let received = received.map_err(|e| format!("receive_migration: {}", error_chain(&e)))?;
    // A successful send leaves the source paused, as the vmm would stop it.
    MigrationSource::resume(src).map_err(|e| format!("resuming the source: {e}"))?;
    Ok((d, sent, received, dst))
}

/// A sink with no peer (a snapshot) that drops the stream or keeps it.
struct Sink {
    keep: Option<Vec<u8>>,
}

impl Transport for Sink {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if let Some(k) = self.keep.as_mut() {
            parts.iter().for_each(|p| k.extend_from_slice(p));
        }
        Ok(())
    }
    /// Guest pages are dropped where they are (a socket would hand them to the kernel), or
    /// copied when kept.
    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        self.send(parts)?;
        if let Some(k) = self.keep.as_mut() {
            guest.iter().for_each(|g| g.copy_into(k));
        }
        Ok(())
    }
    fn recv(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn has_peer(&self) -> bool {
        false
    }
}

/// The sender with no socket: `send_migration` into a null sink. Also returns one copy
/// of the stream (taken outside the timed runs) for [`receiver_alone`].
fn sender_alone(src: &mut FakeVm) -> Result<(Samples, Vec<u8>), String> {
    let mut send = |keep: bool| -> Result<(Duration, Sink), String> {
        let mut sink = Sink {
            keep: keep.then(|| Vec::with_capacity(STREAM + (STREAM >> 8))),
        };
        let t = Instant::now();
        send_migration(src, &mut sink, SendOptions::default())
            .map_err(|e| format!("send_migration to a sink: {}", error_chain(&e)))?;
        let d = t.elapsed();
        MigrationSource::resume(src).map_err(|e| format!("resuming the source: {e}"))?;
        Ok((d, sink))
    };
    let samples = Samples::collect(DIAG_REPS, || send(false).map(|(d, _)| d))?;
    let (_, sink) = send(true)?;
    Ok((samples, sink.keep.unwrap_or_default()))
}

/// Replays a recorded stream from memory.
struct Replay<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Transport for Replay<'_> {
    fn send(&mut self, _: &[&[u8]]) -> io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn has_peer(&self) -> bool {
        false
    }
}

/// The receiver with no socket: `receive_migration` of `stream` into fresh targets.
fn receiver_alone(stream: &[u8], layout: &[(u64, usize)]) -> Result<Samples, String> {
    Samples::collect(DIAG_REPS, || {
        let mut dst = fake_target(layout);
        let mut replay = Replay {
            data: stream,
            pos: 0,
        };
        let t = Instant::now();
        receive_migration(&mut dst, &mut replay, &ReceiveOptions::default())
            .map_err(|e| format!("receive_migration from memory: {}", error_chain(&e)))?;
        let d = t.elapsed();
        drop(dst);
        Ok(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_has_no_zero_page_and_replays_whole() {
        let data = pattern(64 * PAGE_SIZE);
        assert!(data
            .chunks_exact(PAGE_SIZE)
            .all(|p| !migration::zero::is_zero(p)));
        assert_ne!(data[..PAGE_SIZE], data[PAGE_SIZE..2 * PAGE_SIZE]);
        let mut r = Replay {
            data: &data,
            pos: 0,
        };
        let (mut out, mut buf) = (Vec::new(), [0u8; 1000]);
        loop {
            let n = r.recv(&mut buf).expect("in-memory read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, data);
    }
}

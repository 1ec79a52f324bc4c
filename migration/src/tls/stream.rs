//! A TLS connection over a TCP socket ([`TlsStream`]): the handshake under a deadline, with
//! each failure explained, and every read and write re-armed with the caller's bounds.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;

use rustls::{AlertDescription, CertificateError};

use crate::deadline::Bound;
use crate::wire::{RecordHeader, RecordKind, MAX_MESSAGE_LEN, RECORD_HEADER_LEN};

use super::identity::{printable, AllowList, AllowMatch, PeerIdentity};
use super::{Refused, TlsClient, TlsError, TlsServer};

/// TLS record content types (the first byte of a record): alert and handshake.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// Why a handshake stopped.
#[derive(Debug)]
enum Stop {
    /// rustls refused (a certificate, an alert from the peer, a malformed message).
    Tls(rustls::Error),
    /// The peer's first byte is not a TLS record's: it speaks something else.
    NotTls,
    /// The peer closed the connection, having sent something (`true`) or nothing.
    Closed { sent: bool },
    /// A socket error or the deadline.
    Io(io::Error),
}

/// A TLS connection: the TCP socket and rustls's state. Every read and write goes to the
/// socket, re-armed with the caller's bounds before each call.
pub(crate) struct TlsStream {
    pub(crate) tcp: TcpStream,
    conn: rustls::Connection,
    /// Records read from the socket ahead of rustls, which takes one at a time.
    ahead: ReadAhead,
    peer: Option<PeerIdentity>,
    allowed_by: Option<AllowMatch>,
}

/// Bytes read from a socket in large reads and handed on in small ones: rustls asks for one
/// record (16 KiB) at a time, and a read syscall per record costs more than the decryption
/// (the README has the figures).
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Size of [`ReadAhead`].
const READ_AHEAD: usize = 1 << 20;

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never rustls's state: it holds the traffic keys.
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TlsStream {
    fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            tcp,
            conn: conn.into(),
            ahead: ReadAhead {
                buf: vec![0; READ_AHEAD],
                start: 0,
                end: 0,
            },
            peer: None,
            allowed_by: None,
        }
    }

    /// Source side: the handshake over `tcp`, the destination's certificate checked against
    /// the CA and `name`.
    pub(crate) fn connect(
        tcp: TcpStream,
        tls: &TlsClient,
        name: &str,
        read: Bound,
        write: Bound,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_of(&tcp);
        let mut t = TlsStream::new(tcp, tls.session(name)?);
        match t.handshake(read, write) {
            Ok(()) => Ok(t),
            // Most likely a plaintext destination's Error record: read what it says.
            Err(Stop::NotTls) => Err(TlsError::PlaintextDestination {
                peer,
                said: read_plain_error(&t.tcp, read),
            }),
            Err(stop) => Err(stop.into_error(peer, tls.ca(), None)),
        }
    }

    /// Destination side: the handshake over `tcp`, the source's certificate checked against
    /// the CA and the allow-list. A source that speaks plaintext is told so in plaintext.
    pub(crate) fn accept(
        tcp: TcpStream,
        tls: &TlsServer,
        read: Bound,
        write: Bound,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_of(&tcp);
        let (session, refused) = tls.session()?;
        let mut t = TlsStream::new(tcp, session);
        match t.handshake(read, write) {
            Ok(()) => {
                t.allowed_by = t.peer.as_ref().and_then(|id| tls.allow().check(id));
                Ok(t)
            }
            Err(Stop::NotTls) => {
                send_plain_error(
                    &t.tcp,
                    "this destination takes only TLS connections (it was started with \
                     --tls-dir): migrate with --tls-dir",
                    write,
                );
                Err(TlsError::PlaintextSource { peer })
            }
            Err(stop) => Err(stop.into_error(peer, &tls.ca(), Some((refused, tls.allow())))),
        }
    }

    /// The peer's certificate identity (after the handshake).
    pub(crate) fn peer(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }

    /// Which allow-list entry admitted the peer (destination, with `--tls-allow`).
    pub(crate) fn allowed_by(&self) -> Option<&AllowMatch> {
        self.allowed_by.as_ref()
    }

    /// Runs the handshake to its end (or the first failure), each socket call bounded.
    fn handshake(&mut self, read: Bound, write: Bound) -> Result<(), Stop> {
        let mut first = true;
        loop {
            self.flush(write).map_err(Stop::Io)?;
            if !self.conn.is_handshaking() {
                break;
            }
            if self.ahead.is_empty() {
                read.arm(|t| self.tcp.set_read_timeout(t))
                    .map_err(Stop::Io)?;
            }
            if first {
                let mut b = [0u8; 1];
                let n = retry(|| self.tcp.peek(&mut b)).map_err(|e| Stop::Io(read.timed_out(e)))?;
                if n == 0 {
                    return Err(Stop::Closed { sent: false });
                }
                if b[0] != HANDSHAKE && b[0] != ALERT {
                    return Err(Stop::NotTls);
                }
                first = false;
            }
            let n = self
                .read_tls(false)
                .map_err(|e| Stop::Io(read.timed_out(e)))?;
            if n == 0 {
                return Err(Stop::Closed { sent: true });
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert that tells the peer why, if it can be sent.
                let _ = self.flush(write);
                return Err(Stop::Tls(e));
            }
        }
        let leaf = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| PeerIdentity::from_der(c));
        self.peer = leaf;
        Ok(())
    }

    /// Encrypts and writes all `parts`.
    pub(crate) fn send(&mut self, parts: &[&[u8]], write: Bound) -> io::Result<()> {
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let n = self.conn.writer().write(rest)?;
                rest = &rest[n..];
                if n == 0 {
                    // rustls holds SEND_BUFFER of records: on the wire with them.
                    self.flush(write)?;
                }
            }
        }
        self.flush(write)
    }

    /// Reads at least one decrypted byte, or 0 at the end of the stream (the peer closed the
    /// connection, with or without `close_notify`).
    pub(crate) fn recv(&mut self, buf: &mut [u8], read: Bound, write: Bound) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.ahead.is_empty() {
                read.arm(|t| self.tcp.set_read_timeout(t))?;
            }
            self.read_tls(false).map_err(|e| read.timed_out(e))?;
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.flush(write);
                return Err(record_error(e));
            }
            // A key update's answer, say.
            self.flush(write)?;
        }
    }

    /// Hands rustls the next bytes from the socket: from what was read ahead, else from one
    /// large read (`dont_wait`: only what already arrived). 0 at the end of the stream.
    fn read_tls(&mut self, dont_wait: bool) -> io::Result<usize> {
        let a = &mut self.ahead;
        if a.is_empty() {
            let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
            let n = retry(|| recv(&self.tcp, &mut a.buf, flags))?;
            (a.start, a.end) = (0, n);
            if n == 0 {
                // rustls learns of the end of the stream from an empty read.
                return self.conn.read_tls(&mut io::empty());
            }
        }
        let mut pending = &a.buf[a.start..a.end];
        let n = self.conn.read_tls(&mut pending)?;
        a.start += n;
        Ok(n)
    }

    /// Writes every record rustls holds.
    fn flush(&mut self, write: Bound) -> io::Result<()> {
        while self.conn.wants_write() {
            write.arm(|t| self.tcp.set_write_timeout(t))?;
            match retry(|| self.conn.write_tls(&mut NoSigPipe(&self.tcp))) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(write.timed_out(e)),
                // A peer that refused us closed the connection: its alert says why.
                Err(e) => return Err(self.alert_received().unwrap_or(e)),
            }
        }
        Ok(())
    }

    /// After a failed write: the alert the peer sent before it closed, if it did (reads only
    /// what already arrived).
    fn alert_received(&mut self) -> Option<io::Error> {
        for _ in 0..8 {
            match self.read_tls(true) {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
            if let Err(e) = self.conn.process_new_packets() {
                return Some(record_error(e));
            }
        }
        None
    }
}

impl Stop {
    /// The error that names the cause. `ca` is this side's CA file; `allow` (destination) is
    /// where the verifier left an identity it refused, and the list.
    fn into_error(self, peer: String, ca: &Path, allow: Option<(Refused, &AllowList)>) -> TlsError {
        match self {
            Stop::Tls(e) => {
                if let Some((identity, list)) = allow.and_then(|(r, list)| Some((r.take()?, list)))
                {
                    return TlsError::NotAllowed {
                        peer,
                        identity,
                        allowed: list.to_string(),
                    };
                }
                TlsError::Handshake {
                    peer,
                    cause: explain(&e, Some(ca)),
                    source: e,
                }
            }
            Stop::NotTls => TlsError::Handshake {
                peer,
                cause: "the peer does not speak TLS".into(),
                source: rustls::Error::General("not a TLS record".into()),
            },
            Stop::Closed { sent: false } => TlsError::Empty { peer },
            Stop::Closed { sent: true } => TlsError::Closed { peer },
            Stop::Io(source) => TlsError::Io { peer, source },
        }
    }
}

/// The address of a TCP peer, for messages.
fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "the peer".to_string(), |a| a.to_string())
}

/// Tells a peer that speaks the plaintext migration stream why it is refused: a migration
/// `Error` record, in plaintext (best effort, bounded).
fn send_plain_error(tcp: &TcpStream, msg: &str, write: Bound) {
    let mut end = msg.len().min(MAX_MESSAGE_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let payload = &msg.as_bytes()[..end];
    let header = RecordHeader {
        kind: RecordKind::Error,
        len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
    }
    .encode();
    let mut record = header.to_vec();
    record.extend_from_slice(payload);
    let mut rest = &record[..];
    while !rest.is_empty() {
        if write.arm(|t| tcp.set_write_timeout(t)).is_err() {
            return;
        }
        match retry(|| NoSigPipe(tcp).write(rest)) {
            Ok(n) if n > 0 => rest = &rest[n..],
            _ => return,
        }
    }
}

/// Reads what a peer that answered a ClientHello in plaintext said: the message of a
/// migration `Error` record, if that is what it sent (bounded).
fn read_plain_error(tcp: &TcpStream, read: Bound) -> Option<String> {
    let fill = |buf: &mut [u8]| -> Option<()> {
        let mut done = 0;
        while done < buf.len() {
            read.arm(|t| tcp.set_read_timeout(t)).ok()?;
            match retry(|| (&*tcp).read(&mut buf[done..])) {
                Ok(n) if n > 0 => done += n,
                _ => return None,
            }
        }
        Some(())
    };
    let mut raw = [0u8; RECORD_HEADER_LEN];
    fill(&mut raw)?;
    let header = RecordHeader::decode(&raw, 0).ok()?;
    if header.kind != RecordKind::Error || header.len as usize > MAX_MESSAGE_LEN {
        return None;
    }
    let mut payload = vec![0u8; header.len as usize];
    fill(&mut payload)?;
    (crc32c::crc32c(&payload) == header.payload_crc)
        .then(|| printable(&String::from_utf8_lossy(&payload)))
}

/// `f` again while it is interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A TLS error in the data phase, as an I/O error that says what it means.
fn record_error(e: rustls::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        RecordError(explain(&e, None), e),
    )
}

/// `recv(2)` on a socket with `flags`.
fn recv(tcp: &TcpStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A TLS error in the data phase: what it means, then rustls's words.
#[derive(Debug)]
struct RecordError(String, rustls::Error);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {} ({})", self.0, self.1)
    }
}

impl std::error::Error for RecordError {}

/// Writes to a socket with `sendmsg(MSG_NOSIGNAL)`: a closed peer is `EPIPE`, not `SIGPIPE`.
struct NoSigPipe<'a>(&'a TcpStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; only the iovec fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on unix; sendmsg does not write through it.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024);
        // SAFETY: the iovecs point into the caller's live slices for the whole call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a rustls error means, in the words an operator needs; `ca` is this side's CA file.
fn explain(e: &rustls::Error, ca: Option<&Path>) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let our_ca = ca.map_or_else(
        || "our CA".to_string(),
        |p| format!("the CA in {}", p.display()),
    );
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!("the peer's certificate is not signed by {our_ca}"),
            // The issuer's name is our CA's, its key is not: another CA of the same name.
            C::BadSignature => format!(
                "the peer's certificate is not signed by {our_ca} (but by another CA of the \
                 same name)"
            ),
            C::Expired | C::ExpiredContext { .. } => "the peer's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the peer's certificate is not valid for the name we connected to (connecting \
                 by address, --tls-name names the host its certificate is for)"
                    .into()
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the peer's certificate is not for this use (its extended key usage)".into()
            }
            C::ApplicationVerificationFailure => {
                "the peer's certificate subject is not in --tls-allow".into()
            }
            _ => "the peer's certificate was refused".into(),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA => {
                "the peer refused our certificate: it is not signed by the peer's CA".into()
            }
            AlertDescription::CertificateExpired => {
                "the peer refused our certificate as expired or not yet valid".into()
            }
            AlertDescription::AccessDenied => {
                "the peer refused our certificate: its subject is not in the peer's --tls-allow"
                    .into()
            }
            AlertDescription::BadCertificate => {
                "the peer refused our certificate as bad (malformed, or not valid for the name \
                 it was reached by)"
                    .into()
            }
            AlertDescription::DecryptError => {
                "the peer refused our certificate: its signature does not verify (signed by \
                 another CA of the same name as the peer's?)"
                    .into()
            }
            AlertDescription::CertificateRequired => {
                "the peer requires a certificate from us".into()
            }
            AlertDescription::UnsupportedCertificate | AlertDescription::CertificateUnknown => {
                "the peer refused our certificate".into()
            }
            AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
                "the peer and we agree on no TLS 1.3 parameters".into()
            }
            other => format!("the peer ended the TLS session (alert {other:?})"),
        },
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::PeerIncompatible(_) => "the peer cannot do TLS 1.3 as we require".into(),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the peer sent something that is not valid TLS here".into()
        }
        E::DecryptError => "a record from the peer did not decrypt (tampered with?)".into(),
        _ => "TLS failed".into(),
    }
}

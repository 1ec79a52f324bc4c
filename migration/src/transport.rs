//! Where the stream goes: `unix:PATH`, `tcp:HOST:PORT` (bidirectional, the destination
//! replies) and `file:PATH` (a snapshot: no peer, no replies), plus an in-memory buffer for
//! tests and fuzzing.
//!
//! Writes are vectored (`sendmsg`/`writev` with up to `IOV_MAX` parts per call, looping on
//! short writes); reads are large (the stream reader asks for whole payloads, straight into
//! guest memory on the destination).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Most parts per `writev`/`sendmsg` (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// `sun_path` holds 108 bytes including the terminating NUL.
const UNIX_PATH_MAX: usize = 107;

/// A byte stream the migration runs over. Implemented by [`Connection`]; tests wrap one to
/// inject faults or guest writes between sends.
pub trait Transport {
    /// Writes all `parts`, in order.
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()>;
    /// Reads at least one byte into `buf`, or returns 0 at end of stream.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// True for sockets (the destination replies), false for files and buffers.
    fn has_peer(&self) -> bool;
    /// Limits how long one `recv` may wait (sockets only).
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    /// Limits how long one `send` may block on a peer that stopped reading (sockets only).
    fn set_write_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Errors parsing an endpoint URI.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("Endpoint {0:?} has no scheme; expected unix:PATH, tcp:HOST:PORT or file:PATH")]
    MissingScheme(String),
    #[error("Unknown endpoint scheme {0:?}; expected unix, tcp or file")]
    UnknownScheme(String),
    #[error("Endpoint {0:?} has an empty path")]
    EmptyPath(String),
    #[error("Unix socket path is {len} bytes, the limit is {UNIX_PATH_MAX}")]
    UnixPathTooLong { len: usize },
    #[error("Endpoint {0:?} needs HOST:PORT")]
    MissingPort(String),
    #[error("Bad port {0:?}: expected a number 1..=65535 (0 only to listen)")]
    BadPort(String),
    #[error("Endpoint {0:?} has an empty host")]
    EmptyHost(String),
}

/// Errors opening or accepting connections.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("Connecting to {0} failed")]
    Connect(Endpoint, #[source] io::Error),
    #[error("Listening on {0} failed")]
    Listen(Endpoint, #[source] io::Error),
    #[error("{0} is in use: another process listens on it")]
    InUse(Endpoint),
    #[error("Accepting a connection on {0} failed")]
    Accept(Endpoint, #[source] io::Error),
    #[error("Opening snapshot {0} failed")]
    Open(Endpoint, #[source] io::Error),
    #[error("Creating snapshot {0} failed")]
    Create(Endpoint, #[source] io::Error),
}

/// A parsed migration endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
    File(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        Endpoint::parse(s)
    }
}

impl Endpoint {
    /// Parses `unix:PATH`, `tcp:HOST:PORT` (`tcp:[v6]:PORT`) or `file:PATH`.
    pub fn parse(uri: &str) -> Result<Endpoint, EndpointError> {
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| EndpointError::MissingScheme(uri.to_string()))?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(EndpointError::EmptyPath(uri.to_string()));
                }
                if rest.len() > UNIX_PATH_MAX {
                    return Err(EndpointError::UnixPathTooLong { len: rest.len() });
                }
                Ok(Endpoint::Unix(rest.into()))
            }
            "file" => {
                if rest.is_empty() {
                    return Err(EndpointError::EmptyPath(uri.to_string()));
                }
                Ok(Endpoint::File(rest.into()))
            }
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| EndpointError::MissingPort(uri.to_string()))?;
                let host = match host.strip_prefix('[') {
                    Some(h) => h
                        .strip_suffix(']')
                        .ok_or_else(|| EndpointError::MissingPort(uri.to_string()))?,
                    None if host.contains(':') => {
                        return Err(EndpointError::MissingPort(uri.to_string()))
                    }
                    None => host,
                };
                if host.is_empty() {
                    return Err(EndpointError::EmptyHost(uri.to_string()));
                }
                let port = port
                    .parse::<u16>()
                    .map_err(|_| EndpointError::BadPort(port.to_string()))?;
                Ok(Endpoint::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            other => Err(EndpointError::UnknownScheme(other.to_string())),
        }
    }

    /// Source side: connects to a listening destination, or creates the snapshot file.
    pub fn connect(&self) -> Result<Connection, TransportError> {
        match self {
            Endpoint::Unix(path) => UnixStream::connect(path)
                .map(|s| Connection::Unix(widen_send_buffer(s)))
                .map_err(|e| TransportError::Connect(self.clone(), e)),
            Endpoint::Tcp { host, port } => {
                if *port == 0 {
                    let e = io::Error::new(io::ErrorKind::InvalidInput, "port 0");
                    return Err(TransportError::Connect(self.clone(), e));
                }
                let stream = TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| TransportError::Connect(self.clone(), e))?;
                stream
                    .set_nodelay(true)
                    .map_err(|e| TransportError::Connect(self.clone(), e))?;
                Ok(Connection::Tcp(stream))
            }
            Endpoint::File(path) => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map(Connection::File)
                .map_err(|e| TransportError::Create(self.clone(), e)),
        }
    }

    /// Destination side: binds the socket (a stale unix socket file is replaced, a live one
    /// refused), or opens the snapshot file for reading. Then [`Listener::accept`] gives the
    /// connection.
    pub fn listen(&self) -> Result<Listener, TransportError> {
        match self {
            Endpoint::Unix(path) => {
                let l = match UnixListener::bind(path) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        let is_socket = std::fs::symlink_metadata(path)
                            .is_ok_and(|m| m.file_type().is_socket());
                        if !is_socket {
                            return Err(TransportError::Listen(self.clone(), e));
                        }
                        // The probe is an empty connection, which a waiting destination
                        // ignores (see `DestinationError::is_empty_stream`).
                        if UnixStream::connect(path).is_ok() {
                            return Err(TransportError::InUse(self.clone()));
                        }
                        let _ = std::fs::remove_file(path);
                        UnixListener::bind(path)
                    }
                    other => other,
                }
                .map_err(|e| TransportError::Listen(self.clone(), e))?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Endpoint::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port))
                    .map_err(|e| TransportError::Listen(self.clone(), e))?;
                Ok(Listener::Tcp(l))
            }
            Endpoint::File(path) => {
                let f = File::open(path).map_err(|e| TransportError::Open(self.clone(), e))?;
                Ok(Listener::File(Some(f), path.clone()))
            }
        }
    }
}

/// Bytes a unix socket may hold in flight, asked of the kernel (which caps it at
/// `net.core.wmem_max`). With the default (208 KiB) the sender and receiver take turns
/// every 208 KiB, each turn a cross-CPU wake-up; with 4 MiB one whole record is in flight
/// (the A/B is in the README). TCP keeps the kernel's autotuning, which a fixed size would
/// switch off.
pub const UNIX_SEND_BUFFER: usize = 4 << 20;

/// Asks for [`UNIX_SEND_BUFFER`] on `s`; a refusal only costs speed.
pub fn widen_send_buffer(s: UnixStream) -> UnixStream {
    let size = UNIX_SEND_BUFFER as libc::c_int;
    // SAFETY: `s` is an open socket and the option value is a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "Cannot widen the socket's send buffer: {}",
            io::Error::last_os_error()
        );
    }
    s
}

/// A bound destination endpoint.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    File(Option<File>, PathBuf),
}

impl Listener {
    /// The endpoint actually bound (with the real port for `tcp:HOST:0`).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Endpoint::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
            }
            Listener::File(_, p) => Endpoint::File(p.clone()),
        })
    }

    /// A duplicate of the listening socket that another thread may shut down to wake a blocked
    /// [`Listener::accept`] (it then fails). `None` for `file:`, which never blocks.
    pub fn wake_handle(&self) -> Option<OwnedFd> {
        match self {
            Listener::Unix(l, _) => l.try_clone().ok().map(OwnedFd::from),
            Listener::Tcp(l) => l.try_clone().ok().map(OwnedFd::from),
            Listener::File(..) => None,
        }
    }

    /// Waits for the source and returns the connection (the file itself for `file:`).
    pub fn accept(&mut self) -> Result<Connection, TransportError> {
        let ep = self
            .local_endpoint()
            .unwrap_or(Endpoint::File(PathBuf::new()));
        match self {
            Listener::Unix(l, _) => l
                .accept()
                .map(|(s, _)| Connection::Unix(s))
                .map_err(|e| TransportError::Accept(ep, e)),
            Listener::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| TransportError::Accept(ep.clone(), e))?;
                s.set_nodelay(true)
                    .map_err(|e| TransportError::Accept(ep, e))?;
                Ok(Connection::Tcp(s))
            }
            Listener::File(f, _) => f.take().map(Connection::File).ok_or_else(|| {
                TransportError::Accept(ep, io::Error::other("snapshot already opened"))
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An in-memory stream: appends on send, reads from the front on recv.
#[derive(Debug, Default)]
pub struct MemoryStream {
    data: Vec<u8>,
    pos: usize,
}

/// An open migration connection.
#[derive(Debug)]
pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
    File(File),
    Memory(MemoryStream),
}

impl Connection {
    /// A connected pair of unix sockets (tests, in-process migrations).
    pub fn pair() -> io::Result<(Connection, Connection)> {
        let (a, b) = UnixStream::pair()?;
        Ok((
            Connection::Unix(widen_send_buffer(a)),
            Connection::Unix(widen_send_buffer(b)),
        ))
    }

    /// An empty in-memory stream to write a snapshot into.
    pub fn memory() -> Connection {
        Connection::Memory(MemoryStream::default())
    }

    /// An in-memory stream to read `bytes` from.
    pub fn from_bytes(bytes: Vec<u8>) -> Connection {
        Connection::Memory(MemoryStream {
            data: bytes,
            pos: 0,
        })
    }

    /// The bytes of an in-memory stream (empty for other kinds).
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Connection::Memory(m) => m.data,
            _ => Vec::new(),
        }
    }

    /// A duplicate of the socket that another thread may shut down to wake a blocked read or
    /// write (which then sees the end of the stream). `None` for files and memory.
    pub fn wake_handle(&self) -> Option<OwnedFd> {
        match self {
            Connection::Unix(s) => s.try_clone().ok().map(OwnedFd::from),
            Connection::Tcp(s) => s.try_clone().ok().map(OwnedFd::from),
            Connection::File(_) | Connection::Memory(_) => None,
        }
    }

    fn fd(&self) -> Option<RawFd> {
        match self {
            Connection::Unix(s) => Some(s.as_raw_fd()),
            Connection::Tcp(s) => Some(s.as_raw_fd()),
            Connection::File(f) => Some(f.as_raw_fd()),
            Connection::Memory(_) => None,
        }
    }
}

impl Transport for Connection {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let socket = matches!(self, Connection::Unix(_) | Connection::Tcp(_));
        match self.fd() {
            Some(fd) => send_all(fd, parts, socket),
            None => {
                if let Connection::Memory(m) = self {
                    for p in parts {
                        m.data.extend_from_slice(p);
                    }
                }
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Connection::Unix(s) => s.read(buf),
                Connection::Tcp(s) => s.read(buf),
                Connection::File(f) => f.read(buf),
                Connection::Memory(m) => {
                    let n = buf.len().min(m.data.len() - m.pos);
                    buf[..n].copy_from_slice(&m.data[m.pos..m.pos + n]);
                    m.pos += n;
                    Ok(n)
                }
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn has_peer(&self) -> bool {
        matches!(self, Connection::Unix(_) | Connection::Tcp(_))
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(timeout),
            Connection::Tcp(s) => s.set_read_timeout(timeout),
            _ => Ok(()),
        }
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_write_timeout(timeout),
            Connection::Tcp(s) => s.set_write_timeout(timeout),
            _ => Ok(()),
        }
    }
}

/// Writes every part with as few `sendmsg`/`writev` calls as the kernel allows.
fn send_all(fd: RawFd, parts: &[&[u8]], socket: bool) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let last = (first + IOV_MAX).min(iov.len());
        let batch = &mut iov[first..last];
        let n = if socket {
            // SAFETY: an all-zero msghdr is valid; we set only the iovec fields.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = batch.as_mut_ptr();
            msg.msg_iovlen = batch.len();
            // SAFETY: the iovecs point into the caller's live slices; MSG_NOSIGNAL turns a
            // closed peer into EPIPE instead of SIGPIPE.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: the iovecs point into the caller's live slices.
            unsafe { libc::writev(fd, batch.as_ptr(), batch.len() as libc::c_int) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Drop fully written parts, trim a partly written one.
        let mut n = n as usize;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same part (n < its length).
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/tmp/m.sock").unwrap(),
            Endpoint::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:4444").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        let v6 = Endpoint::parse("tcp:[::1]:80").unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:80");
        assert_eq!(
            Endpoint::parse("file:/a/b").unwrap(),
            Endpoint::File("/a/b".into())
        );
    }

    #[test]
    fn rejects_malformed_endpoints() {
        use EndpointError::*;
        let cases: &[(&str, EndpointError)] = &[
            ("/tmp/x", MissingScheme("/tmp/x".into())),
            ("udp:1.2.3.4:5", UnknownScheme("udp".into())),
            ("unix:", EmptyPath("unix:".into())),
            ("file:", EmptyPath("file:".into())),
            ("tcp:host", MissingPort("tcp:host".into())),
            ("tcp::80", EmptyHost("tcp::80".into())),
            ("tcp:h:99999", BadPort("99999".into())),
            ("tcp:h:", BadPort("".into())),
            ("tcp:::1:80", MissingPort("tcp:::1:80".into())),
        ];
        for (uri, err) in cases {
            assert_eq!(&Endpoint::parse(uri).unwrap_err(), err, "{uri}");
        }
        let long = format!("unix:/{}", "x".repeat(200));
        assert!(matches!(
            Endpoint::parse(&long),
            Err(UnixPathTooLong { .. })
        ));
    }

    #[test]
    fn vectored_send_over_socketpair_handles_many_parts() {
        let (mut a, mut b) = Connection::pair().unwrap();
        let chunks: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![(i % 251) as u8; 7]).collect();
        let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let expected: Vec<u8> = chunks.concat();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = b.recv(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        a.send(&parts).unwrap();
        drop(a);
        assert_eq!(reader.join().unwrap(), expected);
    }

    #[test]
    fn tcp_listen_accept_connect() {
        let mut l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .listen()
            .unwrap();
        let ep = l.local_endpoint().unwrap();
        let t = std::thread::spawn(move || {
            let mut c = ep.connect().unwrap();
            c.send(&[b"hello"]).unwrap();
        });
        let mut c = l.accept().unwrap();
        assert!(c.has_peer());
        let mut buf = [0u8; 5];
        let mut got = 0;
        while got < 5 {
            got += c.recv(&mut buf[got..]).unwrap();
        }
        assert_eq!(&buf, b"hello");
        t.join().unwrap();
    }

    #[test]
    fn connect_to_nothing_names_the_endpoint() {
        let err = Endpoint::parse("unix:/nonexistent/dir/sock")
            .unwrap()
            .connect()
            .unwrap_err();
        assert!(err.to_string().contains("unix:/nonexistent/dir/sock"));
    }

    fn shut_down(fd: OwnedFd) {
        // SAFETY: shutdown(2) on a socket descriptor we own; no memory is involved.
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    #[test]
    fn wake_handles_end_a_blocked_accept_and_read() {
        let dir = std::env::temp_dir().join(format!("minivmm-wake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ep in [
            Endpoint::Unix(dir.join("m.sock")),
            Endpoint::parse("tcp:127.0.0.1:0").unwrap(),
        ] {
            let mut l = ep.listen().unwrap();
            let handle = l.wake_handle().expect("sockets have a wake handle");
            let waker = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                shut_down(handle);
            });
            assert!(l.accept().is_err(), "{ep}: accept woken");
            waker.join().unwrap();
        }
        let (mut a, _b) = Connection::pair().unwrap();
        let handle = a.wake_handle().expect("sockets have a wake handle");
        let waker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            shut_down(handle);
        });
        let mut buf = [0u8; 8];
        assert_eq!(
            a.recv(&mut buf).unwrap_or(0),
            0,
            "read woken at end of stream"
        );
        waker.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

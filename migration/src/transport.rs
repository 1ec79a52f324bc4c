//! Where the stream goes: `unix:PATH`, `tcp:HOST:PORT` (bidirectional, the destination
//! replies) and `file:PATH` (a snapshot: no peer, no replies), plus an in-memory buffer for
//! tests and fuzzing.
//!
//! Connecting is bounded ([`Endpoint::connect`] takes a timeout). A snapshot is written to a
//! new temporary file beside the target and only [`Transport::commit`] (data synced, renamed
//! over the target, directory synced) replaces an older snapshot: a failure at any byte
//! leaves the previous one untouched.
//!
//! Writes are vectored (`sendmsg`/`writev` with up to `IOV_MAX` parts per call, looping on
//! short writes); reads are large (the stream reader asks for whole payloads, straight into
//! guest memory on the destination).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::deadline::Bound;
pub use crate::deadline::Deadline;
use crate::fd_passing;
use crate::tls::{AllowMatch, PeerIdentity, TlsClient, TlsError, TlsServer, TlsStream};

/// Most parts per `writev`/`sendmsg` (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// `sun_path` holds 108 bytes including the terminating NUL.
const UNIX_PATH_MAX: usize = 107;

/// Guest memory to write to the stream as it is at the moment of the copy: the guest may be
/// writing it meanwhile (a live pass), so no Rust reference to it is ever formed; the kernel
/// (`writev`, `sendmsg`) or a raw copy reads it.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpan {
    ptr: *const u8,
    len: usize,
}

impl GuestSpan {
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped and readable for as long as the span is used (it may
    /// be written concurrently).
    pub unsafe fn new(ptr: *const u8, len: usize) -> GuestSpan {
        GuestSpan { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The first `at` bytes and the rest (`at` is capped at the length).
    pub fn split_at(&self, at: usize) -> (GuestSpan, GuestSpan) {
        let at = at.min(self.len);
        (
            GuestSpan {
                ptr: self.ptr,
                len: at,
            },
            GuestSpan {
                ptr: self.ptr.wrapping_add(at),
                len: self.len - at,
            },
        )
    }

    /// Appends a raw copy of the span's bytes (whatever they are at the moment) to `out`.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        let at = out.len();
        // SAFETY: the span is readable (its constructor's contract) and `out` has `len` bytes
        // of spare capacity at `at`, which the raw copy initialises; no reference to the
        // guest's bytes is formed.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr().add(at), self.len);
            out.set_len(at + self.len);
        }
    }
}

/// A byte stream the migration runs over. Implemented by [`Connection`]; tests wrap one to
/// inject faults or guest writes between sends.
pub trait Transport {
    /// Writes all `parts`, in order.
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()>;
    /// Writes all `parts`, then the guest memory `guest`, in order, as one operation. The
    /// default copies the guest bytes into a buffer first; [`Connection`] hands them to the
    /// kernel where they are (no copy).
    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        let mut copy = Vec::with_capacity(guest.iter().map(GuestSpan::len).sum());
        for g in guest {
            g.copy_into(&mut copy);
        }
        let mut all = parts.to_vec();
        all.push(&copy);
        self.send(&all)
    }
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
    /// No send or receive may wait past `deadline` (sockets only; `None` lifts it).
    fn set_deadline(&mut self, _deadline: Option<Deadline>) {}
    /// Makes what was sent durable and final (a snapshot file: synced and renamed over the
    /// target). Sockets have nothing to do.
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Closes both directions at once (sockets), so the peer sees the end now.
    fn shutdown(&mut self) {}
    /// A duplicate of the socket, to shut it down from another thread (sockets only).
    fn wake_handle(&self) -> Option<OwnedFd> {
        None
    }
    /// Sends `parts` like [`send`](Self::send), with `fds` attached to their first byte
    /// (`SCM_RIGHTS`, local migration). Only unix sockets can; other transports refuse.
    fn send_with_fds(&mut self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let _ = (parts, fds);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "only a unix socket can pass file descriptors",
        ))
    }
    /// Whether [`send_with_fds`](Self::send_with_fds) and [`take_fds`](Self::take_fds) work
    /// (unix sockets).
    fn passes_fds(&self) -> bool {
        false
    }
    /// The descriptors that arrived with the bytes received so far, oldest first (at most
    /// [`MAX_PASSED_FDS`](fd_passing::MAX_PASSED_FDS) are kept), emptying the queue.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
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
    #[error("Connecting to {0} timed out after {1:?}")]
    ConnectTimeout(Endpoint, Duration),
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

    /// Source side: connects to a listening destination within `timeout`, or creates the
    /// temporary file of a new snapshot (the target is replaced only by
    /// [`Transport::commit`]).
    pub fn connect(&self, timeout: Duration) -> Result<Connection, TransportError> {
        let failed = |e| TransportError::Connect(self.clone(), e);
        match self {
            Endpoint::Unix(path) => connect_unix(path, timeout)
                .map(|s| Stream::Unix(widen_send_buffer(s)).into())
                .map_err(|e| match e.kind() {
                    io::ErrorKind::TimedOut => {
                        TransportError::ConnectTimeout(self.clone(), timeout)
                    }
                    _ => failed(e),
                }),
            Endpoint::Tcp { host, port } => {
                if *port == 0 {
                    let e = io::Error::new(io::ErrorKind::InvalidInput, "port 0");
                    return Err(failed(e));
                }
                let stream = connect_tcp(host, *port, timeout).map_err(|e| match e.kind() {
                    io::ErrorKind::TimedOut => {
                        TransportError::ConnectTimeout(self.clone(), timeout)
                    }
                    _ => failed(e),
                })?;
                stream.set_nodelay(true).map_err(failed)?;
                Ok(Stream::Tcp(stream).into())
            }
            Endpoint::File(path) => SnapshotWriter::create(path)
                .map(|w| Stream::Snapshot(w).into())
                .map_err(|e| TransportError::Create(self.clone(), e)),
        }
    }

    /// Destination side: binds the socket (a unix socket file is mode 0600 whatever the
    /// umask; a stale one is replaced, a live one refused), or opens the snapshot file for
    /// reading. Then [`Listener::accept`] gives the connection.
    pub fn listen(&self) -> Result<Listener, TransportError> {
        match self {
            Endpoint::Unix(path) => {
                let l = match bind_unix(path) {
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
                        bind_unix(path)
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

/// Backlog of a listening socket.
const BACKLOG: libc::c_int = 128;

/// The address of the unix socket at `path`.
fn unix_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid; the family and path are filled in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unix socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

/// A new unix stream socket (close-on-exec; `flags` adds e.g. `SOCK_NONBLOCK`).
fn unix_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked and owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own exclusively.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds and listens on a unix socket whose file is mode 0600 from the start, whatever the
/// umask: Linux creates the file with the socket inode's mode (less the umask), which
/// `fchmod` sets before `bind`; no window in which another user could connect, no `chmod`
/// by path that a planted link could redirect.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let addr = unix_address(path)?;
    let fd = unix_socket(0)?;
    // SAFETY: fchmod(2) on the socket we own; no memory is involved.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the call and the length
    // is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on the bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// Connects to a unix socket, waiting at most `timeout` for a listener whose backlog is full
/// (a blocking connect would wait without bound).
fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let addr = unix_address(path)?;
    let owned = unix_socket(libc::SOCK_NONBLOCK)?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the call and the
        // length is its size.
        let rc = unsafe {
            libc::connect(
                owned.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        // A unix socket connects at once or says the backlog is full (EAGAIN): try again.
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(libc::EAGAIN) => return Err(io::ErrorKind::TimedOut.into()),
            _ => return Err(e),
        }
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A unix socket's peer for logs: the local process, with its pid when known.
fn unix_peer(s: &UnixStream) -> String {
    match peer_pid(s) {
        Some(pid) => format!("a local process (pid {pid})"),
        None => "a local process".into(),
    }
}

/// The pid of the process at the other end of a unix socket, as it was when it connected.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live ucred and `len` its size; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Connects to the first address of `host:port` that answers within `timeout` in all.
fn connect_tcp(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in (host, port).to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A snapshot being written: a new temporary file (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600)
/// in the target's directory. [`Transport::commit`] makes it the target; dropped before
/// that, the temporary file is removed and the target (an older snapshot) is untouched.
#[derive(Debug)]
pub struct SnapshotWriter {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl SnapshotWriter {
    fn create(target: &Path) -> io::Result<SnapshotWriter> {
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = target.with_file_name(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        Ok(SnapshotWriter {
            file,
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Data synced, the temporary file renamed over the target, the directory synced: the new
    /// snapshot is there after a crash, and until the rename the old one is.
    fn commit(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        let dir = match self.target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
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
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(|e| TransportError::Accept(ep, e))?;
                let peer = Some(unix_peer(&s));
                Ok(Connection {
                    peer,
                    ..Stream::Unix(s).into()
                })
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().map_err(|e| TransportError::Accept(ep, e))?;
                // A peer that already reset the connection makes this fail: its reads will
                // say so, it is no reason to stop listening.
                if let Err(e) = s.set_nodelay(true) {
                    log::debug!("TCP_NODELAY on an accepted connection: {e}");
                }
                Ok(Connection {
                    peer: Some(addr.to_string()),
                    ..Stream::Tcp(s).into()
                })
            }
            Listener::File(f, _) => f.take().map(|f| Stream::File(f).into()).ok_or_else(|| {
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

/// An open migration connection: the stream, and the bounds on every wait for it (a timeout
/// per operation, and optionally a deadline that no operation may pass, however slowly the
/// peer trickles bytes).
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    /// The peer as it was when accepted (a reset peer has no address afterwards).
    peer: Option<String>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    deadline: Option<Deadline>,
    /// Descriptors received on a unix socket, not taken yet.
    fds: Vec<OwnedFd>,
}

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// TCP with TLS, after the handshake ([`Connection::tls_client`], [`Connection::tls_server`]).
    Tls(Box<TlsStream>),
    /// A snapshot being read.
    File(File),
    /// A snapshot being written.
    Snapshot(SnapshotWriter),
    Memory(MemoryStream),
}

impl From<Stream> for Connection {
    fn from(stream: Stream) -> Connection {
        Connection {
            stream,
            peer: None,
            read_timeout: None,
            write_timeout: None,
            deadline: None,
            fds: Vec::new(),
        }
    }
}

impl Connection {
    /// A connected pair of unix sockets (tests, in-process migrations).
    pub fn pair() -> io::Result<(Connection, Connection)> {
        let (a, b) = UnixStream::pair()?;
        Ok((
            Stream::Unix(widen_send_buffer(a)).into(),
            Stream::Unix(widen_send_buffer(b)).into(),
        ))
    }

    /// An empty in-memory stream to write a snapshot into.
    pub fn memory() -> Connection {
        Stream::Memory(MemoryStream::default()).into()
    }

    /// An in-memory stream to read `bytes` from.
    pub fn from_bytes(bytes: Vec<u8>) -> Connection {
        Stream::Memory(MemoryStream {
            data: bytes,
            pos: 0,
        })
        .into()
    }

    /// The bytes of an in-memory stream (empty for other kinds).
    pub fn into_bytes(self) -> Vec<u8> {
        match self.stream {
            Stream::Memory(m) => m.data,
            _ => Vec::new(),
        }
    }

    /// A duplicate of the socket that another thread may shut down to wake a blocked read or
    /// write (which then sees the end of the stream). `None` for files and memory.
    pub fn wake_handle(&self) -> Option<OwnedFd> {
        match &self.stream {
            Stream::Unix(s) => s.try_clone().ok().map(OwnedFd::from),
            Stream::Tcp(s) => s.try_clone().ok().map(OwnedFd::from),
            Stream::Tls(t) => t.tcp.try_clone().ok().map(OwnedFd::from),
            Stream::File(_) | Stream::Snapshot(_) | Stream::Memory(_) => None,
        }
    }

    /// The peer's address, for logs (`None` for files and memory): `IP:PORT`, or a local
    /// process with its pid (from `SO_PEERCRED`).
    pub fn peer(&self) -> Option<String> {
        if let Some(p) = &self.peer {
            return Some(p.clone());
        }
        match &self.stream {
            Stream::Unix(s) => Some(unix_peer(s)),
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
            Stream::Tls(t) => t.tcp.peer_addr().ok().map(|a| a.to_string()),
            _ => None,
        }
    }

    /// Source side of mutual TLS on this `tcp:` connection: the handshake, with the
    /// destination's certificate checked against the CA and against `name` (the host it was
    /// reached by, or `--tls-name`). Every wait is bounded by the connection's timeouts and
    /// by `deadline`. A destination that answers in plaintext is reported with what it said.
    pub fn tls_client(
        self,
        tls: &TlsClient,
        name: &str,
        deadline: Deadline,
    ) -> Result<Connection, TlsError> {
        let (tcp, mut c) = self.into_tcp()?;
        c.deadline = Some(deadline);
        let t = TlsStream::connect(tcp, tls, name, c.bound(true), c.bound(false))?;
        c.stream = Stream::Tls(Box::new(t));
        // Back to the per-operation timeouts that the handshake's deadline cut short.
        c.set_deadline(None);
        Ok(c)
    }

    /// Destination side of mutual TLS on this accepted `tcp:` connection: the handshake, with
    /// the source's certificate checked against the CA and the allow-list. Every wait is
    /// bounded by the connection's timeouts and by `deadline`. A source that speaks plaintext
    /// is told, in a plaintext `Error` record, that this endpoint needs TLS.
    pub fn tls_server(self, tls: &TlsServer, deadline: Deadline) -> Result<Connection, TlsError> {
        let (tcp, mut c) = self.into_tcp()?;
        c.deadline = Some(deadline);
        let t = TlsStream::accept(tcp, tls, c.bound(true), c.bound(false))?;
        c.stream = Stream::Tls(Box::new(t));
        c.set_deadline(None);
        Ok(c)
    }

    /// The peer's certificate identity, on a TLS connection.
    pub fn tls_peer(&self) -> Option<&PeerIdentity> {
        match &self.stream {
            Stream::Tls(t) => t.peer(),
            _ => None,
        }
    }

    /// Which `--tls-allow` entry admitted the peer (destination side).
    pub fn tls_allowed_by(&self) -> Option<&AllowMatch> {
        match &self.stream {
            Stream::Tls(t) => t.allowed_by(),
            _ => None,
        }
    }

    /// The TCP socket, and the connection's bounds to carry over.
    fn into_tcp(self) -> Result<(TcpStream, Connection), TlsError> {
        let Connection {
            stream,
            peer,
            read_timeout,
            write_timeout,
            deadline,
            fds,
        } = self;
        let bounds = Connection {
            stream: Stream::Memory(MemoryStream::default()),
            peer,
            read_timeout,
            write_timeout,
            deadline,
            fds,
        };
        match stream {
            Stream::Tcp(tcp) => Ok((tcp, bounds)),
            other => Err(TlsError::NotTcp(
                match other {
                    Stream::Unix(_) => "a unix socket",
                    Stream::Tls(_) => "a TLS connection",
                    _ => "a file",
                }
                .to_string(),
            )),
        }
    }

    /// Closes the writing direction (sockets): the peer reads what was sent, then the end.
    pub fn shutdown_write(&mut self) {
        let _ = match &self.stream {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tls(t) => t.tcp.shutdown(std::net::Shutdown::Write),
            _ => Ok(()),
        };
    }

    fn fd(&self) -> Option<RawFd> {
        match &self.stream {
            Stream::Unix(s) => Some(s.as_raw_fd()),
            Stream::Tcp(s) => Some(s.as_raw_fd()),
            Stream::Tls(t) => Some(t.tcp.as_raw_fd()),
            Stream::File(f) => Some(f.as_raw_fd()),
            Stream::Snapshot(w) => Some(w.file.as_raw_fd()),
            Stream::Memory(_) => None,
        }
    }

    fn is_socket(&self) -> bool {
        matches!(
            self.stream,
            Stream::Unix(_) | Stream::Tcp(_) | Stream::Tls(_)
        )
    }

    /// What bounds a read (`true`) or a write on this connection.
    fn bound(&self, read: bool) -> Bound {
        Bound {
            timeout: if read {
                self.read_timeout
            } else {
                self.write_timeout
            },
            deadline: self.deadline,
        }
    }

    fn set_socket_timeout(&self, read: bool, t: Option<Duration>) -> io::Result<()> {
        match (&self.stream, read) {
            (Stream::Unix(s), true) => s.set_read_timeout(t),
            (Stream::Unix(s), false) => s.set_write_timeout(t),
            (Stream::Tcp(s), true) => s.set_read_timeout(t),
            (Stream::Tcp(s), false) => s.set_write_timeout(t),
            (Stream::Tls(s), true) => s.tcp.set_read_timeout(t),
            (Stream::Tls(s), false) => s.tcp.set_write_timeout(t),
            _ => Ok(()),
        }
    }
}

impl Transport for Connection {
    fn wake_handle(&self) -> Option<OwnedFd> {
        Connection::wake_handle(self)
    }

    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.send_iov(parts, &[])
    }

    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        self.send_iov(parts, guest)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (read, write) = (self.bound(true), self.bound(false));
        if matches!(self.stream, Stream::Unix(_) | Stream::Tcp(_)) {
            read.arm(|t| self.set_socket_timeout(true, t))?;
        }
        loop {
            let r = match &mut self.stream {
                Stream::Unix(s) => fd_passing::recv_with_fds(s.as_raw_fd(), buf, &mut self.fds),
                Stream::Tcp(s) => s.read(buf),
                // Arms its bounds before each read of the socket.
                Stream::Tls(t) => t.recv(buf, read, write),
                Stream::File(f) => f.read(buf),
                Stream::Snapshot(_) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a snapshot being written is not read",
                )),
                Stream::Memory(m) => {
                    let n = buf.len().min(m.data.len() - m.pos);
                    buf[..n].copy_from_slice(&m.data[m.pos..m.pos + n]);
                    m.pos += n;
                    Ok(n)
                }
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read.timed_out(e)),
                ok => return ok,
            }
        }
    }

    fn has_peer(&self) -> bool {
        self.is_socket()
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.read_timeout = timeout;
        self.set_socket_timeout(true, timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.write_timeout = timeout;
        self.set_socket_timeout(false, timeout)
    }

    fn set_deadline(&mut self, deadline: Option<Deadline>) {
        self.deadline = deadline;
        if deadline.is_none() {
            // Back to the plain per-operation timeouts.
            let _ = self.set_socket_timeout(true, self.read_timeout);
            let _ = self.set_socket_timeout(false, self.write_timeout);
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Snapshot(w) => w.commit(),
            _ => Ok(()),
        }
    }

    fn send_with_fds(&mut self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let Stream::Unix(s) = &self.stream else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only a unix socket can pass file descriptors",
            ));
        };
        // One small record: the descriptors ride on its first byte, the rest (if the kernel
        // took less) follows like any send.
        let data = parts.concat();
        let bound = self.bound(false);
        bound.arm(|t| s.set_write_timeout(t))?;
        let sent = fd_passing::send_with_fds(s.as_raw_fd(), &data, fds);
        if bound.deadline.is_some() {
            let _ = s.set_write_timeout(self.write_timeout);
        }
        let sent = sent.map_err(|e| bound.timed_out(e))?;
        match &data[sent..] {
            [] => Ok(()),
            rest => self.send(&[rest]),
        }
    }

    fn passes_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }

    fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    fn shutdown(&mut self) {
        let _ = match &self.stream {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tls(t) => t.tcp.shutdown(std::net::Shutdown::Both),
            _ => Ok(()),
        };
    }
}

impl Connection {
    /// Writes `parts`, then `guest`, as one operation: with as few vectored calls as the
    /// kernel allows (sockets, files), or through TLS from a copy.
    fn send_iov(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        // One send (one record) is one operation: all of it within the write timeout, however
        // the peer dribbles its reading, and within the connection's deadline.
        let op = self.write_timeout.map(|t| Deadline::after(t, "write"));
        let write = Bound {
            timeout: self.write_timeout,
            deadline: match (op, self.deadline) {
                (Some(a), Some(b)) => Some(if a.at <= b.at { a } else { b }),
                (a, b) => a.or(b),
            },
        };
        if let Stream::Tls(t) = &mut self.stream {
            // TLS encrypts from our buffers: the guest bytes are copied first (raw reads).
            let mut copy = Vec::new();
            guest.iter().for_each(|g| g.copy_into(&mut copy));
            let mut all = parts.to_vec();
            if !copy.is_empty() {
                all.push(&copy);
            }
            // Arms the socket before each write; back to the plain timeout after.
            let r = t.send(&all, write);
            if write.deadline.is_some() {
                let _ = self.set_socket_timeout(false, self.write_timeout);
            }
            return r;
        }
        let socket = self.is_socket();
        let Some(fd) = self.fd() else {
            if let Stream::Memory(m) = &mut self.stream {
                for p in parts {
                    m.data.extend_from_slice(p);
                }
                for g in guest {
                    g.copy_into(&mut m.data);
                }
            }
            return Ok(());
        };
        let calls = std::cell::Cell::new(0u32);
        let rearmed = std::cell::Cell::new(false);
        let before_each = || -> io::Result<()> {
            // The socket's own timeout covers the first call unless a connection deadline
            // is closer; every later call (after a partial write) gets what is left.
            let first = calls.replace(calls.get() + 1) == 0;
            if socket && (!first || self.deadline.is_some()) {
                write.arm(|t| {
                    rearmed.set(true);
                    self.set_socket_timeout(false, t)
                })?;
            }
            Ok(())
        };
        let iov = parts
            .iter()
            .map(|p| (p.as_ptr(), p.len()))
            .chain(guest.iter().map(|g| (g.as_ptr(), g.len())));
        let r = send_all(fd, iov, socket, before_each).map_err(|e| write.timed_out(e));
        if rearmed.get() {
            let _ = self.set_socket_timeout(false, self.write_timeout);
        }
        r
    }
}

/// Writes every part (address, length: the caller's slices, or guest memory spans) with as
/// few `sendmsg`/`writev` calls as the kernel allows, calling `before_each` before every call
/// (it may refuse to go on).
fn send_all(
    fd: RawFd,
    parts: impl Iterator<Item = (*const u8, usize)>,
    socket: bool,
    before_each: impl Fn() -> io::Result<()>,
) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .filter(|&(_, len)| len > 0)
        .map(|(ptr, len)| libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        before_each()?;
        let last = (first + IOV_MAX).min(iov.len());
        let batch = &mut iov[first..last];
        let n = if socket {
            // SAFETY: an all-zero msghdr is valid; we set only the iovec fields.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = batch.as_mut_ptr();
            msg.msg_iovlen = batch.len();
            // SAFETY: the iovecs point into the caller's live slices or readable guest memory
            // spans (the kernel only reads them); MSG_NOSIGNAL turns a closed peer into EPIPE
            // instead of SIGPIPE.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: the iovecs point into the caller's live slices or readable guest memory
            // spans (the kernel only reads them).
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
            let mut c = ep.connect(Duration::from_secs(5)).unwrap();
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
    fn a_unix_listener_is_0600_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.sock");
        // SAFETY: umask(2) only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let l = Endpoint::Unix(path.clone()).listen();
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let _l = l.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let c = Endpoint::Unix(path)
            .connect(Duration::from_secs(1))
            .unwrap();
        let me = std::process::id();
        assert_eq!(c.peer(), Some(format!("a local process (pid {me})")));
    }

    #[test]
    fn connect_to_nothing_names_the_endpoint() {
        let err = Endpoint::parse("unix:/nonexistent/dir/sock")
            .unwrap()
            .connect(Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("unix:/nonexistent/dir/sock"));
    }

    #[test]
    fn a_snapshot_replaces_the_old_one_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vm.snap");
        std::fs::write(&target, b"old snapshot").unwrap();
        let ep = Endpoint::File(target.clone());
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };

        // Written but not committed (a failure, a full disk): the old one stays, the
        // temporary file goes.
        let mut c = ep.connect(Duration::from_secs(1)).unwrap();
        c.send(&[b"half a new"]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old snapshot");
        drop(c);
        assert_eq!(std::fs::read(&target).unwrap(), b"old snapshot");
        assert_eq!(listing(), ["vm.snap"]);

        // Committed: the new one, mode 0600.
        let mut c = ep.connect(Duration::from_secs(1)).unwrap();
        c.send(&[b"new snapshot"]).unwrap();
        c.commit().unwrap();
        drop(c);
        assert_eq!(std::fs::read(&target).unwrap(), b"new snapshot");
        assert_eq!(listing(), ["vm.snap"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_snapshot_never_follows_a_link_planted_at_its_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("vm.snap");
        let tmp = dir
            .path()
            .join(format!(".vm.snap.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let err = Endpoint::File(target.clone())
            .connect(Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, TransportError::Create(..)), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!target.exists());
    }

    #[test]
    fn connecting_to_a_unix_listener_that_never_accepts_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let ep = Endpoint::Unix(path);
        // Fill the backlog; then a connect waits for room that never comes.
        let mut held = Vec::new();
        let started = Instant::now();
        let err = loop {
            match ep.connect(Duration::from_millis(100)) {
                Ok(c) => held.push(c),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        assert!(matches!(err, TransportError::ConnectTimeout(..)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_deadline_bounds_a_peer_that_trickles() {
        let (mut a, b) = Connection::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.set_deadline(Some(Deadline::after(Duration::from_millis(300), "test")));
        // The peer sends a byte every 50 ms: each read succeeds within its timeout, the
        // deadline still ends the wait.
        let trickler = std::thread::spawn(move || {
            let mut b = b;
            for _ in 0..40 {
                if b.send(&[b"x"]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut buf = [0u8; 1];
        let err = loop {
            match a.recv(&mut buf) {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the test deadline passed");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(a);
        trickler.join().unwrap();
    }

    /// A peer that reads 4 KiB every 50 ms, for two seconds.
    fn slow_reader(mut b: Connection) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            for _ in 0..40 {
                if b.recv(&mut buf).map_or(true, |n| n == 0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    }

    #[test]
    fn a_deadline_bounds_a_peer_that_reads_a_trickle() {
        let (mut a, b) = Connection::pair().unwrap();
        a.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        a.set_deadline(Some(Deadline::after(Duration::from_millis(300), "test")));
        let reader = slow_reader(b);
        let data = vec![7u8; 64 << 20];
        let started = Instant::now();
        let err = a.send(&[&data]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(a);
        reader.join().unwrap();
    }

    #[test]
    fn one_send_finishes_within_the_write_timeout_or_fails() {
        let (mut a, b) = Connection::pair().unwrap();
        a.set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // The peer reads a little every 50 ms: every sendmsg makes some progress within the
        // socket's timeout; the record as a whole must still fail soon.
        let reader = slow_reader(b);
        let data = vec![7u8; 64 << 20];
        let started = Instant::now();
        let err = a.send(&[&data]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(a);
        reader.join().unwrap();
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

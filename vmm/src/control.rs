//! The control socket: newline-delimited JSON requests on a Unix socket, one reply line each.
//!
//! ```text
//! → {"cmd":"status"}   ← {"ok":true,"state":"running","mem_bytes":536870912,"cpus":1,"uptime_ms":1234}
//! → {"cmd":"pause"}    ← {"ok":true}          (also "resume", "shutdown")
//! → {"cmd":"cancel"}   ← {"ok":true}          (gives the running migration up)
//! → not json           ← {"ok":false,"error":"invalid JSON: ..."}   (the connection stays usable)
//! ```
//!
//! Requests are read with a bound ([`MAX_REQUEST_LEN`]); a longer line is refused and the
//! connection closed. The socket file is created with mode 0600; a stale file left by a dead
//! process is replaced, a live socket is refused.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use serde::Deserialize;
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// Client timeout of [`request`].
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {0} is in use by a running minivmm")]
    SocketInUse(PathBuf),
    #[error("control socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove stale control socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("cannot bind control socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("cannot set up control socket {0}")]
    Setup(PathBuf, #[source] io::Error),
    #[error("cannot connect to control socket {0}")]
    Connect(PathBuf, #[source] io::Error),
    #[error("control request to {0} failed")]
    Io(PathBuf, #[source] io::Error),
    #[error("control socket {0} closed without a reply")]
    NoReply(PathBuf),
    #[error("control socket {0} sent a reply that is not JSON")]
    BadReply(PathBuf, #[source] serde_json::Error),
}

/// A typed request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    /// Live-migrate (or snapshot) the VM. The reply comes when it is done; progress lines
    /// `{"progress":{...}}` may come before it.
    Migrate(MigrateRequest),
    /// Give the running migration up (honoured until the guest is paused for the final
    /// pass); its own reply then says whether it was cancelled or completed.
    Cancel,
}

impl Request {
    /// The request's `cmd`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
            Request::Migrate(_) => "migrate",
            Request::Cancel => "cancel",
        }
    }
}

/// Arguments of `migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.
    pub to: String,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Bytes per second.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    #[serde(default)]
    pub max_passes: Option<u32>,
    #[serde(default)]
    pub no_zero_elision: bool,
    /// After a `file:` snapshot, keep the VM running here.
    #[serde(default)]
    pub keep_running: bool,
    /// Hash guest memory at the final pause; the destination checks it before resuming.
    #[serde(default)]
    pub verify_memory: bool,
    /// Throttle the vCPUs when the guest dirties memory faster than it can be sent (default on).
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// Fault injection for tests: break the stream after this many bytes.
    #[serde(default)]
    pub fail_after_bytes: Option<u64>,
}

fn default_true() -> bool {
    true
}

/// The commands [`Request`] knows, for the "unknown command" error.
pub const COMMANDS: &[&str] = &["status", "pause", "resume", "shutdown", "migrate", "cancel"];

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("request must be a JSON object with a string \"cmd\" field")]
    NoCmd,
    #[error("unknown command {0:?} (known: {known})", known = COMMANDS.join(", "))]
    UnknownCommand(String),
    #[error("invalid {cmd:?} request: {reason}")]
    BadArguments { cmd: String, reason: String },
}

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let v: Value = serde_json::from_str(line).map_err(|e| RequestError::Json(e.to_string()))?;
    let cmd = v
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or(RequestError::NoCmd)?
        .to_string();
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(RequestError::UnknownCommand(cmd));
    }
    serde_json::from_value(v).map_err(|e| RequestError::BadArguments {
        cmd,
        reason: e.to_string(),
    })
}

/// `{"ok":false,"error":...}`
pub fn error_reply(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

/// Executes requests (implemented by the VMM).
pub trait RequestHandler {
    /// The reply to `req`: `{"ok":true,...}` or an error reply; `None` when the handler took
    /// the connection over (it keeps a clone of `conn` and replies itself, later), after which
    /// the server stops reading from it.
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Value>;
}

/// Bind the control socket at `path`: mode 0600, replacing a stale socket file, refusing a
/// live one.
pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::SocketInUse(path.to_path_buf())),
            Err(e) => {
                debug!("replacing stale control socket {} ({e})", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| ControlError::RemoveStale(path.to_path_buf(), e))?;
            }
        }
    }
    // SAFETY: umask only changes this process's file creation mask; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| ControlError::Bind(path.to_path_buf(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ControlError::Setup(path.to_path_buf(), e))?;
    Ok(ControlSocket {
        listener,
        path: path.to_path_buf(),
    })
}

/// A bound control socket; its file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What to do with a connection after reading from it.
enum ConnState {
    Open,
    Close,
}

/// Event-loop subscriber serving the control socket.
pub struct ControlServer<H: RequestHandler> {
    socket: ControlSocket,
    handler: Arc<Mutex<H>>,
    conns: HashMap<RawFd, Connection>,
}

impl<H: RequestHandler> ControlServer<H> {
    pub fn new(socket: ControlSocket, handler: Arc<Mutex<H>>) -> Self {
        ControlServer {
            socket,
            handler,
            conns: HashMap::new(),
        }
    }

    /// The socket back, to be served by another server; open connections are closed.
    pub fn into_socket(self) -> ControlSocket {
        self.socket
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.socket.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        warn!("control socket: too many connections, refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        debug!("control connection: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        warn!("control connection cannot be polled: {e:?}");
                        continue;
                    }
                    self.conns.insert(
                        fd,
                        Connection {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    fn serve(handler: &Mutex<H>, conn: &mut Connection) -> ConnState {
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.len() > MAX_REQUEST_LEN + 4096 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ConnState::Close,
            }
        }
        while let Some(pos) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let reply = if line.len() > MAX_REQUEST_LEN {
                error_reply(&format!("request longer than {MAX_REQUEST_LEN} bytes"))
            } else {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                match parse_request(text) {
                    Ok(req) => {
                        debug!("control request {req:?}");
                        let reply = handler
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .handle(req, &conn.stream);
                        match reply {
                            Some(r) => r,
                            None => return ConnState::Close,
                        }
                    }
                    Err(e) => error_reply(&e.to_string()),
                }
            };
            if write_reply(&mut conn.stream, &reply).is_err() {
                return ConnState::Close;
            }
        }
        if conn.buf.len() > MAX_REQUEST_LEN {
            let _ = write_reply(
                &mut conn.stream,
                &error_reply(&format!("request longer than {MAX_REQUEST_LEN} bytes")),
            );
            return ConnState::Close;
        }
        if closed {
            ConnState::Close
        } else {
            ConnState::Open
        }
    }
}

fn write_reply(stream: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut line = reply.to_string();
    line.push('\n');
    // Replies are small; wait for buffer space rather than drop one.
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let r = stream.write_all(line.as_bytes());
    stream.set_nonblocking(true)?;
    r
}

impl<H: RequestHandler> MutEventSubscriber for ControlServer<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.socket.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let state = if events.event_set().contains(EventSet::IN) {
            Self::serve(&self.handler, conn)
        } else {
            ConnState::Close
        };
        if let ConnState::Close = state {
            if let Some(c) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.socket.listener, EventSet::IN)) {
            warn!("control socket cannot be polled: {e:?}");
        }
    }
}

/// Send one request to the control socket at `path` and return the reply.
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let io_err = |e| ControlError::Io(path.to_path_buf(), e);
    let mut s =
        UnixStream::connect(path).map_err(|e| ControlError::Connect(path.to_path_buf(), e))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(s.take(MAX_REQUEST_LEN as u64))
        .read_line(&mut reply)
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(ControlError::NoReply(path.to_path_buf()));
    }
    serde_json::from_str(&reply).map_err(|e| ControlError::BadReply(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(r#" {"cmd":"pause"} "#), Ok(Request::Pause));
        assert_eq!(parse_request(r#"{"cmd":"resume"}"#), Ok(Request::Resume));
        assert_eq!(
            parse_request(r#"{"cmd":"shutdown"}"#),
            Ok(Request::Shutdown)
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let e = parse_request("this is not json").expect_err("not json");
        assert!(e.to_string().contains("JSON"), "{e}");
        assert_eq!(parse_request("[1,2]"), Err(RequestError::NoCmd));
        assert_eq!(parse_request(r#"{"cmd":7}"#), Err(RequestError::NoCmd));
        let e = parse_request(r#"{"cmd":"explode"}"#).expect_err("unknown");
        assert_eq!(e, RequestError::UnknownCommand("explode".into()));
        assert!(e.to_string().contains("explode"));
        assert!(
            e.to_string()
                .ends_with("(known: status, pause, resume, shutdown, migrate, cancel)"),
            "{e}"
        );
    }

    struct Fake(Vec<Request>);

    impl RequestHandler for Fake {
        fn handle(&mut self, req: Request, _conn: &UnixStream) -> Option<Value> {
            self.0.push(req);
            Some(json!({"ok": true}))
        }
    }

    fn temp_sock(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("minivmm-ctl-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn socket_mode_stale_and_live() {
        let p = temp_sock("modes");
        drop(UnixListener::bind(&p).expect("stale"));
        let s = bind(&p).expect("stale socket replaced");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&p), Err(ControlError::SocketInUse(_))));
        drop(s);
        assert!(!p.exists(), "removed on drop");
        std::fs::write(&p, b"x").expect("file");
        assert!(matches!(bind(&p), Err(ControlError::NotASocket(_))));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn server_answers_and_survives_bad_lines() {
        let p = temp_sock("serve");
        let handler = Arc::new(Mutex::new(Fake(Vec::new())));
        let server = ControlServer::new(bind(&p).expect("bind"), handler.clone());
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("em");
        em.add_subscriber(Arc::new(Mutex::new(server)));
        let p2 = p.clone();
        let client = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p2).expect("connect");
            s.write_all(b"garbage\n{\"cmd\":\"status\"}\n{\"cmd\":\"nope\"}\n")
                .expect("write");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut replies = Vec::new();
            for _ in 0..3 {
                let mut l = String::new();
                r.read_line(&mut l).expect("reply");
                replies.push(serde_json::from_str::<Value>(&l).expect("json reply"));
            }
            let long = vec![b'x'; MAX_REQUEST_LEN + 10];
            let _ = s.write_all(&long);
            let _ = s.write_all(b"\n");
            let mut l = String::new();
            r.read_line(&mut l).expect("reply to long line");
            replies.push(serde_json::from_str::<Value>(&l).expect("json"));
            replies
        });
        while !client.is_finished() {
            em.run_with_timeout(50).expect("run");
        }
        let replies = client.join().expect("client");
        assert_eq!(replies[0]["ok"], false);
        assert_eq!(replies[1]["ok"], true);
        assert!(replies[2]["error"].as_str().unwrap_or("").contains("nope"));
        assert!(replies[3]["error"]
            .as_str()
            .unwrap_or("")
            .contains("longer"));
        assert_eq!(handler.lock().expect("h").0, vec![Request::Status]);
    }
}

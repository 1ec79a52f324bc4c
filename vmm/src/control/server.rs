//! The control socket and its event-loop server: a Unix socket file created with mode 0600
//! (a stale file left by a dead process is replaced, a live socket is refused), and a
//! [`MutEventSubscriber`] that reads newline-delimited requests, hands each to a
//! [`RequestHandler`] and writes its reply.
//!
//! Requests are read with a bound ([`MAX_REQUEST_LEN`]); a longer line is refused and the
//! connection closed. A line that does not parse is answered with an error and the
//! connection stays usable.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use serde::Serialize;

use super::protocol::{parse_request, Reply, Request, Response, MAX_REQUEST_LEN};
use crate::sync::lock;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 32;

/// Errors setting up the control socket.
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
}

/// Executes requests (implemented by the VMM).
pub trait RequestHandler {
    /// The reply to `req`; `None` when the handler took the connection over (it keeps a clone
    /// of `conn` and replies itself, later), after which the server stops reading from it.
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Reply<Response>>;
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
                Reply::error(format!("request longer than {MAX_REQUEST_LEN} bytes"))
            } else {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                match parse_request(text) {
                    Ok(req) => {
                        debug!("control request {req:?}");
                        let reply = lock(handler).handle(req, &conn.stream);
                        match reply {
                            Some(r) => r,
                            None => return ConnState::Close,
                        }
                    }
                    Err(e) => Reply::error(e.to_string()),
                }
            };
            if write_reply(&mut conn.stream, &reply).is_err() {
                return ConnState::Close;
            }
        }
        if conn.buf.len() > MAX_REQUEST_LEN {
            let _ = write_reply(
                &mut conn.stream,
                &Reply::<Response>::error(format!("request longer than {MAX_REQUEST_LEN} bytes")),
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

fn write_reply(stream: &mut UnixStream, reply: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Done;
    use event_manager::{EventManager, SubscriberOps};
    use serde_json::Value;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;

    struct Fake(Vec<Request>);

    impl RequestHandler for Fake {
        fn handle(&mut self, req: Request, _conn: &UnixStream) -> Option<Reply<Response>> {
            self.0.push(req);
            Some(Reply::Ok(Done {}.into()))
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

//! Peers of a destination that are not `minivmm migrate`: a probe, a reset, garbage, an idle
//! connection, or the start of a stream crafted with the migration crate's writer, each with
//! the destination's reply read back.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use migration::stream::read_reply;
use migration::wire::RecordKind;
use migration::{Connection, Endpoint, Transport};
use vmm::persist::MigrationConfig;

/// Where a destination listens.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp(u16),
}

impl Target {
    /// `unix:PATH` or `tcp:127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        match self {
            Target::Unix(p) => format!("unix:{}", p.display()),
            Target::Tcp(port) => format!("tcp:127.0.0.1:{port}"),
        }
    }

    /// A connection, as a source would open it.
    pub fn connect(&self) -> Connection {
        let ep = Endpoint::parse(&self.uri()).expect("endpoint");
        ep.connect(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.uri()))
    }
}

/// A unix socket path's mode bits.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Connects and closes at once: a health check or a port scan.
pub fn probe(t: &Target) {
    drop(t.connect());
}

/// Connects over TCP and resets the connection (`SO_LINGER` 0, then close).
pub fn reset(port: u16) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on our socket with a live linger struct of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(s);
}

/// The destination's reply record after `conn` sent what it sent: (kind, text).
pub fn reply(conn: &mut Connection, timeout: Duration) -> Result<(RecordKind, String), String> {
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    read_reply(conn)
        .map(|(k, p)| (k, String::from_utf8_lossy(&p).into_owned()))
        .map_err(|e| migration::error_chain(&e))
}

/// Sends `bytes`, then reads the reply.
pub fn send_and_reply(t: &Target, bytes: &[u8]) -> Result<(RecordKind, String), String> {
    let mut c = t.connect();
    c.send(&[bytes]).map_err(|e| e.to_string())?;
    reply(&mut c, Duration::from_secs(30))
}

/// The `Error` text a crafted stream start with `config` gets back (panics on another reply).
pub fn refusal_of(t: &Target, config: &MigrationConfig) -> String {
    let json = serde_json::to_vec(config).expect("json");
    let start = vmm::test_utils::stream_start(&json);
    match send_and_reply(t, &start) {
        Ok((RecordKind::Error, text)) => text,
        other => panic!("expected an Error reply, got {other:?}"),
    }
}

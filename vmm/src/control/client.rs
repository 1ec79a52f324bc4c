//! The client side of the control socket: [`request`] sends one request and reads its reply;
//! [`migrate`] is `minivmm migrate`, which asks a running VMM to migrate, shows progress on a
//! terminal and prints the result (human-readable, or one JSON document with `--json`).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::protocol::{
    Done, EventLine, MigrateLine, MigrateRequest, MigrateSummary, OnDeadline, PassProgress, Reply,
    Request, MAX_REQUEST_LEN,
};
use crate::cli::{DeadlineArg, MigrateArgs};

/// Timeout of [`request`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors of the control-socket client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot connect to control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("control request to {0} failed")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("control socket {0} closed without a reply")]
    NoReply(PathBuf),
    #[error("control socket {0} closed before the migration finished")]
    Closed(PathBuf),
    #[error("control socket {0} sent a reply that is not JSON of the expected form")]
    BadReply(PathBuf, #[source] serde_json::Error),
    #[error("migration failed: {0}")]
    Failed(String),
}

/// Send `req` to the control socket at `path` and read its reply, whose body is a `T`
/// (for example [`Done`] or [`VmStatus`](super::protocol::VmStatus)).
pub fn request<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<Reply<T>, ClientError> {
    request_line(
        path,
        &serde_json::to_string(req).map_err(ClientError::Encode)?,
    )
}

/// [`request`] with a line written as it is (the tests send malformed ones).
pub fn request_line<T: DeserializeOwned>(path: &Path, req: &str) -> Result<Reply<T>, ClientError> {
    let io_err = |e| ClientError::Io(path.to_path_buf(), e);
    let mut s =
        UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_path_buf(), e))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io_err)?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(s.take(MAX_REQUEST_LEN as u64))
        .read_line(&mut reply)
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(ClientError::NoReply(path.to_path_buf()));
    }
    serde_json::from_str(&reply).map_err(|e| ClientError::BadReply(path.to_path_buf(), e))
}

/// Subscribes to the events of the process behind `socket` and hands each [`EventLine`] to
/// `on_event` until the process closes the stream (it ended) or `on_event` returns false.
pub fn events(
    socket: &Path,
    mut on_event: impl FnMut(&EventLine) -> bool,
) -> Result<(), ClientError> {
    let io = |e| ClientError::Io(socket.to_path_buf(), e);
    let mut s =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
    let mut line = serde_json::to_string(&Request::Events).map_err(ClientError::Encode)?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(s);
    let mut first = true;
    loop {
        let mut l = String::new();
        // Bounded: a line longer than a reply may be is not an event.
        let n = (&mut reader)
            .take(MAX_REQUEST_LEN as u64 * 4)
            .read_line(&mut l)
            .map_err(io)?;
        if n == 0 {
            return if first {
                Err(ClientError::NoReply(socket.to_path_buf()))
            } else {
                Ok(())
            };
        }
        if first {
            first = false;
            let reply: Reply<Done> = serde_json::from_str(&l)
                .map_err(|e| ClientError::BadReply(socket.to_path_buf(), e))?;
            reply.into_result().map_err(ClientError::Failed)?;
            continue;
        }
        let event: EventLine =
            serde_json::from_str(&l).map_err(|e| ClientError::BadReply(socket.to_path_buf(), e))?;
        if !on_event(&event) {
            return Ok(());
        }
    }
}

/// A reply as one line of JSON, as `--json` prints it.
pub fn to_json<T: Serialize>(reply: &Reply<T>) -> String {
    // Cannot fail: every reply type has string keys only.
    serde_json::to_string(reply).unwrap_or_default()
}

/// Send `request` and follow the progress lines; returns the summary when the migration
/// succeeded. With `json_out`, a failure's reply is printed on stdout.
pub fn migrate(
    socket: &Path,
    request: &MigrateRequest,
    json_out: bool,
) -> Result<MigrateSummary, ClientError> {
    let io = |e| ClientError::Io(socket.to_path_buf(), e);
    let mut s =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
    // A migration of a big, busy guest may take long; the VM side has its own timeouts.
    s.set_read_timeout(Some(Duration::from_secs(3600)))
        .map_err(io)?;
    let mut line = serde_json::to_string(&Request::Migrate(Box::new(request.clone())))
        .map_err(ClientError::Encode)?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let tty = std::io::stderr().is_terminal() && !json_out;
    let mut reader = BufReader::new(s);
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).map_err(io)? == 0 {
            return Err(ClientError::Closed(socket.to_path_buf()));
        }
        let reply = match serde_json::from_str(&l) {
            Ok(MigrateLine::Progress(p)) => {
                if tty {
                    eprint!("\r\x1b[K{}", progress_text(&p));
                }
                continue;
            }
            Ok(MigrateLine::Reply(reply)) => *reply,
            Err(e) => return Err(ClientError::BadReply(socket.to_path_buf(), e)),
        };
        if tty {
            eprintln!();
        }
        if json_out && !reply.is_ok() {
            println!("{}", to_json(&reply));
        }
        return reply.into_result().map_err(ClientError::Failed);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn progress_text(p: &PassProgress) -> String {
    format!(
        "pass {}: {:.1} MiB dirty, sending {:.0} MiB/s, guest dirties {:.0} MiB/s{}",
        p.pass,
        mib(p.remaining_bytes),
        mib(p.bandwidth_bps),
        mib(p.dirty_rate_bps),
        if p.diverging { " (not converging)" } else { "" }
    )
}

/// The human-readable result.
pub fn summary_text(v: &MigrateSummary) -> String {
    let mut s = format!(
        "migrated to {}: {:.1} ms total, {:.1} ms downtime, {} passes, {:.1} MiB sent, \
         {} zero pages elided, {} untouched pages skipped",
        v.to,
        v.total_ms,
        v.downtime_ms,
        v.passes,
        mib(v.bytes_sent),
        v.pages_zero_elided,
        v.pages_untouched_skipped,
    );
    s.push_str(&format!(
        "\nsource RSS {:.1} MiB",
        v.source_rss_kib as f64 / 1024.0
    ));
    if let Some(d) = v.dest_rss_kib {
        s.push_str(&format!(", destination RSS {:.1} MiB", d as f64 / 1024.0));
    }
    if let Some(d) = &v.destination {
        let d = serde_json::to_string(d).unwrap_or_default();
        s.push_str(&format!("\ndestination acknowledged: {d}"));
    }
    if let Some(h) = &v.mem_hash_source {
        s.push_str(&format!(
            "\nmemory hash {h} (destination {})",
            v.mem_hash_dest.as_deref().unwrap_or("-")
        ));
    }
    s
}

/// The control request for `minivmm migrate` arguments (the bandwidth already parsed);
/// `None` without `--to`. The TLS directory goes as an absolute path: the VMM process, which
/// reads it, may run elsewhere.
pub fn migrate_request(a: &MigrateArgs, max_bandwidth: Option<u64>) -> Option<MigrateRequest> {
    let tls_dir = a
        .tls_dir
        .as_ref()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
    Some(MigrateRequest {
        to: a.to.clone()?,
        downtime_ms: a.downtime_ms,
        max_bandwidth,
        max_passes: a.max_passes,
        no_zero_elision: a.no_zero_elision,
        keep_running: a.keep_running,
        verify_memory: a.verify_memory,
        auto_converge: !a.no_auto_converge,
        connect_timeout_ms: a.connect_timeout_ms,
        io_timeout_ms: a.io_timeout_ms,
        handshake_timeout_ms: a.handshake_timeout_ms,
        switchover_timeout_ms: a.switchover_timeout_ms,
        deadline_ms: a.deadline_ms,
        on_deadline: match a.on_deadline {
            DeadlineArg::Cancel => OnDeadline::Cancel,
            DeadlineArg::Switchover => OnDeadline::Switchover,
        },
        tls_dir,
        tls_name: a.tls_name.clone(),
        local: a.local,
        detach: a.detach,
        connections: a.connections,
    })
}

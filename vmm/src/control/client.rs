//! The client side of the control socket: [`request`] sends one request and reads its reply;
//! [`migrate`] is `minivmm migrate`, which asks a running VMM to migrate, shows progress on a
//! terminal and prints the result (human-readable, or one JSON document with `--json`).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::protocol::MAX_REQUEST_LEN;
use crate::cli::MigrateArgs;

/// Timeout of [`request`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors of the control-socket client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("control request to {0} failed")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("control socket {0} closed without a reply")]
    NoReply(PathBuf),
    #[error("control socket {0} closed before the migration finished")]
    Closed(PathBuf),
    #[error("control socket {0} sent a reply that is not JSON")]
    BadReply(PathBuf, #[source] serde_json::Error),
    #[error("migration failed: {0}")]
    Failed(String),
}

/// Send one request to the control socket at `path` and return the reply.
pub fn request(path: &Path, req: &Value) -> Result<Value, ClientError> {
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

/// Send `request` and follow the replies; returns the final reply when it says ok.
pub fn migrate(socket: &Path, request: &Value, json_out: bool) -> Result<Value, ClientError> {
    let io = |e| ClientError::Io(socket.to_path_buf(), e);
    let mut s =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
    // A migration of a big, busy guest may take long; the VM side has its own timeouts.
    s.set_read_timeout(Some(Duration::from_secs(3600)))
        .map_err(io)?;
    let mut line = request.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let tty = std::io::stderr().is_terminal() && !json_out;
    let mut reader = BufReader::new(s);
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).map_err(io)? == 0 {
            return Err(ClientError::Closed(socket.to_path_buf()));
        }
        let v: Value =
            serde_json::from_str(&l).map_err(|e| ClientError::BadReply(socket.to_path_buf(), e))?;
        if let Some(p) = v.get("progress") {
            if tty {
                eprint!("\r\x1b[K{}", progress_text(p));
            }
            continue;
        }
        if tty {
            eprintln!();
        }
        if v["ok"] == true {
            return Ok(v);
        }
        let msg = v["error"]
            .as_str()
            .unwrap_or("no error message")
            .to_string();
        if json_out {
            println!("{v}");
        }
        return Err(ClientError::Failed(msg));
    }
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
}

fn progress_text(p: &Value) -> String {
    format!(
        "pass {}: {:.1} MiB dirty, sending {:.0} MiB/s, guest dirties {:.0} MiB/s{}",
        p["pass"],
        mib(&p["remaining_bytes"]),
        mib(&p["bandwidth_bps"]),
        mib(&p["dirty_rate_bps"]),
        if p["diverging"] == true {
            " (not converging)"
        } else {
            ""
        }
    )
}

/// The human-readable result.
pub fn summary_text(v: &Value) -> String {
    let mut s = format!(
        "migrated to {}: {:.1} ms total, {:.1} ms downtime, {} passes, {:.1} MiB sent, \
         {} zero pages elided, {} untouched pages skipped",
        v["to"].as_str().unwrap_or("?"),
        v["total_ms"].as_f64().unwrap_or(0.0),
        v["downtime_ms"].as_f64().unwrap_or(0.0),
        v["passes"],
        mib(&v["bytes_sent"]),
        v["pages_zero_elided"],
        v["pages_untouched_skipped"],
    );
    s.push_str(&format!(
        "\nsource RSS {:.1} MiB",
        v["source_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0
    ));
    if let Some(d) = v["dest_rss_kib"].as_f64() {
        s.push_str(&format!(", destination RSS {:.1} MiB", d / 1024.0));
    }
    if v["destination"].is_object() {
        s.push_str(&format!("\ndestination acknowledged: {}", v["destination"]));
    }
    if let Some(h) = v["mem_hash_source"].as_str() {
        s.push_str(&format!(
            "\nmemory hash {h} (destination {})",
            v["mem_hash_dest"].as_str().unwrap_or("-")
        ));
    }
    s
}

/// The control request for `minivmm migrate` arguments (the bandwidth already parsed).
pub fn migrate_request(a: &MigrateArgs, max_bandwidth: Option<u64>) -> Value {
    json!({
        "cmd": "migrate",
        "to": a.to,
        "downtime_ms": a.downtime_ms,
        "max_bandwidth": max_bandwidth,
        "max_passes": a.max_passes,
        "no_zero_elision": a.no_zero_elision,
        "keep_running": a.keep_running,
        "verify_memory": a.verify_memory,
        "auto_converge": !a.no_auto_converge,
        "fail_after_bytes": a.fail_after_bytes,
    })
}

//! The control-socket protocol: one JSON object per line each way.
//!
//! ```text
//! → {"cmd":"status"}   ← {"ok":true,"state":"running","mem_bytes":536870912,"cpus":1,"uptime_ms":1234}
//! → {"cmd":"pause"}    ← {"ok":true}          (also "resume", "shutdown")
//! → {"cmd":"cancel"}   ← {"ok":true}          (gives the running migration up)
//! → not json           ← {"ok":false,"error":"invalid JSON: ..."}   (the connection stays usable)
//! ```

use serde::Deserialize;
use serde_json::{json, Value};

/// Longest request line accepted (and longest reply line a client reads).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! The control-socket protocol: every request and every reply as a serde type. The daemon
//! writes them ([`super::dispatch`], the migration worker); the clients read them
//! ([`super::client`], the end-to-end tests, the bench).
//!
//! One JSON object per line each way. A reply is [`Reply`]: `{"ok":true,...}` with the fields
//! of its body, or `{"ok":false,"error":"..."}`. Units are in the field names.
//!
//! ```text
//! → {"cmd":"status"}   ← {"ok":true,"state":"running","mem_bytes":536870912,"cpus":1,"uptime_ms":1234}
//!                        VmStatus; IncomingStatus from a `receive` that has no guest yet
//! → {"cmd":"pause"}    ← {"ok":true}          Done (also "resume", and "cancel", which gives
//!                                             the running migration up)
//! → {"cmd":"shutdown"} ← {"ok":true}          ShuttingDown
//! → {"cmd":"migrate","to":"unix:/tmp/m.sock",...}               MigrateRequest
//!                      ← {"progress":{"pass":0,...}}           ProgressLine, after each live pass
//!                      ← {"ok":true,"to":"unix:/tmp/m.sock",...} MigrateSummary, at the end
//! → {"cmd":"migrate",...,"detach":true}
//!                      ← {"ok":true,"to":"unix:/tmp/m.sock","detached":true}  MigrationStarted
//! → {"cmd":"events"}   ← {"ok":true}, then one EventLine per line  ([`events`])
//! → not json           ← {"ok":false,"error":"invalid JSON: ..."}   (the connection stays usable)
//! ```
//!
//! `receive --listen` prints a [`ListeningLine`] on stdout once it listens.

use std::path::PathBuf;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::RunState;

pub mod events;

pub use events::{Event, EventLine, ListeningLine, MigrationFigures, Side, EVENT_HISTORY};

/// Longest request line accepted (and longest reply line a client reads).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// Declares [`Request`], [`Request::name`] and [`COMMANDS`] from one list, so that a
/// command's name is spelled once: `"name" => Variant` or `"name" => Variant(Arguments)`.
macro_rules! requests {
    ($($(#[$doc:meta])* $name:literal => $variant:ident $(($args:ty))?,)*) => {
        /// A request: `{"cmd":NAME}` plus, for `migrate`, its arguments.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "cmd")]
        pub enum Request {
            $($(#[$doc])* #[serde(rename = $name)] $variant $(($args))?,)*
        }

        impl Request {
            /// The request's `cmd`.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Request::$variant { .. } => $name,)*
                }
            }
        }

        /// The commands [`Request`] knows, for the "unknown command" error.
        pub const COMMANDS: &[&str] = &[$($name),*];
    };
}

requests! {
    /// State, memory size, vCPUs, uptime: [`VmStatus`] (or [`IncomingStatus`]).
    "status" => Status,
    /// Stop every vCPU: [`Done`].
    "pause" => Pause,
    /// Let every vCPU run again: [`Done`]. After a migration whose outcome is unknown only
    /// with `"force":true`, the operator's word that the guest does not run at the
    /// destination.
    "resume" => Resume(ResumeRequest),
    /// End the VM (or give the incoming migration up): [`ShuttingDown`].
    "shutdown" => Shutdown,
    /// Live-migrate (or snapshot) the VM. The reply, [`MigrateSummary`], comes when it is
    /// done; [`ProgressLine`]s may come before it.
    "migrate" => Migrate(Box<MigrateRequest>),
    /// Give the running migration up (honoured until the guest is paused for the final
    /// pass): [`Done`]; the migration's own reply then says whether it was cancelled or
    /// completed.
    "cancel" => Cancel,
    /// Follow the migrations of this process: [`Done`], then [`EventLine`]s until the client
    /// closes the connection.
    "events" => Events,
}

/// Arguments of `migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.
    pub to: String,
    /// Longest acceptable pause of the guest for the final pass, milliseconds (default 50).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Stream bytes per second (default unlimited).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy passes before stop-and-copy (default 30).
    #[serde(default)]
    pub max_passes: Option<u32>,
    /// Send zero pages in the bulk pass too.
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
    /// Longest wait to connect, milliseconds (default 10 s).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Longest wait for any one read or write on the connection, milliseconds (default 30 s).
    #[serde(default)]
    pub io_timeout_ms: Option<u64>,
    /// Longest from connecting to the destination's `Ready`, milliseconds (default 30 s).
    #[serde(default)]
    pub handshake_timeout_ms: Option<u64>,
    /// Longest the guest stays paused before the commit, milliseconds (default 30 s).
    #[serde(default)]
    pub switchover_timeout_ms: Option<u64>,
    /// The whole migration's deadline, milliseconds (default none).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// What the deadline does: `cancel` (default: keep the guest here) or `switchover`.
    #[serde(default)]
    pub on_deadline: OnDeadline,
    /// Mutual TLS (`tcp:` only): the directory with `ca.pem`, `cert.pem` and `key.pem`, which
    /// the VMM process reads (a path, never key material).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must be valid for (default: the `HOST` of
    /// `tcp:HOST:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    /// Local migration (`unix:` only): shared guest memory handed over by descriptor, only
    /// state copied.
    #[serde(default)]
    pub local: bool,
    /// Reply at once ([`MigrationStarted`]) instead of at the end; progress and result go to
    /// `status` and the `events` stream.
    #[serde(default)]
    pub detach: bool,
    /// Connections to the destination (1 to 16, default 1): the live passes' pages go over
    /// all but the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u8>,
}

/// What a migration's deadline does when it passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    /// Give the migration up; the guest runs on here.
    #[default]
    Cancel,
    /// Stop pre-copy after the pass in progress and switch over whatever is left.
    Switchover,
}

/// Arguments of `resume`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// Resume even though a migration's outcome is unknown: the operator checked that the
    /// guest does not run at the destination.
    #[serde(default)]
    pub force: bool,
}

impl MigrateRequest {
    /// The first wait given as 0 ms, named as its command-line flag: a zero wait would fail
    /// at the socket (or never bound anything), so it is refused up front, as `receive`
    /// refuses its own.
    pub fn zero_wait(&self) -> Option<&'static str> {
        [
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--io-timeout-ms", self.io_timeout_ms),
            ("--handshake-timeout-ms", self.handshake_timeout_ms),
            ("--switchover-timeout-ms", self.switchover_timeout_ms),
            ("--deadline-ms", self.deadline_ms),
        ]
        .into_iter()
        .find(|&(_, ms)| ms == Some(0))
        .map(|(flag, _)| flag)
    }

    /// A migration to `to` with every option at its default.
    pub fn new(to: impl Into<String>) -> MigrateRequest {
        MigrateRequest {
            to: to.into(),
            downtime_ms: None,
            max_bandwidth: None,
            max_passes: None,
            no_zero_elision: false,
            keep_running: false,
            verify_memory: false,
            auto_converge: true,
            connect_timeout_ms: None,
            io_timeout_ms: None,
            handshake_timeout_ms: None,
            switchover_timeout_ms: None,
            deadline_ms: None,
            on_deadline: OnDeadline::Cancel,
            tls_dir: None,
            tls_name: None,
            local: false,
            detach: false,
            connections: None,
        }
    }
}

fn default_true() -> bool {
    true
}

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

/// A reply line: `{"ok":true, ...the fields of T}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<T> {
    Ok(T),
    /// The request was refused or failed; the text says why.
    Error(String),
}

impl<T> Reply<T> {
    /// An error reply saying `msg`.
    pub fn error(msg: impl Into<String>) -> Reply<T> {
        Reply::Error(msg.into())
    }

    /// The body, or the error text.
    pub fn into_result(self) -> Result<T, String> {
        match self {
            Reply::Ok(body) => Ok(body),
            Reply::Error(e) => Err(e),
        }
    }

    /// Whether the reply says `"ok":true`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }
}

impl<T: Serialize> Serialize for Reply<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Success<'a, T> {
            ok: bool,
            #[serde(flatten)]
            body: &'a T,
        }
        #[derive(Serialize)]
        struct Failure<'a> {
            ok: bool,
            error: &'a str,
        }
        match self {
            Reply::Ok(body) => Success { ok: true, body }.serialize(serializer),
            Reply::Error(error) => Failure { ok: false, error }.serialize(serializer),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Reply<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut v = Value::deserialize(deserializer)?;
        let Some(fields) = v.as_object_mut() else {
            return Err(D::Error::custom("a reply must be a JSON object"));
        };
        match fields.remove("ok") {
            Some(Value::Bool(true)) => T::deserialize(v).map(Reply::Ok).map_err(D::Error::custom),
            Some(Value::Bool(false)) => Ok(Reply::Error(
                fields
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no error message")
                    .to_string(),
            )),
            _ => Err(D::Error::custom("a reply must have a boolean \"ok\" field")),
        }
    }
}

/// The body of a reply that says nothing but `"ok":true` (`pause`, `resume`, `cancel`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// `shutdown`: the VM (or the incoming migration) is told to end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShuttingDown {
    /// The VM's outgoing migration at that moment (it is cancelled first); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<OutgoingStatus>,
}

/// `status` of a VM (`minivmm run`, or a `receive` whose guest runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// `created`, `running` or `paused`.
    pub state: RunState,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Since the vCPUs started, milliseconds.
    pub uptime_ms: u64,
    /// The VM's outgoing migration, while one runs or once it succeeded; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<OutgoingStatus>,
    /// How the last outgoing migration that gave the guest back here ended (failed or
    /// cancelled); absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<EndedMigration>,
}

/// An outgoing migration that ended with the guest still here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedMigration {
    /// The destination endpoint.
    pub to: String,
    /// Whether it was given up (`cancel`, deadline) rather than failed.
    pub cancelled: bool,
    /// Why it ended.
    pub error: String,
}

/// The reply to a `migrate` with `detach`: the migration runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStarted {
    /// The destination endpoint.
    pub to: String,
    /// Always true: the result comes through `status` and `events`.
    pub detached: bool,
}

/// What `status` shows of a VM's outgoing migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutgoingStatus {
    /// The destination endpoint (`unix:PATH`, `tcp:HOST:PORT` or `file:PATH`).
    pub to: String,
    /// Since the migration started, milliseconds.
    pub elapsed_ms: u64,
    /// A `cancel` was asked for.
    pub cancelling: bool,
    /// The migration succeeded: the guest runs at `to` now.
    pub moved: bool,
    /// The guest was handed over but the destination never confirmed it runs: it stays
    /// paused here until `resume` with `force` (the operator's word that it does not run
    /// at `to`) or `shutdown`.
    #[serde(default)]
    pub outcome_unknown: bool,
    /// The last pass's progress, `null` during the bulk pass.
    pub last_pass: Option<PassProgress>,
    /// The figures as QEMU's `query-migrate` gives them, as of the last pass (and
    /// `total_time_ms` as of now); `null` during the bulk pass.
    #[serde(default)]
    pub stats: Option<Box<MigrationFigures>>,
}

/// What the migration worker reports after each live pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassProgress {
    /// The pass that just ended (0 is the bulk pass).
    pub pass: u32,
    /// Dirty memory left to send, bytes.
    pub remaining_bytes: u64,
    /// Stream bytes per second during the pass.
    pub bandwidth_bps: u64,
    /// Bytes the guest dirtied per second during the pass.
    pub dirty_rate_bps: u64,
    /// The downtime if the guest were paused now, milliseconds.
    pub expected_downtime_ms: f64,
    /// The guest dirties memory at least as fast as it is sent.
    pub diverging: bool,
}

impl From<&migration::Progress> for PassProgress {
    fn from(p: &migration::Progress) -> PassProgress {
        PassProgress {
            pass: p.pass,
            remaining_bytes: p.remaining_bytes,
            bandwidth_bps: p.bandwidth_bps,
            dirty_rate_bps: p.dirty_rate_bps,
            expected_downtime_ms: p.expected_downtime.as_secs_f64() * 1000.0,
            diverging: p.diverging,
        }
    }
}

/// A line `{"progress":{...}}` that the `migrate` connection gets before its reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressLine {
    /// The pass that just ended.
    pub progress: PassProgress,
}

/// A line on a `migrate` connection: a [`ProgressLine`] after each live pass, then the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrateLine {
    Progress(PassProgress),
    Reply(Box<Reply<MigrateSummary>>),
}

impl<'de> Deserialize<'de> for MigrateLine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(deserializer)?;
        if v.get("progress").is_some() {
            ProgressLine::deserialize(v).map(|l| MigrateLine::Progress(l.progress))
        } else {
            Reply::deserialize(v).map(|r| MigrateLine::Reply(Box::new(r)))
        }
        .map_err(D::Error::custom)
    }
}

/// `status` of a `receive` that has no guest yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingStatus {
    /// `waiting` or `receiving`.
    pub state: IncomingState,
    /// The endpoint the source is awaited on.
    pub listen: String,
    /// While receiving: how far the stream has come (its fields sit at the top level).
    #[serde(flatten)]
    pub progress: Option<IncomingProgress>,
}

/// What a `receive` with no guest yet is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncomingState {
    /// For a source to connect.
    Waiting,
    /// A source's stream.
    Receiving,
}

/// How far a `receive` has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingProgress {
    /// The pass being received, `null` before the first.
    pub pass: Option<u32>,
    /// Stream bytes received up to the last record header.
    pub received_bytes: u64,
}

/// `status` as a client that does not know what answers it reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Status {
    Vm(VmStatus),
    Incoming(IncomingStatus),
}

/// Every reply body a [`RequestHandler`](super::server::RequestHandler) gives at once (the
/// reply to `migrate` comes later, from its worker: [`MigrateSummary`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Status),
    ShuttingDown(ShuttingDown),
    Done(Done),
    MigrationStarted(MigrationStarted),
}

impl From<MigrationStarted> for Response {
    fn from(s: MigrationStarted) -> Response {
        Response::MigrationStarted(s)
    }
}

impl From<VmStatus> for Response {
    fn from(s: VmStatus) -> Response {
        Response::Status(Status::Vm(s))
    }
}

impl From<IncomingStatus> for Response {
    fn from(s: IncomingStatus) -> Response {
        Response::Status(Status::Incoming(s))
    }
}

impl From<ShuttingDown> for Response {
    fn from(s: ShuttingDown) -> Response {
        Response::ShuttingDown(s)
    }
}

impl From<Done> for Response {
    fn from(d: Done) -> Response {
        Response::Done(d)
    }
}

/// The reply to a `migrate` that succeeded: headline figures at the top level, everything in
/// `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateSummary {
    /// The destination endpoint.
    pub to: String,
    /// From the start of the migration to the destination's acknowledgement, milliseconds.
    pub total_ms: f64,
    /// Guest paused until the destination reported it running, milliseconds.
    pub downtime_ms: f64,
    /// Passes over guest memory, the final one included.
    pub passes: u64,
    /// Stream bytes sent.
    pub bytes_sent: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Zero pages left out of the bulk pass (pristine destination).
    pub pages_zero_elided: u64,
    /// Zero pages sent as zero records.
    pub pages_zero_sent: u64,
    /// Zero pages known from pagemap without being read.
    pub pages_untouched_skipped: u64,
    /// Whether the bulk pass elided zero pages.
    pub zero_elision: bool,
    /// Whether the remaining dirty memory fit the downtime limit when pre-copy stopped.
    pub converged: bool,
    /// Highest auto-converge throttle applied, percent.
    pub max_throttle_pct: u32,
    /// Non-zero guest memory at the final pause, bytes (with `verify_memory`).
    pub nonzero_bytes: Option<u64>,
    /// Hash of guest memory at the final pause (with `verify_memory`).
    pub mem_hash_source: Option<String>,
    /// The hash the destination checked before resuming.
    pub mem_hash_dest: Option<String>,
    /// This (source) process's resident set at the end, KiB.
    pub source_rss_kib: u64,
    /// The destination process's resident set once its guest ran, KiB.
    pub dest_rss_kib: Option<u64>,
    /// What the destination reported with its acknowledgement (`null` for a snapshot file).
    pub destination: Option<DestinationReport>,
    /// The figures as QEMU's `query-migrate` gives them.
    pub figures: MigrationFigures,
    /// The whole `migration::MigrationStats` (passes, totals, downtime phases, …). It stays a
    /// JSON value: `MigrationStats` serialises but cannot be read back (its phase names are
    /// `&'static str`).
    pub stats: Value,
}

/// What the destination reports, with its acknowledgement, once its guest runs; the source
/// passes it on in [`MigrateSummary::destination`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// The destination process's resident set once its guest ran, KiB.
    pub rss_kib: u64,
    /// Its guest memory was proven all zero before the stream (zero pages could be elided).
    pub pristine: bool,
    /// Its guest memory was reset to zero before the stream (not proven pristine).
    pub reset: bool,
    /// The memory hash it checked before resuming (with `verify_memory`).
    pub mem_hash: Option<String>,
    /// Non-zero pages it counted while hashing (with `verify_memory`).
    pub nonzero_pages: Option<u64>,
    /// Over TLS: the subject of the source's certificate, as the destination accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_peer: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(r#" {"cmd":"pause"} "#), Ok(Request::Pause));
        assert_eq!(
            parse_request(r#"{"cmd":"resume"}"#),
            Ok(Request::Resume(ResumeRequest { force: false }))
        );
        assert_eq!(
            parse_request(r#"{"cmd":"resume","force":true}"#),
            Ok(Request::Resume(ResumeRequest { force: true }))
        );
        assert_eq!(
            parse_request(r#"{"cmd":"shutdown"}"#),
            Ok(Request::Shutdown)
        );
        assert_eq!(parse_request(r#"{"cmd":"events"}"#), Ok(Request::Events));
        let detached = MigrateRequest {
            detach: true,
            ..MigrateRequest::new("tcp:10.0.0.2:4000")
        };
        assert_eq!(
            parse_request(r#"{"cmd":"migrate","to":"tcp:10.0.0.2:4000","detach":true}"#),
            Ok(Request::Migrate(Box::new(detached)))
        );
    }

    #[test]
    fn a_detached_migration_is_answered_at_once() {
        use serde_json::json;
        round_trip(
            Reply::Ok(MigrationStarted {
                to: "tcp:h:1".into(),
                detached: true,
            }),
            json!({"ok": true, "to": "tcp:h:1", "detached": true}),
        );
        let wire = serde_json::to_value(Reply::Ok(Response::from(MigrationStarted {
            to: "tcp:h:1".into(),
            detached: true,
        })))
        .expect("serialise");
        assert_eq!(wire["detached"], true);
        round_trip(
            Reply::Ok(VmStatus {
                state: RunState::Running,
                mem_bytes: 4096,
                cpus: 1,
                uptime_ms: 1,
                migration: None,
                last_migration: Some(EndedMigration {
                    to: "tcp:h:1".into(),
                    cancelled: false,
                    error: "refused".into(),
                }),
            }),
            json!({"ok": true, "state": "running", "mem_bytes": 4096, "cpus": 1,
                   "uptime_ms": 1, "last_migration": {"to": "tcp:h:1", "cancelled": false,
                   "error": "refused"}}),
        );
    }

    #[test]
    fn zero_waits_are_named_by_their_flag() {
        assert_eq!(MigrateRequest::new("unix:/x").zero_wait(), None);
        let r = MigrateRequest {
            io_timeout_ms: Some(0),
            deadline_ms: Some(5),
            ..MigrateRequest::new("unix:/x")
        };
        assert_eq!(r.zero_wait(), Some("--io-timeout-ms"));
        let r = MigrateRequest {
            switchover_timeout_ms: Some(0),
            ..MigrateRequest::new("unix:/x")
        };
        assert_eq!(r.zero_wait(), Some("--switchover-timeout-ms"));
    }

    #[test]
    fn every_command_is_spelled_once() {
        let migrate = MigrateRequest::new("file:/tmp/s");
        let all = [
            Request::Status,
            Request::Pause,
            Request::Resume(ResumeRequest::default()),
            Request::Shutdown,
            Request::Migrate(Box::new(migrate)),
            Request::Cancel,
            Request::Events,
        ];
        let names: Vec<&str> = all.iter().map(Request::name).collect();
        assert_eq!(names, COMMANDS);
        for req in all {
            let line = serde_json::to_string(&req).expect("serialise");
            let wire: Value = serde_json::from_str(&line).expect("json");
            assert_eq!(wire["cmd"], req.name(), "{line}");
            assert_eq!(parse_request(&line), Ok(req), "{line}");
        }
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
                .ends_with("(known: status, pause, resume, shutdown, migrate, cancel, events)"),
            "{e}"
        );
    }

    /// `value` serialises to `wire` and reads back from it.
    fn round_trip<T>(value: T, wire: Value)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_value(&value).expect("serialise"), wire);
        let back: T = serde_json::from_value(wire).expect("deserialise");
        assert_eq!(back, value);
    }

    #[test]
    fn replies_keep_the_wire_format() {
        use serde_json::json;
        round_trip(Reply::Ok(Done {}), json!({"ok": true}));
        round_trip(
            Reply::<Done>::error("no migration is running"),
            json!({"ok": false, "error": "no migration is running"}),
        );
        let progress = PassProgress {
            pass: 1,
            remaining_bytes: 8192,
            bandwidth_bps: 1000,
            dirty_rate_bps: 10,
            expected_downtime_ms: 1.5,
            diverging: false,
        };
        round_trip(
            ProgressLine {
                progress: progress.clone(),
            },
            json!({"progress": {"pass": 1, "remaining_bytes": 8192, "bandwidth_bps": 1000,
                   "dirty_rate_bps": 10, "expected_downtime_ms": 1.5, "diverging": false}}),
        );
        let mut vm = VmStatus {
            state: RunState::Running,
            mem_bytes: 512 << 20,
            cpus: 2,
            uptime_ms: 1234,
            migration: None,
            last_migration: None,
        };
        round_trip(
            Reply::Ok(Status::Vm(vm.clone())),
            json!({"ok": true, "state": "running", "mem_bytes": 536870912, "cpus": 2,
                   "uptime_ms": 1234}),
        );
        vm.migration = Some(OutgoingStatus {
            to: "unix:/m".into(),
            elapsed_ms: 7,
            cancelling: true,
            moved: false,
            outcome_unknown: false,
            last_pass: Some(progress),
            stats: None,
        });
        let wire = serde_json::to_value(Reply::Ok(vm.clone())).expect("serialise");
        assert_eq!(wire["migration"]["last_pass"]["pass"], 1, "{wire}");
        assert_eq!(wire["migration"]["cancelling"], true, "{wire}");
        round_trip(Reply::Ok(vm), wire);
        round_trip(
            Reply::Ok(Status::Incoming(IncomingStatus {
                state: IncomingState::Waiting,
                listen: "unix:/m".into(),
                progress: None,
            })),
            json!({"ok": true, "state": "waiting", "listen": "unix:/m"}),
        );
        round_trip(
            Reply::Ok(Status::Incoming(IncomingStatus {
                state: IncomingState::Receiving,
                listen: "tcp:h:1".into(),
                progress: Some(IncomingProgress {
                    pass: None,
                    received_bytes: 40,
                }),
            })),
            json!({"ok": true, "state": "receiving", "listen": "tcp:h:1", "pass": null,
                   "received_bytes": 40}),
        );
        round_trip(Reply::Ok(ShuttingDown::default()), json!({"ok": true}));
    }

    #[test]
    fn migrate_summary_round_trips() {
        use serde_json::json;
        let report = DestinationReport {
            rss_kib: 70000,
            pristine: true,
            reset: false,
            mem_hash: Some("00ff".into()),
            nonzero_pages: Some(3),
            tls_peer: Some("CN=src.example".into()),
        };
        let summary = MigrateSummary {
            to: "unix:/m".into(),
            total_ms: 76.25,
            downtime_ms: 1.0,
            passes: 2,
            bytes_sent: 67_310_496,
            pages_sent: 16_433,
            pages_zero_elided: 5,
            pages_zero_sent: 6,
            pages_untouched_skipped: 7,
            zero_elision: true,
            converged: true,
            max_throttle_pct: 0,
            nonzero_bytes: Some(3 * 4096),
            mem_hash_source: Some("00ff".into()),
            mem_hash_dest: Some("00ff".into()),
            source_rss_kib: 72000,
            dest_rss_kib: Some(70000),
            destination: Some(report),
            figures: MigrationFigures {
                total_time_ms: 76,
                setup_time_ms: 2.0,
                transferred_bytes: 67_310_496,
                remaining_bytes: 0,
                total_bytes: 4 << 30,
                duplicate_pages: 5 + 6,
                normal_pages: 16_433,
                normal_bytes: 16_433 * 4096,
                mbps: 7000.0,
                dirty_pages_rate: 0,
                dirty_sync_count: 2,
                expected_downtime_ms: None,
                downtime_ms: Some(1.0),
            },
            stats: json!({"stop_reason": "converged"}),
        };
        let wire = serde_json::to_value(Reply::Ok(summary.clone())).expect("serialise");
        assert_eq!(
            (
                &wire["ok"],
                &wire["destination"]["pristine"],
                &wire["total_ms"]
            ),
            (&json!(true), &json!(true), &json!(76.25))
        );
        round_trip(Reply::Ok(summary), wire);
    }

    #[test]
    fn migrate_lines_are_progress_then_the_reply() {
        let line: MigrateLine = serde_json::from_str(
            r#"{"progress":{"pass":2,"remaining_bytes":0,"bandwidth_bps":1,"dirty_rate_bps":0,
                "expected_downtime_ms":0.25,"diverging":true}}"#,
        )
        .expect("progress");
        assert!(
            matches!(&line, MigrateLine::Progress(p) if p.pass == 2 && p.diverging),
            "{line:?}"
        );
        let line: MigrateLine =
            serde_json::from_str(r#"{"ok":false,"error":"cancelled"}"#).expect("reply");
        assert_eq!(
            line,
            MigrateLine::Reply(Box::new(Reply::error("cancelled")))
        );
    }

    #[test]
    fn a_reply_needs_a_boolean_ok() {
        let r: Result<Reply<Done>, _> = serde_json::from_str(r#"{"error":"x"}"#);
        assert!(r.is_err());
        let r: Reply<Done> = serde_json::from_str(r#"{"ok":false}"#).expect("reply");
        assert_eq!(r, Reply::error("no error message"));
        let r: Result<Reply<VmStatus>, _> = serde_json::from_str(r#"{"ok":true,"state":"on"}"#);
        assert!(r.is_err(), "the body must match its type");
    }
}

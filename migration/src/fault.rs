//! Fault injection, compiled in: a named point at every step of both sides of a migration,
//! and what to do there (kill the process, stall past the deadlines, fail the operation, or
//! silence this side's direction of the link without closing it), as FoundationDB's
//! `BUGGIFY` points. The fault matrix (`e2e/tests/fault_matrix.rs`) runs every point with
//! every action on real processes and checks that the guest runs in exactly one of them.
//!
//! A fault is armed only through the process's environment ([`FaultSource::from_env`], variable
//! [`FAULT_ENV`]), which the vmm reads at start and logs loudly; nothing a control-socket
//! client or a stream peer sends can arm one.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::transport::{Deadline, GuestSpan, Transport};

/// The environment variable that arms a fault: `POINT:ACTION` or `POINT:stall:MS` (fires
/// once per process), or `@PATH`: a file holding such a spec, read again at the start of
/// every migration (empty or absent: none; fires once per migration). The file lets a test
/// fault many migrations of one long-lived process.
pub const FAULT_ENV: &str = "MINIVMM_FAULT";

/// How long a `stall` sleeps unless the variable says otherwise.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);

/// The steps of a migration at which a fault can be injected, on either side. Each side hits
/// the points in this order; the destination's are the same steps seen from its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Source: just connected. Destination: just accepted.
    Connect,
    /// Source: configuration sent, before reading `Ready`. Destination: before sending it.
    BeforeReady,
    /// At the first page record of the bulk pass (sending it; having read it).
    MidBulk,
    /// At the first page record of the first dirty pass.
    MidDirty,
    /// At the beginning of the final pass (the source's guest is paused).
    FinalPass,
    /// Source: before sending the device state. Destination: at the first state record.
    StateSend,
    /// After `End`, before `Restored` (source: before reading it; destination: before
    /// restoring and sending it).
    BeforeRestored,
    /// After `Restored`, before `Go` (source: before sending it; destination: before
    /// reading it).
    BeforeGo,
    /// After `Go`, before `Running` (source: before reading it; destination: the guest runs,
    /// before sending it).
    BeforeRunning,
    /// After `Running` (source: received it; destination: sent it).
    AfterRunning,
}

impl FaultPoint {
    /// Every point, in the order a migration passes them.
    pub const ALL: [FaultPoint; 10] = [
        FaultPoint::Connect,
        FaultPoint::BeforeReady,
        FaultPoint::MidBulk,
        FaultPoint::MidDirty,
        FaultPoint::FinalPass,
        FaultPoint::StateSend,
        FaultPoint::BeforeRestored,
        FaultPoint::BeforeGo,
        FaultPoint::BeforeRunning,
        FaultPoint::AfterRunning,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::Connect => "connect",
            FaultPoint::BeforeReady => "before-ready",
            FaultPoint::MidBulk => "mid-bulk",
            FaultPoint::MidDirty => "mid-dirty",
            FaultPoint::FinalPass => "final-pass",
            FaultPoint::StateSend => "state-send",
            FaultPoint::BeforeRestored => "before-restored",
            FaultPoint::BeforeGo => "before-go",
            FaultPoint::BeforeRunning => "before-running",
            FaultPoint::AfterRunning => "after-running",
        }
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens at the point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultAction {
    /// The process dies at once (`SIGKILL`), as on a host crash.
    Kill,
    /// The thread sleeps this long, then goes on: a stalled process or a frozen VM.
    Stall(Duration),
    /// The step fails with an error, as an I/O error would.
    Fail,
    /// From here on, whatever this side sends vanishes; nothing is closed and reading goes
    /// on: a link partitioned in one direction.
    Silence,
}

impl FaultAction {
    pub fn name(self) -> &'static str {
        match self {
            FaultAction::Kill => "kill",
            FaultAction::Stall(_) => "stall",
            FaultAction::Fail => "fail",
            FaultAction::Silence => "silence",
        }
    }
}

impl fmt::Display for FaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultAction::Stall(d) => write!(f, "stall:{}", d.as_millis()),
            other => f.write_str(other.name()),
        }
    }
}

/// One armed fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fault {
    pub point: FaultPoint,
    pub action: FaultAction,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.point, self.action)
    }
}

/// Why a fault specification was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultSpecError {
    #[error("fault {0:?}: expected POINT:ACTION or POINT:stall:MS")]
    Syntax(String),
    #[error("unknown fault point {0:?} (known: {known})", known = point_names())]
    Point(String),
    #[error("unknown fault action {0:?} (known: kill, stall, fail, silence)")]
    Action(String),
    #[error("bad stall duration {0:?}: expected milliseconds")]
    Stall(String),
}

fn point_names() -> String {
    FaultPoint::ALL.map(FaultPoint::name).join(", ")
}

impl FromStr for Fault {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<Fault, FaultSpecError> {
        let mut parts = s.split(':');
        let (Some(point), Some(action)) = (parts.next(), parts.next()) else {
            return Err(FaultSpecError::Syntax(s.to_string()));
        };
        let point = FaultPoint::ALL
            .into_iter()
            .find(|p| p.name() == point)
            .ok_or_else(|| FaultSpecError::Point(point.to_string()))?;
        let action = match (action, parts.next()) {
            ("kill", None) => FaultAction::Kill,
            ("fail", None) => FaultAction::Fail,
            ("silence", None) => FaultAction::Silence,
            ("stall", None) => FaultAction::Stall(DEFAULT_STALL),
            ("stall", Some(ms)) => FaultAction::Stall(Duration::from_millis(
                ms.parse()
                    .map_err(|_| FaultSpecError::Stall(ms.to_string()))?,
            )),
            (a, None) => return Err(FaultSpecError::Action(a.to_string())),
            _ => return Err(FaultSpecError::Syntax(s.to_string())),
        };
        if parts.next().is_some() {
            return Err(FaultSpecError::Syntax(s.to_string()));
        }
        Ok(Fault { point, action })
    }
}

/// Where a process's faults come from ([`FAULT_ENV`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultSource {
    /// One fault, fired once per process.
    Fixed(Fault),
    /// A file read at the start of each migration.
    File(PathBuf),
}

impl FaultSource {
    /// What [`FAULT_ENV`] arms, if anything.
    pub fn from_env() -> Result<Option<FaultSource>, FaultSpecError> {
        match std::env::var(FAULT_ENV) {
            Ok(spec) if !spec.is_empty() => FaultSource::parse(&spec).map(Some),
            _ => Ok(None),
        }
    }

    fn parse(spec: &str) -> Result<FaultSource, FaultSpecError> {
        match spec.strip_prefix('@') {
            Some(path) => Ok(FaultSource::File(PathBuf::from(path))),
            None => spec.parse().map(FaultSource::Fixed),
        }
    }

    /// The fault of the next migration: the fixed one, or what the file says now.
    pub fn next(&self) -> Result<Option<Fault>, FaultSpecError> {
        match self {
            FaultSource::Fixed(f) => Ok(Some(*f)),
            FaultSource::File(path) => match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => s.trim().parse().map(Some),
                _ => Ok(None),
            },
        }
    }
}

impl fmt::Display for FaultSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultSource::Fixed(fault) => write!(f, "{fault}"),
            FaultSource::File(path) => write!(f, "@{}", path.display()),
        }
    }
}

/// The error a `fail` fault returns.
#[derive(Debug, thiserror::Error)]
#[error("injected fault: fail at {0}")]
pub struct InjectedFault(pub FaultPoint);

/// The fault of a process (if armed) and the state it leaves in one migration (a silenced
/// link). A fault fires once per process, at the first time its point is reached, so that
/// the next migration (a retry, or the survivor's next one) runs clean. Cloning shares the
/// state; [`Faults::for_next_migration`] shares only whether it fired.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    fault: Option<Fault>,
    fired: Arc<AtomicBool>,
    silenced: Arc<AtomicBool>,
}

impl Faults {
    /// No fault.
    pub fn none() -> Faults {
        Faults::default()
    }

    pub fn new(fault: Option<Fault>) -> Faults {
        Faults {
            fault,
            fired: Arc::default(),
            silenced: Arc::default(),
        }
    }

    /// Whether any fault is armed.
    pub fn armed(&self) -> bool {
        self.fault.is_some()
    }

    /// The same fault for another migration of the process: fired if it fired, with a link
    /// of its own.
    pub fn for_next_migration(&self) -> Faults {
        Faults {
            fault: self.fault,
            fired: self.fired.clone(),
            silenced: Arc::default(),
        }
    }

    /// Whether this side's sends vanish.
    pub fn silenced(&self) -> bool {
        self.silenced.load(Ordering::Acquire)
    }

    /// Called when the migration reaches `point`: does what an armed fault there says.
    pub fn hit(&self, point: FaultPoint) -> io::Result<()> {
        let Some(fault) = self.fault.filter(|f| f.point == point) else {
            return Ok(());
        };
        if self.fired.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        log::warn!("INJECTING FAULT {fault}");
        match fault.action {
            FaultAction::Kill => {
                // SAFETY: kill(2) on our own pid; it does not return for SIGKILL.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            FaultAction::Stall(d) => {
                std::thread::sleep(d);
                Ok(())
            }
            FaultAction::Fail => Err(io::Error::other(InjectedFault(point))),
            FaultAction::Silence => {
                self.silenced.store(true, Ordering::Release);
                Ok(())
            }
        }
    }
}

/// A transport whose sends vanish once [`Faults`] silenced it (nothing is closed; receiving
/// goes on). Without an armed fault it passes everything through.
pub struct FaultyTransport<'t> {
    inner: &'t mut dyn Transport,
    faults: Faults,
}

impl<'t> FaultyTransport<'t> {
    pub fn new(inner: &'t mut dyn Transport, faults: Faults) -> FaultyTransport<'t> {
        FaultyTransport { inner, faults }
    }
}

impl Transport for FaultyTransport<'_> {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.faults.silenced() {
            return Ok(());
        }
        self.inner.send(parts)
    }

    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        if self.faults.silenced() {
            return Ok(());
        }
        self.inner.send_guest(parts, guest)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf)
    }

    fn wake_handle(&self) -> Option<std::os::fd::OwnedFd> {
        self.inner.wake_handle()
    }

    fn has_peer(&self) -> bool {
        self.inner.has_peer()
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }

    fn set_deadline(&mut self, deadline: Option<Deadline>) {
        self.inner.set_deadline(deadline)
    }

    fn commit(&mut self) -> io::Result<()> {
        self.inner.commit()
    }

    fn send_with_fds(
        &mut self,
        parts: &[&[u8]],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        if self.faults.silenced() {
            return Ok(());
        }
        self.inner.send_with_fds(parts, fds)
    }

    fn passes_fds(&self) -> bool {
        self.inner.passes_fds()
    }

    fn take_fds(&mut self) -> Vec<std::os::fd::OwnedFd> {
        self.inner.take_fds()
    }

    fn shutdown(&mut self) {
        self.inner.shutdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Connection;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!(
            "before-go:kill".parse(),
            Ok(Fault {
                point: FaultPoint::BeforeGo,
                action: FaultAction::Kill
            })
        );
        assert_eq!(
            "mid-bulk:stall:250".parse::<Fault>().map(|f| f.action),
            Ok(FaultAction::Stall(Duration::from_millis(250)))
        );
        for p in FaultPoint::ALL {
            for a in ["kill", "fail", "silence", "stall:1"] {
                let f: Fault = format!("{p}:{a}").parse().expect("every cell parses");
                assert_eq!(f.to_string(), format!("{p}:{a}"));
            }
        }
        assert!(matches!(
            "x:kill".parse::<Fault>(),
            Err(FaultSpecError::Point(_))
        ));
        assert!(matches!(
            "connect:boom".parse::<Fault>(),
            Err(FaultSpecError::Action(_))
        ));
        assert!(matches!(
            "connect".parse::<Fault>(),
            Err(FaultSpecError::Syntax(_))
        ));
        assert!(matches!(
            "connect:stall:x".parse::<Fault>(),
            Err(FaultSpecError::Stall(_))
        ));
        assert!(matches!(
            "connect:kill:1".parse::<Fault>(),
            Err(FaultSpecError::Syntax(_))
        ));
    }

    #[test]
    fn fail_fails_only_at_its_point_and_silence_swallows_sends() {
        let faults = Faults::new(Some(Fault {
            point: FaultPoint::MidDirty,
            action: FaultAction::Fail,
        }));
        assert!(faults.hit(FaultPoint::MidBulk).is_ok());
        let e = faults.hit(FaultPoint::MidDirty).unwrap_err();
        assert_eq!(e.to_string(), "injected fault: fail at mid-dirty");

        let faults = Faults::new(Some(Fault {
            point: FaultPoint::BeforeGo,
            action: FaultAction::Silence,
        }));
        let (mut a, mut b) = Connection::pair().expect("pair");
        let mut t = FaultyTransport::new(&mut a, faults.clone());
        t.send(&[b"before"]).expect("send");
        faults.hit(FaultPoint::BeforeGo).expect("silence");
        t.send(&[b"after"]).expect("a silenced send still succeeds");
        drop(t);
        drop(a);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match b.recv(&mut buf).expect("recv") {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(got, b"before");
    }
}

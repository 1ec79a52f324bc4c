//! End-to-end test harness: starts real `minivmm` (and QEMU) processes under real KVM, captures
//! their serial consoles line by line, talks to their control sockets and kills them on drop.
//!
//! The binary is `$MINIVMM_BIN` (the Makefile exports it), else `minivmm` next to the directory
//! that holds the test executable (`target/<profile>/deps/..`).
//!
//! KVM policy (`require_kvm!()`): a test that needs KVM runs when `/dev/kvm` opens read-write;
//! otherwise it panics when `MINIVMM_REQUIRE_KVM=1` (CI), else prints `SKIP: …` and returns.
//! The policy is `vmm::test_utils`, re-exported here so that the unit tests of `vmm` and these
//! end-to-end tests share one implementation.

pub mod events;
pub mod guest;
pub mod linux;
pub mod migrate;
pub mod peer;
pub mod qemu;
pub mod rig;

pub use vmm::require_kvm;
pub use vmm::test_utils::{kvm_available, kvm_policy};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use vmm::control::protocol::{Reply, Request, VmStatus};

/// Path of the `minivmm` binary under test.
pub fn minivmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIVMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("minivmm")
}

/// A path from an environment variable that the Makefile exports, when the file exists.
pub fn env_file(var: &str) -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os(var)?);
    p.exists().then_some(p)
}

/// A file the test needs from the Makefile: missing is a failure under `MINIVMM_REQUIRE_KVM=1`
/// (CI runs `make test`, which provides it), a skip elsewhere.
pub fn require_file(var: &str, test: &str) -> Option<PathBuf> {
    if let Some(p) = env_file(var) {
        return Some(p);
    }
    if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: ${var} is not set or missing; run through `make test`");
    }
    eprintln!("SKIP: {test}: ${var} not set (run through `make test`)");
    None
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("minivmm-e2e-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    partial: Vec<u8>,
    closed: bool,
}

type Shared = Arc<(Mutex<Captured>, Condvar)>;

fn capture<R: Read + Send + 'static>(mut r: R, tag: String, echo: bool) -> Shared {
    let shared: Shared = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
    let s2 = shared.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut c = lock(&s2);
            let cv = &s2.1;
            if n == 0 {
                if !c.partial.is_empty() {
                    let l = String::from_utf8_lossy(&c.partial).trim_end().to_string();
                    c.lines.push(l);
                    c.partial.clear();
                }
                c.closed = true;
                cv.notify_all();
                return;
            }
            c.partial.extend_from_slice(&buf[..n]);
            while let Some(pos) = c.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.partial.drain(..=pos).collect();
                let l = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if echo {
                    eprintln!("[{tag}] {l}");
                }
                c.lines.push(l);
            }
            cv.notify_all();
        }
    });
    shared
}

/// A running process (minivmm or QEMU) with captured stdout and stderr.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Shared,
    err: Shared,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Start `program args…` with piped stdio. Output lines are echoed to the test's stderr
    /// (visible with `--nocapture` and in failures).
    pub fn spawn(name: &str, program: &Path, args: &[String]) -> Proc {
        Proc::spawn_env(name, program, args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(name: &str, program: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let out = capture(child.stdout.take().expect("stdout"), name.to_string(), true);
        let err = capture(
            child.stderr.take().expect("stderr"),
            format!("{name} stderr"),
            true,
        );
        let stdin = child.stdin.take();
        Proc {
            name: name.to_string(),
            child,
            stdin,
            out,
            err,
            status: None,
        }
    }

    /// Start `minivmm` with the given arguments.
    pub fn minivmm(name: &str, args: &[&str]) -> Proc {
        Proc::minivmm_env(name, args, &[])
    }

    /// Start `minivmm` with extra environment variables (`MINIVMM_FAULT=...`).
    pub fn minivmm_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Proc::spawn_env(name, &minivmm_bin(), &args, env)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.out).lines.clone()
    }

    /// All stderr text so far.
    pub fn stderr(&self) -> String {
        lock(&self.err).lines.join("\n")
    }

    /// Number of stdout lines so far (use as a cursor for `wait_line_from`).
    pub fn line_count(&self) -> usize {
        lock(&self.out).lines.len()
    }

    /// Wait for a stdout line satisfying `pred`; panics with the log tail on timeout or exit.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line_from(0, what, timeout, pred)
    }

    /// Like `wait_line` but only considers lines at index `from` or later.
    pub fn wait_line_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.try_wait_line_from(from, timeout, &pred) {
            Ok(l) => l,
            Err(why) => panic!(
                "{}: waiting for {what}: {why}\n--- stdout tail ---\n{}\n--- stderr ---\n{}",
                self.name,
                tail(&self.lines(), 40),
                self.stderr()
            ),
        }
    }

    /// Wait for a matching stdout line; Err says why not (timeout or the process exited).
    pub fn try_wait_line_from(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: &dyn Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        loop {
            {
                let c = lock(&self.out);
                let cv = &self.out.1;
                while next < c.lines.len() {
                    if pred(&c.lines[next]) {
                        return Ok(c.lines[next].clone());
                    }
                    next += 1;
                }
                if c.closed {
                    drop(c);
                    let st = self.wait_exit(Duration::from_secs(5));
                    return Err(format!("output closed, exit status {st:?}"));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(format!("timed out after {timeout:?}"));
                }
                let wait = (deadline - now).min(Duration::from_millis(200));
                let _ = cv.wait_timeout(c, wait);
            }
        }
    }

    /// Type text on the process's stdin.
    pub fn type_text(&mut self, s: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = i.write_all(s.as_bytes());
            let _ = i.flush();
        }
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                // Let the capture threads drain the pipes.
                let t = Instant::now();
                while (!lock(&self.out).closed || !lock(&self.err).closed)
                    && t.elapsed() < Duration::from_secs(2)
                {
                    thread::sleep(Duration::from_millis(10));
                }
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }

    /// Resident set size in KiB (from /proc/PID/status); 0 once the process is gone.
    pub fn rss_kib(&self) -> u64 {
        vmm::procfs::rss_kib(Some(self.child.id()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Captured> {
    vmm::sync::lock(&s.0)
}

/// The last `n` lines joined.
pub fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Send one request to a control socket and read its reply, whose body is a `T`.
pub fn control<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<Reply<T>, String> {
    vmm::control::request(socket, request).map_err(|e| vmm::error_chain(&e))
}

/// [`control`] with a line sent as it is (for malformed requests).
pub fn control_line<T: DeserializeOwned>(socket: &Path, line: &str) -> Result<Reply<T>, String> {
    vmm::control::client::request_line(socket, line).map_err(|e| vmm::error_chain(&e))
}

/// The `status` of the VM behind a control socket; panics if it cannot be had.
pub fn vm_status(socket: &Path) -> VmStatus {
    control(socket, &Request::Status)
        .and_then(Reply::into_result)
        .unwrap_or_else(|e| panic!("status of {}: {e}", socket.display()))
}

/// Wait until a control socket accepts connections.
pub fn wait_for_socket(p: &mut Proc, socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        if !p.alive() {
            panic!(
                "{} exited before its control socket appeared: {}",
                p.name,
                p.stderr()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{}: control socket {} did not appear",
        p.name,
        socket.display()
    );
}

/// Parse `key=value` words of a line into a map (values keep their text).
pub fn kv(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

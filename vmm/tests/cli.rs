//! The `minivmm` binary as a user runs it: exit codes, error messages, the control socket,
//! signals. Guests are the hand-assembled PVH guest of `common`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use vmm::control::protocol::{
    Done, IncomingState, IncomingStatus, MigrateRequest, Reply, Request, ShuttingDown, VmStatus,
};
use vmm::{require_kvm, RunState};

#[allow(dead_code)] // each test binary uses part of the shared guest helpers
mod common;
use common::{GuestFile, MODE_ECHO, MODE_POWER_OFF, MODE_SPIN, MODE_TRIPLE_FAULT};

const BIN: &str = env!("CARGO_BIN_EXE_minivmm");

fn sock(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("minivmm-cli-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn run(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("minivmm {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn assert_fails(args: &[&str], code: i32, needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "minivmm {args:?}: {err}");
    assert!(
        err.contains(needle),
        "minivmm {args:?}: expected {needle:?} in {err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn usage_and_value_errors_exit_2() {
    let s = sock("usage");
    let s = s.to_str().expect("utf-8");
    assert_fails(&["run", "--bogus"], 2, "--bogus");
    assert_fails(&["frobnicate"], 2, "frobnicate");
    assert_fails(&["run", "--mem", "0", "--api-socket", s], 2, "--mem");
    assert_fails(&["run", "--mem", "lots", "--api-socket", s], 2, "lots");
    assert_fails(&["run", "--cpus", "0", "--api-socket", s], 2, "--cpus");
    assert_fails(&["run", "--cpus", "100000", "--api-socket", s], 2, "--cpus");
    assert_fails(&["run", "--mem", "1024T", "--api-socket", s], 2, "--mem");
    assert_fails(&["receive"], 2, "--listen");
    assert_fails(&["receive", "--from", "unix:/x"], 2, "file:");
    assert_fails(&["migrate"], 2, "--to");
    assert_fails(&["migrate", "--cancel", "--to", "x"], 2, "--cancel");
    assert_fails(&["migrate", "--to", "x", "--max-bandwidth", "zz"], 2, "zz");
    assert_fails(
        &["run", "--mem", "65M", "--mem-hugepages", "--api-socket", s],
        2,
        "multiple of 2M",
    );
}

#[test]
fn plot_draws_a_migration_and_names_bad_input() {
    let dir = std::env::temp_dir().join(format!("minivmm-cli-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let input = dir.join("mig.json");
    let svg = dir.join("mig.svg");
    let json = serde_json::json!({
        "ok": true, "to": "unix:/m",
        "stats": {
            "passes": [{"pass": 0, "kind": "bulk", "bytes": 67_108_864u64, "duration_us": 60_000,
                        "bandwidth_bps": 1_000_000_000u64, "dirty_rate_bps": 1_000_000},
                       {"pass": 1, "kind": "final", "bytes": 4096, "duration_us": 100,
                        "bandwidth_bps": 0, "dirty_rate_bps": 0}],
            "setup_phases_us": [["send configuration", 80]],
            "downtime_phases_us": [["pause", 90], ["destination restore", 300]],
            "total_duration_us": 61_000, "downtime_us": 900
        }
    });
    std::fs::write(&input, json.to_string()).expect("write");
    let out = run(&[
        "plot",
        input.to_str().expect("utf-8"),
        "-o",
        svg.to_str().expect("utf-8"),
        "--title",
        "idle & co",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = std::fs::read_to_string(&svg).expect("svg written");
    assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
    assert!(doc.contains("idle &amp; co") && doc.contains("destination restore"));

    std::fs::write(&input, "{\"ok\":false,\"error\":\"cancelled\"}").expect("write");
    assert_fails(&["plot", input.to_str().expect("utf-8")], 1, "cancelled");
    std::fs::write(&input, "not json").expect("write");
    assert_fails(&["plot", input.to_str().expect("utf-8")], 1, "is not JSON");
    assert_fails(
        &["plot", "/nonexistent/mig.json"],
        1,
        "cannot read /nonexistent/mig.json",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_kernel_and_initrd_files_exit_1_naming_the_file() {
    let s = sock("files");
    let s = s.to_str().expect("utf-8");
    let dir = std::env::temp_dir();
    let garbage = dir.join(format!("minivmm-cli-{}-garbage", std::process::id()));
    std::fs::write(&garbage, vec![0x5au8; 65536]).expect("garbage");
    let empty = dir.join(format!("minivmm-cli-{}-empty", std::process::id()));
    std::fs::write(&empty, b"").expect("empty");
    let (g, e) = (
        garbage.to_str().expect("utf-8"),
        empty.to_str().expect("utf-8"),
    );
    assert_fails(
        &["run", "--kernel", "/nonexistent/vmlinuz", "--api-socket", s],
        1,
        "/nonexistent/vmlinuz",
    );
    assert_fails(
        &["run", "--kernel", g, "--api-socket", s],
        1,
        "neither a bzImage nor an ELF",
    );
    assert_fails(&["run", "--kernel", e, "--api-socket", s], 1, "is empty");
    assert_fails(
        &[
            "run",
            "--kernel",
            g,
            "--initrd",
            "/nonexistent/initrd",
            "--api-socket",
            s,
        ],
        1,
        "/nonexistent/initrd",
    );
    let _ = std::fs::remove_file(garbage);
    let _ = std::fs::remove_file(empty);
    assert!(!Path::new(s).exists(), "no socket left behind");
}

#[test]
fn guest_power_off_exits_0_and_triple_fault_exits_1() {
    require_kvm!();
    let s = sock("ends");
    let g = GuestFile::new("cli-off", MODE_POWER_OFF);
    let out = run(&[
        "run",
        "--kernel",
        g.0.to_str().expect("utf-8"),
        "--cmdline",
        "bye",
        "--api-socket",
        s.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bye\n3\n");
    assert!(!s.exists(), "socket removed at exit");

    let g = GuestFile::new("cli-fault", MODE_TRIPLE_FAULT);
    let out = run(&[
        "run",
        "--kernel",
        g.0.to_str().expect("utf-8"),
        "--api-socket",
        s.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: vCPU 0:") && err.contains("KVM_EXIT_"),
        "{err}"
    );
}

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (30 s at most) until the control socket at `s` accepts connections.
fn wait_for_socket(s: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(s).is_err() {
        assert!(Instant::now() < deadline, "control socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_spinner(tag: &str, s: &Path, guest: &GuestFile) -> Vm {
    let child = Command::new(BIN)
        .args([
            "run",
            "--kernel",
            guest.0.to_str().expect("utf-8"),
            "--cpus",
            "2",
            "--cmdline",
            tag,
        ])
        .arg("--api-socket")
        .arg(s)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for_socket(s);
    Vm(child)
}

type Conn = (UnixStream, BufReader<UnixStream>);

/// Send `req` on the connection and read the reply, whose body is a `T`.
fn ask<T: DeserializeOwned>(conn: &mut Conn, req: &Request) -> Reply<T> {
    ask_line(conn, &serde_json::to_string(req).expect("encode"))
}

/// [`ask`] with a line sent as it is.
fn ask_line<T: DeserializeOwned>(conn: &mut Conn, req: &str) -> Reply<T> {
    conn.0.write_all(req.as_bytes()).expect("send");
    conn.0.write_all(b"\n").expect("send");
    let mut line = String::new();
    conn.1.read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("reply of the expected form")
}

/// The `status` of a VM.
fn status(conn: &mut Conn) -> VmStatus {
    ask(conn, &Request::Status).into_result().expect("status")
}

/// Whether a reply is an error containing `needle`.
fn refused<T>(r: &Reply<T>, needle: &str) -> bool {
    matches!(r, Reply::Error(e) if e.contains(needle))
}

fn wait_exit(vm: &mut Vm) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = vm.0.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "minivmm did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn control_socket_session_and_shutdown() {
    require_kvm!();
    let s = sock("session");
    let g = GuestFile::new("cli-spin", MODE_SPIN);
    let mut vm = spawn_spinner("session", &s, &g);
    let mode = std::fs::metadata(&s).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let stream = UnixStream::connect(&s).expect("connect");
    let mut conn = (stream.try_clone().expect("clone"), BufReader::new(stream));
    let r = status(&mut conn);
    assert_eq!(
        (r.state, r.cpus, r.mem_bytes),
        (RunState::Running, 2, 512 << 20)
    );
    let r = ask_line::<Done>(&mut conn, "this is not json");
    assert!(refused(&r, "JSON"), "{r:?}");
    let r = ask_line::<Done>(&mut conn, r#"{"cmd":"explode"}"#);
    assert!(refused(&r, "explode"), "{r:?}");
    assert_eq!(ask(&mut conn, &Request::Pause), Reply::Ok(Done {}));
    assert_eq!(status(&mut conn).state, RunState::Paused);
    assert_eq!(
        ask(&mut conn, &Request::Resume(Default::default())),
        Reply::Ok(Done {})
    );
    assert_eq!(status(&mut conn).state, RunState::Running);

    // A second minivmm on the live socket is refused.
    let g2 = GuestFile::new("cli-spin2", MODE_SPIN);
    assert_fails(
        &[
            "run",
            "--kernel",
            g2.0.to_str().expect("utf-8"),
            "--api-socket",
            s.to_str().expect("utf-8"),
        ],
        1,
        "in use",
    );

    // The library client.
    let r = vmm::control::request::<VmStatus>(&s, &Request::Status).expect("client");
    assert!(r.is_ok(), "{r:?}");

    assert_eq!(
        ask(&mut conn, &Request::Shutdown),
        Reply::Ok(ShuttingDown::default())
    );
    assert!(wait_exit(&mut vm).success());
    assert!(!s.exists(), "socket removed");
    let mut out = String::new();
    vm.0.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert_eq!(out, "session\n3\n");
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    require_kvm!();
    for (sig, tag) in [(libc::SIGTERM, "term"), (libc::SIGINT, "int")] {
        let s = sock(tag);
        let g = GuestFile::new(tag, MODE_SPIN);
        let mut vm = spawn_spinner(tag, &s, &g);
        // SAFETY: kill(2) on our own child; no memory involved.
        unsafe { libc::kill(vm.0.id() as i32, sig) };
        assert!(wait_exit(&mut vm).success(), "signal {sig} exits 0");
        assert!(!s.exists(), "socket removed after signal {sig}");
    }
}

/// A `minivmm receive --listen unix:LISTEN`, once its control socket answers (by then it
/// listens on LISTEN too).
fn spawn_receiver(listen: &Path, api: &Path) -> Vm {
    let child = Command::new(BIN)
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", listen.display()))
        .arg("--api-socket")
        .arg(api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let vm = Vm(child);
    wait_for_socket(api);
    vm
}

/// `minivmm receive` has no event loop until a guest arrives. Meanwhile its control socket
/// answers (status says what it does, requests needing a VM are refused, shutdown gives up),
/// and a signal or a shutdown, while it waits, while a peer is half way through its stream
/// header (still waiting: no stream began) or while a stream is half received, ends it
/// cleanly without starting a guest, and the peer is told why.
#[test]
fn receive_answers_and_ends_cleanly_before_a_guest_arrives() {
    require_kvm!();
    let config = vmm::test_utils::host_migration_config(64 << 20, 1).expect("host config");
    let start = vmm::test_utils::stream_start(&serde_json::to_vec(&config).expect("json"));
    // (how it is ended, bytes of a stream a source sends first, the state status reports)
    for (end, tag, feed, state) in [
        (Some(libc::SIGTERM), "rx-wait", None, IncomingState::Waiting),
        (
            Some(libc::SIGINT),
            "rx-part",
            Some(&start[..]),
            IncomingState::Receiving,
        ),
        (
            None,
            "rx-shut",
            Some(&b"MINIVMM"[..]),
            IncomingState::Waiting,
        ),
    ] {
        let api = sock(&format!("{tag}-api"));
        let listen = sock(tag);
        let mut vm = spawn_receiver(&listen, &api);
        let mut peer = feed.map(|bytes| {
            let mut c = UnixStream::connect(&listen).expect("connect as the source");
            c.write_all(bytes).expect("feed");
            c
        });
        let stream = UnixStream::connect(&api).expect("control socket");
        let mut conn = (stream.try_clone().expect("clone"), BufReader::new(stream));
        // The first status may come before the receiving thread took the connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r: IncomingStatus = ask(&mut conn, &Request::Status)
                .into_result()
                .expect("status");
            if r.state == state {
                break;
            }
            assert!(Instant::now() < deadline, "{tag}: status stays {r:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = ask::<Done>(
            &mut conn,
            &Request::Migrate(Box::new(MigrateRequest::new("file:/dev/null"))),
        );
        let doing = match state {
            IncomingState::Waiting => "waiting",
            IncomingState::Receiving => "receiving",
        };
        assert!(
            refused(&r, "no VM to migrate") && refused(&r, doing),
            "{tag}: {r:?}"
        );
        let needle = match end {
            Some(sig) => {
                // SAFETY: kill(2) on our own child; no memory involved.
                unsafe { libc::kill(vm.0.id() as i32, sig) };
                format!("signal {sig}")
            }
            None => {
                let r = ask::<ShuttingDown>(&mut conn, &Request::Shutdown);
                assert!(r.is_ok(), "{r:?}");
                "shutdown request".to_string()
            }
        };
        let status = wait_exit(&mut vm);
        let mut err = String::new();
        vm.0.stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        assert!(status.success(), "{tag}: exits 0: {err}");
        assert!(err.contains(&needle), "{tag}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!api.exists() && !listen.exists(), "{tag}: sockets removed");
        // The source is told why in an Error reply (a 16-byte record header, then the text).
        if let Some(peer) = &mut peer {
            let mut reply = Vec::new();
            let _ = peer.read_to_end(&mut reply);
            let text = String::from_utf8_lossy(reply.get(16..).unwrap_or_default());
            assert!(
                text.contains("The destination gave the migration up"),
                "{tag}: reply {reply:?}"
            );
        }
    }
}

/// A connection that closes without a byte (a health check) is not a migration attempt, and a
/// second destination on the same path is refused instead of taking the path over.
#[test]
fn receive_ignores_probes_and_refuses_a_second_listener() {
    let api = sock("probe-api");
    let listen = sock("probe");
    let mut vm = spawn_receiver(&listen, &api);
    for _ in 0..3 {
        drop(UnixStream::connect(&listen).expect("probe"));
    }
    let api2 = sock("probe-api2");
    assert_fails(
        &[
            "receive",
            "--listen",
            &format!("unix:{}", listen.display()),
            "--api-socket",
            api2.to_str().expect("utf-8"),
        ],
        1,
        "in use",
    );
    assert!(listen.exists(), "the first destination keeps its socket");
    let stream = UnixStream::connect(&api).expect("control socket");
    let mut conn = (stream.try_clone().expect("clone"), BufReader::new(stream));
    // The probes end quickly; the destination is back to waiting after each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ask::<IncomingStatus>(&mut conn, &Request::Status);
        if matches!(&r, Reply::Ok(s) if s.state == IncomingState::Waiting) {
            break;
        }
        assert!(Instant::now() < deadline, "status stays {r:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(vm.0.try_wait().expect("wait").is_none(), "still running");
    let r = ask::<ShuttingDown>(&mut conn, &Request::Shutdown);
    assert!(r.is_ok(), "{r:?}");
    assert!(wait_exit(&mut vm).success());
    assert!(!listen.exists() && !api.exists(), "sockets removed");
}

#[test]
fn stale_socket_file_is_replaced() {
    require_kvm!();
    let s = sock("stale");
    drop(std::os::unix::net::UnixListener::bind(&s).expect("stale socket"));
    let g = GuestFile::new("stale", MODE_SPIN);
    let mut vm = spawn_spinner("stale", &s, &g);
    let r = vmm::control::request::<VmStatus>(&s, &Request::Status).expect("status");
    assert!(r.is_ok(), "{r:?}");
    let r = vmm::control::request::<ShuttingDown>(&s, &Request::Shutdown).expect("shutdown");
    assert!(r.is_ok(), "{r:?}");
    assert!(wait_exit(&mut vm).success());
    assert!(!s.exists(), "socket removed");
}

#[test]
fn stdin_reaches_the_guest_through_the_uart() {
    require_kvm!();
    let s = sock("echo");
    let g = GuestFile::new("echo", MODE_ECHO);
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--kernel",
            g.0.to_str().expect("utf-8"),
            "--cmdline",
            "echo",
        ])
        .arg("--api-socket")
        .arg(&s)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // More than the 64-byte FIFO holds, so input flow control is exercised too; `a`..`p`
    // only, as `q` ends the guest.
    let input: Vec<u8> = (0..200).map(|i| b'a' + (i % 16) as u8).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&input).expect("type");
    stdin.write_all(b"q").expect("type");
    // Closing stdin must not end the VM; the guest powers off after `q`.
    drop(stdin);
    let mut vm = Vm(child);
    assert!(wait_exit(&mut vm).success());
    let mut out = Vec::new();
    vm.0.stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read");
    let expected: Vec<u8> = b"echo\n3\n"
        .iter()
        .copied()
        .chain(input.iter().map(|b| b + 1))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&expected)
    );
}

//! Bad input gets a clear error naming what was wrong, a non-zero exit and no panic.

use std::time::Duration;

use e2e::{control, control_line, require_kvm, vm_status, wait_for_socket, Proc, TempDir};
use vmm::control::protocol::{Done, Reply, Request, ShuttingDown};
use vmm::RunState;

/// Run minivmm to completion; returns (exit code, stderr).
fn run_fail(args: &[&str]) -> (i32, String) {
    let mut p = Proc::minivmm("bad", args);
    let st = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("minivmm {args:?} did not exit: {}", p.stderr()));
    let err = p.stderr();
    assert!(
        !err.contains("panicked"),
        "minivmm {args:?} panicked: {err}"
    );
    (st.code().unwrap_or(-1), err)
}

fn assert_refused(args: &[&str], needle: &str) {
    let (code, err) = run_fail(args);
    assert_ne!(code, 0, "minivmm {args:?} must fail");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "minivmm {args:?}: error should mention {needle:?}, got: {err}"
    );
}

/// A command-line error: exit status 2, and the message names `needles` (what was wrong).
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let (code, err) = run_fail(args);
    assert_eq!(code, 2, "minivmm {args:?} is a command-line error: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "minivmm {args:?}: error should mention {needle:?}, got: {err}"
        );
    }
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "one error line: {err}"
    );
}

/// A malformed endpoint is refused before anything is built, bound or connected: the flag,
/// the value and what is wrong with it, exit status 2. `migrate --to` checks it on the
/// client side (no VM and no control socket is asked: the one given here does not exist).
#[test]
fn malformed_endpoints_are_command_line_errors() {
    let dir = TempDir::new("bad-endpoints");
    let api = dir.join("none.api");
    let api = api.to_str().expect("utf-8");
    let long = format!("unix:/{}", "x".repeat(200));
    let cases: &[(&str, &str)] = &[
        ("bogus", "has no scheme"),
        ("ftp:/x", "Unknown endpoint scheme \"ftp\""),
        ("unix:", "has an empty path"),
        ("tcp:localhost", "needs HOST:PORT"),
        ("tcp:127.0.0.1:99999", "Bad port \"99999\""),
        ("tcp::80", "has an empty host"),
        ("tcp:[::1:80", "needs HOST:PORT"),
        (&long, "the limit is 107"),
    ];
    for &(uri, what) in cases {
        let quoted = format!("{uri:?}");
        assert_usage_error(
            &["receive", "--listen", uri, "--api-socket", api],
            &["--listen", &quoted, what],
        );
        assert_usage_error(
            &["migrate", "--to", uri, "--api-socket", api],
            &["--to", &quoted, what],
        );
    }
    assert_usage_error(
        &["receive", "--from", "unix:", "--api-socket", api],
        &["--from", "has an empty path"],
    );
    assert_usage_error(
        &[
            "receive",
            "--listen",
            "file:/tmp/x.snap",
            "--api-socket",
            api,
        ],
        &["--listen takes unix:PATH or tcp:HOST:PORT"],
    );
    assert_usage_error(
        &["migrate", "--to", "tcp:127.0.0.1:0", "--api-socket", api],
        &["--to", "port 0 is only for --listen"],
    );
    // Several connections: a count in range, a destination that can take them.
    let to = ["migrate", "--to", "unix:/tmp/x.sock", "--api-socket", api];
    for n in ["0", "17"] {
        assert_usage_error(
            &[&to[..], &["--connections", n]].concat(),
            &["--connections", n, "1..=16"],
        );
    }
    assert_usage_error(
        &[
            "migrate",
            "--to",
            "file:/tmp/x.snap",
            "--connections",
            "2",
            "--api-socket",
            api,
        ],
        &["--connections 2", "a file: snapshot is one stream"],
    );
    assert_usage_error(
        &[&to[..], &["--local", "--connections", "4"]].concat(),
        &["--connections with --local", "copies no memory"],
    );
    // A wait of 0 ms, as `receive` refuses its own.
    for flag in [
        "--io-timeout-ms",
        "--switchover-timeout-ms",
        "--deadline-ms",
    ] {
        assert_usage_error(
            &[&to[..], &[flag, "0"]].concat(),
            &[flag, "must be at least 1 (milliseconds)"],
        );
    }
}

#[test]
fn unknown_flags_and_subcommands() {
    assert_refused(&["run", "--bogus"], "--bogus");
    assert_refused(&["frobnicate"], "frobnicate");
    assert_refused(&["run", "--mem"], "--mem");
}

#[test]
fn bad_sizes_and_counts() {
    let dir = TempDir::new("bad-sizes");
    let api = dir.join("api.sock");
    let api = api.to_str().unwrap();
    assert_refused(&["run", "--mem", "0", "--api-socket", api], "mem");
    assert_refused(&["run", "--mem", "lots", "--api-socket", api], "lots");
    assert_refused(&["run", "--cpus", "0", "--api-socket", api], "cpus");
    assert_refused(&["run", "--cpus", "100000", "--api-socket", api], "cpus");
    let sock = dir.join("mig.sock");
    let listen = format!("unix:{}", sock.display());
    let receive = |extra: &[&str]| {
        let mut args = vec!["receive", "--listen", &listen, "--api-socket", api];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let refused = |extra: &[&str], what: &str| {
        let args = receive(extra);
        assert_refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), what);
    };
    refused(&["--mem", "0", "--cpus", "1"], "mem");
    refused(&["--mem", "1G", "--cpus", "0"], "cpus");
    refused(&["--mem", "1G"], "--cpus");
    refused(&["--cpus", "1"], "--mem");
}

#[test]
fn memory_beyond_what_the_host_can_map() {
    require_kvm!();
    let dir = TempDir::new("bad-mem");
    let api = dir.join("api.sock");
    assert_refused(
        &[
            "run",
            "--mem",
            "1024T",
            "--api-socket",
            api.to_str().unwrap(),
        ],
        "mem",
    );
}

#[test]
fn missing_and_garbage_kernel_or_initrd() {
    let dir = TempDir::new("bad-kernel");
    let api = dir.join("api.sock");
    let api = api.to_str().unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 64 * 1024]).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.join("nope");
    let (g, e, m) = (
        garbage.to_str().unwrap(),
        empty.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    assert_refused(&["run", "--kernel", m, "--api-socket", api], "nope");
    assert_refused(&["run", "--kernel", g, "--api-socket", api], "kernel");
    assert_refused(&["run", "--kernel", e, "--api-socket", api], "kernel");
    assert_refused(&["run", "--initrd", m, "--api-socket", api], "nope");
    if e2e::kvm_available() {
        if let Some(k) = e2e::env_file("MINIVMM_KERNEL") {
            let k = k.to_str().unwrap().to_string();
            assert_refused(
                &["run", "--kernel", &k, "--initrd", m, "--api-socket", api],
                "nope",
            );
        }
    }
}

#[test]
fn control_socket_rejects_bad_requests_and_live_socket_is_refused() {
    require_kvm!();
    let dir = TempDir::new("bad-control");
    let api = dir.join("api.sock");
    let mut vm = Proc::minivmm(
        "vm",
        &[
            "run",
            "--cmdline",
            "touch=8M rate=0",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    wait_for_socket(&mut vm, &api, Duration::from_secs(30));

    let r = control_line::<Done>(&api, "this is not json").expect("reply");
    assert!(
        matches!(&r, Reply::Error(e) if e.to_lowercase().contains("json")),
        "{r:?}"
    );

    let r = control_line::<Done>(&api, r#"{"cmd":"explode"}"#).expect("reply");
    assert!(
        matches!(&r, Reply::Error(e) if e.contains("explode")),
        "{r:?}"
    );

    let r = vm_status(&api);
    assert_eq!((r.state, r.cpus), (RunState::Running, 1), "{r:?}");

    // A second VMM on the same live socket is refused.
    assert_refused(&["run", "--api-socket", api.to_str().unwrap()], "socket");

    // pause / resume / shutdown.
    assert_eq!(control(&api, &Request::Pause), Ok(Reply::Ok(Done {})));
    assert_eq!(vm_status(&api).state, RunState::Paused);
    assert_eq!(
        control(&api, &Request::Resume(Default::default())),
        Ok(Reply::Ok(Done {}))
    );
    let r = control::<ShuttingDown>(&api, &Request::Shutdown).expect("shutdown");
    assert!(r.is_ok(), "{r:?}");
    let st = vm.wait_exit(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "shutdown exits 0: {st:?}");
}

#[test]
fn stale_socket_file_is_replaced() {
    require_kvm!();
    let dir = TempDir::new("stale");
    let api = dir.join("api.sock");
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&api).unwrap());
    assert!(api.exists());
    let mut vm = Proc::minivmm(
        "vm",
        &[
            "run",
            "--cmdline",
            "touch=8M rate=0",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    wait_for_socket(&mut vm, &api, Duration::from_secs(30));
    vm_status(&api);
}

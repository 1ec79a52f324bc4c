//! A destination fed a bad or truncated stream exits with a clear error and never starts a
//! half-restored guest; a destination that may retry resets its memory first.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use e2e::migrate::{
    assert_hashes_match, assert_keeps_verifying, assert_no_guest_ran, migrate, migrate_ok, Vm, T,
};
use e2e::{require_kvm, TempDir};

#[test]
fn garbage_on_the_migration_socket_is_refused() {
    require_kvm!();
    let dir = TempDir::new("bad-stream");
    let sock = dir.join("mig.sock");
    let mut dst = Vm::receive(&dir, "dst", &format!("unix:{}", sock.display()), &[]);
    let mut s = UnixStream::connect(&sock).expect("connect");
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n");
    drop(s);
    let st = dst.proc.wait_exit(T).expect("destination exits");
    assert!(!st.success(), "a bad stream ends the destination non-zero");
    let err = dst.proc.stderr();
    assert!(err.contains("error"), "clear error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_no_guest_ran(&dst.proc);
}

#[test]
fn truncated_snapshot_is_refused() {
    require_kvm!();
    let dir = TempDir::new("bad-snap");
    let mut src = Vm::run(&dir, "src", "256M", 1, "touch=16M rate=0 seed=21");
    src.rounds(0, 1);
    let snap = dir.join("vm.snap");
    migrate_ok(&mut src, &format!("file:{}", snap.display()), &[]);
    let len = std::fs::metadata(&snap).expect("snapshot").len();
    for cut in [16, len / 2, len - 8] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&snap)
            .expect("open");
        f.set_len(cut).expect("truncate");
        drop(f);
        let mut p = e2e::Proc::minivmm(
            "restore-truncated",
            &[
                "receive",
                "--from",
                &format!("file:{}", snap.display()),
                "--api-socket",
                dir.join("r.api").to_str().unwrap(),
            ],
        );
        let st = p.wait_exit(T).expect("exits");
        assert!(!st.success(), "truncated at {cut}: must fail");
        let err = p.stderr();
        assert!(
            err.contains("error") && !err.contains("panicked"),
            "cut {cut}: {err}"
        );
        assert_no_guest_ran(&p);
    }
}

/// An attempt that dies mid-stream, retried into the same destination process: the destination
/// makes its memory pristine again before it accepts elided pages, and ends identical.
#[test]
fn retry_into_the_same_destination_after_a_broken_attempt() {
    require_kvm!();
    let dir = TempDir::new("retry");
    // The first migration fails at the final pass (the bulk pass is in the destination's
    // memory by then); the fault fires once per process, the retry runs clean.
    let fault = [("MINIVMM_FAULT", "final-pass:fail")];
    let mut src = Vm::run_env(&dir, "src", "1G", 1, "touch=128M rate=5000 seed=22", &fault);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--attempts", "2"]);
    let m = migrate(&src.api, &uri, &[]);
    assert!(
        !m.ok,
        "the injected failure fails the attempt: {:?}",
        m.reply
    );
    assert!(src.proc.alive(), "source survives");
    src.rounds(0, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dst.proc.alive(),
        "destination waits for the retry: {}",
        dst.proc.stderr()
    );
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
}

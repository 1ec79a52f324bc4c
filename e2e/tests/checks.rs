//! The checks the other tests rely on can fail: the guest's own verifier reports a page that
//! lost a write, and the harness sees it; a destination that takes a retry without making
//! its memory zero again would hold stale pages where the source has zeros, which the
//! guest's verifier and the memory hashes catch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use e2e::guest::assert_no_failure;
use e2e::migrate::{assert_hashes_match, assert_keeps_verifying, migrate, migrate_ok, Vm, T};
use e2e::{kv, require_kvm, TempDir};

/// `lose_write=4` makes CPU 0 record a rewrite of one page after its 4th round without
/// writing it, as a migration that lost a dirty page would leave it. Migrated after round 1,
/// the guest reports that page stale on the destination every round from then on, and
/// `assert_no_failure`, on which every migration test relies, rejects it. The memory hashes
/// of source and destination still agree: the stream carried memory exactly, the fault is in
/// the guest's own bookkeeping, which only the guest's verifier can see.
#[test]
fn a_lost_write_fails_the_guests_verifier_and_the_harness_sees_it() {
    require_kvm!();
    let dir = TempDir::new("chk-lost");
    let mut src = Vm::run(
        &dir,
        "src",
        "256M",
        1,
        "touch=16M rate=500 seed=41 verify_ms=500 lose_write=4",
    );
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    // The self-test fires on whichever side runs the guest at its 4th round.
    let lost_on = |lines: Vec<String>| {
        lines
            .into_iter()
            .find(|l| l.starts_with("TESTGUEST lost-write"))
    };
    let lost = match lost_on(src.proc.lines()) {
        Some(l) => l,
        None => dst.proc.wait_line("the lost write", T, |l| {
            l.starts_with("TESTGUEST lost-write")
        }),
    };
    let page = kv(&lost)["page"].clone();
    let fail = dst.proc.wait_line("the stale page reported", T, |l| {
        l.starts_with("VERIFY-FAIL") && kv(l).get("page") == Some(&page)
    });
    let f = kv(&fail);
    let gen: u64 = kv(&lost)["gen"].parse().expect("gen");
    assert_eq!(
        (f["kind"].as_str(), f["expected_gen"].parse::<u64>().ok()),
        ("owned", Some(gen)),
        "{fail}"
    );
    assert_eq!(
        f["found"],
        format!("gen{}", gen - 1),
        "a stale page: {fail}"
    );
    dst.proc.wait_line("the failed round", T, |l| {
        l.starts_with("VERIFY-ROUND-FAILED")
    });
    let seen = catch_unwind(AssertUnwindSafe(|| assert_no_failure(&dst.proc)));
    assert!(
        seen.is_err(),
        "assert_no_failure must reject a guest that reported {fail}"
    );
}

/// A first attempt copies the guest's working set into the destination and fails at the
/// final pass (`--attempts 2`: the destination waits for the retry). Then the guest zeroes
/// the first 16 MiB of it again (`scrub=`, done once its fill ends), and the retry elides
/// those pages as zero. The destination must therefore make its memory zero again before it
/// accepts elided pages: one that kept the first attempt's data would hold stale non-zero
/// pages there, which the destination's memory hash (checked before it resumes) and the
/// guest's own verifier (scrubbed pages must read zero) would both report.
#[test]
fn a_retry_leaves_no_stale_page_where_the_guest_zeroed_memory() {
    require_kvm!();
    let dir = TempDir::new("chk-retry");
    let fault = [("MINIVMM_FAULT", "final-pass:fail")];
    // 128 MiB filled at 4,000 pages/s (8 s); its first 16 MiB (4,096 pages, the first second
    // of the fill) are zeroed again when the fill ends.
    let mut src = Vm::run_env(
        &dir,
        "src",
        "512M",
        1,
        "touch=128M scrub=16M fill_rate=4000 rate=0 seed=42 verify_ms=500",
        &fault,
    );
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--attempts", "2"]);
    src.proc
        .wait_line("layout", T, |l| l.starts_with("TESTGUEST layout"));
    std::thread::sleep(Duration::from_secs(3));
    let m = migrate(&src.api, &uri, &[]);
    assert!(!m.ok, "the injected fault fails the first attempt");
    assert!(
        !src.proc.lines().iter().any(|l| l.starts_with("FILL-DONE")),
        "the first attempt must end before the guest zeroes its scrubbed pages; it ended \
         after (the guest filled faster than 4,000 pages/s?)"
    );
    assert!(src.proc.alive() && dst.proc.alive(), "both wait");
    src.proc
        .wait_line("fill done", T, |l| l.starts_with("FILL-DONE"));
    src.rounds(0, 1);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    let reset = stats.destination.as_ref().map(|d| d.reset);
    assert_eq!(
        (stats.zero_elision, reset),
        (true, Some(true)),
        "the retry found memory written, reset it and then took elided pages: {stats:?}"
    );
    assert!(
        stats.pages_zero_elided >= 4096,
        "the scrubbed pages were elided: {stats:?}"
    );
    assert_keeps_verifying(&mut dst, 1);
}

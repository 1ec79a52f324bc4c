//! Local migrations between two fake VMs over a real unix socket pair: guest memory goes
//! across as memfd descriptors, only state is copied; the refusals; a failure before `Go`.

use std::thread;
use std::time::Duration;

use migration::fake::{fake_target, FakeVm};
use migration::fault::{Fault, FaultAction, FaultPoint, Faults};
use migration::{
    receive_migration, send_migration, Connection, DestinationError, Endpoint, MigrationStats,
    ReceiveOptions, ReceiveStats, SendOptions, SourceError, StateBlob, Transport, PAGE_SIZE,
};

const LAYOUT: &[(u64, usize)] = &[(0, 2 << 20), (0x1_0000_0000, 1 << 20)];

fn states() -> Vec<StateBlob> {
    vec![StateBlob {
        id: "vcpu0".into(),
        version: 1,
        data: (0..100u8).collect(),
    }]
}

fn source(shared: bool) -> FakeVm {
    let mut vm = if shared {
        FakeVm::new_shared(LAYOUT)
    } else {
        FakeVm::new(LAYOUT)
    };
    vm.states = states();
    let w = vm.writer();
    for i in 0..64u64 {
        w.write(i * 3 * PAGE_SIZE as u64 + 8, &i.to_le_bytes());
    }
    w.write(0x1_0000_0000 + 4096, b"second region");
    vm
}

fn local() -> SendOptions {
    SendOptions {
        local: true,
        io_timeout: Duration::from_secs(5),
        ..SendOptions::default()
    }
}

type Outcome = (
    Result<MigrationStats, SourceError>,
    Result<ReceiveStats, DestinationError>,
    FakeVm,
);

fn migrate(src: &mut FakeVm, mut dst: FakeVm, opts: SendOptions, ropts: ReceiveOptions) -> Outcome {
    let (mut a, mut b) = Connection::pair().unwrap();
    let dest = thread::spawn(move || {
        let r = receive_migration(&mut dst, &mut b, &ropts);
        (r, dst)
    });
    let s = send_migration(src, &mut a, opts);
    a.shutdown();
    let (r, dst) = dest.join().unwrap();
    (s, r, dst)
}

#[test]
fn a_local_migration_hands_the_memory_over_and_copies_only_state() {
    let mut src = source(true);
    // A guest that keeps writing until it is paused: its writes land in the shared memory.
    src.run_guest(|w| {
        w.write(0x5000, &[7u8; 64]);
        thread::sleep(Duration::from_micros(100));
    });
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        local(),
        ReceiveOptions::default(),
    );
    let stats = s.unwrap();
    let rstats = r.unwrap();
    assert!(stats.local && rstats.local);
    assert!(stats.passes.is_empty(), "no RAM pass: {stats}");
    assert!(
        stats.stream_bytes < 4096,
        "config, memory record, state and End only: {} bytes",
        stats.stream_bytes
    );
    assert!(!src.calls.contains(&"start_dirty_log"), "{:?}", src.calls);
    assert_eq!(
        dst.calls,
        ["validate_config", "adopt_memory", "restore_state", "resume"]
    );
    assert!(dst.memory_is_shared() && dst.running && dst.states == states());
    assert!(src.paused && !src.running && !src.calls.contains(&"resume"));
    assert_eq!(src.first_difference(&dst), None);
    // The same pages, not a copy: a write on one side is seen on the other.
    dst.writer().write(0x9000, b"written at the destination");
    let mut got = [0u8; 26];
    src.writer().read(0x9000, &mut got);
    assert_eq!(&got, b"written at the destination");
}

#[test]
fn private_memory_is_refused_by_the_destination_and_the_source_runs_on() {
    let mut src = source(false);
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        local(),
        ReceiveOptions::default(),
    );
    let err = migration::error_chain(&s.unwrap_err());
    assert!(
        err.contains("private anonymous") && err.contains("--mem-shared"),
        "the source hears why: {err}"
    );
    assert!(matches!(r, Err(DestinationError::Local(_))), "{r:?}");
    assert!(!dst.running && !dst.calls.contains(&"resume"));
    assert!(src.running && !src.paused);
    assert!(!src.calls.contains(&"pause"));
}

#[test]
fn local_needs_a_unix_socket() {
    let mut src = source(true);
    let mut l = Endpoint::parse("tcp:127.0.0.1:0")
        .unwrap()
        .listen()
        .unwrap();
    let ep = l.local_endpoint().unwrap();
    let dest = thread::spawn(move || {
        let mut c = l.accept().unwrap();
        let mut dst = fake_target(LAYOUT);
        let r = receive_migration(&mut dst, &mut c, &ReceiveOptions::default());
        (r, dst)
    });
    let mut conn = ep.connect(Duration::from_secs(5)).unwrap();
    let err = send_migration(&mut src, &mut conn, local()).unwrap_err();
    assert!(matches!(err, SourceError::LocalNeedsUnix(_)), "{err}");
    drop(conn);
    let (r, dst) = dest.join().unwrap();
    assert!(r.is_err() && !dst.running);
    assert!(src.running && src.calls.is_empty(), "{:?}", src.calls);
}

#[test]
fn a_failure_before_go_unmaps_the_memory_and_never_runs_it() {
    let mut src = source(true);
    let ropts = ReceiveOptions {
        faults: Faults::new(Some(Fault {
            point: FaultPoint::BeforeGo,
            action: FaultAction::Fail,
        })),
        ..ReceiveOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), local(), ropts);
    assert!(s.is_err() && r.is_err());
    assert!(
        !dst.running && !dst.calls.contains(&"resume"),
        "{:?}",
        dst.calls
    );
    assert_eq!(dst.calls.last(), Some(&"release_memory"));
    assert!(!dst.memory_is_shared(), "the destination let the memory go");
    assert!(src.running && !src.paused, "the source's guest runs on");
    // And its memory is as it was: the destination wrote nothing.
    let mut got = [0u8; 13];
    src.writer().read(0x1_0000_0000 + 4096, &mut got);
    assert_eq!(&got, b"second region");
}

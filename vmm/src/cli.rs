//! Command-line interface: `minivmm run | receive | migrate | resume | tls-init`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{RawConfig, RawReceiveConfig, MAX_ATTEMPTS};

/// A small KVM virtual machine monitor built for live migration.
#[derive(Debug, Parser)]
#[command(name = "minivmm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM: a bzImage, a PVH ELF (vmlinux, test guest) or, without --kernel, the built-in
    /// test guest. The serial console is on stdin/stdout.
    Run(RunArgs),
    /// Start an empty VMM that waits for an incoming migration (or loads a snapshot),
    /// restores the VM and resumes it. The console continues on this process's stdin/stdout.
    Receive(ReceiveArgs),
    /// Ask a running VMM, over its control socket, to live-migrate (or snapshot) its VM.
    Migrate(MigrateArgs),
    /// Resume a paused VM. After a migration whose outcome is unknown (the guest was handed
    /// over and the destination never confirmed it runs) only with --force.
    Resume(ResumeArgs),
    /// Write a TLS directory for `migrate --tls-dir` and `receive --tls-dir`: ca.pem, cert.pem
    /// and key.pem, for this host's names. Makes a new CA (its key in ca-key.pem) unless --ca
    /// names the directory of an existing one. Never overwrites a file.
    TlsInit(TlsInitArgs),
    /// Draw one migration's timeline (passes, bandwidth, dirty rate, setup and downtime
    /// phases) as an SVG file, from what `migrate --json` printed.
    Plot(PlotArgs),
    /// Print the status of a VM (or of a `receive` waiting for one) as one JSON line.
    Status(SocketArgs),
    /// Follow the migration events of a VM or a `receive`: one JSON line each, until it ends.
    Events(SocketArgs),
}

#[derive(Debug, Args)]
pub struct TlsInitArgs {
    /// Directory to write (created, mode 0700, if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// A name this host is reached by: a DNS name or an IP address (repeatable; the first is
    /// also the certificate's subject CN). Sources connect to it by one of these names, and a
    /// destination's --tls-allow names one of a source's.
    #[arg(long, value_name = "HOST", required = true)]
    pub name: Vec<String>,
    /// Sign with the CA made by an earlier `tls-init` in this directory (its ca.pem and
    /// ca-key.pem) instead of making a new CA.
    #[arg(long, value_name = "DIR")]
    pub ca: Option<PathBuf>,
    /// Days the host certificate is valid (default 825).
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// The output of `minivmm migrate --json` (`-` for stdin).
    #[arg(value_name = "MIGRATION_JSON")]
    pub input: PathBuf,
    /// Where to write the SVG (default: stdout).
    #[arg(short, long, value_name = "SVG")]
    pub output: Option<PathBuf>,
    /// Title (default: the input's name).
    #[arg(long, value_name = "TEXT")]
    pub title: Option<String>,
}

#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Control socket of the VM (default as for `run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Control socket of the VM (default as for `run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Resume even though the last migration's outcome is unknown. Say so only when the guest
    /// does not run at the destination: otherwise it runs twice.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: a bzImage or an ELF with a PVH entry note. Default: the built-in test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (test guest default: "touch=64M rate=1000").
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest memory, e.g. 512M, 1G, 16G.
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Control socket path (default: $XDG_RUNTIME_DIR/minivmm.sock, else /tmp/minivmm.sock).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Guest RAM in shared memory (a memfd per region) instead of private memory: a
    /// migration to a process on this host can then hand it over (`migrate --local`).
    #[arg(long)]
    pub mem_shared: bool,
    /// Guest RAM in shared huge pages (hugetlbfs memfd; --mem a multiple of 2M, pages reserved
    /// in /proc/sys/vm/nr_hugepages). Shared like --mem-shared.
    #[arg(long)]
    pub mem_hugepages: bool,
    /// How the VM tracks its guest's writes for migration: bitmap (default: KVM's dirty
    /// bitmaps, initially set where KVM offers it), bitmap-protect (every page
    /// write-protected when a migration starts), ring or ring:ENTRIES (KVM's per-vCPU dirty
    /// rings, 65536 entries each by default; experimental: its migrations always verify guest
    /// memory, as --verify-memory does).
    #[arg(long, value_name = "KIND")]
    pub dirty_tracker: Option<String>,
}

impl From<RunArgs> for RawConfig {
    fn from(a: RunArgs) -> RawConfig {
        RawConfig {
            mem: a.mem,
            cpus: a.cpus,
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            api_socket: a.api_socket,
            mem_shared: a.mem_shared,
            mem_hugepages: a.mem_hugepages,
            dirty_tracker: a.dirty_tracker,
        }
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["listen", "from"])))]
pub struct ReceiveArgs {
    /// Where to wait for the source: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "URI")]
    pub listen: Option<String>,
    /// Restore a snapshot: file:PATH.
    #[arg(long, value_name = "URI")]
    pub from: Option<String>,
    /// Control socket of the restored VM (default as for `run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Incoming migrations to try: after a failed one the destination makes its memory
    /// pristine again and waits for the next (default 1: a failure ends minivmm). Only a
    /// connection whose stream header and configuration were accepted counts; probes,
    /// garbage, idle peers and refused configurations are logged and do not.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_ATTEMPTS as i64))]
    pub attempts: u32,
    /// Guest memory of the VM to expect (as for `run`): with --cpus, the VM is built before
    /// the source connects, as QEMU's destination is from its -m and -smp, instead of after
    /// the stream announced its shape (takes the KVM set-up off the migration's clock). A
    /// stream with another shape is refused.
    #[arg(long, value_name = "SIZE", requires = "cpus")]
    pub mem: Option<String>,
    /// vCPUs of the VM to expect (with --mem).
    #[arg(long, value_name = "N", requires = "mem")]
    pub cpus: Option<u32>,
    /// Most guest memory a stream may ask for (default: this host's memory). A larger one is
    /// refused before anything is allocated.
    #[arg(long, value_name = "SIZE")]
    pub max_mem: Option<String>,
    /// Most vCPUs a stream may ask for (default: this host's online CPUs, at most 254).
    #[arg(long, value_name = "N")]
    pub max_cpus: Option<u32>,
    /// Longest wait for any one read or write on a connection (default 30000).
    #[arg(long, value_name = "MS")]
    pub io_timeout_ms: Option<u64>,
    /// Longest from a connection to the reply that accepts the stream: a peer that sends
    /// nothing valid in time is dropped (default 10000).
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Longest the restored guest waits for the source's go-ahead before it is discarded
    /// (default 10000).
    #[arg(long, value_name = "MS")]
    pub commit_timeout_ms: Option<u64>,
    /// Longest from a connection to the end of its stream, all passes and device state
    /// included: a source that sends just fast enough for --io-timeout-ms is dropped then
    /// and keeps its guest (default: no limit).
    #[arg(long, value_name = "MS")]
    pub deadline_ms: Option<u64>,
    /// Take only mutual-TLS connections (tcp: only), with ca.pem, cert.pem and key.pem from
    /// DIR: the source's certificate must be signed by the CA.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure_plaintext")]
    pub tls_dir: Option<PathBuf>,
    /// Take only sources whose certificate names NAME, as its subject CN or as a DNS subject
    /// alternative name (repeatable; exact, case-insensitive).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_allow: Vec<String>,
    /// Listen on a non-loopback tcp: address without TLS: anyone who reaches the port can
    /// send a VM or read one in flight. Each connection is warned about.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// How the received VM tracks its guest's writes when it migrates on (as for `run`).
    #[arg(long, value_name = "KIND")]
    pub dirty_tracker: Option<String>,
}

impl From<ReceiveArgs> for RawReceiveConfig {
    fn from(a: ReceiveArgs) -> RawReceiveConfig {
        RawReceiveConfig {
            listen: a.listen,
            from: a.from,
            api_socket: a.api_socket,
            attempts: a.attempts,
            mem: a.mem,
            cpus: a.cpus,
            max_mem: a.max_mem,
            max_cpus: a.max_cpus,
            io_timeout_ms: a.io_timeout_ms,
            handshake_timeout_ms: a.handshake_timeout_ms,
            commit_timeout_ms: a.commit_timeout_ms,
            deadline_ms: a.deadline_ms,
            tls_dir: a.tls_dir,
            tls_allow: a.tls_allow,
            insecure_plaintext: a.insecure_plaintext,
            dirty_tracker: a.dirty_tracker,
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Destination: unix:PATH, tcp:HOST:PORT or file:PATH (snapshot).
    #[arg(long, value_name = "URI", required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Give up the migration this VM is running (until its guest is paused for the final
    /// pass); the guest runs on here and the `migrate` that started it exits 1.
    #[arg(long, conflicts_with_all = [
        "to", "local", "downtime_ms", "max_bandwidth", "max_passes", "no_zero_elision", "keep_running",
        "verify_memory", "no_auto_converge", "json", "connect_timeout_ms", "io_timeout_ms",
        "handshake_timeout_ms", "switchover_timeout_ms", "deadline_ms", "on_deadline",
        "tls_dir", "tls_name",
        "detach", "connections",
    ])]
    pub cancel: bool,
    /// Control socket of the VM to migrate (default as for `run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Local migration to a process on this host (unix:PATH only): guest memory, which must
    /// be shared (`run --mem-shared` or `--mem-hugepages`), is handed over by descriptor and
    /// only vCPU and device state is copied.
    #[arg(long)]
    pub local: bool,
    /// Longest acceptable pause of the guest for the final pass (default 50).
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit in bytes per second, with K/M/G suffixes (default: unlimited).
    #[arg(long, value_name = "RATE")]
    pub max_bandwidth: Option<String>,
    /// Most pre-copy passes before stop-and-copy (default 30).
    #[arg(long, value_name = "N")]
    pub max_passes: Option<u32>,
    /// Send zero pages in the bulk pass too.
    #[arg(long)]
    pub no_zero_elision: bool,
    /// With file:PATH, keep the VM running after the snapshot.
    #[arg(long)]
    pub keep_running: bool,
    /// Hash guest memory at the final pause; the destination checks it before resuming.
    #[arg(long)]
    pub verify_memory: bool,
    /// Do not throttle the vCPUs when the guest dirties memory faster than it can be sent
    /// (auto-converge is on by default).
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Print the result as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Return as soon as the migration runs; follow it with `minivmm events` or `status`.
    #[arg(long)]
    pub detach: bool,
    /// Longest wait to connect to the destination (default 10000).
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Longest wait for any one read or write on the connection (default 30000).
    #[arg(long, value_name = "MS")]
    pub io_timeout_ms: Option<u64>,
    /// Longest from connecting to the destination's Ready (default 30000).
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Longest the guest stays paused before the destination takes it over; past it the
    /// migration fails and the guest runs on here (default 30000).
    #[arg(long, value_name = "MS")]
    pub switchover_timeout_ms: Option<u64>,
    /// The whole migration's deadline (default none).
    #[arg(long, value_name = "MS")]
    pub deadline_ms: Option<u64>,
    /// What the deadline does: cancel (the guest stays here) or switchover (pause and send
    /// the rest now, at the cost of a longer downtime).
    #[arg(long, value_enum, requires = "deadline_ms", default_value = "cancel")]
    pub on_deadline: DeadlineArg,
    /// Migrate over mutual TLS (tcp: only), with ca.pem, cert.pem and key.pem from DIR (read
    /// by the VMM process): the destination's certificate must be signed by the CA and valid
    /// for the HOST of tcp:HOST:PORT.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must be valid for, instead of HOST (when
    /// connecting by address).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_name: Option<String>,
    /// Connections to the destination (unix: or tcp:, 1 to 16, default 1): one carries the
    /// passes' order, the final pass and the commit, the others the live passes' pages, each
    /// written and read by a thread of its own.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    pub connections: Option<u8>,
}

/// `--on-deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeadlineArg {
    Cancel,
    Switchover,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_parse() {
        let cli = Cli::try_parse_from([
            "minivmm",
            "run",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--cmdline",
            "-x y",
            "--kernel",
            "/k",
        ])
        .expect("valid command line");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.mem.as_deref(), Some("1G"));
        assert_eq!(a.cpus, Some(2));
        assert_eq!(a.cmdline.as_deref(), Some("-x y"));
        assert_eq!(a.kernel, Some(PathBuf::from("/k")));
    }

    #[test]
    fn unknown_flags_and_missing_values_are_errors() {
        assert!(Cli::try_parse_from(["minivmm", "run", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["minivmm", "run", "--mem"]).is_err());
        assert!(Cli::try_parse_from(["minivmm", "frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["minivmm", "run", "--cpus", "x"]).is_err());
    }

    #[test]
    fn migrate_needs_a_destination_or_cancel_alone() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["minivmm", "migrate"], args].concat());
        assert!(parse(&[]).is_err(), "neither --to nor --cancel");
        assert!(parse(&["--to", "unix:/m"]).is_ok());
        let Ok(Cli {
            command: Command::Migrate(a),
        }) = parse(&["--cancel", "--api-socket", "/s"])
        else {
            panic!("--cancel alone parses")
        };
        assert!(a.cancel && a.to.is_none());
        assert!(parse(&["--cancel", "--to", "unix:/m"]).is_err());
        assert!(parse(&["--cancel", "--max-passes", "3"]).is_err());
        assert!(parse(&["--cancel", "--tls-dir", "/t"]).is_err());
    }

    #[test]
    fn tls_flags_need_their_directory() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["minivmm"], args].concat());
        let to = ["migrate", "--to", "tcp:h:1"];
        assert!(parse(&[&to[..], &["--tls-name", "h"]].concat()).is_err());
        assert!(parse(&[&to[..], &["--tls-dir", "/t", "--tls-name", "h"]].concat()).is_ok());
        let listen = ["receive", "--listen", "tcp:0.0.0.0:1"];
        assert!(parse(&[&listen[..], &["--tls-allow", "a"]].concat()).is_err());
        assert!(
            parse(&[&listen[..], &["--tls-dir", "/t", "--insecure-plaintext"]].concat()).is_err()
        );
        let Ok(Cli {
            command: Command::Receive(a),
        }) = parse(
            &[
                &listen[..],
                &["--tls-dir", "/t", "--tls-allow", "a", "--tls-allow", "b"],
            ]
            .concat(),
        )
        else {
            panic!("receive with TLS parses")
        };
        assert_eq!(a.tls_allow, ["a", "b"]);
        assert!(parse(&["tls-init", "/d"]).is_err(), "tls-init needs --name");
        let Ok(Cli {
            command: Command::TlsInit(a),
        }) = parse(&["tls-init", "/d", "--name", "h", "--name", "10.0.0.1"])
        else {
            panic!("tls-init parses")
        };
        assert_eq!((a.name.len(), a.days, a.ca), (2, 825, None));
    }
}

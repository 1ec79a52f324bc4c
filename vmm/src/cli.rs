//! Command-line interface: `minivmm run | receive | migrate`.

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
    /// Incoming attempts to accept: after a failed one the destination makes its memory
    /// pristine again and waits for the next (default 1: a failure ends minivmm).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_ATTEMPTS as i64))]
    pub attempts: u32,
    /// Guest memory of the VM to expect (as for `run`): with --cpus, the VM is built before
    /// the source connects, as QEMU's destination is from its -m and -smp, instead of after
    /// the stream announced its shape (takes the KVM set-up off the migration's clock). A
    /// stream with another shape gets a VM built to its shape.
    #[arg(long, value_name = "SIZE", requires = "cpus")]
    pub mem: Option<String>,
    /// vCPUs of the VM to expect (with --mem).
    #[arg(long, value_name = "N", requires = "mem")]
    pub cpus: Option<u32>,
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
        "to", "downtime_ms", "max_bandwidth", "max_passes", "no_zero_elision", "keep_running",
        "verify_memory", "no_auto_converge", "json", "fail_after_bytes",
    ])]
    pub cancel: bool,
    /// Control socket of the VM to migrate (default as for `run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
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
    /// Fault injection for tests: break the stream after N bytes.
    #[arg(long, value_name = "N", hide = true)]
    pub fail_after_bytes: Option<u64>,
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
    }
}

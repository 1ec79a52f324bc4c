//! Command-line interface: `minivmm run | receive | migrate`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::RawConfig;

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
    /// Receive a migrating VM (not implemented yet).
    Receive(PassThroughArgs),
    /// Migrate a running VM to another minivmm (not implemented yet).
    Migrate(PassThroughArgs),
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

/// Arguments of the subcommands that are not implemented yet, accepted as they are.
#[derive(Debug, Args)]
pub struct PassThroughArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
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
}

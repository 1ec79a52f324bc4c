//! `minivmm`: parse the command line, run, print the error chain once, exit.
//!
//! Exit status: 0 when the guest powers off or resets or a shutdown is requested, 1 when the
//! guest faults or minivmm fails, 2 for command-line errors.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::config::VmConfig;
use vmm::exit::VmExit;
use vmm::{error_chain, runner};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = match VmConfig::new(args.into()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            let announce =
                |p: &std::path::Path| eprintln!("minivmm: control socket {}", p.display());
            match runner::run(config, announce) {
                Ok(VmExit::Fault(f)) => {
                    eprintln!("error: {}", error_chain(&f));
                    ExitCode::from(1)
                }
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Command::Receive(_) => not_implemented("receive"),
        Command::Migrate(_) => not_implemented("migrate"),
    }
}

fn not_implemented(what: &str) -> ExitCode {
    eprintln!("minivmm {what}: not implemented yet");
    ExitCode::from(2)
}

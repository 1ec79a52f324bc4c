//! `minivmm`: parse the command line, run, print the error chain once, exit.
//!
//! Exit status: 0 when the guest powers off or resets or a shutdown is requested, 1 when the
//! guest faults or minivmm fails, 2 for command-line errors.

use std::process::ExitCode;

use clap::Parser;
use migration::Endpoint;
use vmm::cli::{Cli, Command};
use vmm::config::{ReceiveConfig, VmConfig};
use vmm::control::client;
use vmm::control::protocol::{Done, MigrationStarted, Reply, Request, ResumeRequest};
use vmm::exit::VmExit;
use vmm::migrate::receive::receive;
use vmm::{error_chain, runner};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    // Fault injection (the fault matrix's tests) is armed only through the environment.
    match migration::fault::FaultSource::from_env() {
        Ok(None) => {}
        Ok(Some(f)) => eprintln!(
            "minivmm: FAULT INJECTION ARMED ({}={f}): migrations will fail on purpose",
            migration::fault::FAULT_ENV
        ),
        Err(e) => {
            eprintln!("error: {}: {e}", migration::fault::FAULT_ENV);
            return ExitCode::from(2);
        }
    }
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
            finish(runner::run(config, announce))
        }
        Command::Receive(args) => {
            let config = match ReceiveConfig::new(args.into()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            let announce =
                |p: &std::path::Path| eprintln!("minivmm: control socket {}", p.display());
            finish(receive(config, announce))
        }
        Command::Migrate(args) => migrate(&args),
        Command::Resume(args) => resume(&args),
        Command::Plot(args) => match vmm::plot::plot(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                ExitCode::from(1)
            }
        },
        Command::TlsInit(args) => tls_init(&args),
        Command::Status(args) => status(&api_socket(&args)),
        Command::Events(args) => events(&api_socket(&args)),
    }
}

/// `minivmm tls-init`: what was written, and what to do with it.
fn tls_init(args: &vmm::cli::TlsInitArgs) -> ExitCode {
    match vmm::tls_init::tls_init(args) {
        Ok(w) => {
            for f in &w.files {
                eprintln!("minivmm: wrote {}", f.display());
            }
            eprintln!("minivmm: this host's certificate: {}", w.identity);
            if w.new_ca {
                eprintln!(
                    "minivmm: new CA; its key is {}: sign the other hosts' directories with \
                     `minivmm tls-init DIR --name HOST --ca {}`, then keep it off the hosts",
                    args.dir.join(vmm::tls_init::CA_KEY_FILE).display(),
                    args.dir.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn api_socket(args: &vmm::cli::SocketArgs) -> std::path::PathBuf {
    args.api_socket
        .clone()
        .unwrap_or_else(vmm::config::default_api_socket)
}

/// `minivmm status`: the reply as one JSON line; exits 1 on an error reply.
fn status(api: &std::path::Path) -> ExitCode {
    match client::request::<serde_json::Value>(api, &Request::Status) {
        Ok(reply) => {
            println!("{}", client::to_json(&reply));
            if reply.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// `minivmm events`: every event line as it comes, until the process closes the stream.
fn events(api: &std::path::Path) -> ExitCode {
    use std::io::Write;
    let printed = client::events(api, |event| {
        let mut out = std::io::stdout().lock();
        serde_json::to_string(event)
            .ok()
            .is_some_and(|l| writeln!(out, "{l}").and_then(|()| out.flush()).is_ok())
    });
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn finish<E: std::error::Error>(r: Result<VmExit, E>) -> ExitCode {
    match r {
        Ok(VmExit::Fault(f)) => {
            eprintln!("error: {}", error_chain(&f));
            ExitCode::from(1)
        }
        Ok(VmExit::Migrated(to)) => {
            eprintln!("minivmm: the VM moved to {to}");
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn migrate(args: &vmm::cli::MigrateArgs) -> ExitCode {
    let api = args
        .api_socket
        .clone()
        .unwrap_or_else(vmm::config::default_api_socket);
    if args.cancel {
        return cancel(&api);
    }
    let bandwidth = match args.max_bandwidth.as_deref().map(vmm::config::parse_size) {
        None => None,
        Some(Ok(0)) => {
            eprintln!("error: --max-bandwidth must be above 0");
            return ExitCode::from(2);
        }
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            eprintln!("error: --max-bandwidth: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let Some(req) = client::migrate_request(args, bandwidth) else {
        eprintln!("error: --to is required");
        return ExitCode::from(2);
    };
    if let Some(flag) = req.zero_wait() {
        eprintln!("error: {flag} must be at least 1 (milliseconds)");
        return ExitCode::from(2);
    }
    // A malformed destination is the command line's fault: say so before asking the VM.
    match Endpoint::parse(&req.to) {
        Ok(Endpoint::Tcp { port: 0, .. }) => {
            eprintln!("error: --to {:?}: port 0 is only for --listen", req.to);
            return ExitCode::from(2);
        }
        Ok(Endpoint::File(_)) if req.connections.is_some_and(|n| n > 1) => {
            eprintln!(
                "error: --connections {}: a file: snapshot is one stream; several connections \
                 need unix: or tcp:",
                req.connections.unwrap_or(1)
            );
            return ExitCode::from(2);
        }
        Ok(_) if req.local && req.connections.is_some_and(|n| n > 1) => {
            eprintln!(
                "error: --connections with --local: a local migration copies no memory, there \
                 is nothing to spread over connections"
            );
            return ExitCode::from(2);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: --to {:?}: {e}", req.to);
            return ExitCode::from(2);
        }
    }
    if req.detach {
        return match client::request::<MigrationStarted>(&api, &Request::Migrate(Box::new(req))) {
            Ok(Reply::Ok(started)) => {
                if args.json {
                    println!("{}", client::to_json(&Reply::Ok(started)));
                } else {
                    eprintln!(
                        "minivmm: migrating to {}; follow it with `minivmm events`",
                        started.to
                    );
                }
                ExitCode::SUCCESS
            }
            Ok(Reply::Error(e)) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                ExitCode::from(1)
            }
        };
    }
    match client::migrate(&api, &req, args.json) {
        Ok(summary) => {
            if args.json {
                println!("{}", client::to_json(&Reply::Ok(summary)));
            } else {
                println!("{}", client::summary_text(&summary));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// `minivmm resume [--force]`.
fn resume(args: &vmm::cli::ResumeArgs) -> ExitCode {
    let api = args
        .api_socket
        .clone()
        .unwrap_or_else(vmm::config::default_api_socket);
    let req = Request::Resume(ResumeRequest { force: args.force });
    done_or_error(&api, &req, "resumed")
}

/// `minivmm migrate --cancel`.
fn cancel(api: &std::path::Path) -> ExitCode {
    done_or_error(api, &Request::Cancel, "cancelling the migration")
}

/// Sends a request whose reply is `Done`: says `done` and exits 0, or prints the error and
/// exits 1.
fn done_or_error(api: &std::path::Path, req: &Request, done: &str) -> ExitCode {
    match client::request::<Done>(api, req) {
        Ok(Reply::Ok(Done {})) => {
            eprintln!("minivmm: {done}");
            ExitCode::SUCCESS
        }
        Ok(Reply::Error(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

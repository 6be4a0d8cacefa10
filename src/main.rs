//! The `simdevice` binary: parse the command line, start logging, run one verb, and turn its
//! error into a message (the whole source chain, on one line) and an exit code.

use std::process::ExitCode;

/// Builds with the hub allocate through mimalloc: the hub's telemetry and Event Hubs paths
/// allocate per event, and with glibc's malloc the hub spent more CPU per event and its
/// Event Hubs reader fell further behind (docs/benchmarks.md, eighth run). The device-only
/// build keeps the system allocator, which its memory figures were measured with.
#[cfg(feature = "hub")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, Parser};
use simdevice::cli::{Cli, Command};
use simdevice::commands;

/// sysexits.h EX_CONFIG: the configuration is wrong. The systemd units list it in
/// `RestartPreventExitStatus=`, so a broken configuration does not restart-loop.
const EX_CONFIG: u8 = 78;
/// A usage or configuration mistake given to `simdevice service` (1 is: the hub said no).
#[cfg(feature = "service")]
const EX_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A fleet's thousands of agents would each log every connect and acknowledgement: it
    // logs its own progress at info, the agents' warnings and errors only (RUST_LOG still
    // decides when set).
    let default_level = match &cli.command {
        #[cfg(feature = "fleet")]
        Command::Fleet(_) => "warn,simdevice::fleet=info,simdevice::commands::fleet=info",
        _ => "info",
    };
    simdevice::common::logging::init(cli.log_format, default_level);
    // One device needs no thread pool: `run` gets a single-threaded runtime, which keeps the
    // daemon's memory and CPU small; the hub and the rest use one worker per core (the hub's
    // Event Hubs endpoint adds a thread of its own: hub/amqp/thread.rs).
    let runtime = match &cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error, ExitCode::FAILURE),
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => match commands::run::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            #[cfg(feature = "hub")]
            Command::Hub(args) => match commands::hub::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            #[cfg(feature = "service")]
            Command::Service(args) => match commands::service::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) if error.is_usage() => fail(&error, ExitCode::from(EX_USAGE)),
                Err(error) => fail(&error, ExitCode::FAILURE),
            },
            #[cfg(feature = "fleet")]
            Command::Fleet(args) => match commands::fleet::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            #[cfg(feature = "archive")]
            Command::Archive(args) => match commands::archive::run(args).await {
                Ok(summary) if summary.is_clean() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            Command::Provision(args) => match commands::provision::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            Command::Config(args) => match commands::config::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, config_or_failure(error.is_config())),
            },
            Command::Doctor(args) => commands::doctor::run(args).await,
            Command::Completions(args) => {
                commands::generate::completions(Cli::command(), args, &mut std::io::stdout().lock())
            }
            Command::Man => commands::generate::man(Cli::command(), &mut std::io::stdout().lock()),
        }
    })
}

fn config_or_failure(is_config: bool) -> ExitCode {
    if is_config {
        ExitCode::from(EX_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

/// Prints `error: outer: cause: root cause` on stderr and returns `code`.
fn fail(error: &dyn std::error::Error, code: ExitCode) -> ExitCode {
    eprintln!("error: {}", simdevice::common::logging::error_chain(error));
    code
}

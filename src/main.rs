//! The `simdevice` binary: parse the command line, start logging, run one verb, map its error
//! to an exit code.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use simdevice::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    simdevice::common::logging::init(cli.log_format);
    // One device needs no thread pool: `run` gets a single-threaded runtime, which keeps the
    // daemon's memory and CPU small; the hub and the rest use one worker per core.
    let runtime = match &cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match cli.command {
            Command::Hub(args) => {
                simdevice::commands::hub::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Service(args) => Ok(simdevice::commands::service::run(args).await),
            Command::Run(args) => Ok(simdevice::commands::run::run(args).await),
            Command::Config(args) => Ok(simdevice::commands::config::run(args)),
            Command::Doctor(args) => Ok(simdevice::commands::doctor::run(args).await),
            Command::Completions(args) => Ok(simdevice::commands::generate::completions(
                Cli::command(),
                args,
                &mut std::io::stdout().lock(),
            )),
            Command::Man => Ok(simdevice::commands::generate::man(
                Cli::command(),
                &mut std::io::stdout().lock(),
            )),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

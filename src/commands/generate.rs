//! `simdevice completions SHELL` and `simdevice man`: shell completions and a man page,
//! generated from the command-line definition in `cli.rs` (so they cannot drift from it) and
//! printed to stdout for packaging, e.g.
//! `simdevice completions bash > /usr/share/bash-completion/completions/simdevice`.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Writes the completion script for `shell`.
pub fn completions(args: CompletionsArgs, out: &mut dyn Write) -> ExitCode {
    let mut command = crate::cli::Cli::command();
    clap_complete::generate(args.shell, &mut command, "simdevice", out);
    ExitCode::SUCCESS
}

/// Writes the man page (section 1) of `simdevice`, listing its subcommands.
pub fn man(out: &mut dyn Write) -> ExitCode {
    let command = crate::cli::Cli::command();
    match clap_mangen::Man::new(command).render(out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write the man page: {error}");
            ExitCode::FAILURE
        }
    }
}

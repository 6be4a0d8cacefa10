//! `simdevice completions SHELL` and `simdevice man`: shell completions and a man page,
//! generated from the command-line definition in `cli.rs` (so they cannot drift from it) and
//! printed to stdout for packaging, e.g.
//! `simdevice completions bash > /usr/share/bash-completion/completions/simdevice`.

use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Writes the completion script for `shell` of `command` (the `Cli` tree, given by `main`).
pub fn completions(
    mut command: clap::Command,
    args: CompletionsArgs,
    out: &mut dyn Write,
) -> ExitCode {
    clap_complete::generate(args.shell, &mut command, "simdevice", out);
    ExitCode::SUCCESS
}

/// Writes the man page (section 1) of `simdevice`, listing its subcommands.
pub fn man(command: clap::Command, out: &mut dyn Write) -> ExitCode {
    match clap_mangen::Man::new(command).render(out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write the man page: {error}");
            ExitCode::FAILURE
        }
    }
}

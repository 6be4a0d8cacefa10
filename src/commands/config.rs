//! TEMPORARY stub until `simdevice config check` lands (being written now).
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {}
pub fn run(_args: ConfigArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}

//! `simdevice service` (placeholder until written).
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {}
pub async fn run(_args: ServiceArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}

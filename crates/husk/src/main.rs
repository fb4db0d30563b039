//! `husk`: a runc-compatible OCI runtime that runs every container in its own
//! lightweight VM. This binary is argument parsing and logging over
//! `husk-runtime`.

mod cli;
mod commands;
mod logging;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(&cli.global) {
        eprintln!("husk: {e:#}");
        return ExitCode::from(1);
    }
    match commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::debug!("failed: {e:?}");
            eprintln!("husk: {e:#}");
            ExitCode::from(1)
        }
    }
}

//! `husk`: a runc-compatible OCI runtime that runs every container in its own
//! lightweight VM. This binary is argument parsing and logging over
//! `husk-runtime`.

/// `println!` that ignores a closed stdout (`husk list | head`), as a
/// runtime's output is often piped.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod cli;
mod commands;
mod logging;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(&cli) {
        eprintln!("husk: {e:#}");
        return ExitCode::from(1);
    }
    let json_log = logging::json_error_log(&cli.global);
    match commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::debug!("failed: {e:?}");
            if let Some(log) = json_log {
                logging::append_runc_error(&log, &msg);
            }
            eprintln!("husk: {msg}");
            ExitCode::from(1)
        }
    }
}

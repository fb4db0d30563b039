//! Logging setup: `--log`, `--log-format`, `--debug`, `$HUSK_LOG`, and the
//! config's `log_level`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, GlobalOpts, LogFormat};

/// Env var with a tracing filter for husk's own log (overrides the rest).
pub const LOG_ENV: &str = "HUSK_LOG";

/// husk's log filter: `HUSK_LOG`, else `debug` with `--debug`, else `warn`.
fn filter(opts: &GlobalOpts) -> EnvFilter {
    if let Ok(f) = std::env::var(LOG_ENV) {
        if let Ok(f) = EnvFilter::try_new(f) {
            return f;
        }
    }
    EnvFilter::new(if opts.debug { "debug" } else { "warn" })
}

pub fn init(cli: &Cli) -> anyhow::Result<()> {
    let opts = &cli.global;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(opts))
        .with_span_events(husk_runtime::timing::SPAN_EVENTS)
        .with_target(opts.debug);
    match &opts.log {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            let b = builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false);
            match opts.log_format {
                LogFormat::Json => b.json().init(),
                LogFormat::Text => b.init(),
            }
        }
        // A monitor's stderr is the container's: it logs only to a file.
        None if matches!(cli.command, Command::Monitor(_)) => {}
        None => {
            let b = builder.with_writer(std::io::stderr);
            match opts.log_format {
                LogFormat::Json => b.json().init(),
                LogFormat::Text => b.init(),
            }
        }
    }
    Ok(())
}

/// The log file that gets runc-style JSON error lines, if any.
pub fn json_error_log(opts: &GlobalOpts) -> Option<PathBuf> {
    match (&opts.log, opts.log_format) {
        (Some(p), LogFormat::Json) => Some(p.clone()),
        _ => None,
    }
}

/// Appends `{"level":"error","msg":...,"time":...}`, the line runc writes and
/// conmon and podman read back to report a runtime's failure.
pub fn append_runc_error(log: &Path, msg: &str) {
    let line = serde_json::json!({
        "level": "error",
        "msg": msg,
        "time": husk_runtime::state::now_rfc3339(),
    });
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

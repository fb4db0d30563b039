//! Logging setup: `--log`, `--log-format`, `--debug`, `$HUSK_LOG`, and the
//! config's `log_level`.

use std::fs::OpenOptions;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::cli::{GlobalOpts, LogFormat};

/// Env var with a tracing filter for husk's own log (overrides the rest).
pub const LOG_ENV: &str = "HUSK_LOG";

/// husk's log filter before the config is read: `HUSK_LOG`, else `debug`
/// with `--debug`, else `warn`.
fn filter(opts: &GlobalOpts) -> EnvFilter {
    if let Ok(f) = std::env::var(LOG_ENV) {
        if let Ok(f) = EnvFilter::try_new(f) {
            return f;
        }
    }
    EnvFilter::new(if opts.debug { "debug" } else { "warn" })
}

pub fn init(opts: &GlobalOpts) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(opts))
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

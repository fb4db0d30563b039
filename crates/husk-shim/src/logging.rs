//! The shim's log. The server writes into the `log` FIFO that containerd
//! creates in the bundle (containerd copies it into its own log); `delete`
//! writes to stderr, which containerd logs as cleanup warnings.
//!
//! Filter: `$HUSK_LOG` (a tracing filter), else `debug` when containerd runs
//! with debug logging (`-debug`), else `info` (which includes the
//! `husk_timing` spans, reported as they close: see `husk_runtime::timing`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;

/// Env var with a tracing filter for the shim's log.
pub const LOG_ENV: &str = "HUSK_LOG";

fn filter(default: &str) -> EnvFilter {
    std::env::var(LOG_ENV)
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default))
}

/// A writer that never blocks: while nobody drains the FIFO (containerd is
/// restarting) log lines are dropped rather than stalling the shim.
struct FifoWriter(Arc<File>);

impl Write for FifoWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match (&*self.0).write(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(buf.len())
            }
            r => r,
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Logs into `./log` (the bundle's FIFO); without it, nowhere.
pub fn init_server(debug: bool) {
    let Ok(file) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
    else {
        return;
    };
    let file = Arc::new(file);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(if debug { "debug" } else { "info" }))
        .with_span_events(husk_runtime::timing::SPAN_EVENTS)
        .with_ansi(false)
        .with_writer(move || FifoWriter(file.clone()))
        .try_init();
}

pub fn init_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter("warn"))
        .with_ansi(false)
        .with_writer(io::stderr)
        .try_init();
}

//! The command line, with runc's names for global and per-verb flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "husk",
    version,
    about = "A runc-compatible OCI runtime that runs every container in its own lightweight VM",
    long_about = "husk runs each container inside its own QEMU microVM with its own guest \
kernel, while taking runc's command line. The guest kernel and agent come from \
`make guest`; `husk check` says whether this host can run sandboxes.\n\n\
Configuration: --config, else $HUSK_CONFIG, else /etc/husk/config.toml, else \
compiled-in defaults (see docs/configuration.md)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/husk")]
    pub root: PathBuf,
    /// Write husk's log to this file instead of stderr.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Debug logging for husk and the guest agent; the guest console and
    /// QEMU's log are written to husk's log when the sandbox goes away.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility; husk manages cgroups inside the guest.
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Configuration file (default: $HUSK_CONFIG or /etc/husk/config.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and run a container in a new VM, in the foreground: the
    /// container's stdio is husk's, its exit status is husk's, and SIGINT,
    /// SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 sent to husk reach the container.
    Run(RunArgs),
    /// Say whether this host can run sandboxes, and what is missing.
    Check,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path to the bundle directory (holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// The container id (letters, digits, `_+-.`).
    pub id: String,
}

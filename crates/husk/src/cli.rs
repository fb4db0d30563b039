//! The command line, with runc's verbs, flags, output formats and exit codes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "husk",
    version,
    about = "A runc-compatible OCI runtime that runs every container in its own lightweight VM",
    long_about = "husk runs each container inside its own QEMU microVM with its own guest \
kernel, while taking runc's command line, so podman (conmon), CRI-O or Docker can drive it \
with --runtime. The guest kernel and agent come from `make guest`; `husk check` says whether \
this host can run sandboxes.\n\n\
Configuration: --config, else $HUSK_CONFIG, else /etc/husk/config.toml, else \
compiled-in defaults (see docs/configuration.md).\n\n\
A flag given twice takes its last value, as with runc (Docker appends its \
runtimeArgs after its own --root).",
    // runc's semantics: a repeated flag takes the last value.
    args_override_self = true
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
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
    /// Accepted for runc compatibility. husk puts each container in a cgroup
    /// of its own inside the guest (cgroupfs semantics); the host keeps the
    /// cgroups it already had.
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Configuration file (default: $HUSK_CONFIG or /etc/husk/config.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container in a new VM; its process waits for `start`.
    Create(CreateArgs),
    /// Start the process of a created container.
    Start(IdArg),
    /// Print the state of a container as JSON.
    State(IdArg),
    /// Send a signal to the container's init (default SIGTERM).
    Kill(KillArgs),
    /// Delete a container and every host trace of its VM.
    Delete(DeleteArgs),
    /// Create and start a container. In the foreground the container's stdio
    /// is husk's, its exit status is husk's, and SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1/2 sent to husk reach the container.
    Run(RunArgs),
    /// Run a new process in a running container.
    Exec(ExecArgs),
    /// List the container's processes (guest pids, see `husk ps --help`).
    Ps(PsArgs),
    /// List containers under --root.
    List(ListArgs),
    /// Pause the container by freezing its whole VM.
    Pause(IdArg),
    /// Resume a paused container.
    Resume(IdArg),
    /// Print container statistics (and, with --interval, keep printing).
    Events(EventsArgs),
    /// Change the container's resource limits (its cgroup in the guest).
    Update(UpdateArgs),
    /// Print the features husk supports, as JSON (runc's format).
    Features,
    /// Write a default config.json into the bundle directory.
    Spec(SpecArgs),
    /// Say whether this host can run sandboxes, and what is missing.
    Check,
    /// Build, show, refresh or remove the VM template new sandboxes are
    /// restored from (docs/templates.md). Sandboxes build it when it is
    /// missing or outdated; `template.enabled = false` turns templates off.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Internal: the sandbox monitor behind a container.
    #[command(hide = true)]
    Monitor(MonitorArgs),
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Build the template of the current configuration (guest kernel,
    /// initrd, QEMU, machine size, log level) unless it is built already.
    Build,
    /// List the templates under `template.dir`: which one the current
    /// configuration uses, when each was built, what it costs on disk.
    Show {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Rebuild the current template and remove every other one.
    Refresh,
    /// Remove the template ID, or every template when none is named.
    /// Running sandboxes keep what they mapped.
    Remove {
        /// A template id as `husk template show` lists it.
        id: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct IdArg {
    /// The container id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Path to the bundle directory (holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Unix socket that receives the master of the container's pty (when
    /// process.terminal is true).
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// File to write the pid of the process standing for the container's
    /// init on the host (the sandbox monitor).
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility; host descriptors cannot cross into
    /// the VM, so they are not passed on.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container id (letters, digits, `_+-.`).
    pub id: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Detach: return once the container runs.
    #[arg(short, long)]
    pub detach: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-subreaper")]
    pub no_subreaper: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(short, long)]
    pub all: bool,
    pub id: String,
    /// Signal name (TERM, SIGKILL) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill the container first if it still runs.
    #[arg(short, long)]
    pub force: bool,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Unix socket that receives the master of the process's pty.
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables to add (KEY=VALUE).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Allocate a pty.
    #[arg(short, long)]
    pub tty: bool,
    /// uid[:gid] to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// OCI process JSON file (instead of COMMAND and the flags above).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Detach: return once the process runs.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the pid of the host process standing for the new
    /// process (it lives as long as it and exits with its status).
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (no SELinux in the guest).
    #[arg(long = "process-label")]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility (no AppArmor in the guest).
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Set no_new_privileges.
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Add a capability.
    #[arg(short, long = "cap")]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility; host descriptors are not passed on.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long = "ignore-paused")]
    pub ignore_paused: bool,
    pub id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "PIDs are the guest's: each container runs in its own VM, so its \
processes have no host pids. The host process standing for the container is the \
sandbox monitor (`husk state` shows its pid). `--format json` (runc's list of host \
pids, which the runc shim and `docker top` look up on the host) is refused with an \
error for that reason."
)]
pub struct PsArgs {
    #[arg(short, long, value_enum, default_value = "table")]
    pub format: Format,
    pub id: String,
    /// Accepted for runc compatibility (ps options are not applied).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(short, long, value_enum, default_value = "table")]
    pub format: Format,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Interval between statistics (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s")]
    pub interval: String,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// OCI linux.resources JSON file ("-" for stdin).
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit (bytes, or with k/m/g suffix).
    #[arg(long)]
    pub memory: Option<String>,
    /// Memory + swap limit.
    #[arg(long = "memory-swap")]
    pub memory_swap: Option<String>,
    /// Memory soft limit.
    #[arg(long = "memory-reservation")]
    pub memory_reservation: Option<String>,
    /// Accepted for runc compatibility (no kernel memory limit on cgroup v2).
    #[arg(long = "kernel-memory")]
    pub kernel_memory: Option<String>,
    #[arg(long = "cpu-shares")]
    pub cpu_shares: Option<u64>,
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    #[arg(long = "cpu-quota")]
    pub cpu_quota: Option<i64>,
    /// CPUs as a decimal (1.5 = quota of 150000 per 100000 period).
    #[arg(long)]
    pub cpus: Option<f64>,
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
    #[arg(long = "blkio-weight")]
    pub blkio_weight: Option<u16>,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Bundle directory to write config.json into.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Accepted for runc compatibility (the spec is the same).
    #[arg(long)]
    pub rootless: bool,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[arg(long)]
    pub bundle: PathBuf,
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    #[arg(long = "ready-fd")]
    pub ready_fd: Option<i32>,
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_repeated_flag_takes_its_last_value_as_with_runc() {
        let cli = Cli::try_parse_from([
            "husk",
            "--root",
            "/var/run/docker/runtime-runc/moby",
            "--root",
            "/run/h",
            "state",
            "c1",
        ])
        .expect("a repeated --root is accepted");
        assert_eq!(cli.global.root, std::path::PathBuf::from("/run/h"));
        let cli = Cli::try_parse_from([
            "husk",
            "--log-format",
            "text",
            "--log-format",
            "json",
            "list",
        ])
        .expect("a repeated --log-format is accepted");
        assert!(matches!(cli.global.log_format, LogFormat::Json));
        // A verb's own flags alike; repeatable ones still add up.
        let cli = Cli::try_parse_from(["husk", "create", "--bundle", "/a", "--bundle", "/b", "c1"])
            .expect("a repeated --bundle is accepted");
        let Command::Create(c) = cli.command else {
            panic!("create")
        };
        assert_eq!(c.bundle, std::path::PathBuf::from("/b"));
        let cli = Cli::try_parse_from(["husk", "exec", "-e", "A=1", "-e", "B=2", "c1", "true"])
            .expect("exec");
        let Command::Exec(e) = cli.command else {
            panic!("exec")
        };
        assert_eq!(e.env, ["A=1", "B=2"]);
    }
}

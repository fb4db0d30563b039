//! What the init stage (`husk-agent init`) and the exec stage (`husk-agent
//! exec`) share: their descriptors and first steps, their error type and
//! status reporting, the terminal, and
//! the last steps of every container process: resource limits, working
//! directory, user, capabilities (runc's order), `no_new_privs`, the
//! program lookup, seccomp and `execve`.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{self, AccessFlags, Gid, Uid};
use oci_spec::runtime::PosixRlimitType;
use serde::de::DeserializeOwned;

use super::mounts::{ensure_file, MountError};
use super::protocol::{self, StageMessage, CONFIG_FD, CONSOLE_FD, START_FD, STATUS_FD};
use super::spec::{find_program, path_of, LookupError, ProcessConfig};
use crate::caps;
use crate::seccomp::SeccompProgram;
use crate::sys;

/// A stage's first steps: close everything but fds 0-6 (nothing else
/// belongs to the container), read the instructions (`what` names them in
/// errors) and take the start pipe, close-on-exec.
pub fn take_instructions<T: DeserializeOwned>(what: &str) -> Result<(T, File), StageError> {
    sys::close_fds_from(CONSOLE_FD as u32 + 1);
    let config = step(sys::take_inherited_fd(CONFIG_FD), || {
        format!("taking the config pipe (fd {CONFIG_FD})")
    })?;
    let mut json = Vec::new();
    step(File::from(config).read_to_end(&mut json), || {
        format!("reading the {what}")
    })?;
    let instructions = serde_json::from_slice(&json)
        .map_err(|e| StageError::Spec(format!("the {what} are not valid: {e}")))?;
    let start = File::from(step(sys::take_inherited_fd(START_FD), || {
        format!("taking the start pipe (fd {START_FD})")
    })?);
    step(sys::set_cloexec(start.as_fd(), true), || {
        "marking the start pipe close-on-exec".to_string()
    })?;
    Ok((instructions, start))
}

/// Blocks until the agent says go (one byte on the start pipe); exits the
/// stage quietly when the agent gave up on it instead (end-of-file: the
/// container or exec was removed before it started).
pub fn wait_for_start(start: File) {
    let mut go = [0u8; 1];
    if !matches!((&start).read(&mut go), Ok(1)) {
        std::process::exit(0);
    }
}

/// A failed stage step.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Step {
        /// The step.
        what: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A mount failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The program was not found.
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// The spec asks for something impossible.
    #[error("{0}")]
    Spec(String),
    /// `execve` failed.
    #[error("exec {program:?}: {errno}")]
    Exec {
        /// `args[0]`.
        program: String,
        /// Why.
        errno: Errno,
    },
}

impl StageError {
    fn invalid_spec(&self) -> bool {
        matches!(self, Self::Lookup(_) | Self::Spec(_) | Self::Exec { .. })
    }

    fn exit_code(&self) -> i32 {
        match self {
            Self::Lookup(LookupError::NotExecutable(_)) => 126,
            Self::Exec {
                errno: Errno::EACCES,
                ..
            } => 126,
            Self::Lookup(_) | Self::Exec { .. } => 127,
            _ => 1,
        }
    }
}

/// Wraps a failing call with what was being done.
pub fn step<T, E: Into<io::Error>>(
    result: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, StageError> {
    result.map_err(|e| StageError::Step {
        what: what(),
        source: e.into(),
    })
}

/// Writes status messages to the agent.
pub struct Reporter(File);

impl Reporter {
    /// Sends one message.
    pub fn send(&self, message: &StageMessage) {
        let line = protocol::encode(message);
        // If the agent is gone there is nobody to tell.
        let _ = (&self.0).write_all(&line);
    }

    /// Sends a warning for the agent's log.
    pub fn warn(&self, text: String) {
        self.send(&StageMessage::Warning(text));
    }
}

/// Runs a stage: takes the status pipe, runs `run`, and reports its
/// failure (or panic) there before exiting. Never returns.
pub fn run_stage(name: &str, run: fn(&Reporter) -> Result<Infallible, StageError>) -> ! {
    let Ok(status) = sys::take_inherited_fd(STATUS_FD) else {
        // Not started by the agent: there is nobody to report to.
        eprintln!("husk-agent {name} is internal to the agent and cannot be run by hand");
        std::process::exit(125);
    };
    let _ = sys::set_cloexec(status.as_fd(), true);
    let reporter = Reporter(File::from(status));
    // Panics are reported on the status pipe, never printed on the
    // container's stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&reporter)));
    let (message, invalid_spec, code) = match outcome {
        Ok(Ok(never)) => match never {},
        Ok(Err(e)) => (e.to_string(), e.invalid_spec(), e.exit_code()),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            (format!("container {name} stage panicked: {text}"), false, 1)
        }
    };
    reporter.send(&StageMessage::Error {
        message,
        invalid_spec,
    });
    std::process::exit(code)
}

/// The console socket (fd 6) of a stage whose process has a terminal;
/// `None` without one.
pub fn take_console_socket(process: &ProcessConfig) -> Result<Option<OwnedFd>, StageError> {
    if !process.terminal {
        return Ok(None);
    }
    let socket = step(sys::take_inherited_fd(CONSOLE_FD), || {
        "taking the console socket (fd 6) for process.terminal".to_string()
    })?;
    step(sys::set_cloexec(socket.as_fd(), true), || {
        "marking the console socket close-on-exec".to_string()
    })?;
    Ok(Some(socket))
}

/// Allocates the process's terminal as runc does: from the container's own
/// `/dev/ptmx`, so that the pty belongs to the container's devpts and the
/// process sees itself on `/dev/pts/N`. Sets `process.consoleSize`, with
/// `console` bind-mounts the slave on `/dev/console` (the init), makes the
/// slave fds 0, 1 and 2, owned by the process's uid (as runc's
/// `fixStdioPermissions`), and sends the master to the agent on `socket`.
///
/// Must run inside the container's mount namespace and root, after its
/// mounts. Making the slave the controlling terminal is left to the caller,
/// which must be a session leader by then.
pub fn setup_terminal(
    socket: OwnedFd,
    process: &ProcessConfig,
    console: bool,
) -> Result<(), StageError> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    // posix_openpt opens /dev/ptmx, which (a `pts/ptmx` symlink, or a
    // device node the kernel resolves to the devpts next to it) reaches the
    // container's devpts instance.
    let master = step(
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC),
        || {
            "opening /dev/ptmx in the container for process.terminal (the container needs a devpts mounted on /dev/pts)".to_string()
        },
    )?;
    step(grantpt(&master), || "grantpt on the terminal".to_string())?;
    step(unlockpt(&master), || "unlocking the terminal".to_string())?;
    let slave = step(ptsname_r(&master), || {
        "finding the terminal's name in the container's /dev/pts".to_string()
    })?;
    if let Some((rows, cols)) = process.console_size {
        step(sys::set_window_size(master.as_fd(), rows, cols), || {
            format!(
                "setting the terminal size to {rows} rows, {cols} columns (process.consoleSize)"
            )
        })?;
    }
    if console {
        bind_console(&slave)?;
    }
    let fd = step(
        open(
            slave.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
        || format!("opening the terminal {slave}"),
    )?;
    // The slave belongs to whoever opened the master (root); the process's
    // user should own its terminal. Keep the group (the devpts `gid=`). An
    // owner or uid this user namespace does not map cannot be changed, and
    // is left as runc leaves it.
    match unistd::fchown(&fd, Some(Uid::from_raw(process.uid)), None) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::EPERM) => {}
        Err(e) => step(Err(e), || {
            format!("giving the terminal {slave} to uid {}", process.uid)
        })?,
    }
    step(unistd::dup2_stdin(&fd), || {
        format!("making the terminal {slave} stdin")
    })?;
    step(unistd::dup2_stdout(&fd), || {
        format!("making the terminal {slave} stdout")
    })?;
    step(unistd::dup2_stderr(&fd), || {
        format!("making the terminal {slave} stderr")
    })?;
    // Last, so that a master the agent holds is a terminal fully set up.
    step(sys::send_fd(socket.as_fd(), master.as_fd()), || {
        "sending the terminal master to the agent (console socket)".to_string()
    })
}

/// Bind-mounts the terminal `slave` on `/dev/console` (created if missing),
/// as runc does for a container's init.
fn bind_console(slave: &str) -> Result<(), StageError> {
    let console = Path::new("/dev/console");
    step(ensure_file(console), || "creating /dev/console".to_string())?;
    step(
        mount(
            Some(slave),
            console,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
        || format!("bind-mounting the terminal {slave} on /dev/console"),
    )
}

fn rlimit_resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// `oomScoreAdj` and `rlimits` (while the process is still privileged).
pub fn apply_limits(process: &ProcessConfig) -> Result<(), StageError> {
    if let Some(score) = process.oom_score_adj {
        step(
            fs::write("/proc/self/oom_score_adj", score.to_string()),
            || format!("setting oomScoreAdj to {score}"),
        )?;
    }
    for limit in &process.rlimits {
        step(
            setrlimit(rlimit_resource(limit.resource), limit.soft, limit.hard),
            || {
                format!(
                    "setting {:?} to soft {} hard {}",
                    limit.resource, limit.soft, limit.hard
                )
            },
        )?;
    }
    Ok(())
}

/// Installs the seccomp filter.
pub fn install_seccomp(program: &SeccompProgram) -> Result<(), StageError> {
    step(
        sys::install_seccomp_filter(&program.filter, program.flags),
        || "loading the seccomp filter (linux.seccomp)".to_string(),
    )
}

/// Working directory, bounding set, groups, gid, uid, capabilities, umask,
/// no_new_privs; then finds the program with the process's credentials.
///
/// The seccomp filter is installed here, before the capabilities are
/// dropped, when the process does not get `no_new_privs` (the kernel then
/// requires `CAP_SYS_ADMIN`); the returned flag says whether it was. With
/// `no_new_privs` it is installed by [`exec_program`], last.
pub fn become_user(
    process: &ProcessConfig,
    seccomp: Option<&SeccompProgram>,
) -> Result<(PathBuf, bool), StageError> {
    let cwd = &process.cwd;
    // Create the working directory as root, like runc; enter it before and,
    // if that failed (root squashing on a share), after dropping privileges.
    let _ = fs::create_dir_all(cwd);
    let entered = unistd::chdir(cwd.as_path()).is_ok();
    let last_cap = caps::last_cap();
    let caps = process.capabilities.map(|c| c.for_kernel(last_cap));
    if let Some(caps) = caps {
        for cap in caps.bounding_drops(last_cap) {
            step(sys::drop_bounding_cap(cap), || {
                format!(
                    "dropping {} from the bounding set",
                    caps::NAMES.get(cap as usize).unwrap_or(&"a capability")
                )
            })?;
        }
    }
    let mut seccomp_installed = false;
    if let Some(program) = seccomp.filter(|_| !process.no_new_privileges) {
        install_seccomp(program)?;
        seccomp_installed = true;
    }
    if caps.is_some() {
        step(sys::set_keep_caps(true), || {
            "keeping capabilities across setuid".to_string()
        })?;
    }
    let groups: Vec<Gid> = process
        .additional_gids
        .iter()
        .map(|&g| Gid::from_raw(g))
        .collect();
    step(unistd::setgroups(&groups), || {
        format!(
            "setting the additional groups {:?}",
            process.additional_gids
        )
    })?;
    step(unistd::setgid(Gid::from_raw(process.gid)), || {
        format!("setting the gid to {}", process.gid)
    })?;
    step(unistd::setuid(Uid::from_raw(process.uid)), || {
        format!("setting the uid to {}", process.uid)
    })?;
    if let Some(caps) = caps {
        step(sys::set_keep_caps(false), || {
            "clearing keep-capabilities".to_string()
        })?;
        let state = sys::CapState {
            effective: caps.effective,
            permitted: caps.permitted,
            inheritable: caps.inheritable,
        };
        step(sys::capset(state), || {
            format!(
                "setting the capabilities (effective {:?}, permitted {:?}, inheritable {:?})",
                caps::CapSets::names(caps.effective),
                caps::CapSets::names(caps.permitted),
                caps::CapSets::names(caps.inheritable)
            )
        })?;
        // Kernels without ambient capabilities fail here; nothing to clear.
        let _ = sys::clear_ambient_caps();
        for cap in 0..=last_cap {
            if caps.ambient & (1 << cap) != 0 {
                step(sys::raise_ambient_cap(cap), || {
                    format!("raising {} in the ambient set", caps::NAMES[cap as usize])
                })?;
            }
        }
    }
    if !entered {
        unistd::chdir(cwd.as_path()).map_err(|e| {
            StageError::Spec(format!(
                "process.cwd {}: {e}; it must be a directory the user can enter",
                cwd.display()
            ))
        })?;
    }
    umask(Mode::from_bits_truncate(process.umask.unwrap_or(0o022)));
    if process.no_new_privileges {
        step(nix::sys::prctl::set_no_new_privs(), || {
            "setting no_new_privs".to_string()
        })?;
    }
    let name = &process.args[0];
    let program = find_program(name, path_of(&process.env), |p| {
        unistd::access(p, AccessFlags::X_OK).is_ok()
    })?;
    Ok((program, seccomp_installed))
}

/// The last steps of every container process, once its namespaces and
/// filesystem are done: limits, user and capabilities (with the seccomp
/// filter when it must come first), default signal handlers, then
/// `before_exec` (the init reports `Ready` and waits for its go there), the
/// pending seccomp filter and `execve`.
pub fn become_and_exec(
    process: &ProcessConfig,
    seccomp: Option<&SeccompProgram>,
    before_exec: impl FnOnce(),
) -> Result<Infallible, StageError> {
    apply_limits(process)?;
    let (program, seccomp_installed) = become_user(process, seccomp)?;
    step(sys::reset_signals(), || {
        "resetting signal handlers".to_string()
    })?;
    before_exec();
    let pending = seccomp.filter(|_| !seccomp_installed);
    exec_program(&program, process, pending)
}

/// Installs `seccomp` (when still pending) and execs the program.
pub fn exec_program(
    program: &Path,
    process: &ProcessConfig,
    seccomp: Option<&SeccompProgram>,
) -> Result<Infallible, StageError> {
    let to_cstrings = |list: &[String]| -> Result<Vec<CString>, StageError> {
        list.iter()
            .map(|s| {
                CString::new(s.as_bytes())
                    .map_err(|_| StageError::Spec(format!("{s:?} contains a NUL byte")))
            })
            .collect()
    };
    let path = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| StageError::Spec("the program path contains a NUL byte".to_string()))?;
    let args = to_cstrings(&process.args)?;
    let env = to_cstrings(&process.env)?;
    if let Some(program) = seccomp {
        install_seccomp(program)?;
    }
    let errno = match unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(StageError::Exec {
        program: process.args[0].clone(),
        errno,
    })
}

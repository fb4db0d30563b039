//! Spawning the helper processes a VM needs (QEMU, virtiofsd).
//!
//! Every child gets its own process group (so a Ctrl-C at the terminal reaches
//! husk, which forwards it to the container, and not QEMU), dies with its
//! parent (`PR_SET_PDEATHSIG`), and is killed when its handle is dropped.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::HypervisorError;

/// Spawns `cmd` with stderr (and stdout) appended to `log`, on the host CPUs
/// `cpus` when given.
pub(crate) fn spawn(
    what: &'static str,
    mut cmd: Command,
    log: &Path,
    cpus: Option<&[usize]>,
) -> Result<Child, HypervisorError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| HypervisorError::Io {
            context: format!("cannot open {}", log.display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| HypervisorError::Io {
        context: format!("cannot open {}", log.display()),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let affinity = match cpus {
        Some(cpus) => {
            let mut set = CpuSet::new();
            for &cpu in cpus {
                set.set(cpu).map_err(|e| HypervisorError::Io {
                    context: format!("host CPU {cpu} cannot be named in a CPU set"),
                    source: e.into(),
                })?;
            }
            Some(set)
        }
        None => None,
    };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, sched_setaffinity) on data
    // prepared before the fork, touching no shared state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(set) = &affinity {
                sched_setaffinity(Pid::from_raw(0), set)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|source| HypervisorError::Spawn { what, source })
}

/// Waits until `path` exists, failing early when `child` exits first.
pub(crate) async fn wait_for_socket(
    what: &'static str,
    child: &mut Child,
    path: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HypervisorError::EarlyExit {
                what,
                status: status.to_string(),
                output: log_tail(log, 2000),
            });
        }
        if start.elapsed() > timeout {
            return Err(HypervisorError::SocketTimeout {
                what,
                path: path.to_path_buf(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The last `max` bytes of a log file, trimmed, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}

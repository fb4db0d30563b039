//! Starting a monitor as its own process (`husk create`, `husk run -d`).
//!
//! The monitor is `husk` itself re-executed with the hidden `monitor` verb.
//! It inherits the caller's stdio (the container's stdio, as runc's init
//! does), starts a new session, and reports on a pipe once the container is
//! created, or why it could not be. When `husk create` then exits, the
//! monitor is re-parented to the nearest subreaper (conmon, containerd's
//! shim) or init, which can then wait for it as for the container.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use nix::fcntl::OFlag;

use super::MonitorError;

/// What the monitor reported.
#[derive(Debug, serde::Deserialize)]
struct Ready {
    pid: Option<u32>,
    error: Option<String>,
}

/// Starts `exe args... --ready-fd N` and waits until it has created the
/// container; returns the monitor's pid. With `own_stdio` false (the
/// container has a terminal of its own, through a console socket) the
/// monitor gets none of the caller's stdio: a caller reading its own
/// output to the end (containerd's runc shim in terminal mode) is not held
/// by a process that outlives `create`.
pub fn spawn_monitor(
    exe: &Path,
    args: Vec<OsString>,
    own_stdio: bool,
) -> Result<u32, MonitorError> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| MonitorError::Spawn(e.into()))?;
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args).arg("--ready-fd").arg(wfd.to_string());
    if !own_stdio {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    // The pipe's write end survives exec; the monitor leads a new session.
    husk_sys::keep_fd_and_setsid(&mut cmd, wfd);
    let child = cmd.spawn().map_err(MonitorError::Spawn)?;
    drop(w);
    let mut msg = String::new();
    let _ = std::fs::File::from(r).read_to_string(&mut msg);
    let ready: Ready = serde_json::from_str(&msg).unwrap_or(Ready {
        pid: None,
        error: Some(format!(
            "the sandbox monitor (pid {}) exited before creating the container; run with --debug --log FILE for details",
            child.id()
        )),
    });
    match (ready.pid, ready.error) {
        (Some(pid), _) => Ok(pid),
        (None, Some(e)) => Err(MonitorError::Failed(e)),
        (None, None) => Err(MonitorError::Failed(
            "the sandbox monitor sent an empty report".into(),
        )),
    }
}

/// Takes ownership of the ready pipe named by `--ready-fd`.
pub fn take_ready_fd(fd: i32) -> Result<std::os::fd::OwnedFd, MonitorError> {
    // Open, and kept from leaking into the VM's processes (a held write
    // end would keep `husk create` waiting).
    husk_sys::claim_inherited_fd(fd)
        .map_err(|_| MonitorError::Failed(format!("--ready-fd {fd} is not an open descriptor")))
}

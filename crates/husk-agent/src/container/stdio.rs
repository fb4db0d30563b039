//! The stdio of a container's init: three pipes, or a terminal (pty) whose
//! master carries both directions and whose slave becomes the init's
//! controlling terminal and `/dev/console`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::OFlag;

use crate::process::stdio::{spawn_pump, FdIo, OUTPUT_BUFFER_CAPACITY};
use crate::process::{OutputBuffer, Stdin};

/// A close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// The stdio of a new init: what the child gets, and what the agent keeps.
pub struct Stdio {
    /// Fds 0, 1, 2 of the child.
    pub child: [OwnedFd; 3],
    /// The agent's end of stdin.
    pub stdin: Stdin,
    /// Stdout as read by the agent.
    pub stdout: Arc<OutputBuffer>,
    /// Stderr as read by the agent.
    pub stderr: Arc<OutputBuffer>,
    /// The tasks filling the buffers.
    pub pumps: Vec<tokio::task::JoinHandle<()>>,
    /// The terminal's slave path, for `/dev/console`.
    pub console: Option<PathBuf>,
    /// The terminal master (for resizing).
    pub master: Option<OwnedFd>,
}

/// A pty of `size` (rows, columns) for container `id`.
pub fn terminal_stdio(id: &str, size: Option<(u16, u16)>) -> io::Result<Stdio> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = PathBuf::from(ptsname_r(&master)?);
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&slave_path)?
        .into();
    let master = OwnedFd::from(master);
    if let Some((rows, cols)) = size {
        crate::sys::set_window_size(master.as_fd(), rows, cols)?;
    }
    let writer = master.try_clone()?;
    let resizer = master.try_clone()?;
    let stdout = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
    let pump = spawn_pump(
        FdIo::terminal(master)?,
        Arc::clone(&stdout),
        format!("the terminal of container {id}"),
    );
    Ok(Stdio {
        child: [slave.try_clone()?, slave.try_clone()?, slave],
        stdin: Stdin::terminal(FdIo::new(writer)?),
        stdout,
        stderr: OutputBuffer::closed(),
        pumps: vec![pump],
        console: Some(slave_path),
        master: Some(resizer),
    })
}

/// Three pipes for container `id`.
pub fn pipe_stdio(id: &str) -> io::Result<Stdio> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let stdout = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
    let stderr = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
    let pumps = vec![
        spawn_pump(
            FdIo::new(stdout_r)?,
            Arc::clone(&stdout),
            format!("stdout of container {id}"),
        ),
        spawn_pump(
            FdIo::new(stderr_r)?,
            Arc::clone(&stderr),
            format!("stderr of container {id}"),
        ),
    ];
    Ok(Stdio {
        child: [stdin_r, stdout_w, stderr_w],
        stdin: Stdin::pipe(FdIo::new(stdin_w)?),
        stdout,
        stderr,
        pumps,
        console: None,
        master: None,
    })
}

//! The stdio of a container process (an init or an exec): three pipes, or a
//! terminal (pty) whose master carries both directions.
//!
//! The terminal is not allocated here: the stage allocates it inside the
//! container, from the container's own `/dev/ptmx`, once the container's
//! mounts are done (see `stage::setup_terminal`), so that the pty lives in
//! the container's devpts and the process sees itself on `/dev/pts/N`. The
//! stage sends the master back on a unix socket (`SCM_RIGHTS`) before it
//! reports success; until then its fds 0-2 are `/dev/null`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::protocol;
use crate::process::stdio::{spawn_pump, FdIo, OUTPUT_BUFFER_CAPACITY};
use crate::process::{ExitReceiver, OutputBuffer, Process, Stdin};

/// A close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// What a stage is started with; the agent closes its copies once the stage
/// is cloned.
pub struct ChildStdio {
    /// Fds 0, 1, 2 of the stage: the pipes, or `/dev/null` until the stage
    /// has made its terminal.
    pub fds: [OwnedFd; 3],
    /// The stage's end of the console socket, for a terminal (it goes to
    /// `protocol::CONSOLE_FD`).
    pub console_socket: Option<OwnedFd>,
}

impl ChildStdio {
    /// The descriptors a stage gets, by their number in it: stdio, its
    /// instructions (`config`), its status pipe, its start pipe and, for a
    /// terminal, the console socket.
    pub fn stage_fds<'a>(
        &'a self,
        config: BorrowedFd<'a>,
        status: BorrowedFd<'a>,
        start: BorrowedFd<'a>,
    ) -> Vec<(BorrowedFd<'a>, RawFd)> {
        let mut fds = vec![
            (self.fds[0].as_fd(), 0),
            (self.fds[1].as_fd(), 1),
            (self.fds[2].as_fd(), 2),
            (config, protocol::CONFIG_FD),
            (status, protocol::STATUS_FD),
            (start, protocol::START_FD),
        ];
        if let Some(socket) = &self.console_socket {
            fds.push((socket.as_fd(), protocol::CONSOLE_FD));
        }
        fds
    }
}

/// The agent's ends of a process's stdio while its stage runs.
pub enum PendingStdio {
    /// The ends of the three pipes.
    Pipes {
        /// Write end of stdin.
        stdin: OwnedFd,
        /// Read end of stdout.
        stdout: OwnedFd,
        /// Read end of stderr.
        stderr: OwnedFd,
    },
    /// The agent's end of the console socket, where the terminal master
    /// arrives.
    Terminal {
        /// The socket.
        socket: OwnedFd,
    },
}

/// The stdio of a started process, as the agent keeps it.
pub struct Stdio {
    /// The agent's end of stdin.
    pub stdin: Stdin,
    /// Stdout as read by the agent.
    pub stdout: Arc<OutputBuffer>,
    /// Stderr as read by the agent.
    pub stderr: Arc<OutputBuffer>,
    /// The tasks filling the buffers.
    pub pumps: Vec<tokio::task::JoinHandle<()>>,
    /// The terminal master (for resizing).
    pub master: Option<OwnedFd>,
}

impl Stdio {
    /// The agent's record of process `pid` with this stdio.
    pub fn into_process(self, pid: nix::unistd::Pid, exit: ExitReceiver) -> Process {
        Process::new(pid, exit, self.stdin, self.stdout, self.stderr, self.pumps)
            .with_terminal(self.master)
    }
}

/// Three pipes.
pub fn pipes() -> io::Result<(ChildStdio, PendingStdio)> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    Ok((
        ChildStdio {
            fds: [stdin_r, stdout_w, stderr_w],
            console_socket: None,
        },
        PendingStdio::Pipes {
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        },
    ))
}

/// A terminal the stage will allocate in the container: `/dev/null` as its
/// stdio until then, and a socket pair for the master.
pub fn terminal() -> io::Result<(ChildStdio, PendingStdio)> {
    let null: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into();
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((
        ChildStdio {
            fds: [null.try_clone()?, null.try_clone()?, null],
            console_socket: Some(theirs),
        },
        PendingStdio::Terminal { socket: ours },
    ))
}

impl PendingStdio {
    /// The agent's side of the stdio of process `label`, once its stage
    /// reported success (`Ready`, or the exec'd pid). A stage sends its
    /// terminal master before it reports, so the master is already waiting
    /// on the socket; its absence is an error, not a reason to wait.
    pub fn finish(self, label: &str) -> io::Result<Stdio> {
        match self {
            Self::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let stdout_buffer = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
                let stderr_buffer = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
                let pumps = vec![
                    spawn_pump(
                        FdIo::new(stdout)?,
                        Arc::clone(&stdout_buffer),
                        format!("stdout of {label}"),
                    ),
                    spawn_pump(
                        FdIo::new(stderr)?,
                        Arc::clone(&stderr_buffer),
                        format!("stderr of {label}"),
                    ),
                ];
                Ok(Stdio {
                    stdin: Stdin::pipe(FdIo::new(stdin)?),
                    stdout: stdout_buffer,
                    stderr: stderr_buffer,
                    pumps,
                    master: None,
                })
            }
            Self::Terminal { socket } => {
                let master = receive_master(&socket)?;
                terminal_stdio(label, master)
            }
        }
    }
}

/// The master the stage sent on the console socket.
fn receive_master(socket: &OwnedFd) -> io::Result<OwnedFd> {
    let missing = |why: &str| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stage reported success but sent no terminal master ({why})"),
        )
    };
    match crate::sys::recv_fd(socket.as_fd(), false) {
        Ok(Some(master)) => Ok(master),
        Ok(None) => Err(missing("it closed the console socket")),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(missing("nothing on the console socket"))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("receiving the terminal master on the console socket: {e}"),
        )),
    }
}

/// The stdio of process `label` on the terminal whose master is `master`:
/// one pump for its output, stdin written to the master, stderr at
/// end-of-file.
fn terminal_stdio(label: &str, master: OwnedFd) -> io::Result<Stdio> {
    let writer = master.try_clone()?;
    let resizer = master.try_clone()?;
    let stdout = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY);
    let pump = spawn_pump(
        FdIo::terminal(master)?,
        Arc::clone(&stdout),
        format!("the terminal of {label}"),
    );
    Ok(Stdio {
        stdin: Stdin::terminal(FdIo::new(writer)?),
        stdout,
        stderr: OutputBuffer::closed(),
        pumps: vec![pump],
        master: Some(resizer),
    })
}

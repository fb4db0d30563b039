//! Processes the agent started: their exit status (from the reaper) and
//! their stdio.

pub mod reaper;
pub mod spawn;
pub mod stdio;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::task::JoinHandle;

pub use reaper::{ExitReceiver, Reaper, SignalError};
pub use stdio::{OutputBuffer, Stdin, StdinError};

/// How a process ended, as a shell reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal number.
    pub status: i32,
    /// The signal that ended the process, 0 when it exited on its own.
    pub signal: i32,
}

impl ExitStatus {
    /// The process called `exit(code)`.
    pub fn exited(code: i32) -> Self {
        Self {
            status: code,
            signal: 0,
        }
    }

    /// The process was killed by `signal`.
    pub fn signaled(signal: i32) -> Self {
        Self {
            status: 128 + signal,
            signal,
        }
    }

    /// The pid and status of a terminated child; `None` for stops,
    /// continues and "still alive".
    pub fn from_wait_status(status: WaitStatus) -> Option<(Pid, Self)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Self::exited(code))),
            WaitStatus::Signaled(pid, signal, _core) => Some((pid, Self::signaled(signal as i32))),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.signal == 0 {
            write!(f, "exited with status {}", self.status)
        } else {
            write!(f, "killed by signal {}", self.signal)
        }
    }
}

/// A process the agent started, with everything it holds for it.
pub struct Process {
    pid: Pid,
    exit: ExitReceiver,
    /// Its stdin.
    pub stdin: Stdin,
    /// Its stdout (or terminal output).
    pub stdout: Arc<OutputBuffer>,
    /// Its stderr (at end-of-file from the start for a terminal).
    pub stderr: Arc<OutputBuffer>,
    pumps: Vec<JoinHandle<()>>,
    terminal: Option<OwnedFd>,
}

impl Process {
    /// Bundles a started process.
    pub fn new(
        pid: Pid,
        exit: ExitReceiver,
        stdin: Stdin,
        stdout: Arc<OutputBuffer>,
        stderr: Arc<OutputBuffer>,
        pumps: Vec<JoinHandle<()>>,
    ) -> Self {
        Self {
            pid,
            exit,
            stdin,
            stdout,
            stderr,
            pumps,
            terminal: None,
        }
    }

    /// Records the terminal master of a process that has one (for resizing).
    pub fn with_terminal(mut self, master: Option<OwnedFd>) -> Self {
        self.terminal = master;
        self
    }

    /// Its terminal master, if it has a terminal.
    pub fn terminal(&self) -> Option<BorrowedFd<'_>> {
        self.terminal.as_ref().map(|fd| fd.as_fd())
    }

    /// Its pid in the agent's PID namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits until it has exited; returns at once when it already has.
    pub async fn wait(&self) -> ExitStatus {
        wait_exit(self.pid, &self.exit).await
    }
}

/// Waits until the child `pid` whose exit `exit` reports has exited (for a
/// child that has no [`Process`] yet); returns at once when it already has.
pub async fn wait_exit(pid: Pid, exit: &ExitReceiver) -> ExitStatus {
    let mut exit = exit.clone();
    loop {
        if let Some(status) = *exit.borrow_and_update() {
            return status;
        }
        if exit.changed().await.is_err() {
            // The reaper always publishes before it forgets a pid, so a
            // closed channel with no status cannot happen; report it as a
            // failure rather than hang.
            return exit.borrow().unwrap_or_else(|| {
                tracing::error!(pid = pid.as_raw(), "exit status lost");
                ExitStatus::exited(255)
            });
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_status_encoding() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            ExitStatus::from_wait_status(WaitStatus::Exited(pid, 3)),
            Some((
                pid,
                ExitStatus {
                    status: 3,
                    signal: 0
                }
            ))
        );
        assert_eq!(
            ExitStatus::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((
                pid,
                ExitStatus {
                    status: 137,
                    signal: 9
                }
            ))
        );
        assert_eq!(ExitStatus::from_wait_status(WaitStatus::StillAlive), None);
        assert_eq!(ExitStatus::signaled(15).to_string(), "killed by signal 15");
        assert_eq!(ExitStatus::exited(0).to_string(), "exited with status 0");
    }
}

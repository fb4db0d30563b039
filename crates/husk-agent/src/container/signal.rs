//! Signalling a container's processes: one process by exec id, or all of
//! them (through a frozen cgroup, so that none acts before the others have
//! their signal; a paused container stays frozen); and the agent's own
//! kills of a process it gives up on.

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Container, ContainerError, Containers};
use crate::process::{wait_exit, ExitReceiver, ExitStatus, Process, SignalError};

impl Containers {
    /// Sends `signal` to process `(id, exec_id)`, or with `all` to every
    /// process of the container.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        if all {
            return self.signal_all(id, signal);
        }
        let process = self.get_process(id, exec_id)?;
        self.reaper
            .signal(process.pid(), signal)
            .map_err(|source| match source {
                SignalError::Exited => ContainerError::Exited {
                    id: id.to_string(),
                    status: process.exit_status().unwrap_or(ExitStatus::exited(-1)),
                },
                SignalError::Kill {
                    errno: nix::errno::Errno::EINVAL,
                    ..
                } => ContainerError::BadSignal(signal),
                source => ContainerError::Signal {
                    id: id.to_string(),
                    source,
                },
            })
    }

    fn signal_all(&self, id: &str, signal: i32) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let sig = match signal {
            0 => None,
            n => Some(Signal::try_from(n).map_err(|_| ContainerError::BadSignal(n))?),
        };
        // Signal a frozen container (as runc does), so that none of its
        // processes acts on a signal before the others have theirs: a shell
        // init whose children die first would exit, and its PID namespace's
        // end would SIGKILL the rest before they got the signal asked for.
        // A paused container stays frozen (the signal waits for resume).
        let frozen = match (&container.cgroup, sig) {
            (Some(cgroup), Some(s)) if s != Signal::SIGKILL && !cgroup.is_frozen() => {
                cgroup.freeze().then_some(cgroup)
            }
            _ => None,
        };
        let pids = container.pids();
        let signalled = self.signal_pids(id, &container, sig, pids);
        if let Some(cgroup) = frozen {
            cgroup.thaw();
        }
        signalled
    }

    fn signal_pids(
        &self,
        id: &str,
        container: &Container,
        sig: Option<Signal>,
        pids: Vec<i32>,
    ) -> Result<(), ContainerError> {
        if pids.is_empty() {
            return Err(ContainerError::Exited {
                id: id.to_string(),
                status: container
                    .process
                    .exit_status()
                    .unwrap_or(ExitStatus::exited(-1)),
            });
        }
        if sig == Some(Signal::SIGKILL) {
            if let Some(cgroup) = &container.cgroup {
                cgroup.kill_all();
            }
        }
        tracing::debug!(
            container = id,
            signal = sig.map_or(0, |s| s as i32),
            count = pids.len(),
            "signalling all processes"
        );
        for pid in pids {
            // Processes may exit meanwhile; that is fine.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
        Ok(())
    }

    /// SIGKILLs child `pid`, which has no [`Process`] yet, and waits for
    /// its exit.
    pub(super) async fn kill_and_reap(&self, pid: Pid, exit: &ExitReceiver) -> ExitStatus {
        let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
        wait_exit(pid, exit).await
    }

    /// SIGKILLs `process` and waits for it.
    pub(super) async fn kill_and_wait(&self, process: &Process) -> ExitStatus {
        let _ = self.reaper.signal(process.pid(), Signal::SIGKILL as i32);
        process.wait().await
    }
}

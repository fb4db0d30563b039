//! The agent's only `waitpid` caller: a SIGCHLD-driven loop that reaps every
//! child and hands each exit status to whoever registered the pid.
//!
//! Registration and reaping take the same lock, and `spawn` holds it across
//! the fork and the insertion, so a child that exits at once is still
//! registered before the reaper can collect it. Pids nobody registered
//! (orphans reparented to the agent) are reaped and forgotten, except while
//! an adoption is pending: an exec'd process is cloned by the exec stage with
//! `CLONE_PARENT`, so it is the agent's child before the agent learns its
//! pid. While an [`AdoptionWindow`] is open, exits of unregistered pids are
//! kept for [`Reaper::adopt`], so such a process that dies at once still has
//! its status delivered.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::ExitStatus;

/// Receives a process's exit status once the reaper collected it.
pub type ExitReceiver = watch::Receiver<Option<ExitStatus>>;

/// Why a signal could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The process was already reaped.
    #[error("the process already exited")]
    Exited,
    /// `kill(2)` refused.
    #[error("kill({pid}, {signal}) failed: {errno}")]
    Kill { pid: i32, signal: i32, errno: Errno },
}

/// How long the exit of an unregistered pid is kept while adoptions are
/// pending. An exec stage reports its child's pid within milliseconds.
const UNCLAIMED_TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Table {
    children: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    /// Open adoption windows.
    pending_adoptions: usize,
    /// Exits of unregistered pids seen while an adoption was pending.
    unclaimed: HashMap<i32, (ExitStatus, Instant)>,
}

/// Table of live children, shared by the spawner and the reaper task.
#[derive(Default)]
pub struct Reaper {
    table: Mutex<Table>,
}

/// While alive, exits of pids the reaper does not know are kept so that
/// [`Reaper::adopt`] can still deliver them.
pub struct AdoptionWindow {
    reaper: Arc<Reaper>,
}

impl Drop for AdoptionWindow {
    fn drop(&mut self) {
        let mut table = self.reaper.table();
        table.pending_adoptions -= 1;
        if table.pending_adoptions == 0 {
            table.unclaimed.clear();
        }
    }
}

impl Reaper {
    /// A reaper with an empty table. Call [`Reaper::start`] inside the runtime.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs the SIGCHLD handler and spawns the reaping task. Children that
    /// exited before this call are collected at once.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::clone(self);
        reaper.reap();
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                reaper.reap();
            }
        });
        Ok(())
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means a panic elsewhere; the map is still valid.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens an adoption window: until it is dropped, the exit of a child the
    /// agent did not clone itself is kept for [`Reaper::adopt`].
    pub fn adoption_window(self: &Arc<Self>) -> AdoptionWindow {
        self.table().pending_adoptions += 1;
        AdoptionWindow {
            reaper: Arc::clone(self),
        }
    }

    /// Registers `pid`, a child of the agent that someone else cloned (with
    /// `CLONE_PARENT`), inside an open adoption window. If it already exited
    /// and was reaped, its status is delivered at once.
    pub fn adopt(&self, _window: &AdoptionWindow, pid: Pid) -> ExitReceiver {
        let mut table = self.table();
        let (tx, rx) = watch::channel(None);
        match table.unclaimed.remove(&pid.as_raw()) {
            Some((status, _)) => {
                tx.send_replace(Some(status));
            }
            None => {
                table.children.insert(pid.as_raw(), tx);
            }
        }
        rx
    }

    /// Runs `fork` (which must create exactly one child and return its pid)
    /// with the table locked, and registers the child before unlocking.
    pub fn spawn<F>(&self, fork: F) -> io::Result<(Pid, ExitReceiver)>
    where
        F: FnOnce() -> io::Result<Pid>,
    {
        let mut table = self.table();
        let pid = fork()?;
        let (tx, rx) = watch::channel(None);
        table.children.insert(pid.as_raw(), tx);
        Ok((pid, rx))
    }

    /// Collects every child that has exited and publishes the statuses.
    pub fn reap(&self) {
        let mut table = self.table();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => {
                    let Some((pid, exit)) = ExitStatus::from_wait_status(status) else {
                        // StillAlive: nothing more to collect right now.
                        break;
                    };
                    match table.children.remove(&pid.as_raw()) {
                        Some(tx) => {
                            tracing::debug!(pid = pid.as_raw(), %exit, "child exited");
                            tx.send_replace(Some(exit));
                        }
                        None if table.pending_adoptions > 0 => {
                            let now = Instant::now();
                            table
                                .unclaimed
                                .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                            table.unclaimed.insert(pid.as_raw(), (exit, now));
                            tracing::trace!(pid = pid.as_raw(), %exit, "kept an unclaimed exit");
                        }
                        None => tracing::trace!(pid = pid.as_raw(), %exit, "reaped an orphan"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    /// Sends `signal` to `pid` if it is still a registered, unreaped child.
    /// Holding the table lock guarantees the pid has not been reused.
    pub fn signal(&self, pid: Pid, signal: i32) -> Result<(), SignalError> {
        let table = self.table();
        if !table.children.contains_key(&pid.as_raw()) {
            return Err(SignalError::Exited);
        }
        let sig = if signal == 0 {
            None
        } else {
            Some(Signal::try_from(signal).map_err(|errno| SignalError::Kill {
                pid: pid.as_raw(),
                signal,
                errno,
            })?)
        };
        kill(pid, sig).map_err(|errno| match errno {
            Errno::ESRCH => SignalError::Exited,
            errno => SignalError::Kill {
                pid: pid.as_raw(),
                signal,
                errno,
            },
        })
    }

    /// Pids of every registered child (for killing them all at exit).
    pub fn pids(&self) -> Vec<Pid> {
        self.table()
            .children
            .keys()
            .map(|&p| Pid::from_raw(p))
            .collect()
    }

    /// Whether `pid` is a registered child that has not been reaped yet.
    pub fn is_alive(&self, pid: Pid) -> bool {
        self.table().children.contains_key(&pid.as_raw())
    }
}

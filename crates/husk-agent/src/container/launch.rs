//! The agent's side of launching a stage, written once for both stages:
//! `husk-agent init` (CreateContainer) and `husk-agent exec` (ExecProcess).
//!
//! [`Containers::launch_stage`] makes the stage's stdio (pipes, or a console
//! socket for a terminal) and its config, status and start pipes, clones
//! the agent and execs the stage (the init is held before exec until it is
//! in its cgroup and has its id maps), and feeds it its instructions.
//! [`StageControl`] then reads what the stage reports and gives it the go;
//! [`Containers::take_over`] makes the agent's record of the process once
//! the stage reported success. What a report means is the caller's: the
//! init reports `Ready`, the exec stage the pid of the process it forked.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::protocol::{self, StageMessage};
use super::stdio::{self, pipe, PendingStdio};
use super::{ContainerError, Containers};
use crate::cgroup::{Cgroup, CgroupError};
use crate::process::spawn::{clone_exec, CloneExec};
use crate::process::stdio::FdIo;
use crate::process::{ExitReceiver, Process};

/// Which stage to launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StageKind {
    /// `husk-agent init`: builds a new container and runs its program.
    Init,
    /// `husk-agent exec`: starts an extra process in a running container.
    Exec,
}

impl StageKind {
    /// The agent's subcommand that runs the stage.
    fn subcommand(self) -> &'static CStr {
        match self {
            Self::Init => c"init",
            Self::Exec => c"exec",
        }
    }

    /// The stage's instructions, in messages.
    fn instructions(self) -> &'static str {
        match self {
            Self::Init => "init instructions",
            Self::Exec => "exec instructions",
        }
    }

    /// The step that encodes its instructions.
    fn encoding(self) -> &'static str {
        match self {
            Self::Init => "encoding the init instructions",
            Self::Exec => "encoding the exec instructions",
        }
    }

    /// The step that clones it.
    fn cloning(self) -> &'static str {
        match self {
            Self::Init => "starting the container init (clone)",
            Self::Exec => "starting the exec stage (clone)",
        }
    }
}

/// A stage to launch.
pub(super) struct StageLaunch<'a> {
    /// Which stage.
    pub(super) kind: StageKind,
    /// Whether the process gets a terminal (the stage allocates it in the
    /// container and sends the master back) rather than three pipes.
    pub(super) terminal: bool,
    /// The namespaces the stage is cloned into (none for an exec: the
    /// exec stage joins the init's).
    pub(super) namespaces: CloneFlags,
    /// A PID namespace to clone the stage into instead (a pod member's
    /// init joining its sandbox container's; `namespaces` then lacks
    /// `CLONE_NEWPID`).
    pub(super) pid_namespace: Option<BorrowedFd<'a>>,
    /// Hold the clone before it execs the stage, until it is placed; `None`
    /// execs at once.
    pub(super) hold: Option<Hold<'a>>,
}

/// Where the agent places a held clone before it lets it exec (runc's
/// order: the cgroup first, then the id maps).
pub(super) struct Hold<'a> {
    /// The container's cgroup.
    pub(super) cgroup: Option<&'a Cgroup>,
    /// The user namespace's uid and gid maps; with them the clone becomes
    /// root of its new user namespace before it execs.
    pub(super) id_maps: Option<&'a (String, String)>,
}

/// A stage that was cloned and fed its instructions.
pub(super) struct Launched {
    /// The stage's pid.
    pub(super) pid: Pid,
    /// The stage's exit.
    pub(super) exit: ExitReceiver,
    /// The agent's ends of the process's stdio, until the stage reports.
    pub(super) stdio: PendingStdio,
    /// The stage's status and start pipes.
    pub(super) control: StageControl,
}

/// The agent's ends of a stage's status and start pipes (for the init,
/// kept with the container until start).
pub(super) struct StageControl {
    start: File,
    status: BufReader<FdIo>,
}

/// How a stage took the go.
pub(super) enum Started {
    /// Its status pipe closed at exec: the program runs (and may already
    /// have exited, which WaitProcess reports).
    Running,
    /// The start pipe is broken: the stage is gone (killed before start).
    Gone,
    /// The stage reported a failure.
    Failed {
        /// What failed.
        message: String,
        /// Whether the spec is at fault.
        invalid_spec: bool,
    },
    /// The stage sent another message (the caller logs it); the program is
    /// taken to run.
    Unexpected(StageMessage),
    /// The status pipe could not be read.
    Unreadable(io::Error),
}

impl StageControl {
    /// Reads the stage's next message; `None` at end-of-file. Warnings are
    /// logged and skipped.
    pub(super) async fn next_message(&mut self, id: &str) -> io::Result<Option<StageMessage>> {
        next_message(id, &mut self.status).await
    }

    /// Gives the stage its go and waits until it exec'd the program (or
    /// failed to).
    pub(super) async fn start(self, id: &str) -> Started {
        let Self {
            mut start,
            mut status,
        } = self;
        // One byte into an empty pipe never blocks. It fails (EPIPE) only
        // when the stage is gone: killed before it was started.
        if start.write_all(protocol::GO).is_err() {
            return Started::Gone;
        }
        drop(start);
        match next_message(id, &mut status).await {
            Ok(None) => Started::Running,
            Ok(Some(StageMessage::Error {
                message,
                invalid_spec,
            })) => Started::Failed {
                message,
                invalid_spec,
            },
            Ok(Some(other)) => Started::Unexpected(other),
            Err(source) => Started::Unreadable(source),
        }
    }
}

/// Reads a stage's next message from its status pipe; `None` at
/// end-of-file. Warnings are logged and skipped.
async fn next_message(id: &str, status: &mut BufReader<FdIo>) -> io::Result<Option<StageMessage>> {
    loop {
        let mut line = String::new();
        if status.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        match protocol::decode(&line) {
            Ok(StageMessage::Warning(text)) => {
                tracing::warn!(container = id, "container init: {text}");
            }
            Ok(message) => return Ok(Some(message)),
            Err(e) => tracing::warn!(
                container = id,
                "unreadable message from the container init ({e}): {line:?}"
            ),
        }
    }
}

/// Why a held clone could not be placed.
enum HoldError {
    Cgroup(CgroupError),
    Io(&'static str, io::Error),
}

impl Hold<'_> {
    /// Places the held clone `pid` in its cgroup and writes its user
    /// namespace's id maps.
    fn place(&self, pid: Pid) -> Result<(), HoldError> {
        if let Some(cgroup) = self.cgroup {
            cgroup.add(pid.as_raw()).map_err(HoldError::Cgroup)?;
        }
        if let Some((uid_map, gid_map)) = self.id_maps {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            std::fs::write(proc.join("uid_map"), uid_map)
                .map_err(|e| HoldError::Io("writing linux.uidMappings to uid_map", e))?;
            std::fs::write(proc.join("gid_map"), gid_map)
                .map_err(|e| HoldError::Io("writing linux.gidMappings to gid_map", e))?;
        }
        Ok(())
    }
}

impl Containers {
    /// Clones the agent as the stage `launch` of container `id` and feeds
    /// it `config`. A clone that cannot be placed is killed and reaped.
    pub(super) async fn launch_stage(
        &self,
        id: &str,
        launch: &StageLaunch<'_>,
        config: &impl Serialize,
    ) -> Result<Launched, ContainerError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| ContainerError::Io {
                id: id.to_string(),
                what,
                source,
            }
        };
        let (child_stdio, stdio) = if launch.terminal {
            stdio::terminal().map_err(io_err("preparing the terminal's console socket"))?
        } else {
            stdio::pipes().map_err(io_err("creating stdio pipes"))?
        };
        let json = serde_json::to_vec(config)
            .map_err(|e| io_err(launch.kind.encoding())(io::Error::other(e)))?;
        let (config_r, config_w) = pipe().map_err(io_err("creating the config pipe"))?;
        let (status_r, status_w) = pipe().map_err(io_err("creating the status pipe"))?;
        let (start_r, start_w) = pipe().map_err(io_err("creating the start pipe"))?;
        let hold_pipe = match &launch.hold {
            Some(_) => Some(pipe().map_err(io_err("creating the hold pipe"))?),
            None => None,
        };

        let argv = [
            CString::from(c"husk-agent"),
            CString::from(launch.kind.subcommand()),
        ];
        let mut fds = child_stdio.stage_fds(config_r.as_fd(), status_w.as_fd(), start_r.as_fd());
        if let Some((hold_r, _)) = &hold_pipe {
            fds.push((hold_r.as_fd(), protocol::HOLD_FD));
        }
        let request = CloneExec {
            namespaces: launch.namespaces,
            pid_namespace: launch.pid_namespace,
            program: &self.options.agent_exe,
            argv: &argv,
            fds,
            parent_death_signal: self.options.die_with_agent.then_some(Signal::SIGKILL),
            hold_fd: hold_pipe.as_ref().map(|_| protocol::HOLD_FD),
            become_userns_root: launch.hold.as_ref().is_some_and(|h| h.id_maps.is_some()),
        };
        // Called on a runtime worker thread (this is an async fn, not a
        // blocking task), which lives as long as the agent: see
        // `CloneExec::parent_death_signal`.
        let (pid, exit) = self
            .reaper
            .spawn(|| clone_exec(&request))
            .map_err(io_err(launch.kind.cloning()))?;
        drop(request);
        drop((child_stdio, config_r, status_w, start_r));

        if let (Some(hold), Some((hold_r, hold_w))) = (&launch.hold, hold_pipe) {
            drop(hold_r);
            // The clone waits before exec for its cgroup and its id maps.
            if let Err(error) = hold.place(pid) {
                self.kill_and_reap(pid, &exit).await;
                return Err(match error {
                    HoldError::Cgroup(source) => ContainerError::Cgroup {
                        id: id.to_string(),
                        source,
                    },
                    HoldError::Io(what, source) => ContainerError::Io {
                        id: id.to_string(),
                        what,
                        source,
                    },
                });
            }
            // One byte into an empty pipe never blocks; a dead child is
            // noticed through its status pipe.
            let _ = File::from(hold_w).write_all(protocol::RELEASE);
        }

        let status =
            BufReader::new(FdIo::new(status_r).map_err(io_err("watching the status pipe"))?);
        let fed = async {
            let mut config_pipe = FdIo::new(config_w)?;
            config_pipe.write_all(&json).await
            // Dropping the pipe here gives the stage its end-of-file.
        };
        if let Err(e) = fed.await {
            // The stage is gone; its status pipe and exit status say why.
            tracing::debug!(
                container = id,
                "writing the {} failed: {e}",
                launch.kind.instructions()
            );
        }
        Ok(Launched {
            pid,
            exit,
            stdio,
            control: StageControl {
                start: File::from(start_w),
                status,
            },
        })
    }

    /// The agent's record of process `pid` (exiting through `exit`) once
    /// its stage reported success, with its stdio taken over (`label` names
    /// it in logs). With a terminal, the stage sent its master before it
    /// reported. A process whose stdio cannot be taken over is killed and
    /// reaped.
    pub(super) async fn take_over(
        &self,
        stdio: PendingStdio,
        label: &str,
        pid: Pid,
        exit: ExitReceiver,
    ) -> io::Result<Process> {
        match stdio.finish(label) {
            Ok(stdio) => Ok(stdio.into_process(pid, exit)),
            Err(source) => {
                self.kill_and_reap(pid, &exit).await;
                Err(source)
            }
        }
    }
}

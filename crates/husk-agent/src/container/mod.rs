//! Containers in the guest: the table of them, and their lifecycle
//! (create holds the init before exec, start releases it, remove kills and
//! forgets).

pub mod init;
pub mod mounts;
pub mod spec;
pub mod stdio;
pub mod storage;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_protocol::agent::Storage;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::process::spawn::{clone_exec, CloneExec};
use crate::process::stdio::FdIo;
use crate::process::{ExitStatus, Process, Reaper, SignalError, StdinError};
use spec::{InitConfig, InitMessage, SpecError};
use stdio::{pipe, pipe_stdio, terminal_stdio};
use storage::StorageError;

/// Why a container operation failed. `crate::error` maps these to ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Unknown container id.
    #[error("container {0:?} does not exist; create it first (or it was already removed)")]
    NotFound(String),
    /// Unknown exec id.
    #[error("process {exec_id:?} of container {id:?} does not exist; only the container's init (empty exec_id) can be addressed")]
    NoSuchProcess {
        /// Container id.
        id: String,
        /// Exec id asked for.
        exec_id: String,
    },
    /// Duplicate create.
    #[error("container {0:?} already exists; remove it first or choose another id")]
    AlreadyExists(String),
    /// Bad id.
    #[error("container id {0:?} is invalid; use 1 to 128 characters from A-Z a-z 0-9 _ . - not starting with a dot")]
    InvalidId(String),
    /// Create has not finished.
    #[error("container {0:?} is still being created; wait for CreateContainer to return")]
    Creating(String),
    /// Start twice.
    #[error("container {0:?} was already started; it can be started only once")]
    AlreadyStarted(String),
    /// The rootfs is not there.
    #[error("the rootfs {0} does not exist in the guest; list the storage that holds it in storages and check root.path")]
    RootfsMissing(PathBuf),
    /// The spec is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A storage could not be mounted.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The init stage reported a failure.
    #[error("container {id:?}: {message}")]
    Init {
        /// Container id.
        id: String,
        /// The init stage's message.
        message: String,
        /// Whether the spec is at fault.
        invalid_spec: bool,
    },
    /// The init stage died without saying why.
    #[error("the init of container {id:?} {status} before it ran the container's program; the guest console log may say why")]
    InitDied {
        /// Container id.
        id: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// Signal to a process that is gone.
    #[error("process {id:?} already exited ({status}); there is nothing to signal")]
    Exited {
        /// Container id.
        id: String,
        /// Its exit status.
        status: ExitStatus,
    },
    /// Signal number out of range.
    #[error("signal {0} is not a valid signal number")]
    BadSignal(i32),
    /// kill(2) failed otherwise.
    #[error("signalling container {id:?}: {source}")]
    Signal {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: SignalError,
    },
    /// Stdin problems.
    #[error("stdin of container {id:?}: {source}")]
    Stdin {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: StdinError,
    },
    /// A system call of the agent failed.
    #[error("container {id:?}: {what}: {source}")]
    Io {
        /// Container id.
        id: String,
        /// The step.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// The agent's end of the init stage's control pipes, until start.
struct InitControl {
    start: File,
    status: BufReader<FdIo>,
}

/// A container: its init process and, until it is started, the pipes that
/// hold the init before exec.
pub struct Container {
    id: String,
    process: Process,
    control: tokio::sync::Mutex<Option<InitControl>>,
}

impl Container {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init process.
    pub fn process(&self) -> &Process {
        &self.process
    }
}

enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// How containers are started, fixed per agent mode.
#[derive(Clone, Debug)]
pub struct ContainerOptions {
    /// The agent binary to re-exec as the init stage.
    pub agent_exe: CString,
    /// Kill containers when the agent dies (the agent as a plain process).
    pub die_with_agent: bool,
}

impl Default for ContainerOptions {
    fn default() -> Self {
        Self {
            agent_exe: CString::from(c"/proc/self/exe"),
            die_with_agent: false,
        }
    }
}

/// Every container of the guest.
pub struct Containers {
    table: Mutex<HashMap<String, Slot>>,
    reaper: Arc<Reaper>,
    storages: tokio::sync::Mutex<()>,
    options: ContainerOptions,
}

/// Removes a reserved id unless the create that reserved it succeeded.
struct Reservation<'a> {
    containers: &'a Containers,
    id: &'a str,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.containers.table().remove(self.id);
        }
    }
}

/// Checks a container id: it names things in logs and paths.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Reads the init stage's next message; `None` at end-of-file. Warnings are
/// logged and skipped.
async fn next_message(id: &str, status: &mut BufReader<FdIo>) -> io::Result<Option<InitMessage>> {
    loop {
        let mut line = String::new();
        if status.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<InitMessage>(line.trim_end()) {
            Ok(InitMessage::Warning(text)) => {
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

impl Containers {
    /// An empty table whose processes are reaped by `reaper`.
    pub fn new(reaper: Arc<Reaper>, options: ContainerOptions) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            reaper,
            storages: tokio::sync::Mutex::new(()),
            options,
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container `id`, once created.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        match self.table().get(id) {
            Some(Slot::Ready(container)) => Ok(Arc::clone(container)),
            Some(Slot::Creating) => Err(ContainerError::Creating(id.to_string())),
            None => Err(ContainerError::NotFound(id.to_string())),
        }
    }

    /// The container owning process `(id, exec_id)`; only the init (empty
    /// exec_id) exists.
    pub fn get_process(&self, id: &str, exec_id: &str) -> Result<Arc<Container>, ContainerError> {
        let container = self.get(id)?;
        if !exec_id.is_empty() {
            return Err(ContainerError::NoSuchProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        Ok(container)
    }

    /// Mounts the storages, builds the container and holds its init before
    /// exec. On failure nothing of the container remains.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        storages: &[Storage],
    ) -> Result<(), ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.to_string()));
        }
        {
            let mut table = self.table();
            if table.contains_key(id) {
                return Err(ContainerError::AlreadyExists(id.to_string()));
            }
            table.insert(id.to_string(), Slot::Creating);
        }
        let mut reservation = Reservation {
            containers: self,
            id,
            done: false,
        };

        self.mount_storages(storages).await?;
        let spec = spec::parse(spec_json)?;
        let mut config = spec::translate(&spec)?;
        if !config.rootfs.is_dir() {
            return Err(ContainerError::RootfsMissing(config.rootfs.clone()));
        }
        let (namespaces, notes) = spec::clone_flags(&spec);
        for note in notes {
            tracing::warn!(container = id, "{note}");
        }
        let unapplied = spec::unapplied_features(&spec);
        if !unapplied.is_empty() {
            tracing::info!(
                container = id,
                "not applied in the guest yet: {}",
                unapplied.join(", ")
            );
        }
        let console_size = spec
            .process()
            .as_ref()
            .and_then(|p| p.console_size())
            .map(|b| {
                (
                    b.height().min(u16::MAX as u64) as u16,
                    b.width().min(u16::MAX as u64) as u16,
                )
            });
        let container = self
            .spawn_init(id, &mut config, namespaces, console_size)
            .await?;
        self.table()
            .insert(id.to_string(), Slot::Ready(Arc::new(container)));
        reservation.done = true;
        tracing::info!(container = id, "created");
        Ok(())
    }

    async fn mount_storages(&self, storages: &[Storage]) -> Result<(), ContainerError> {
        if storages.is_empty() {
            return Ok(());
        }
        let _serialised = self.storages.lock().await;
        for storage in storages {
            let storage = storage.clone();
            tokio::task::spawn_blocking(move || storage::mount_storage(&storage))
                .await
                .map_err(|e| ContainerError::Io {
                    id: String::new(),
                    what: "mounting storages",
                    source: io::Error::other(e),
                })??;
        }
        Ok(())
    }

    /// Clones the init stage, feeds it the config and waits for `Ready`.
    async fn spawn_init(
        &self,
        id: &str,
        config: &mut InitConfig,
        namespaces: nix::sched::CloneFlags,
        console_size: Option<(u16, u16)>,
    ) -> Result<Container, ContainerError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| ContainerError::Io {
                id: id.to_string(),
                what,
                source,
            }
        };
        let stdio = if config.process.terminal {
            terminal_stdio(id, console_size).map_err(io_err("allocating a terminal"))?
        } else {
            pipe_stdio(id).map_err(io_err("creating stdio pipes"))?
        };
        config.console = stdio.console.clone();
        let json = serde_json::to_vec(config).map_err(|e| ContainerError::Io {
            id: id.to_string(),
            what: "encoding the init instructions",
            source: io::Error::other(e),
        })?;
        let (config_r, config_w) = pipe().map_err(io_err("creating the config pipe"))?;
        let (status_r, status_w) = pipe().map_err(io_err("creating the status pipe"))?;
        let (start_r, start_w) = pipe().map_err(io_err("creating the start pipe"))?;

        let argv = [CString::from(c"husk-agent"), CString::from(c"init")];
        let request = CloneExec {
            namespaces,
            program: &self.options.agent_exe,
            argv: &argv,
            fds: vec![
                (stdio.child[0].as_fd(), 0),
                (stdio.child[1].as_fd(), 1),
                (stdio.child[2].as_fd(), 2),
                (config_r.as_fd(), init::CONFIG_FD),
                (status_w.as_fd(), init::STATUS_FD),
                (start_r.as_fd(), init::START_FD),
            ],
            parent_death_signal: self.options.die_with_agent.then_some(Signal::SIGKILL),
        };
        // Called on a runtime worker thread (this is an async fn, not a
        // blocking task), which lives as long as the agent: see
        // `CloneExec::parent_death_signal`.
        let (pid, exit) = self
            .reaper
            .spawn(|| clone_exec(&request))
            .map_err(io_err("starting the container init (clone)"))?;
        drop(request);
        drop((stdio.child, config_r, status_w, start_r));
        tracing::debug!(container = id, pid = pid.as_raw(), "container init started");
        let process = Process::new(
            pid,
            exit,
            stdio.stdin,
            stdio.stdout,
            stdio.stderr,
            stdio.pumps,
        );

        let mut status =
            BufReader::new(FdIo::new(status_r).map_err(io_err("watching the status pipe"))?);
        let fed = async {
            let mut config_pipe = FdIo::new(config_w)?;
            config_pipe.write_all(&json).await
            // Dropping the pipe here gives the init its end-of-file.
        };
        if let Err(e) = fed.await {
            // The init is gone; its status pipe and exit status say why.
            tracing::debug!(container = id, "writing the init instructions failed: {e}");
        }
        let outcome = next_message(id, &mut status).await;
        let failure = match outcome {
            Ok(Some(InitMessage::Ready)) => None,
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => Some(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            // End-of-file (or an unreadable pipe) before Ready: the init died;
            // its exit status is filled in below.
            Ok(Some(InitMessage::Warning(_))) | Ok(None) | Err(_) => {
                Some(ContainerError::InitDied {
                    id: id.to_string(),
                    status: ExitStatus::exited(-1),
                })
            }
        };
        if let Some(error) = failure {
            let _ = self.reaper.signal(process.pid(), Signal::SIGKILL as i32);
            let exit = process.wait().await;
            return Err(match error {
                ContainerError::InitDied { id, .. } => {
                    ContainerError::InitDied { id, status: exit }
                }
                other => other,
            });
        }
        let start = File::from(start_w);
        Ok(Container {
            id: id.to_string(),
            process,
            control: tokio::sync::Mutex::new(Some(InitControl { start, status })),
        })
    }

    /// Releases the init into the container's program; returns once it was
    /// exec'd (or failed to be).
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let mut control = container.control.lock().await;
        let Some(InitControl {
            mut start,
            mut status,
        }) = control.take()
        else {
            return Err(ContainerError::AlreadyStarted(id.to_string()));
        };
        // One byte into an empty pipe never blocks. It fails (EPIPE) only
        // when the held init is gone: killed before it was started.
        if start.write_all(b"s").is_err() {
            let status = container.process.wait().await;
            return Err(ContainerError::InitDied {
                id: id.to_string(),
                status,
            });
        }
        drop(start);
        let outcome = next_message(id, &mut status).await;
        match outcome {
            // The status pipe closed at exec: the program runs (and may
            // already have exited, which WaitProcess reports).
            Ok(None) => {
                tracing::info!(container = id, "started");
                Ok(())
            }
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => Err(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            Ok(Some(other)) => {
                tracing::warn!(
                    container = id,
                    "unexpected message from the container init after start: {other:?}"
                );
                Ok(())
            }
            Err(source) => Err(ContainerError::Io {
                id: id.to_string(),
                what: "reading the init's status after start",
                source,
            }),
        }
    }

    /// Sends `signal` to the container's init.
    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), ContainerError> {
        let container = self.get_process(id, exec_id)?;
        let process = container.process();
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

    /// Writes to the init's stdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ContainerError> {
        let container = self.get_process(id, exec_id)?;
        container
            .process()
            .stdin
            .write(data)
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Closes the init's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let container = self.get_process(id, exec_id)?;
        container
            .process()
            .stdin
            .close()
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Kills the container if it still runs, waits for it, and forgets it.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let process = container.process();
        if process.exit_status().is_none() {
            match self.reaper.signal(process.pid(), Signal::SIGKILL as i32) {
                Ok(()) | Err(SignalError::Exited) => {}
                Err(source) => {
                    return Err(ContainerError::Signal {
                        id: id.to_string(),
                        source,
                    })
                }
            }
        }
        let exit = process.wait().await;
        {
            let mut table = self.table();
            if matches!(table.get(id), Some(Slot::Ready(c)) if Arc::ptr_eq(c, &container)) {
                table.remove(id);
            }
        }
        tracing::info!(container = id, %exit, "removed");
        Ok(())
    }

    /// Kills every container and waits for them (the agent is exiting).
    pub async fn kill_all(&self) {
        let containers: Vec<Arc<Container>> = self
            .table()
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(c) => Some(Arc::clone(c)),
                Slot::Creating => None,
            })
            .collect();
        // Every registered child is a container init, including those still
        // being created.
        for pid in self.reaper.pids() {
            let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
        }
        for container in containers {
            container.process().wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(valid_id("abc-1.2_3"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(129)));
    }
}

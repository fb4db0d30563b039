//! The container error type.

use std::io;
use std::path::PathBuf;

use super::spec::SpecError;
use super::storage::StorageError;
use crate::cgroup::CgroupError;
use crate::process::{ExitStatus, SignalError, StdinError};

/// Why a container operation failed. `crate::error` maps these to ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Unknown container id.
    #[error("container {0:?} does not exist; create it first (or it was already removed)")]
    NotFound(String),
    /// Unknown exec id.
    #[error("process {exec_id:?} of container {id:?} does not exist; address the init with an empty exec_id, or an exec by the id given to ExecProcess")]
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
    #[error("container id {0:?} is invalid; use 1 to 128 characters from A-Z a-z 0-9 _ + . - not starting with a dot")]
    InvalidId(String),
    /// ExecProcess without an exec id.
    #[error("ExecProcess for container {0:?} has an empty exec_id; name the process (the empty id is the init)")]
    EmptyExecId(String),
    /// Duplicate exec id.
    #[error("container {id:?} already has a process {exec_id:?}; choose another exec_id")]
    ExecExists {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The exec is still starting.
    #[error(
        "process {exec_id:?} of container {id:?} is still starting; wait for ExecProcess to return"
    )]
    ExecStarting {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// Exec into a container whose init is gone.
    #[error("container {id:?} is not running (its init {status}); exec needs a running container")]
    NotRunning {
        /// Container id.
        id: String,
        /// How its init ended.
        status: ExitStatus,
    },
    /// The exec stage or process reported a failure.
    #[error("exec {exec_id:?} in container {id:?}: {message}")]
    ExecFailed {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
        /// What failed.
        message: String,
        /// Whether the process description is at fault.
        invalid_spec: bool,
    },
    /// ResizePty of a process without a terminal.
    #[error(
        "process {exec_id:?} of container {id:?} has no terminal (process.terminal was false)"
    )]
    NoTerminal {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// A cgroup operation of a container failed.
    #[error("container {id:?}: {source}")]
    Cgroup {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: CgroupError,
    },
    /// The container has no cgroup (the agent runs without a cgroup root).
    #[error("container {0:?} has no cgroup: the agent runs without cgroups (start it with --cgroup-root, or as PID 1 of the guest with cgroup2 mounted)")]
    NoCgroup(String),
    /// UpdateContainer's resources are not OCI JSON.
    #[error("resources_json is not a valid OCI linux.resources object ({0})")]
    ResourcesJson(serde_json::Error),
    /// Create has not finished.
    #[error("container {0:?} is still being created; wait for CreateContainer to return")]
    Creating(String),
    /// Start twice.
    #[error("container {0:?} was already started; it can be started only once")]
    AlreadyStarted(String),
    /// The container joins a namespace of a container that has no live
    /// init (a pod member created before, or after, its sandbox container).
    #[error("container {id:?} joins the {name} namespace of container {target:?}, which {reason}; create and keep the pod's sandbox container running first")]
    JoinTarget {
        /// Container id.
        id: String,
        /// The namespace type (`net`, `ipc`, `uts`, `pid`).
        name: &'static str,
        /// The container whose namespace it joins.
        target: String,
        /// Why that cannot be joined.
        reason: String,
    },
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

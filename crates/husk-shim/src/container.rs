//! What the shim keeps of its containers beyond the runtime's lifecycle
//! model: containerd's names for their stdio, the rootfs it mounted, and
//! execs that containerd has recorded but not yet started (containerd's
//! exec is two calls). Statuses, exits and relays live in the sandbox.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use containerd_shim::api::Status;
use husk_runtime::sandbox::Exit;
use husk_runtime::status::Status as Lifecycle;
use tokio::sync::watch;

use crate::io::StdioPaths;

/// One process as containerd sees it.
pub struct Process {
    pub stdio: StdioPaths,
    /// Dropping it ends stdin (`CloseIO`).
    pub stdin_stop: Option<OwnedFd>,
    /// An exec's OCI process (JSON), until it starts.
    pub spec: Option<Vec<u8>>,
    /// Whether it was handed to the sandbox (the init: created; an exec:
    /// started). `Wait` on an exec not started yet waits for this.
    pub in_sandbox: watch::Sender<bool>,
}

impl Process {
    pub fn new(stdio: StdioPaths, in_sandbox: bool) -> Process {
        Process {
            stdio,
            stdin_stop: None,
            spec: None,
            in_sandbox: watch::channel(in_sandbox).0,
        }
    }
}

pub struct Container {
    pub bundle: PathBuf,
    /// Where the shim mounted the rootfs, if it did.
    pub rootfs: Option<PathBuf>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// containerd's status of a process from the lifecycle's status of its
/// container, whether the process is in the sandbox yet, and its end.
pub fn status(container: Lifecycle, in_sandbox: bool, exit: Option<Exit>) -> Status {
    match (container, in_sandbox, exit) {
        (_, _, Some(_)) | (Lifecycle::Stopped, _, _) => Status::STOPPED,
        (_, false, None) | (Lifecycle::Creating | Lifecycle::Created, _, None) => Status::CREATED,
        (Lifecycle::Paused, true, None) => Status::PAUSED,
        (Lifecycle::Running, true, None) => Status::RUNNING,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_runtime::agent::ExitStatus;

    #[test]
    fn statuses_follow_containerd() {
        let exit = Some(Exit {
            status: ExitStatus::KILLED,
            at: std::time::SystemTime::now(),
        });
        assert_eq!(status(Lifecycle::Created, true, None), Status::CREATED);
        assert_eq!(status(Lifecycle::Running, true, None), Status::RUNNING);
        assert_eq!(status(Lifecycle::Paused, true, None), Status::PAUSED);
        // An exec recorded but not started.
        assert_eq!(status(Lifecycle::Running, false, None), Status::CREATED);
        assert_eq!(status(Lifecycle::Running, true, exit), Status::STOPPED);
        assert_eq!(status(Lifecycle::Stopped, true, None), Status::STOPPED);
    }
}

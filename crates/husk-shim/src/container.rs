//! What the shim knows about its containers and their processes (the init
//! and the execs), in containerd's terms.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::api::Status;
use tokio::sync::watch;

use crate::events::TaskExit;
use crate::io::{ProcessIo, StdioPaths};

/// A process's end, as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal.
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// The init is held before exec; an exec is recorded, not yet run.
    Created,
    Running,
    Stopped,
}

pub struct Process {
    /// The agent's name for it: `""` for the init; an exec's id, made unique
    /// in the guest when containerd reuses an id (the guest keeps exited
    /// execs until the container is removed).
    pub guest_id: String,
    pub stdio: StdioPaths,
    pub state: ProcState,
    pub exit: watch::Sender<Option<Exit>>,
    pub io: Option<ProcessIo>,
    /// An exec's OCI process (JSON), until it starts.
    pub spec: Option<Vec<u8>>,
    /// `Start` is in flight: an exit seen meanwhile waits in
    /// `deferred_exit` until `TaskStart` was sent, so containerd never
    /// hears of the end before the start.
    pub starting: bool,
    pub deferred_exit: Option<TaskExit>,
}

impl Process {
    pub fn new(guest_id: String, stdio: StdioPaths) -> Process {
        Process {
            guest_id,
            stdio,
            state: ProcState::Created,
            exit: watch::channel(None).0,
            io: None,
            spec: None,
            starting: false,
            deferred_exit: None,
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the end (once); returns whether this call did.
    pub fn set_exited(&mut self, status: u32) -> Option<Exit> {
        if self.state == ProcState::Stopped {
            return None;
        }
        self.state = ProcState::Stopped;
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        self.exit.send_replace(Some(exit));
        Some(exit)
    }
}

/// How a paused container was paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paused {
    /// The whole VM is stopped (the container is alone in it).
    Vm,
    /// Its processes got SIGSTOP (other containers share the VM).
    Signals,
}

pub struct Container {
    pub bundle: PathBuf,
    /// It started the pod, and the pod's VM goes away with it.
    pub owner: bool,
    /// Where the shim mounted the rootfs, if it did.
    pub rootfs: Option<PathBuf>,
    pub hooks: oci_spec::runtime::Hooks,
    pub annotations: HashMap<String, String>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// Every exec id the guest has seen for this container.
    pub guest_exec_ids: HashSet<String>,
    pub paused: Option<Paused>,
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

    /// A guest name for a new exec that containerd calls `exec_id`.
    pub fn new_guest_exec_id(&mut self, exec_id: &str) -> String {
        let mut id = exec_id.to_string();
        let mut n = 1;
        while self.guest_exec_ids.contains(&id) {
            id = format!("{exec_id}+{n}");
            n += 1;
        }
        self.guest_exec_ids.insert(id.clone());
        id
    }

    /// containerd's view of a process's status.
    pub fn status(&self, exec_id: &str) -> Status {
        let Some(p) = self.process(exec_id) else {
            return Status::UNKNOWN;
        };
        match p.state {
            ProcState::Created => Status::CREATED,
            ProcState::Stopped => Status::STOPPED,
            ProcState::Running if self.paused.is_some() => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
        }
    }

    /// The OCI state that hooks get on stdin.
    pub fn oci_state(&self, id: &str, pid: u32) -> serde_json::Value {
        let status = match self.init.state {
            ProcState::Created => "created",
            ProcState::Running => "running",
            ProcState::Stopped => "stopped",
        };
        let mut v = serde_json::json!({
            "ociVersion": "1.1.0",
            "id": id,
            "status": status,
            "pid": pid,
            "bundle": self.bundle,
        });
        if !self.annotations.is_empty() {
            v["annotations"] = serde_json::json!(self.annotations);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        Container {
            bundle: "/b".into(),
            owner: true,
            rootfs: None,
            hooks: Default::default(),
            annotations: HashMap::new(),
            init: Process::new(String::new(), StdioPaths::default()),
            execs: HashMap::new(),
            guest_exec_ids: HashSet::new(),
            paused: None,
        }
    }

    #[test]
    fn statuses_follow_containerd() {
        let mut c = container();
        assert_eq!(c.status(""), Status::CREATED);
        c.init.state = ProcState::Running;
        assert_eq!(c.status(""), Status::RUNNING);
        c.paused = Some(Paused::Vm);
        assert_eq!(c.status(""), Status::PAUSED);
        assert_eq!(c.status("nope"), Status::UNKNOWN);
        c.paused = None;
        let exit = c.init.set_exited(137).unwrap();
        assert_eq!(c.status(""), Status::STOPPED);
        assert_eq!(c.init.exited(), Some(exit));
        // The first end recorded stays.
        assert!(c.init.set_exited(0).is_none());
        assert_eq!(c.init.exited().unwrap().status, 137);
    }

    #[test]
    fn a_reused_exec_id_gets_a_fresh_guest_id() {
        let mut c = container();
        assert_eq!(c.new_guest_exec_id("e"), "e");
        assert_eq!(c.new_guest_exec_id("e"), "e+1");
        assert_eq!(c.new_guest_exec_id("e"), "e+2");
        assert_eq!(c.new_guest_exec_id("f"), "f");
    }

    #[test]
    fn hooks_get_the_oci_state() {
        let mut c = container();
        c.annotations.insert("a".into(), "b".into());
        let s = c.oci_state("c1", 42);
        assert_eq!(s["id"], "c1");
        assert_eq!(s["status"], "created");
        assert_eq!(s["pid"], 42);
        assert_eq!(s["annotations"]["a"], "b");
    }
}

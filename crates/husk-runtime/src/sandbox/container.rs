//! What a sandbox knows of each container it holds: its status, its
//! processes (the init and the execs), their ends and their stdio relays.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use oci_spec::runtime::Hooks;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::ExitStatus;
use crate::status::Status;

/// A process's end, as the front ends report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: ExitStatus,
    pub at: SystemTime,
}

/// The relays between a process and its host endpoints.
#[derive(Default)]
pub(super) struct Relays {
    pub out: Option<JoinHandle<()>>,
    pub err: Option<JoinHandle<()>>,
    pub input: Option<JoinHandle<()>>,
}

impl Relays {
    /// Waits (at most `timeout`) until the output is relayed, then stops
    /// everything.
    pub async fn finish(mut self, timeout: Duration) {
        if let Some(i) = self.input.take() {
            i.abort();
        }
        let handles: Vec<JoinHandle<()>> = [self.out.take(), self.err.take()]
            .into_iter()
            .flatten()
            .collect();
        let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
        let wait = async move {
            for h in handles {
                let _ = h.await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!("process output did not end within {timeout:?}; dropping the rest");
            for a in aborts {
                a.abort();
            }
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for h in [self.out.take(), self.err.take(), self.input.take()]
            .into_iter()
            .flatten()
        {
            h.abort();
        }
    }
}

pub(super) struct Process {
    /// The agent's name for it: `""` for the init; an exec's id, made
    /// unique in the guest when a caller reuses an id.
    pub guest_id: String,
    pub exit: watch::Sender<Option<Exit>>,
    pub relays: Option<Relays>,
}

impl Process {
    pub fn new(guest_id: String) -> Process {
        Process {
            guest_id,
            exit: watch::channel(None).0,
            relays: None,
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the end (the first one recorded stays); returns it if this
    /// call recorded it.
    pub fn set_exited(&self, status: ExitStatus) -> Option<Exit> {
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        self.exit
            .send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(exit);
                    true
                } else {
                    false
                }
            })
            .then_some(exit)
    }
}

pub(super) struct Container {
    pub bundle: PathBuf,
    pub hooks: Hooks,
    pub annotations: HashMap<String, String>,
    pub status: Status,
    /// `start` is under way (a second one is refused).
    pub starting: bool,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// Every exec id the guest has seen for this container.
    pub guest_exec_ids: HashSet<String>,
    pub oom_killed: bool,
}

impl Container {
    pub fn new(bundle: PathBuf, hooks: Hooks, annotations: HashMap<String, String>) -> Container {
        Container {
            bundle,
            hooks,
            annotations,
            status: Status::Creating,
            starting: false,
            init: Process::new(String::new()),
            execs: HashMap::new(),
            guest_exec_ids: HashSet::new(),
            oom_killed: false,
        }
    }

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

    /// A guest name for a new exec that the caller calls `exec_id`.
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

    /// Every process with its caller-side exec id (`""` for the init).
    pub fn processes(&self) -> impl Iterator<Item = (&str, &Process)> {
        std::iter::once(("", &self.init)).chain(self.execs.iter().map(|(k, v)| (k.as_str(), v)))
    }

    pub fn take_relays(&mut self) -> Vec<Relays> {
        std::iter::once(&mut self.init)
            .chain(self.execs.values_mut())
            .filter_map(|p| p.relays.take())
            .collect()
    }

    /// The OCI state that hooks get on stdin.
    pub fn oci_state(&self, id: &str, pid: u32) -> serde_json::Value {
        let mut v = serde_json::json!({
            "ociVersion": "1.1.0",
            "id": id,
            "status": self.status.to_string(),
            "pid": pid,
            "bundle": self.bundle,
        });
        if !self.annotations.is_empty() {
            v["annotations"] = serde_json::json!(self.annotations);
        }
        v
    }
}

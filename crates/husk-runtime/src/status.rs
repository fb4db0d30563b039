//! A container's status and the one state machine both front ends follow:
//! which verb is allowed in which status. The CLI (through its monitor) and
//! the containerd shim ask these, never their own rules.
//!
//! Semantics (those of runc, which containerd and podman expect):
//! - `pause` freezes the container's processes (its cgroup in the guest);
//!   other containers of the same VM run on.
//! - `kill` works while created, running or paused: a signal to a paused
//!   container stays pending until `resume`, except SIGKILL, which ends it.
//! - `exec` needs a running container (not paused, not stopped).
//! - `delete` without force takes a created or stopped container; with
//!   force it kills a running or paused one first.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// A verb, for [`Status::allows`] and its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Kill,
    Pause,
    Resume,
    Exec,
    Delete,
    ForceDelete,
    Update,
    Inspect,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Start => "start",
            Verb::Kill => "signal",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Exec => "exec in",
            Verb::Delete | Verb::ForceDelete => "delete",
            Verb::Update => "update",
            Verb::Inspect => "inspect",
        })
    }
}

impl Status {
    pub fn can_start(self) -> bool {
        self == Status::Created
    }
    pub fn can_kill(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }
    pub fn can_pause(self) -> bool {
        self == Status::Running
    }
    pub fn can_resume(self) -> bool {
        self == Status::Paused
    }
    pub fn can_exec(self) -> bool {
        self == Status::Running
    }
    pub fn can_delete(self, force: bool) -> bool {
        force || matches!(self, Status::Created | Status::Stopped)
    }
    pub fn can_update(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }
    /// ps and stats: the container's cgroup exists.
    pub fn can_inspect(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }

    pub fn allows(self, verb: Verb) -> bool {
        match verb {
            Verb::Start => self.can_start(),
            Verb::Kill => self.can_kill(),
            Verb::Pause => self.can_pause(),
            Verb::Resume => self.can_resume(),
            Verb::Exec => self.can_exec(),
            Verb::Delete => self.can_delete(false),
            Verb::ForceDelete => self.can_delete(true),
            Verb::Update => self.can_update(),
            Verb::Inspect => self.can_inspect(),
        }
    }

    /// What to tell a user whose `verb` this status refuses.
    pub fn refusal(self, verb: Verb, id: &str) -> String {
        let fix = match (verb, self) {
            (Verb::Delete, _) => "; stop it first or use --force",
            (Verb::Exec | Verb::Pause, Status::Paused) => "; resume it first",
            (Verb::Kill | Verb::Exec, Status::Stopped) => "; it has exited",
            _ => "",
        };
        format!("cannot {verb} container {id}: it is {self}{fix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Status; 5] = [
        Status::Creating,
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Stopped,
    ];

    /// The whole table, written out: a change to one rule fails here.
    #[test]
    fn every_verb_in_every_status() {
        use Status::*;
        let table: &[(Verb, &[Status])] = &[
            (Verb::Start, &[Created]),
            (Verb::Kill, &[Created, Running, Paused]),
            (Verb::Pause, &[Running]),
            (Verb::Resume, &[Paused]),
            (Verb::Exec, &[Running]),
            (Verb::Delete, &[Created, Stopped]),
            (Verb::ForceDelete, &ALL),
            (Verb::Update, &[Created, Running, Paused]),
            (Verb::Inspect, &[Created, Running, Paused]),
        ];
        for (verb, allowed) in table {
            for s in ALL {
                assert_eq!(s.allows(*verb), allowed.contains(&s), "{verb} while {s}");
            }
        }
    }

    #[test]
    fn refusals_name_the_container_its_status_and_the_fix() {
        let m = Status::Running.refusal(Verb::Delete, "c1");
        assert_eq!(
            m,
            "cannot delete container c1: it is running; stop it first or use --force"
        );
        let m = Status::Paused.refusal(Verb::Exec, "c1");
        assert!(m.contains("paused; resume it first"), "{m}");
    }
}

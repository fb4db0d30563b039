//! Containers in the guest: the table of them and their types. Each part of
//! their life has its own file: `lifecycle` (create holds the init before
//! exec, start releases it, pause/resume freeze and thaw, remove kills and
//! forgets), `exec` (extra processes), `signal`, `process_io` (stdin and
//! terminal size), `resources` (the cgroup-backed Update/Stats/OOM events),
//! `lookup` (finding containers and processes) and `error`.
//!
//! Both the init and an exec are built by a stage, the agent re-exec'd
//! (`init`, `exec_stage`, with what they share in `stage`); `protocol` is
//! how the agent and a stage talk, `launch` the agent's side of it, written
//! once for both.

mod error;
mod exec;
pub mod exec_stage;
pub mod init;
mod launch;
mod lifecycle;
mod lookup;
pub mod mounts;
mod process_io;
pub mod protocol;
pub mod ps;
mod resources;
mod signal;
pub mod spec;
pub mod stage;
pub mod stdio;
pub mod storage;

use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use husk_protocol::agent::Storage;
use nix::sys::inotify::WatchDescriptor;

use crate::cgroup::oom::OomEvents;
use crate::cgroup::{Cgroup, CgroupRoot};
use crate::process::{Process, Reaper};
use crate::seccomp::SeccompProgram;
use launch::StageControl;

pub use error::ContainerError;
pub use lookup::valid_id;

/// An extra process of a container, by exec id.
enum ExecSlot {
    Starting,
    Ready(Arc<Process>),
}

/// A container: its init process and, until it is started, the pipes that
/// hold the init before exec; its exec'd processes; its cgroup.
pub struct Container {
    id: String,
    process: Arc<Process>,
    control: tokio::sync::Mutex<Option<StageControl>>,
    execs: Mutex<HashMap<String, ExecSlot>>,
    cgroup: Option<Cgroup>,
    /// Whether the container has its own PID namespace.
    pid_namespace: bool,
    /// The container's compiled seccomp filter, for its execs.
    seccomp: Option<SeccompProgram>,
    oom_watch: Option<WatchDescriptor>,
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
    /// Where containers' cgroups go; `None` runs without cgroups (resources
    /// are then ignored, and Update/Stats fail).
    pub cgroup_root: Option<PathBuf>,
    /// The sandbox's share, mounted as soon as the agent serves (named on
    /// the kernel command line); CreateContainer waits for that mount.
    pub early_storage: Option<Storage>,
}

impl Default for ContainerOptions {
    /// The options of the agent as PID 1 of the guest.
    fn default() -> Self {
        Self {
            agent_exe: CString::from(c"/proc/self/exe"),
            die_with_agent: false,
            cgroup_root: Some(PathBuf::from(crate::cgroup::GUEST_ROOT)),
            early_storage: None,
        }
    }
}

/// Every container of the guest.
pub struct Containers {
    table: Mutex<HashMap<String, Slot>>,
    reaper: Arc<Reaper>,
    storages: tokio::sync::Mutex<()>,
    options: ContainerOptions,
    cgroups: Option<CgroupRoot>,
    oom: Arc<OomEvents>,
}

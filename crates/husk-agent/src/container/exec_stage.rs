//! The exec stage: `husk-agent exec`, which starts an extra process in a
//! running container (ExecProcess).
//!
//! The agent clones itself without new namespaces and execs this stage,
//! which is single-threaded and so may `setns(2)` into the container init's
//! namespaces: it opens `/proc/<init>/ns/*` for every namespace the init
//! does not share with the agent, and `/proc/<init>/root`, joins them (user
//! first, mount last), enters the init's root, and forks once more
//! (`CLONE_PARENT`, so the new process is the agent's child and the agent
//! reaps it; the fork also puts it into the container's PID namespace).
//! With `process.terminal` it first allocates the terminal from the
//! container's `/dev/ptmx` (as fds 0-2, inherited by the new process) and
//! sends the master to the agent on fd 6. The stage reports the new pid on
//! fd 4 and exits. The new process waits on
//! fd 5 until the agent has placed it in the container's cgroup, then
//! takes the process's limits, user, capabilities and seccomp filter and
//! execs; fd 4 is close-on-exec, so the agent reads end-of-file once the
//! program runs, or an error message.

use std::convert::Infallible;
use std::fs::{self};
use std::io::{self};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{open, OFlag};
use nix::sched::{setns, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{self, Gid, Uid};
use serde::{Deserialize, Serialize};

use super::protocol::StageMessage;
use super::spec::ProcessConfig;
use super::stage::{self, step, Reporter, StageError};
use crate::seccomp::SeccompProgram;
use crate::sys;

/// The namespaces an exec joins when the init's differs from the agent's,
/// in the order they are joined: the user namespace first (it owns the
/// others), the mount namespace last (after it, `/proc/<init>` is gone).
pub const NAMESPACES: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Everything the exec stage needs, sent as JSON on its config pipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecConfig {
    /// The container's init, in the agent's PID namespace.
    pub init_pid: i32,
    /// The process to run.
    pub process: ProcessConfig,
    /// The container's seccomp filter.
    pub seccomp: Option<SeccompProgram>,
    /// SIGKILL the process when the agent dies (`--listen` mode).
    pub die_with_agent: bool,
}

/// Runs the exec stage; never returns.
pub fn main() -> ! {
    stage::run_stage("exec", run)
}

/// Opens the init's namespaces that differ from ours.
fn open_namespaces(init: i32) -> Result<Vec<(OwnedFd, CloneFlags, &'static str)>, StageError> {
    let mut joins = Vec::new();
    for &(name, flag) in NAMESPACES {
        let theirs = format!("/proc/{init}/ns/{name}");
        let their_meta = step(fs::metadata(&theirs), || {
            format!("the container's {name} namespace ({theirs})")
        })?;
        let same = fs::metadata(format!("/proc/self/ns/{name}"))
            .is_ok_and(|ours| ours.dev() == their_meta.dev() && ours.ino() == their_meta.ino());
        if same {
            continue;
        }
        let fd = step(
            open(
                theirs.as_str(),
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
            || format!("opening {theirs}"),
        )?;
        joins.push((fd, flag, name));
    }
    Ok(joins)
}

/// Right after joining a user namespace, becomes its root (as runc's
/// nsexec does), so that what the stage makes there, the terminal above
/// all, belongs to an id the namespace maps and can be given to the
/// process's user. Where the namespace does not map 0, the stage goes on
/// as it is (the process's own ids are set later, by `become_user`).
fn become_namespace_root() {
    // In a namespace whose setgroups is "deny" this fails; that is fine.
    let _ = unistd::setgroups(&[]);
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    let _ = unistd::setresgid(root_gid, root_gid, root_gid);
    let _ = unistd::setresuid(root_uid, root_uid, root_uid);
}

fn run(reporter: &Reporter) -> Result<Infallible, StageError> {
    let (config, start) = stage::take_instructions::<ExecConfig>("exec instructions")?;
    let console_socket = stage::take_console_socket(&config.process)?;
    let init = config.init_pid;
    let joins = open_namespaces(init)?;
    let root = step(
        open(
            format!("/proc/{init}/root").as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
        || "opening the container's root".to_string(),
    )?;
    for (fd, flag, name) in &joins {
        step(setns(fd, *flag), || {
            format!("joining the container's {name} namespace")
        })?;
        if *flag == CloneFlags::CLONE_NEWUSER {
            become_namespace_root();
        }
    }
    drop(joins);
    step(unistd::fchdir(&root), || {
        "entering the container's root".to_string()
    })?;
    step(unistd::chroot("."), || {
        "chroot into the container's root".to_string()
    })?;
    drop(root);
    if let Some(socket) = console_socket {
        // Before the fork: the master is on its way to the agent before
        // the pid is reported, and the new process inherits the slave.
        stage::setup_terminal(socket, &config.process, false)?;
    }

    match step(sys::fork_as_sibling(), || {
        "forking the exec'd process".to_string()
    })? {
        sys::Forked::Parent(pid) => {
            reporter.send(&StageMessage::Pid(pid.as_raw()));
            std::process::exit(0)
        }
        sys::Forked::Child => {}
    }
    if config.die_with_agent {
        let _ = sys::set_parent_death_signal(libc::SIGKILL);
    }
    step(unistd::setsid(), || "creating a session".to_string())?;
    if config.process.terminal {
        step(sys::set_controlling_terminal(io::stdin().as_fd()), || {
            "making the terminal the controlling terminal".to_string()
        })?;
    }
    stage::wait_for_start(start);
    stage::become_and_exec(&config.process, config.seccomp.as_ref(), || {})
}

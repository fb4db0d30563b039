//! The agent's side of launching a stage (`husk-agent init` or
//! `husk-agent exec`): its pipes, the clone, the hold before exec, and
//! reading its status messages.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::spec::InitMessage;
use crate::cgroup::{Cgroup, CgroupError};
use crate::process::stdio::FdIo;

/// The descriptor number the cloned init reads its hold byte from, before
/// it execs (it closes it then; the init stage keeps only fds 0-6).
pub(super) const HOLD_FD: i32 = 7;

/// The agent's end of the init stage's control pipes, until start.
pub(super) struct InitControl {
    pub(super) start: File,
    pub(super) status: BufReader<FdIo>,
}

/// Why a held child could not be prepared.
pub(super) enum HoldError {
    Cgroup(CgroupError),
    Io(&'static str, io::Error),
}

/// Places a held child in its cgroup and writes its user namespace's id
/// maps (runc's order: cgroup first, then the maps).
pub(super) fn prepare_held_init(
    pid: Pid,
    cgroup: Option<&Cgroup>,
    id_maps: Option<&(String, String)>,
) -> Result<(), HoldError> {
    if let Some(cgroup) = cgroup {
        cgroup.add(pid.as_raw()).map_err(HoldError::Cgroup)?;
    }
    if let Some((uid_map, gid_map)) = id_maps {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::write(proc.join("uid_map"), uid_map)
            .map_err(|e| HoldError::Io("writing linux.uidMappings to uid_map", e))?;
        std::fs::write(proc.join("gid_map"), gid_map)
            .map_err(|e| HoldError::Io("writing linux.gidMappings to gid_map", e))?;
    }
    Ok(())
}

/// Reads the init stage's next message; `None` at end-of-file. Warnings are
/// logged and skipped.
pub(super) async fn next_message(
    id: &str,
    status: &mut BufReader<FdIo>,
) -> io::Result<Option<InitMessage>> {
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

//! A container's persisted state (`<root>/<id>/state.json`), written
//! atomically, and the per-container lock that serializes verbs.
//!
//! The status a reader sees is derived: `created`, `running` or `paused` as
//! recorded, but only while the monitor that owns the container is alive
//! (same pid, same start time); otherwise `stopped`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("cannot read the state of container {id}")]
    Read {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state of container {id} is corrupt ({message}): `husk delete --force {id}` removes it"
    )]
    Corrupt { id: String, message: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock container {id}")]
    Lock {
        id: String,
        #[source]
        source: nix::Error,
    },
}

pub use crate::status::Status;

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub status: Status,
    /// The monitor's pid: the host process standing for the container's init.
    pub pid: i32,
    /// The monitor's start time (field 22 of /proc/<pid>/stat), to tell it
    /// from a later process with a recycled pid.
    pub pid_start_time: u64,
    /// RFC 3339 UTC.
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    pub owner: String,
    /// The container's exit status, once it has one.
    pub exit_status: Option<i32>,
    /// The QEMU process of the sandbox.
    pub vm_pid: Option<u32>,
    /// The poststop hooks as they were at create: `delete` runs these, not
    /// what `config.json` says by then.
    #[serde(default)]
    pub poststop: Vec<oci_spec::runtime::Hook>,
}

/// The start time of `pid`, if it is alive (a zombie is not).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces and parentheses: split after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl ContainerState {
    /// The state as the OCI runtime spec (and runc's `state`) shows it.
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.effective_status();
        let mut v = serde_json::json!({
            "ociVersion": "1.1.0",
            "id": self.id,
            "pid": if status == Status::Stopped { 0 } else { self.pid },
            "status": status.to_string(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
        });
        if !self.annotations.is_empty() {
            v["annotations"] = serde_json::json!(self.annotations);
        }
        v
    }

    /// Whether the monitor recorded in the state still runs.
    pub fn monitor_alive(&self) -> bool {
        self.pid > 0 && process_start_time(self.pid) == Some(self.pid_start_time)
    }

    /// The status as runc reports it: `stopped` once the monitor is gone.
    pub fn effective_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            s if self.monitor_alive() => s,
            _ => Status::Stopped,
        }
    }

    pub fn load(dir: &Path, id: &str) -> Result<ContainerState, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_string()))
            }
            Err(source) => {
                return Err(StateError::Read {
                    id: id.to_string(),
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            id: id.to_string(),
            message: e.to_string(),
        })
    }

    /// Writes `state.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(".state.json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).expect("state serializes"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| StateError::Write { path, source })
    }
}

/// An exclusive lock on a container's state dir, held for one verb.
pub struct ContainerLock {
    _lock: Flock<File>,
}

impl ContainerLock {
    /// Locks `<root>/<id>`, waiting for another verb on the same container.
    pub fn acquire(dir: &Path, id: &str) -> Result<ContainerLock, StateError> {
        let f = File::open(dir).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StateError::NotFound(id.to_string())
            } else {
                StateError::Read {
                    id: id.to_string(),
                    source,
                }
            }
        })?;
        let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| StateError::Lock {
            id: id.to_string(),
            source: e,
        })?;
        Ok(ContainerLock { _lock: lock })
    }
}

/// Now, as RFC 3339 UTC with nanoseconds (runc's `created` format).
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// Formats a UNIX time as RFC 3339 UTC (civil-from-days, no time zone data).
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_966_245, 0), "2026-11-29T15:30:45.000000000Z");
    }

    #[test]
    fn own_start_time_is_readable_and_stable() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(i32::MAX), None);
    }

    fn sample(pid: i32, start: u64, status: Status) -> ContainerState {
        ContainerState {
            id: "c".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status,
            pid,
            pid_start_time: start,
            created: now_rfc3339(),
            annotations: BTreeMap::new(),
            owner: String::new(),
            exit_status: None,
            vm_pid: None,
            poststop: Vec::new(),
        }
    }

    #[test]
    fn status_is_stopped_once_the_monitor_is_gone() {
        let me = std::process::id() as i32;
        let start = process_start_time(me).unwrap();
        assert_eq!(
            sample(me, start, Status::Running).effective_status(),
            Status::Running
        );
        // Same pid, other start time: a recycled pid.
        assert_eq!(
            sample(me, start + 1, Status::Running).effective_status(),
            Status::Stopped
        );
        assert_eq!(
            sample(0, 0, Status::Created).effective_status(),
            Status::Stopped
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("husk-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = sample(1, 2, Status::Paused);
        s.save(&dir).unwrap();
        assert_eq!(ContainerState::load(&dir, "c").unwrap(), s);
        let _l = ContainerLock::acquire(&dir, "c").unwrap();
        std::fs::write(dir.join(STATE_FILE), "{").unwrap();
        assert!(matches!(
            ContainerState::load(&dir, "c"),
            Err(StateError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            ContainerState::load(&dir, "c"),
            Err(StateError::NotFound(_))
        ));
    }
}

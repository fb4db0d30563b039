//! cgroup v2 in the guest: one cgroup per container under a root
//! (`/sys/fs/cgroup/husk` when the agent is PID 1, `--cgroup-root DIR` in
//! `--listen` mode), `linux.resources` applied to it, its statistics and
//! OOM kills (`oom`).
//!
//! The root is prepared on the first CreateContainer, not at boot: the
//! controllers `cpu cpuset memory pids io` that the kernel offers are enabled
//! in `cgroup.subtree_control` of every cgroup from the cgroup2 mount down to
//! the root, so each container's cgroup gets them.

pub mod devices;
pub mod oom;
pub mod resources;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use husk_protocol::agent::StatsContainerResponse;
use oci_spec::runtime::LinuxResources;

use resources::ResourceError;

/// The controllers the agent enables for containers.
pub const CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io"];

/// How long [`Cgroup::freeze`] waits for the kernel to finish freezing.
const FREEZE_WAIT: Duration = Duration::from_millis(200);

/// The cgroup root of the agent as PID 1.
pub const GUEST_ROOT: &str = "/sys/fs/cgroup/husk";

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The root could not be prepared.
    #[error("preparing the cgroup root {root}: {message}")]
    Root {
        /// The root.
        root: PathBuf,
        /// What failed.
        message: String,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The resources are not valid.
    #[error(transparent)]
    Resources(#[from] ResourceError),
    /// The device rules are not valid.
    #[error(transparent)]
    DeviceRules(#[from] devices::DeviceRuleError),
    /// A limit needs a controller the guest kernel lacks.
    #[error("{field} needs {file}, which the container's cgroup does not have (the guest kernel lacks that cgroup v2 controller)")]
    MissingController {
        /// The OCI field.
        field: &'static str,
        /// The file.
        file: String,
    },
    /// The kernel refused a value.
    #[error("{field}: writing {value:?} to {file}: {source}")]
    Refused {
        /// The OCI field.
        field: &'static str,
        /// The file.
        file: String,
        /// The value.
        value: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// Where containers' cgroups live.
pub struct CgroupRoot {
    root: PathBuf,
    prepared: OnceLock<Result<(), String>>,
}

impl CgroupRoot {
    /// A root at `root` (prepared lazily).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            prepared: OnceLock::new(),
        }
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates the root and enables the controllers, once.
    pub fn prepare(&self) -> Result<(), CgroupError> {
        self.prepared
            .get_or_init(|| prepare_root(&self.root))
            .clone()
            .map_err(|message| CgroupError::Root {
                root: self.root.clone(),
                message,
            })
    }

    /// Creates the cgroup of container `id` (removing an empty leftover).
    pub fn create(&self, id: &str) -> Result<Cgroup, CgroupError> {
        self.prepare()?;
        let path = self.root.join(id);
        if path.exists() {
            // A leftover of an earlier container of that id; empty unless
            // processes escaped, in which case mkdir below fails clearly.
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).map_err(|source| CgroupError::Io {
            what: "creating the cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(Cgroup { path })
    }
}

/// Enables the controllers from the cgroup2 mount down to `root`.
fn prepare_root(root: &Path) -> Result<(), String> {
    fs::create_dir_all(root).map_err(|e| format!("creating it: {e}"))?;
    if !root.join("cgroup.procs").exists() {
        return Err("it is not in a cgroup2 filesystem (no cgroup.procs)".to_string());
    }
    // The cgroups from the mount point down to the root.
    let mut chain: Vec<&Path> = root
        .ancestors()
        .take_while(|dir| dir.join("cgroup.controllers").exists())
        .collect();
    chain.reverse();
    for dir in chain {
        enable_controllers(dir);
    }
    Ok(())
}

fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .collect();
    if wanted.is_empty() {
        return;
    }
    // One write for all of them (each write costs a trap under TCG); one
    // at a time only if that fails, to name the one that does not work.
    let all: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
    if fs::write(dir.join("cgroup.subtree_control"), all.join(" ")).is_ok() {
        return;
    }
    for controller in wanted {
        {
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"))
            {
                tracing::warn!(
                    "enabling the {controller} controller in {}: {e}",
                    dir.display()
                );
            }
        }
    }
}

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// Parses a flat-keyed cgroup file (`key value` lines).
pub fn parse_flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Parses a single-value file: a number, or "max" (0, no limit).
pub fn parse_limit(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

impl Cgroup {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Enforces device `rules` on it (see [`devices`]).
    pub fn restrict_devices(&self, rules: &[devices::Rule]) -> Result<(), CgroupError> {
        devices::attach(&self.path, rules).map_err(|source| CgroupError::Io {
            what: "attaching the device rules (a BPF program) to",
            path: self.path.clone(),
            source,
        })
    }

    /// Moves process `pid` into it.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.procs");
        fs::write(&path, pid.to_string()).map_err(|source| CgroupError::Io {
            what: "moving the process into",
            path,
            source,
        })
    }

    /// Every process in it and in the cgroups below it.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        pids
    }

    /// Whether any process is left (`populated` of `cgroup.events`).
    pub fn is_populated(&self) -> bool {
        match fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(text) => parse_flat(&text).get("populated").copied().unwrap_or(0) != 0,
            Err(_) => !self.pids().is_empty(),
        }
    }

    /// SIGKILLs everything in it: `cgroup.kill` where the kernel has it
    /// (5.14+), which also catches processes forking meanwhile.
    pub fn kill_all(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Freezes every process in it (`cgroup.freeze`) and waits, briefly,
    /// until the kernel says they are (`frozen 1` in `cgroup.events`);
    /// false where the kernel cannot. [`Cgroup::thaw`] undoes it.
    pub fn freeze(&self) -> bool {
        if fs::write(self.path.join("cgroup.freeze"), "1").is_err() {
            return false;
        }
        let events = self.path.join("cgroup.events");
        let deadline = std::time::Instant::now() + FREEZE_WAIT;
        while std::time::Instant::now() < deadline {
            let frozen = fs::read_to_string(&events)
                .is_ok_and(|text| text.lines().any(|line| line == "frozen 1"));
            if frozen {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Whether `cgroup.freeze` is set (by a pause or a signal-all).
    pub fn is_frozen(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.freeze")).is_ok_and(|t| t.trim() == "1")
    }

    /// Lets the processes of a frozen cgroup run again.
    pub fn thaw(&self) {
        if let Err(e) = fs::write(self.path.join("cgroup.freeze"), "0") {
            tracing::warn!(cgroup = %self.path.display(), "thawing: {e}");
        }
    }

    /// Applies `resources`; returns notes about what was skipped.
    pub fn apply(&self, resources: &LinuxResources) -> Result<Vec<String>, CgroupError> {
        let (writes, mut notes) = resources::plan(resources)?;
        for write in writes {
            let target = write
                .files
                .iter()
                .find(|(file, _)| self.path.join(file).exists());
            let Some((file, value)) = target else {
                let file = write.files[0].0.clone();
                if write.required {
                    return Err(CgroupError::MissingController {
                        field: write.field,
                        file,
                    });
                }
                notes.push(format!(
                    "{}: the guest kernel has no {file}; ignored",
                    write.field
                ));
                continue;
            };
            fs::write(self.path.join(file), value).map_err(|source| CgroupError::Refused {
                field: write.field,
                file: file.clone(),
                value: value.clone(),
                source,
            })?;
        }
        Ok(notes)
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// The number of OOM kills in it (`oom_kill` of `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        parse_flat(&self.read("memory.events"))
            .get("oom_kill")
            .copied()
            .unwrap_or(0)
    }

    /// Its statistics; 0 for what the kernel does not report.
    pub fn stats(&self) -> StatsContainerResponse {
        let cpu = parse_flat(&self.read("cpu.stat"));
        let cpu = |key: &str| cpu.get(key).copied().unwrap_or(0);
        let memory_stat: HashMap<String, u64> = parse_flat(&self.read("memory.stat"));
        StatsContainerResponse {
            cpu_usage_usec: cpu("usage_usec"),
            cpu_user_usec: cpu("user_usec"),
            cpu_system_usec: cpu("system_usec"),
            cpu_nr_periods: cpu("nr_periods"),
            cpu_nr_throttled: cpu("nr_throttled"),
            cpu_throttled_usec: cpu("throttled_usec"),
            memory_usage: parse_limit(&self.read("memory.current")),
            memory_limit: parse_limit(&self.read("memory.max")),
            memory_peak: parse_limit(&self.read("memory.peak")),
            memory_swap_usage: parse_limit(&self.read("memory.swap.current")),
            memory_oom_kills: self.oom_kills(),
            memory_stat,
            pids_current: parse_limit(&self.read("pids.current")),
            pids_limit: parse_limit(&self.read("pids.max")),
            ..Default::default()
        }
    }

    /// Removes it (and any cgroups the container made below it) once it is
    /// empty, waiting up to a second for dying processes to leave.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let mut dirs = Vec::new();
        let mut pending = vec![self.path.clone()];
        while let Some(dir) = pending.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        // Deepest first.
        dirs.reverse();
        for dir in dirs {
            let mut tries = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(source) => {
                        return Err(CgroupError::Io {
                            what: "removing the cgroup",
                            path: dir,
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files() {
        let stat = parse_flat("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nbogus\n");
        assert_eq!(stat["usage_usec"], 1234);
        assert_eq!(stat["system_usec"], 234);
        assert_eq!(stat.len(), 3);
        assert_eq!(parse_limit("max\n"), 0);
        assert_eq!(parse_limit("33554432\n"), 33_554_432);
    }

    #[test]
    fn applying_to_a_fake_cgroup_dir() {
        let dir = std::env::temp_dir().join(format!("husk-cgroup-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for file in ["memory.max", "pids.max", "io.weight"] {
            fs::write(dir.join(file), "").unwrap();
        }
        let cgroup = Cgroup { path: dir.clone() };
        let resources: LinuxResources = serde_json::from_value(serde_json::json!({
            "memory": {"limit": 1048576, "swap": 2097152},
            "pids": {"limit": 20},
            "blockIO": {"weight": 1000}
        }))
        .unwrap();
        let notes = cgroup.apply(&resources).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "20");
        assert_eq!(
            fs::read_to_string(dir.join("io.weight")).unwrap(),
            "default 10000"
        );
        assert!(
            notes.iter().any(|n| n.contains("memory.swap.max")),
            "{notes:?}"
        );
        let cpu: LinuxResources =
            serde_json::from_value(serde_json::json!({"cpu": {"shares": 512}})).unwrap();
        let error = cgroup.apply(&cpu).unwrap_err().to_string();
        assert!(error.contains("cpu.weight"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

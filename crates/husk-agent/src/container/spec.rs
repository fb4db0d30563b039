//! Translating an OCI runtime spec into the init stage's instructions (pure,
//! so it is unit-tested without root).

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use oci_spec::runtime::{
    LinuxDeviceType, LinuxIdMapping, LinuxNamespaceType, PosixRlimitType, Process, Spec,
};
use serde::{Deserialize, Serialize};

use super::mounts::{parse_options, parse_propagation, MountEntry};
use crate::caps::CapSets;
use crate::seccomp::{self, SeccompError, SeccompProgram};

/// A spec the agent cannot run. Every variant is the host's (or the
/// bundle's) mistake, never the guest's.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The bytes are not an OCI runtime spec.
    #[error("the OCI spec is not valid runtime-spec JSON ({0}); send the bundle's config.json as parsed by oci-spec")]
    Json(#[from] serde_json::Error),
    /// No `root`.
    #[error("the OCI spec has no root; set root.path to the container's rootfs in the guest")]
    NoRoot,
    /// `root.path` is relative.
    #[error("root.path {0:?} is relative; translate it to an absolute guest path (under {share})", share = husk_protocol::GUEST_SHARE_DIR)]
    RelativeRoot(PathBuf),
    /// No `process`.
    #[error("the OCI spec has no process; the container needs process.args to run")]
    NoProcess,
    /// `process.args` is missing or empty.
    #[error("process.args is empty; name the program the container runs")]
    NoArgs,
    /// `process.cwd` is relative.
    #[error("process.cwd {0:?} is relative; it must be an absolute path in the container")]
    RelativeCwd(PathBuf),
    /// A mount destination is relative.
    #[error("mount destination {0:?} is relative; mount destinations must be absolute")]
    RelativeMountDestination(PathBuf),
    /// A bind mount lacks its source.
    #[error("bind mount on {0:?} has no source; give the guest path to bind")]
    BindWithoutSource(PathBuf),
    /// A string that goes to a system call contains a NUL byte.
    #[error("{0} contains a NUL byte")]
    NulByte(&'static str),
    /// `linux.rootfsPropagation` is not a propagation name.
    #[error("linux.rootfsPropagation {0:?} is not one of private, shared, slave, unbindable (optionally r-prefixed)")]
    BadPropagation(String),
    /// A device entry the agent cannot create.
    #[error("linux.devices entry {0:?} must be an absolute path under /dev of type c, b, u or p")]
    BadDevice(PathBuf),
    /// `hostname` without a UTS namespace would rename the whole guest.
    #[error(
        "hostname is set but linux.namespaces has no uts namespace; add one or drop the hostname"
    )]
    HostnameWithoutUts,
    /// A user namespace without id mappings, or mappings without one.
    #[error("{0}")]
    UserNamespace(&'static str),
    /// The seccomp profile cannot be compiled.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// `process_json` of ExecProcess is not an OCI process.
    #[error("process_json is not a valid OCI process object ({0}); send the `process` of the runtime spec")]
    ProcessJson(serde_json::Error),
}

/// One device node to create in the container's `/dev`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Absolute path in the container.
    pub path: PathBuf,
    /// `'c'`, `'b'` or `'p'`.
    pub kind: char,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Permission bits (0666 when the spec says nothing).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Which resource.
    pub resource: PosixRlimitType,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The process the init stage finally execs, and its credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// argv; `args[0]` is looked up in the container's PATH when it has no slash.
    pub args: Vec<String>,
    /// The environment, exactly as in the spec.
    pub env: Vec<String>,
    /// Working directory in the container.
    pub cwd: PathBuf,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// File mode creation mask, if the spec sets one.
    pub umask: Option<u32>,
    /// Whether stdio is a terminal (allocated by the stage in the container).
    pub terminal: bool,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privileges: bool,
    /// Written to `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
    /// Capability sets; `None` leaves the process the capabilities its
    /// uid gets (all for root).
    pub capabilities: Option<CapSets>,
    /// `consoleSize` as (rows, columns), for a terminal.
    pub console_size: Option<(u16, u16)>,
}

/// Everything the init stage needs, sent to it as JSON on its config pipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// The rootfs, a guest path.
    pub rootfs: PathBuf,
    /// Remount `/` read-only after setup.
    pub readonly_rootfs: bool,
    /// Propagation of `/` after pivot_root (`MsFlags` bits).
    pub rootfs_propagation: Option<libc::c_ulong>,
    /// Mounts, in spec order.
    pub mounts: Vec<MountEntry>,
    /// Extra device nodes (`linux.devices`).
    pub devices: Vec<DeviceEntry>,
    /// UTS hostname.
    pub hostname: Option<String>,
    /// UTS domain name.
    pub domainname: Option<String>,
    /// Paths hidden from the container.
    pub masked_paths: Vec<PathBuf>,
    /// Paths made read-only.
    pub readonly_paths: Vec<PathBuf>,
    /// `linux.sysctl`, sorted by key.
    pub sysctl: Vec<(String, String)>,
    /// Create a cgroup namespace once the agent placed the init in its
    /// cgroup (so the container's cgroup is its root).
    pub cgroup_namespace: bool,
    /// Namespaces of other containers the init joins first (filled in by
    /// the agent, which knows their inits).
    #[serde(default)]
    pub joins: Vec<JoinConfig>,
    /// Bring `lo` up: the init has a new network namespace (filled in by
    /// the agent from the clone flags).
    #[serde(default)]
    pub loopback: bool,
    /// The compiled `linux.seccomp`, installed right before exec.
    pub seccomp: Option<SeccompProgram>,
    /// The program to run.
    pub process: ProcessConfig,
}

/// The environment variable PATH lookups use when the spec sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Parses the spec JSON.
pub fn parse(json: &[u8]) -> Result<Spec, SpecError> {
    Ok(serde_json::from_slice(json)?)
}

fn no_nul(value: &str, what: &'static str) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::NulByte(what));
    }
    Ok(())
}

/// Translates a spec into init instructions, validating what the init stage
/// relies on; with notes about what the guest ignores (for the log).
pub fn translate(spec: &Spec) -> Result<(InitConfig, Vec<String>), SpecError> {
    let root = spec.root().as_ref().ok_or(SpecError::NoRoot)?;
    if !root.path().is_absolute() {
        return Err(SpecError::RelativeRoot(root.path().clone()));
    }
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let (process, mut notes) = translate_process(process)?;

    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(translate_mount)
        .collect::<Result<Vec<_>, _>>()?;

    let linux = spec.linux().as_ref();
    let rootfs_propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => None,
        Some(name) => Some(
            parse_propagation(name)
                .ok_or_else(|| SpecError::BadPropagation(name.to_string()))?
                .bits(),
        ),
    };
    let devices = linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
        .map(|d| {
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => 'c',
                LinuxDeviceType::B => 'b',
                LinuxDeviceType::P => 'p',
                LinuxDeviceType::A => return Err(SpecError::BadDevice(d.path().clone())),
            };
            if !d.path().starts_with("/dev/") {
                return Err(SpecError::BadDevice(d.path().clone()));
            }
            Ok(DeviceEntry {
                path: d.path().clone(),
                kind,
                major: d.major() as u64,
                minor: d.minor() as u64,
                mode: d.file_mode().unwrap_or(0o666) & 0o7777,
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let paths = |list: Option<&Vec<String>>| -> Vec<PathBuf> {
        list.into_iter().flatten().map(PathBuf::from).collect()
    };
    let mut sysctl: Vec<(String, String)> = linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sysctl.sort();
    if let Some(hostname) = spec.hostname() {
        no_nul(hostname, "hostname")?;
        let has_uts = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| n.iter().any(|ns| ns.typ() == LinuxNamespaceType::Uts));
        if !hostname.is_empty() && !has_uts {
            return Err(SpecError::HostnameWithoutUts);
        }
    }

    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => {
            let (program, seccomp_notes) = seccomp::compile(profile)?;
            notes.extend(seccomp_notes);
            Some(program)
        }
        None => None,
    };
    notes.extend(ignored_features(spec));
    let cgroup_namespace = linux
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup));

    let config = InitConfig {
        rootfs: root.path().clone(),
        readonly_rootfs: root.readonly().unwrap_or(false),
        rootfs_propagation,
        mounts,
        devices,
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        domainname: spec.domainname().clone().filter(|d| !d.is_empty()),
        masked_paths: paths(linux.and_then(|l| l.masked_paths().as_ref())),
        readonly_paths: paths(linux.and_then(|l| l.readonly_paths().as_ref())),
        sysctl,
        cgroup_namespace,
        joins: Vec::new(),
        loopback: false,
        seccomp,
        process,
    };
    Ok((config, notes))
}

/// Translates an OCI process (of the spec, or of ExecProcess), with notes
/// about what is ignored.
pub fn translate_process(process: &Process) -> Result<(ProcessConfig, Vec<String>), SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    for arg in &args {
        no_nul(arg, "process.args")?;
    }
    let env = process.env().clone().unwrap_or_default();
    for var in &env {
        no_nul(var, "process.env")?;
    }
    let cwd = process.cwd().clone();
    if !cwd.is_absolute() {
        return Err(SpecError::RelativeCwd(cwd));
    }
    let user = process.user();
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Rlimit {
            resource: r.typ(),
            soft: r.soft(),
            hard: r.hard(),
        })
        .collect();
    let mut notes = Vec::new();
    let capabilities = process.capabilities().as_ref().map(|caps| {
        let (sets, skipped) = CapSets::from_spec(caps);
        notes.extend(skipped);
        sets
    });
    if process
        .apparmor_profile()
        .as_deref()
        .is_some_and(|p| !p.is_empty())
    {
        notes.push("process.apparmorProfile ignored: the guest kernel has no AppArmor".to_string());
    }
    if process
        .selinux_label()
        .as_deref()
        .is_some_and(|l| !l.is_empty())
    {
        notes.push("process.selinuxLabel ignored: the guest kernel has no SELinux".to_string());
    }
    Ok((
        ProcessConfig {
            args,
            env,
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            terminal: process.terminal().unwrap_or(false),
            rlimits,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            oom_score_adj: process.oom_score_adj(),
            capabilities,
            console_size: process.console_size().map(|b| {
                (
                    b.height().min(u16::MAX as u64) as u16,
                    b.width().min(u16::MAX as u64) as u16,
                )
            }),
        },
        notes,
    ))
}

/// Parses and translates ExecProcess's `process_json`.
pub fn parse_exec_process(json: &[u8]) -> Result<(ProcessConfig, Vec<String>), SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::ProcessJson)?;
    translate_process(&process)
}

/// One line of `/proc/<pid>/uid_map` or `gid_map`.
fn map_line(m: &LinuxIdMapping) -> String {
    format!("{} {} {}\n", m.container_id(), m.host_id(), m.size())
}

/// The id maps of a container with a user namespace: `(uid_map, gid_map)`
/// contents, or `None` without one.
pub fn id_maps(spec: &Spec) -> Result<Option<(String, String)>, SpecError> {
    let linux = spec.linux().as_ref();
    let has_userns = linux
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == LinuxNamespaceType::User));
    let uids = linux
        .and_then(|l| l.uid_mappings().as_ref())
        .filter(|m| !m.is_empty());
    let gids = linux
        .and_then(|l| l.gid_mappings().as_ref())
        .filter(|m| !m.is_empty());
    match (has_userns, uids, gids) {
        (false, None, None) => Ok(None),
        (false, _, _) => Err(SpecError::UserNamespace(
            "linux.uidMappings/gidMappings are set but linux.namespaces has no user namespace; add one or drop the mappings",
        )),
        (true, Some(uids), Some(gids)) => Ok(Some((
            uids.iter().map(map_line).collect(),
            gids.iter().map(map_line).collect(),
        ))),
        (true, _, _) => Err(SpecError::UserNamespace(
            "the user namespace needs linux.uidMappings and linux.gidMappings",
        )),
    }
}

fn translate_mount(mount: &oci_spec::runtime::Mount) -> Result<MountEntry, SpecError> {
    let destination = mount.destination().clone();
    if !destination.is_absolute() {
        return Err(SpecError::RelativeMountDestination(destination));
    }
    let options = mount.options().clone().unwrap_or_default();
    let mut parsed = parse_options(&options);
    let mut fstype = mount.typ().clone().unwrap_or_default();
    if fstype == "bind" || parsed.flags.contains(MsFlags::MS_BIND) {
        parsed.flags.insert(MsFlags::MS_BIND);
        fstype.clear();
        if mount.source().is_none() {
            return Err(SpecError::BindWithoutSource(destination));
        }
    } else if fstype == "cgroup" {
        // The guest runs cgroup v2 only; v1 controller names are meaningless.
        fstype = "cgroup2".to_string();
        parsed.data.clear();
    }
    Ok(MountEntry {
        source: mount.source().clone(),
        destination,
        fstype,
        flags: parsed.flags.bits(),
        propagation: parsed.propagation.iter().map(|p| p.bits()).collect(),
        data: parsed.data.join(","),
    })
}

/// A namespace of another container of the sandbox that the init joins
/// (`setns`) instead of creating one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceJoin {
    /// The container whose init's namespace is joined.
    pub container: String,
    /// Its name under `/proc/<pid>/ns/` (`net`, `ipc`, `uts`, `pid`).
    pub name: &'static str,
    /// Its `CLONE_NEW*` flag.
    pub flag: CloneFlags,
}

/// A namespace the init stage joins, resolved to a path in the agent's
/// view (`/proc/<init pid>/ns/<name>`), with its `CLONE_NEW*` bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinConfig {
    /// The namespace file to open.
    pub path: PathBuf,
    /// Its `CLONE_NEW*` flag bits (`setns`'s `nstype`).
    pub nstype: i32,
    /// Its type, for messages.
    pub name: String,
}

/// The namespaces to create for the container, the ones it joins, and
/// notes about the ones the spec asks for that the agent does not provide.
///
/// The mount namespace is always new (the init pivots into the rootfs).
/// PID, UTS, IPC, network and user namespaces are new when the spec lists
/// them; one it leaves out is shared with the guest (its "host" is the VM,
/// as under runc a missing namespace is the host's). A new network
/// namespace gets its loopback up (`InitConfig::loopback`). A cgroup
/// namespace is created by the init itself once it is in its cgroup (see
/// `InitConfig::cgroup_namespace`), so it is not among these flags.
///
/// A network, IPC, UTS or PID entry whose path is
/// `husk_protocol::CONTAINER_NS_PREFIX` + a container id joins that
/// container's (a pod member joining its sandbox container's; PID when
/// CRI's `NamespaceOption.pid` is `POD`). The network, IPC and UTS
/// namespaces are joined by the init stage itself (`InitConfig::joins`);
/// a PID namespace can only be entered by a new process, so the agent
/// clones the init into it (`CloneExec::pid_namespace`). Any other path
/// names a host namespace, which the guest cannot join: the container gets
/// a new one, with a note.
pub fn clone_flags(spec: &Spec) -> (CloneFlags, Vec<NamespaceJoin>, Vec<String>) {
    let mut flags = CloneFlags::CLONE_NEWNS;
    let mut joins = Vec::new();
    let mut notes = Vec::new();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten();
    for ns in namespaces {
        let typ = ns.typ();
        let joinable = match typ {
            LinuxNamespaceType::Network => Some(("net", CloneFlags::CLONE_NEWNET)),
            LinuxNamespaceType::Ipc => Some(("ipc", CloneFlags::CLONE_NEWIPC)),
            LinuxNamespaceType::Uts => Some(("uts", CloneFlags::CLONE_NEWUTS)),
            LinuxNamespaceType::Pid => Some(("pid", CloneFlags::CLONE_NEWPID)),
            _ => None,
        };
        if let Some(path) = ns.path() {
            let container = path
                .to_str()
                .and_then(|p| p.strip_prefix(husk_protocol::CONTAINER_NS_PREFIX))
                .filter(|c| !c.is_empty() && !c.contains('/'));
            match (joinable, container) {
                (Some((name, flag)), Some(container)) => {
                    joins.push(NamespaceJoin {
                        container: container.to_string(),
                        name,
                        flag,
                    });
                    continue;
                }
                _ => notes.push(format!(
                    "joining the {typ} namespace at {} is not supported yet; the container gets a new one",
                    path.display()
                )),
            }
        }
        match typ {
            LinuxNamespaceType::Mount => {}
            LinuxNamespaceType::Pid => flags |= CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Uts => flags |= CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => flags |= CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Cgroup => {}
            LinuxNamespaceType::Network => flags |= CloneFlags::CLONE_NEWNET,
            LinuxNamespaceType::User => flags |= CloneFlags::CLONE_NEWUSER,
            LinuxNamespaceType::Time => notes.push(
                "time namespaces are not supported yet; the container shares the guest's clocks"
                    .to_string(),
            ),
        }
    }
    (flags, joins, notes)
}

/// Spec features the agent ignores beyond the process's and the seccomp
/// profile's (which `translate` notes as it goes): hooks (run by the host
/// runtime) and the like.
fn ignored_features(spec: &Spec) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(linux) = spec.linux() {
        if linux
            .mount_label()
            .as_deref()
            .is_some_and(|l| !l.is_empty())
        {
            notes.push("linux.mountLabel ignored: the guest kernel has no SELinux".to_string());
        }
        if linux.intel_rdt().is_some() {
            notes.push("linux.intelRdt ignored: the guest has no RDT".to_string());
        }
        if linux.personality().is_some() {
            notes.push("linux.personality ignored".to_string());
        }
    }
    if spec.hooks().is_some() {
        notes.push("hooks are run by the host runtime, not in the guest".to_string());
    }
    notes
}

/// The PATH of an environment list (`PATH=...`), or the default.
pub fn path_of(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|v| v.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Why `args[0]` could not be turned into a program path.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// Nothing by that name in any PATH directory.
    #[error("exec {0:?}: no such file or directory in the container's PATH")]
    NotInPath(String),
    /// Found, but not an executable file.
    #[error("exec {0:?}: permission denied (not an executable file)")]
    NotExecutable(String),
    /// A path given with a slash does not exist.
    #[error("exec {0:?}: no such file or directory")]
    Missing(String),
}

/// Finds the program to exec: `name` itself when it contains a slash,
/// otherwise the first executable regular file `dir/name` for `dir` in
/// `path`. `is_executable` decides executability (access(X_OK) in the init
/// stage, so the container's credentials count).
pub fn find_program(
    name: &str,
    path: &str,
    is_executable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, LookupError> {
    if name.contains('/') {
        let program = PathBuf::from(name);
        return match std::fs::metadata(&program) {
            Err(_) => Err(LookupError::Missing(name.to_string())),
            Ok(meta) if meta.is_file() && is_executable(&program) => Ok(program),
            Ok(_) => Err(LookupError::NotExecutable(name.to_string())),
        };
    }
    if name.is_empty() {
        return Err(LookupError::NotInPath(name.to_string()));
    }
    let mut found_non_executable = false;
    for dir in path.split(':') {
        // An empty PATH entry means the current directory.
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && is_executable(&candidate) => return Ok(candidate),
            Ok(_) => found_non_executable = true,
            Err(_) => {}
        }
    }
    if found_non_executable {
        Err(LookupError::NotExecutable(name.to_string()))
    } else {
        Err(LookupError::NotInPath(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn runc_spec() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2-dev",
            "process": {
                "terminal": false,
                "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 18},
                "args": ["sh", "-c", "echo hi"],
                "env": ["PATH=/bin:/usr/bin", "TERM=xterm", "FOO=bar"],
                "cwd": "/work",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                "noNewPrivileges": true,
                "capabilities": {"bounding": ["CAP_KILL"]}
            },
            "root": {"path": "/run/husk/share/c1/rootfs", "readonly": true},
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro", "cpu"]},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/run/husk/share/c1/hosts", "options": ["rbind", "ro", "rprivate"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"},
                               {"type": "uts"}, {"type": "ipc"},
                               {"type": "cgroup"}, {"type": "user"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": {"net.ipv4.ip_forward": "1", "kernel.msgmax": "8192"},
                "rootfsPropagation": "rslave",
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        })
    }

    fn spec_of(value: serde_json::Value) -> Spec {
        parse(value.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn translates_a_full_spec() {
        let (config, _) = translate(&spec_of(runc_spec())).unwrap();
        assert_eq!(config.rootfs, PathBuf::from("/run/husk/share/c1/rootfs"));
        assert!(config.readonly_rootfs);
        assert_eq!(config.hostname.as_deref(), Some("box"));
        assert_eq!(config.process.args, vec!["sh", "-c", "echo hi"]);
        assert_eq!(config.process.env.len(), 3);
        assert_eq!(config.process.cwd, PathBuf::from("/work"));
        assert_eq!((config.process.uid, config.process.gid), (1000, 100));
        assert_eq!(config.process.additional_gids, vec![5, 6]);
        assert_eq!(config.process.umask, Some(18));
        assert!(config.process.no_new_privileges);
        assert_eq!(config.process.rlimits[0].soft, 512);
        assert_eq!(
            config.sysctl,
            vec![
                ("kernel.msgmax".to_string(), "8192".to_string()),
                ("net.ipv4.ip_forward".to_string(), "1".to_string())
            ]
        );
        assert_eq!(
            config.rootfs_propagation,
            Some((MsFlags::MS_SLAVE | MsFlags::MS_REC).bits())
        );
        assert_eq!(config.devices[0].kind, 'c');
        assert_eq!(config.devices[0].mode, 0o666);

        let cgroup = &config.mounts[2];
        assert_eq!(cgroup.fstype, "cgroup2");
        assert!(cgroup.data.is_empty());
        assert!(cgroup.ms_flags().contains(MsFlags::MS_RDONLY));

        let dev = &config.mounts[1];
        assert_eq!(dev.data, "mode=755,size=65536k");
        assert!(!dev.is_bind());

        let hosts = &config.mounts[3];
        assert!(hosts.is_bind());
        assert!(hosts
            .ms_flags()
            .contains(MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert!(hosts.fstype.is_empty());
        assert_eq!(
            hosts.propagation,
            vec![(MsFlags::MS_PRIVATE | MsFlags::MS_REC).bits()]
        );

        // The instructions survive their trip through JSON.
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<InitConfig>(&json).unwrap(), config);
    }

    #[test]
    fn namespaces_and_notes() {
        let (flags, joins, notes) = clone_flags(&spec_of(runc_spec()));
        assert_eq!(
            flags,
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWUSER
        );
        // The init makes its cgroup namespace itself, once in its cgroup.
        assert!(!flags.contains(CloneFlags::CLONE_NEWCGROUP));
        assert!(joins.is_empty());
        assert!(notes.is_empty(), "{notes:?}");

        // A pod member joins its sandbox container's network, IPC and UTS
        // namespaces; a host path is noted and gets a new one.
        let mut s = runc_spec();
        let pod = |t: &str| {
            format!("{}pod1", husk_protocol::CONTAINER_NS_PREFIX)
                + if t.is_empty() { "" } else { t }
        };
        s["linux"]["namespaces"] = serde_json::json!([
            {"type": "mount"}, {"type": "pid", "path": pod("")},
            {"type": "network", "path": pod("")},
            {"type": "ipc", "path": pod("")},
            {"type": "uts", "path": pod("")},
            {"type": "cgroup", "path": "/proc/1/ns/cgroup"},
            {"type": "user", "path": pod("")},
        ]);
        let (flags, joins, notes) = clone_flags(&spec_of(s));
        assert_eq!(flags, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUSER);
        let joined: Vec<_> = joins
            .iter()
            .map(|j| (j.container.as_str(), j.name, j.flag))
            .collect();
        assert_eq!(
            joined,
            [
                ("pod1", "pid", CloneFlags::CLONE_NEWPID),
                ("pod1", "net", CloneFlags::CLONE_NEWNET),
                ("pod1", "ipc", CloneFlags::CLONE_NEWIPC),
                ("pod1", "uts", CloneFlags::CLONE_NEWUTS),
            ]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");

        // NamespaceOption.pid = CONTAINER: a PID namespace of its own; a
        // host path (not a container of the sandbox) gets a new one too.
        let mut s = runc_spec();
        s["linux"]["namespaces"] = serde_json::json!([
            {"type": "mount"}, {"type": "pid"},
            {"type": "network", "path": pod("")},
        ]);
        let (flags, joins, notes) = clone_flags(&spec_of(s));
        assert_eq!(flags, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID);
        assert_eq!(joins.len(), 1);
        assert!(notes.is_empty(), "{notes:?}");
        let mut s = runc_spec();
        s["linux"]["namespaces"] = serde_json::json!([
            {"type": "mount"}, {"type": "pid", "path": "/proc/42/ns/pid"},
        ]);
        let (flags, joins, notes) = clone_flags(&spec_of(s));
        assert_eq!(flags, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID);
        assert!(joins.is_empty());
        assert_eq!(notes.len(), 1, "{notes:?}");

        // A namespace the spec leaves out is the guest's.
        let mut s = runc_spec();
        s["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]);
        s.as_object_mut().unwrap().remove("hostname");
        let (flags, _, _) = clone_flags(&spec_of(s));
        assert_eq!(flags, CloneFlags::CLONE_NEWNS);
        let mut s = runc_spec();
        s["process"]["apparmorProfile"] = "docker-default".into();
        s["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_KILL"]);
        let (_, notes) = translate(&spec_of(s)).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("AppArmor"), "{notes:?}");
    }

    #[test]
    fn user_namespace_maps() {
        let mut s = runc_spec();
        assert!(matches!(
            id_maps(&spec_of(s.clone())),
            Err(SpecError::UserNamespace(_))
        ));
        s["linux"]["uidMappings"] =
            serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        s["linux"]["gidMappings"] = serde_json::json!([
            {"containerID": 0, "hostID": 200000, "size": 1000},
            {"containerID": 1000, "hostID": 1000, "size": 1}
        ]);
        let (uids, gids) = id_maps(&spec_of(s.clone())).unwrap().unwrap();
        assert_eq!(uids, "0 100000 65536\n");
        assert_eq!(gids, "0 200000 1000\n1000 1000 1\n");
        s["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]);
        s.as_object_mut().unwrap().remove("hostname");
        assert!(id_maps(&spec_of(s.clone())).is_err());
        s["linux"].as_object_mut().unwrap().remove("uidMappings");
        s["linux"].as_object_mut().unwrap().remove("gidMappings");
        assert_eq!(id_maps(&spec_of(s)).unwrap(), None);
    }

    #[test]
    fn exec_process_json() {
        let (process, notes) = parse_exec_process(
            br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 5, "gid": 6},
                "terminal": true, "capabilities": {"bounding": ["CAP_CHOWN"]},
                "selinuxLabel": "x"}"#,
        )
        .unwrap();
        assert_eq!(process.args, vec!["sh"]);
        assert_eq!((process.uid, process.gid), (5, 6));
        assert!(process.terminal);
        assert_eq!(process.capabilities.unwrap().bounding, 1);
        assert_eq!(notes.len(), 1);
        assert!(matches!(
            parse_exec_process(b"[]"),
            Err(SpecError::ProcessJson(_))
        ));
        assert!(matches!(
            parse_exec_process(br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#),
            Err(SpecError::NoArgs)
        ));
    }

    #[test]
    fn rejects_broken_specs() {
        assert!(matches!(parse(b"{not json"), Err(SpecError::Json(_))));
        let mut value = runc_spec();
        value["root"]["path"] = "rootfs".into();
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::RelativeRoot(_))
        ));
        let mut value = runc_spec();
        value["process"]["args"] = serde_json::json!([]);
        assert!(matches!(translate(&spec_of(value)), Err(SpecError::NoArgs)));
        let mut value = runc_spec();
        value.as_object_mut().unwrap().remove("process");
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::NoProcess)
        ));
        let mut value = runc_spec();
        value["process"]["cwd"] = "work".into();
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::RelativeCwd(_))
        ));
        let mut value = runc_spec();
        value["mounts"][3].as_object_mut().unwrap().remove("source");
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::BindWithoutSource(_))
        ));
        let mut value = runc_spec();
        value["process"]["env"] = serde_json::json!(["A=b\u{0}c"]);
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::NulByte("process.env"))
        ));
        let mut value = runc_spec();
        value["linux"]["rootfsPropagation"] = "sideways".into();
        assert!(matches!(
            translate(&spec_of(value)),
            Err(SpecError::BadPropagation(_))
        ));
    }

    #[test]
    fn path_of_env() {
        assert_eq!(path_of(&["A=1".into(), "PATH=/x:/y".into()]), "/x:/y");
        assert_eq!(path_of(&[]), DEFAULT_PATH);
    }

    #[test]
    fn program_lookup() {
        let dir = std::env::temp_dir().join(format!("husk-agent-lookup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::create_dir_all(dir.join("b")).unwrap();
        fs::write(dir.join("a/tool"), b"").unwrap();
        fs::set_permissions(dir.join("a/tool"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(dir.join("b/tool"), b"").unwrap();
        fs::set_permissions(dir.join("b/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(dir.join("a/sub")).unwrap();
        let exec_bit = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o111 != 0;
        let path = format!("{}:{}", dir.join("a").display(), dir.join("b").display());

        assert_eq!(
            find_program("tool", &path, exec_bit).unwrap(),
            dir.join("b/tool")
        );
        assert_eq!(
            find_program("nosuchcmd", &path, exec_bit)
                .unwrap_err()
                .to_string(),
            "exec \"nosuchcmd\": no such file or directory in the container's PATH"
        );
        assert_eq!(
            find_program("sub", &path, exec_bit),
            Err(LookupError::NotExecutable("sub".into()))
        );
        let absolute = dir.join("b/tool").display().to_string();
        assert_eq!(
            find_program(&absolute, "", exec_bit).unwrap(),
            PathBuf::from(&absolute)
        );
        let missing = dir.join("nope").display().to_string();
        assert_eq!(
            find_program(&missing, "", exec_bit),
            Err(LookupError::Missing(missing.clone()))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Host cgroup isolation: a sandbox's host processes (QEMU, virtiofsd, the
//! monitor or shim) live in the cgroup the caller named in
//! `linux.cgroupsPath`, with memory and CPU limits derived from the VM's
//! size plus a stated overhead, so no guest takes more of the host than
//! its VM was given.
//!
//! Use: [`HostCgroup::create`] before QEMU starts, [`HostCgroup::add`] for
//! QEMU, virtiofsd and the current process, and [`HostCgroup::remove`] (or
//! drop) at teardown, after the processes were stopped. Nothing here kills
//! a process.
//!
//! # `cgroupsPath`, as runc reads it
//!
//! - cgroupfs form, `/machine/abc`: absolute, taken from the root of every
//!   hierarchy (`/sys/fs/cgroup/memory/machine/abc`, ...).
//! - cgroupfs form, `machine/abc`: relative, taken from the caller's own
//!   cgroup in each hierarchy (cgroup v2: from the parent of the caller's
//!   own cgroup, as runc does, since a v2 cgroup with processes in it
//!   cannot hand controllers to children).
//! - empty: the relative path `<id>`.
//! - systemd form `slice:prefix:name`: chosen when the path has exactly two
//!   `:` and its first part is empty or a slice name ending in `.slice`, without `/` (anything else is
//!   a cgroupfs path). The slice is expanded the way systemd nests slices
//!   (`a-b.slice` is `a.slice/a-b.slice`; `-.slice` is the root; an empty
//!   slice is `system.slice`), the unit is `prefix-name.scope`
//!   (`name.scope` without a prefix; `name` itself when it ends in
//!   `.slice`), and the result is absolute: `machine.slice:libpod:abc` is
//!   `/machine.slice/libpod-abc.scope`. husk does not ask systemd for a
//!   scope unit: it creates that directory itself in the cgroup
//!   filesystem, like runc's cgroupfs driver given the same path. On a host
//!   run by systemd this is a directory systemd did not create (it leaves
//!   it alone, but `systemctl` does not show it as a unit).
//!
//! `..` is refused in any form, so a path never leaves its hierarchy.
//!
//! # Hierarchies
//!
//! Found in `/proc/self/mountinfo`. cgroup v1 (also the "hybrid" layout,
//! v1 controllers plus a v2 mount with no controllers) is used when a v1
//! hierarchy carries `memory` or `cpu`: the sandbox gets a directory in the
//! `memory`, `cpu`, `cpuacct`, `pids` and `blkio` hierarchies that are
//! mounted (the last three for the statistics podman and containerd read;
//! co-mounted controllers share one directory). `cpuset` is left alone:
//! `linux.resources.cpu.cpus` pins QEMU itself (see [`crate::sizing`]).
//! Otherwise a cgroup2 mount is used: one directory, with `cpu`, `memory`,
//! `pids` and `io` (those the parent offers) enabled in the
//! `cgroup.subtree_control` of every ancestor below the root.
//!
//! # Removal
//!
//! Only the directories [`HostCgroup::create`] made are removed, deepest
//! first, with `rmdir` (never recursively); a directory that existed before
//! stays, and so does a created parent that another cgroup now lives in.
//! If the current process is still in the cgroup it is moved back to the
//! cgroup it was in when the `HostCgroup` was created.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period [`Limits::for_vm`] uses, in microseconds (the kernel's
/// default).
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// A reasonable `overhead_mib` for [`Limits::for_vm`]: what QEMU itself
/// (device emulation, its own heap, page tables of guest RAM), virtiofsd
/// and the monitor use besides the guest's RAM. Page cache that virtiofsd
/// brings in is also charged to the cgroup, but the kernel reclaims it
/// before it kills anything.
pub const DEFAULT_OVERHEAD_MIB: u32 = 256;

/// CPU time granted beyond one host CPU per vCPU, in thousandths of a host
/// CPU: half a CPU for QEMU's main loop and I/O threads and for virtiofsd,
/// which work on the guest's behalf, so an I/O-heavy guest that also keeps
/// every vCPU busy is not throttled below its vCPU count.
pub const EMULATOR_CPU_MILLIS: u64 = 500;

/// How long [`HostCgroup::remove`] waits for the cgroup to empty (processes
/// that were just killed leave it when the kernel has reaped them).
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The v1 hierarchies a sandbox joins (by controller).
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "blkio"];
/// The v2 controllers enabled for a sandbox, when the parent offers them.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("linux.cgroupsPath {path:?} {reason}")]
    BadPath { path: String, reason: String },
    #[error("no cgroup filesystem is mounted (none in /proc/self/mountinfo): mount cgroup2 at /sys/fs/cgroup, or the v1 controllers under it")]
    NoCgroupFs,
    #[error("the {controller} cgroup controller is not available ({where_}), but a {limit} limit needs it: enable it, or size the sandbox without that limit")]
    MissingController {
        controller: &'static str,
        limit: &'static str,
        where_: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create cgroup {path}{}", hint(.source, "mkdir"))]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}{}", hint(.source, file_name(.path)))]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} still has processes {pids:?} after {}s: stop them first (husk kills nothing here)", REMOVE_TIMEOUT.as_secs())]
    NotEmpty { path: PathBuf, pids: Vec<u32> },
    #[error("cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// What to do about a failed write, by file and errno.
fn hint(e: &std::io::Error, file: &str) -> String {
    let h = match (e.raw_os_error(), file) {
        (Some(libc::EACCES | libc::EPERM | libc::EROFS), _) => {
            "permission denied: run as root, with the cgroup filesystem writable (or delegated to this user)"
        }
        (Some(libc::EBUSY), "cgroup.subtree_control") => {
            "the cgroup has processes of its own, and cgroup v2 lets only a cgroup without processes hand controllers to children: move them to a child cgroup, or choose a cgroupsPath under another parent"
        }
        (Some(libc::EBUSY), f) if f.starts_with("memory.") => {
            "the cgroup already uses more memory than that: give the VM more memory or overhead"
        }
        (Some(libc::EINVAL), f) if f.starts_with("cpu.") => {
            "the kernel refused the CPU quota (with cgroup v1 a child's quota may not exceed its parent's): give the parent cgroup a larger quota or none"
        }
        (Some(libc::ESRCH), "cgroup.procs") => "no such process",
        (Some(libc::ENOENT), "mkdir") => "a parent directory vanished while it was being created (another sandbox removed it): retry",
        (Some(libc::ENOENT), _) => "the kernel does not offer this file: the controller is not enabled for this cgroup",
        _ => return String::new(),
    };
    format!(": {h}")
}

/// The host resources a sandbox's cgroup allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `memory.limit_in_bytes` (v1) or `memory.max` (v2); `None`: no limit.
    pub memory_bytes: Option<u64>,
    /// CPU time per period, in µs; `None`: no limit.
    pub cpu_quota_us: Option<i64>,
    /// The CFS period, in µs (used only with a quota).
    pub cpu_period_us: u64,
    /// `pids.max` (tasks, threads included); `None`: no limit.
    pub pids: Option<i64>,
}

impl Limits {
    /// The limits of a VM of `memory_mib` RAM and `vcpus` vCPUs:
    /// memory is the guest's RAM plus `overhead_mib` (see
    /// [`DEFAULT_OVERHEAD_MIB`]); CPU is one host CPU per vCPU plus
    /// [`EMULATOR_CPU_MILLIS`] for the emulator and virtiofsd, over
    /// [`DEFAULT_CPU_PERIOD_US`]; tasks are not limited (the guest cannot
    /// create host processes; QEMU's and virtiofsd's thread pools are
    /// bounded by themselves). `vcpus` 0 counts as 1.
    pub fn for_vm(memory_mib: u32, vcpus: u32, overhead_mib: u32) -> Limits {
        let period = DEFAULT_CPU_PERIOD_US;
        let quota = u64::from(vcpus.max(1)) * period + period * EMULATOR_CPU_MILLIS / 1000;
        Limits {
            memory_bytes: Some((u64::from(memory_mib) + u64::from(overhead_mib)) << 20),
            cpu_quota_us: Some(quota as i64),
            cpu_period_us: period,
            pids: None,
        }
    }
}

/// `linux.cgroupsPath` (see the module documentation) as a path in a
/// hierarchy: absolute (from the hierarchy's root) or relative (from the
/// caller's own cgroup). Never empty, never the root, without `.` or `..`.
pub fn parse_cgroups_path(path: &str, id: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = |reason: &str| HostCgroupError::BadPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if path.is_empty() {
        check_name(id).map_err(|r| HostCgroupError::BadPath {
            path: path.to_string(),
            reason: format!("is empty and the container id {id:?} {r}"),
        })?;
        return Ok(PathBuf::from(id));
    }
    let parts: Vec<&str> = path.split(':').collect();
    if parts.len() == 3
        && (parts[0].is_empty() || (parts[0].ends_with(".slice") && !parts[0].contains('/')))
    {
        return systemd_path(parts[0], parts[1], parts[2]).map_err(|r| bad(&r));
    }
    let mut out = PathBuf::from(if path.starts_with('/') { "/" } else { "" });
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("contains \"..\": name a cgroup without going up"))
            }
        }
    }
    if out.as_os_str().is_empty() || out == Path::new("/") {
        return Err(bad(
            "names the root cgroup: husk puts a sandbox in a cgroup of its own, give one like \"/machine/<id>\"",
        ));
    }
    Ok(out)
}

/// A single path component: not empty, no `/`, not `.` or `..`.
fn check_name(n: &str) -> Result<(), String> {
    if n.is_empty() {
        Err("is empty".into())
    } else if n.contains('/') {
        Err("contains '/'".into())
    } else if n == "." || n == ".." {
        Err("is \".\" or \"..\"".into())
    } else {
        Ok(())
    }
}

fn systemd_path(slice: &str, prefix: &str, name: &str) -> Result<PathBuf, String> {
    let mut out = expand_slice(if slice.is_empty() {
        "system.slice"
    } else {
        slice
    })?;
    check_name(name).map_err(|r| format!("(systemd form slice:prefix:name): the name {r}"))?;
    if !prefix.is_empty() {
        check_name(prefix).map_err(|r| format!("(systemd form): the prefix {r}"))?;
    }
    out.push(if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Ok(out)
}

/// `a-b.slice` → `/a.slice/a-b.slice`, `-.slice` → `/`.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| {
        format!("(systemd form slice:prefix:name): the slice {slice:?} {why}: use one like \"machine.slice\" or \"kubepods-besteffort.slice\"")
    };
    let body = slice
        .strip_suffix(".slice")
        .ok_or_else(|| bad("does not end in \".slice\""))?;
    let mut out = PathBuf::from("/");
    if body == "-" {
        return Ok(out);
    }
    if body.is_empty()
        || body.contains('/')
        || body.starts_with('-')
        || body.ends_with('-')
        || body.contains("--")
    {
        return Err(bad("is not a slice name"));
    }
    let mut acc = String::new();
    for part in body.split('-') {
        if !acc.is_empty() {
            acc.push('-');
        }
        acc.push_str(part);
        out.push(format!("{acc}.slice"));
    }
    Ok(out)
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// The cgroup the mount shows at `point` (mountinfo's root field).
    root: PathBuf,
    /// v1: its controllers (and `name=` options); v2: empty.
    controllers: Vec<String>,
    v2: bool,
}

/// Unescapes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts in a `/proc/self/mountinfo`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let v2 = match post[0] {
            "cgroup" => false,
            "cgroup2" => true,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            post[2]
                .split(',')
                .filter(|o| {
                    o.starts_with("name=")
                        || !matches!(
                            *o,
                            "rw" | "ro" | "relatime" | "noatime" | "nosuid" | "nodev" | "noexec"
                        ) && !o.contains('=')
                })
                .map(str::to_string)
                .collect()
        };
        mounts.push(Mount {
            point: PathBuf::from(unescape(pre[4])),
            root: PathBuf::from(unescape(pre[3])),
            controllers,
            v2,
        });
    }
    mounts
}

/// The hierarchies a sandbox's cgroup goes in: v1 (one per distinct mount
/// of [`V1_CONTROLLERS`]) or the v2 mount.
fn choose_mounts(mounts: &[Mount]) -> Result<Vec<Mount>, HostCgroupError> {
    let v1: Vec<&Mount> = mounts.iter().filter(|m| !m.v2).collect();
    if v1
        .iter()
        .any(|m| m.controllers.iter().any(|c| c == "memory" || c == "cpu"))
    {
        let mut chosen: Vec<Mount> = Vec::new();
        for want in V1_CONTROLLERS {
            if let Some(m) = v1.iter().find(|m| m.controllers.iter().any(|c| c == want)) {
                if !chosen.iter().any(|c| c.point == m.point) {
                    chosen.push((*m).clone());
                }
            }
        }
        return Ok(chosen);
    }
    let v2: Vec<&Mount> = mounts.iter().filter(|m| m.v2).collect();
    let m = v2
        .iter()
        .find(|m| m.point == Path::new("/sys/fs/cgroup"))
        .or(v2.first())
        .ok_or(HostCgroupError::NoCgroupFs)?;
    Ok(vec![(*m).clone()])
}

/// The caller's own cgroup in `m`, from a `/proc/self/cgroup`, as a path
/// from `m`'s mount point (`None`: not listed).
fn own_cgroup(m: &Mount, proc_cgroup: &str) -> Option<PathBuf> {
    let path = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if m.v2 {
            ctrls.is_empty()
        } else {
            let set: HashSet<&str> = ctrls.split(',').collect();
            !ctrls.is_empty() && m.controllers.iter().all(|c| set.contains(c.as_str()))
        };
        hit.then(|| PathBuf::from(path))
    })?;
    // Under a bind mount of a sub-cgroup, paths are from that cgroup.
    let rel = path.strip_prefix(&m.root).unwrap_or(&path);
    Some(PathBuf::from("/").join(rel))
}

/// `cgroup` resolved in `m`: the directory, as a path from the mount point.
fn resolve(m: &Mount, cgroup: &Path, proc_cgroup: &str) -> PathBuf {
    if cgroup.is_absolute() {
        return cgroup.to_path_buf();
    }
    let mut base = own_cgroup(m, proc_cgroup).unwrap_or_else(|| PathBuf::from("/"));
    if m.v2 {
        if let Some(p) = base.parent() {
            base = p.to_path_buf();
        }
    }
    base.join(cgroup)
}

fn read(path: &Path) -> Result<String, HostCgroupError> {
    std::fs::read_to_string(path).map_err(|source| HostCgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One write to a cgroup file, not following a symlink.
fn write(path: &Path, value: &str) -> Result<(), HostCgroupError> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| HostCgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

fn procs(dir: &Path) -> Result<Vec<u32>, HostCgroupError> {
    Ok(read(&dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// A sandbox's cgroup, in one directory per hierarchy.
#[derive(Debug)]
pub struct HostCgroup {
    hierarchies: Vec<Dir>,
    v2: bool,
}

#[derive(Debug)]
struct Dir {
    /// The sandbox's cgroup directory.
    leaf: PathBuf,
    /// The directories this made, outermost first.
    created: Vec<PathBuf>,
    /// The current process's cgroup directory when this was created.
    origin: PathBuf,
}

impl HostCgroup {
    /// Creates the cgroup `cgroups_path` (see [`parse_cgroups_path`]; `id`
    /// is the container's, for an empty path) in every hierarchy, and
    /// writes `limits`. An existing directory is joined, its limits
    /// overwritten, and left in place at removal. On error, whatever was
    /// created is removed again.
    pub fn create(
        cgroups_path: &str,
        id: &str,
        limits: &Limits,
    ) -> Result<HostCgroup, HostCgroupError> {
        let cgroup = parse_cgroups_path(cgroups_path, id)?;
        let mounts = choose_mounts(&parse_mountinfo(&read(Path::new("/proc/self/mountinfo"))?))?;
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        Self::create_in(&mounts, &proc_cgroup, &cgroup, limits)
    }

    /// [`HostCgroup::create`] in the hierarchies `mounts`, the caller's
    /// cgroups being `proc_cgroup` (a `/proc/self/cgroup`).
    fn create_in(
        mounts: &[Mount],
        proc_cgroup: &str,
        cgroup: &Path,
        limits: &Limits,
    ) -> Result<HostCgroup, HostCgroupError> {
        let v2 = mounts.iter().any(|m| m.v2);
        let has = |c: &str| mounts.iter().any(|m| m.controllers.iter().any(|x| x == c));
        if !v2 {
            for (needed, ctrl, limit) in [
                (limits.memory_bytes.is_some(), "memory", "memory"),
                (limits.cpu_quota_us.is_some(), "cpu", "CPU"),
                (limits.pids.is_some(), "pids", "pids"),
            ] {
                if needed && !has(ctrl) {
                    return Err(HostCgroupError::MissingController {
                        controller: ctrl,
                        limit,
                        where_: "no cgroup v1 hierarchy of it is mounted".into(),
                    });
                }
            }
        }
        let mut cg = HostCgroup {
            hierarchies: Vec::new(),
            v2,
        };
        for m in mounts {
            let rel = resolve(m, cgroup, proc_cgroup);
            let origin = own_cgroup(m, proc_cgroup).unwrap_or_else(|| PathBuf::from("/"));
            let origin = m.point.join(origin.strip_prefix("/").unwrap_or(&origin));
            let dir = cg.make_dirs(m, &rel, origin, limits)?;
            cg.hierarchies.push(dir);
        }
        for d in &cg.hierarchies {
            cg.write_limits(&d.leaf, limits)?;
        }
        Ok(cg)
    }

    /// mkdir of every missing component of `rel` under `m` (v2: enabling
    /// controllers on the way). Retries if a parent vanishes under it.
    fn make_dirs(
        &self,
        m: &Mount,
        rel: &Path,
        origin: PathBuf,
        limits: &Limits,
    ) -> Result<Dir, HostCgroupError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut dir = Dir {
                leaf: m.point.clone(),
                created: Vec::new(),
                origin: origin.clone(),
            };
            let mut result = Ok(());
            for c in rel.components() {
                let Component::Normal(c) = c else { continue };
                if m.v2 {
                    if let Err(e) = enable_controllers(&dir.leaf, limits) {
                        result = Err(e);
                        break;
                    }
                }
                let next = dir.leaf.join(c);
                match std::fs::create_dir(&next) {
                    Ok(()) => dir.created.push(next.clone()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        result = Err(HostCgroupError::Create { path: next, source });
                        break;
                    }
                }
                dir.leaf = next;
            }
            match result {
                Ok(()) => return Ok(dir),
                Err(e) => {
                    // Undo this attempt's directories before retrying or failing.
                    let _ = remove_dirs(&dir, Instant::now());
                    let vanished = matches!(&e, HostCgroupError::Create { source, .. } if source.kind() == ErrorKind::NotFound);
                    if !vanished || attempt >= 3 {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn write_limits(&self, leaf: &Path, l: &Limits) -> Result<(), HostCgroupError> {
        let has = |f: &str| leaf.join(f).exists();
        if self.v2 {
            if let Some(b) = l.memory_bytes {
                write(&leaf.join("memory.max"), &b.to_string())?;
            }
            if let Some(q) = l.cpu_quota_us {
                write(&leaf.join("cpu.max"), &format!("{q} {}", l.cpu_period_us))?;
            }
            if let Some(p) = l.pids {
                write(&leaf.join("pids.max"), &p.to_string())?;
            }
            return Ok(());
        }
        if let (Some(b), true) = (l.memory_bytes, has("memory.limit_in_bytes")) {
            write(&leaf.join("memory.limit_in_bytes"), &b.to_string())?;
        }
        if let (Some(q), true) = (l.cpu_quota_us, has("cpu.cfs_quota_us")) {
            write(
                &leaf.join("cpu.cfs_period_us"),
                &l.cpu_period_us.to_string(),
            )?;
            write(&leaf.join("cpu.cfs_quota_us"), &q.to_string())?;
        }
        if let (Some(p), true) = (l.pids, has("pids.max")) {
            write(&leaf.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup, in every
    /// hierarchy. Processes it starts afterwards are born there.
    pub fn add(&self, pid: u32) -> Result<(), HostCgroupError> {
        for d in &self.hierarchies {
            write(&d.leaf.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The sandbox's cgroup directory in each hierarchy (v2: one), for
    /// statistics and logs.
    pub fn paths(&self) -> Vec<&Path> {
        self.hierarchies.iter().map(|d| d.leaf.as_path()).collect()
    }

    /// Every directory this made, outermost first in each hierarchy: what
    /// [`remove_made`] takes away after this process died.
    pub fn made(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .flat_map(|d| d.created.iter().cloned())
            .collect()
    }

    /// Whether this is a cgroup v2 cgroup.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Moves the current process back where it was, waits up to
    /// [`REMOVE_TIMEOUT`] for the cgroup to empty, and removes the
    /// directories [`HostCgroup::create`] made. Kills nothing: a cgroup
    /// that still has processes is an error and stays, and `remove` (or
    /// the drop) may try again once they are gone.
    pub fn remove(&mut self) -> Result<(), HostCgroupError> {
        let me = std::process::id();
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut first_err = None;
        for mut d in std::mem::take(&mut self.hierarchies) {
            if d.origin != d.leaf && procs(&d.leaf).map(|p| p.contains(&me)).unwrap_or(false) {
                if let Err(e) = write(&d.origin.join("cgroup.procs"), &me.to_string()) {
                    first_err.get_or_insert(e);
                }
            }
            if let Err(e) = remove_dirs(&d, deadline) {
                first_err.get_or_insert(e);
                d.created.retain(|p| p.exists());
                self.hierarchies.push(d);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if self.hierarchies.is_empty() {
            return;
        }
        if let Err(e) = self.remove() {
            tracing::warn!("host cgroup not removed: {e}");
        }
    }
}

/// v2: enables [`V2_CONTROLLERS`] (those `dir` offers, and that are not on
/// yet) for `dir`'s children. The root needs no limit-free children, so
/// this is done at every level, the root included.
fn enable_controllers(dir: &Path, limits: &Limits) -> Result<(), HostCgroupError> {
    let offered = read(&dir.join("cgroup.controllers"))?;
    let offered: HashSet<&str> = offered.split_whitespace().collect();
    let on = read(&dir.join("cgroup.subtree_control"))?;
    let on: HashSet<&str> = on.split_whitespace().collect();
    for (ctrl, needed, limit) in [
        ("memory", limits.memory_bytes.is_some(), "memory"),
        ("cpu", limits.cpu_quota_us.is_some(), "CPU"),
        ("pids", limits.pids.is_some(), "pids"),
    ] {
        if needed && !offered.contains(ctrl) {
            return Err(HostCgroupError::MissingController {
                controller: ctrl,
                limit,
                where_: format!("not in {}", dir.join("cgroup.controllers").display()),
            });
        }
    }
    let want: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| offered.contains(**c) && !on.contains(**c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &want.join(" "))
}

/// rmdir of `d`'s created directories, innermost first. The leaf is waited
/// for until `deadline`; a created parent that is busy holds another
/// cgroup and is left.
fn remove_dirs(d: &Dir, deadline: Instant) -> Result<(), HostCgroupError> {
    for (i, dir) in d.created.iter().enumerate().rev() {
        let is_leaf = i + 1 == d.created.len() && *dir == d.leaf;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.kind() == ErrorKind::DirectoryNotEmpty =>
                {
                    if !is_leaf {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        return Err(HostCgroupError::NotEmpty {
                            path: dir.clone(),
                            pids: procs(dir).unwrap_or_default(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(HostCgroupError::Remove {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Removes the directories a sandbox's [`HostCgroup::made`] listed after
/// its owner died without removing them: whatever still runs in them is
/// the dead sandbox's (a VMM helper that outlived it) and is killed; then
/// each is removed, deepest first, only under `/sys/fs/cgroup`, never a
/// parent another sandbox still uses.
pub fn remove_made(made: &[PathBuf]) {
    for dir in made.iter().rev() {
        let safe = dir.starts_with("/sys/fs/cgroup/")
            && !dir
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if !safe {
            tracing::warn!(path = %dir.display(), "not a cgroup directory; left alone");
            continue;
        }
        let members = || procs(dir).unwrap_or_default();
        // Only a leaf is the sandbox's own; a parent may hold others'.
        let leaf = std::fs::read_dir(dir)
            .map(|mut it| !it.any(|e| e.is_ok_and(|e| e.path().is_dir())))
            .unwrap_or(false);
        let left = if leaf { members() } else { Vec::new() };
        for pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !left.is_empty() {
            let t0 = std::time::Instant::now();
            while !members().is_empty() && t0.elapsed() < REMOVE_TIMEOUT {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // A parent another sandbox still uses.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && left.is_empty() => {
                tracing::debug!(path = %dir.display(), "cgroup still in use")
            }
            Err(e) => tracing::warn!(path = %dir.display(), error = %e, "cgroup left in place"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str) -> PathBuf {
        parse_cgroups_path(path, "abc").unwrap()
    }

    #[test]
    fn cgroupfs_paths() {
        assert_eq!(p("/machine/abc"), Path::new("/machine/abc"));
        assert_eq!(p("//machine/./abc/"), Path::new("/machine/abc"));
        assert_eq!(p("machine/abc"), Path::new("machine/abc"));
        assert_eq!(p("abc"), Path::new("abc"));
        assert_eq!(p(""), Path::new("abc"));
        // Not the systemd form: the first part is not a slice.
        assert_eq!(p("a:b:c"), Path::new("a:b:c"));
        assert_eq!(p("/x.slice:b:c"), Path::new("/x.slice:b:c"));
    }

    #[test]
    fn systemd_paths() {
        assert_eq!(
            p("machine.slice:libpod:abc"),
            Path::new("/machine.slice/libpod-abc.scope")
        );
        assert_eq!(
            p("system.slice:docker:1234"),
            Path::new("/system.slice/docker-1234.scope")
        );
        assert_eq!(
            p("a-b.slice:cri:x"),
            Path::new("/a.slice/a-b.slice/cri-x.scope")
        );
        assert_eq!(
            p("kubepods-besteffort-pod12.slice:cri-containerd:x"),
            Path::new("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-x.scope")
        );
        assert_eq!(p("-.slice:p:x"), Path::new("/p-x.scope"));
        assert_eq!(p(":p:x"), Path::new("/system.slice/p-x.scope"));
        assert_eq!(p("machine.slice::x"), Path::new("/machine.slice/x.scope"));
        assert_eq!(
            p("machine.slice:p:sub.slice"),
            Path::new("/machine.slice/sub.slice")
        );
    }

    #[test]
    fn bad_paths() {
        for bad in [
            "/",
            "///",
            ".",
            "/a/../b",
            "../x",
            "a\0b",
            "machine.slice:libpod:",
            "machine.slice:libpod:a/b",
            "machine.slice:li/b:x",
            "machine.slice:p:..",
            "-a.slice:p:x",
            "a-.slice:p:x",
            "a--b.slice:p:x",
            ".slice:p:x",
        ] {
            let e = parse_cgroups_path(bad, "abc").unwrap_err();
            assert!(matches!(e, HostCgroupError::BadPath { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("linux.cgroupsPath"), "{e}");
        }
        assert!(parse_cgroups_path("", "a/b").is_err());
        assert!(parse_cgroups_path("", "..").is_err());
    }

    #[test]
    fn limits_for_vm() {
        let l = Limits::for_vm(2048, 2, DEFAULT_OVERHEAD_MIB);
        assert_eq!(l.memory_bytes, Some((2048 + 256) << 20));
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(l.cpu_quota_us, Some(250_000));
        assert_eq!(l.pids, None);
        assert_eq!(Limits::for_vm(128, 0, 0).cpu_quota_us, Some(150_000));
        assert_eq!(Limits::for_vm(128, 0, 0).memory_bytes, Some(128 << 20));
        // No overflow at the extremes.
        let big = Limits::for_vm(u32::MAX, u32::MAX, u32::MAX);
        assert_eq!(big.memory_bytes, Some((2 * u64::from(u32::MAX)) << 20));
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn v1_mounts_are_chosen_once_each() {
        let m = choose_mounts(&parse_mountinfo(HYBRID)).unwrap();
        let points: Vec<_> = m.iter().map(|m| m.point.to_str().unwrap()).collect();
        assert_eq!(
            points,
            [
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/pids"
            ]
        );
        assert_eq!(m[1].controllers, ["cpu", "cpuacct"]);
        let own = "4:memory:/sess/1\n2:cpu,cpuacct:/c\n8:pids:/\n0::/u\n";
        assert_eq!(
            resolve(&m[0], Path::new("x/y"), own),
            Path::new("/sess/1/x/y")
        );
        assert_eq!(resolve(&m[1], Path::new("x"), own), Path::new("/c/x"));
        assert_eq!(resolve(&m[0], Path::new("/abs"), own), Path::new("/abs"));
    }

    #[test]
    fn pure_v2() {
        let text = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = choose_mounts(&parse_mountinfo(text)).unwrap();
        assert_eq!(m.len(), 1);
        assert!(m[0].v2);
        // Relative: from the parent of the caller's own cgroup.
        let own = "0::/user.slice/session-1.scope\n";
        assert_eq!(
            resolve(&m[0], Path::new("x"), own),
            Path::new("/user.slice/x")
        );
        assert!(matches!(
            choose_mounts(&[]),
            Err(HostCgroupError::NoCgroupFs)
        ));
    }

    /// cgroup v2 code on a v1 host: the hybrid layout's controller-less v2
    /// mount, without limits (it offers no controllers to limit with).
    #[cfg(feature = "root-tests")]
    #[test]
    fn v2_without_controllers_on_this_host() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let Some(m) = parse_mountinfo(&text).into_iter().find(|m| m.v2) else {
            return;
        };
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let name = format!("husk-test-{}-v2", std::process::id());
        let top = m.point.join(&name);
        let cgroup = PathBuf::from(format!("/{name}/sb"));
        let none = Limits {
            memory_bytes: None,
            cpu_quota_us: None,
            cpu_period_us: DEFAULT_CPU_PERIOD_US,
            pids: None,
        };
        let mounts = [m.clone()];
        // A limit needs a controller the mount does not offer: refused, nothing left.
        let offered = std::fs::read_to_string(m.point.join("cgroup.controllers")).unwrap();
        if !offered.contains("memory") {
            let e =
                HostCgroup::create_in(&mounts, &proc_cgroup, &cgroup, &Limits::for_vm(64, 1, 0))
                    .unwrap_err();
            assert!(
                matches!(
                    e,
                    HostCgroupError::MissingController {
                        controller: "memory",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(!top.exists());
        }
        let mut cg = HostCgroup::create_in(&mounts, &proc_cgroup, &cgroup, &none).unwrap();
        assert!(cg.is_v2());
        assert_eq!(cg.paths(), [top.join("sb")]);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cg.add(child.id()).unwrap();
        let in_proc = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(
            in_proc.lines().any(|l| l == format!("0::/{name}/sb")),
            "{in_proc}"
        );
        assert!(matches!(cg.remove(), Err(HostCgroupError::NotEmpty { .. })));
        child.kill().unwrap();
        child.wait().unwrap();
        cg.remove().unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
    }
}

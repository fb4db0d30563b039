//! The init stage: `husk-agent init`, the first process of a container.
//!
//! The agent clones itself into the container's new namespaces and execs this
//! stage (see `process/spawn.rs`). It is single-threaded and owns nothing of
//! the agent, so it may do anything: it reads its instructions from fd 3,
//! builds the container's filesystem, pivots into it, takes the container's
//! identity, reports `Ready` on fd 4, blocks until the agent writes to fd 5
//! (runc's create/start split) and execs the container's program.
//!
//! Failures go to fd 4 as an [`InitMessage::Error`]; fd 4 is close-on-exec,
//! so the agent reads end-of-file once the program runs.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{self, AccessFlags, Gid, Uid};
use oci_spec::runtime::PosixRlimitType;

use super::mounts::{
    create_dev_symlinks, ensure_file, mount_entry, resolve_in_root, MountError, DEFAULT_DEVICES,
};
use super::spec::{find_program, path_of, DeviceEntry, InitConfig, InitMessage, LookupError};
use crate::sys;

/// Where the init stage reads its [`InitConfig`] (JSON, until end-of-file).
pub const CONFIG_FD: RawFd = 3;
/// Where it writes [`InitMessage`]s, one JSON object per line.
pub const STATUS_FD: RawFd = 4;
/// Where it waits for the agent's go: one byte means start, end-of-file means
/// the container was removed before it started.
pub const START_FD: RawFd = 5;

/// A failed init step.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("{what}: {source}")]
    Step {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("{0}")]
    Spec(String),
    #[error("exec {program:?}: {errno}")]
    Exec { program: String, errno: Errno },
}

impl InitError {
    fn invalid_spec(&self) -> bool {
        matches!(self, Self::Lookup(_) | Self::Spec(_) | Self::Exec { .. })
    }

    fn exit_code(&self) -> i32 {
        match self {
            Self::Lookup(LookupError::NotExecutable(_)) => 126,
            Self::Exec {
                errno: Errno::EACCES,
                ..
            } => 126,
            Self::Lookup(_) | Self::Exec { .. } => 127,
            _ => 1,
        }
    }
}

fn step<T, E: Into<io::Error>>(
    result: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, InitError> {
    result.map_err(|e| InitError::Step {
        what: what(),
        source: e.into(),
    })
}

/// Writes status messages to the agent.
struct Reporter(File);

impl Reporter {
    fn send(&self, message: &InitMessage) {
        let mut line = serde_json::to_vec(message).unwrap_or_default();
        line.push(b'\n');
        // If the agent is gone there is nobody to tell.
        let _ = (&self.0).write_all(&line);
    }

    fn warn(&self, text: String) {
        self.send(&InitMessage::Warning(text));
    }
}

/// Runs the init stage; never returns.
pub fn main() -> ! {
    let Ok(status) = sys::take_inherited_fd(STATUS_FD) else {
        // Not started by the agent: there is nobody to report to.
        eprintln!("husk-agent init is internal to the agent and cannot be run by hand");
        std::process::exit(125);
    };
    let _ = sys::set_cloexec(status.as_fd(), true);
    let reporter = Reporter(File::from(status));
    // Panics are reported on the status pipe, never printed on the
    // container's stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&reporter)));
    let (message, invalid_spec, code) = match outcome {
        Ok(Ok(never)) => match never {},
        Ok(Err(e)) => (e.to_string(), e.invalid_spec(), e.exit_code()),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            (format!("container init panicked: {text}"), false, 1)
        }
    };
    reporter.send(&InitMessage::Error {
        message,
        invalid_spec,
    });
    std::process::exit(code)
}

fn read_config() -> Result<InitConfig, InitError> {
    let fd = step(sys::take_inherited_fd(CONFIG_FD), || {
        "taking the config pipe (fd 3)".to_string()
    })?;
    let mut json = Vec::new();
    step(File::from(fd).read_to_end(&mut json), || {
        "reading the init instructions".to_string()
    })?;
    serde_json::from_slice(&json)
        .map_err(|e| InitError::Spec(format!("the init instructions are not valid: {e}")))
}

fn run(reporter: &Reporter) -> Result<Infallible, InitError> {
    // Nothing but fds 0-5 belongs to the container.
    sys::close_fds_from(START_FD as u32 + 1);
    let config = read_config()?;
    let start = File::from(step(sys::take_inherited_fd(START_FD), || {
        "taking the start pipe (fd 5)".to_string()
    })?);
    step(sys::set_cloexec(start.as_fd(), true), || {
        "marking the start pipe close-on-exec".to_string()
    })?;
    // Mount points and the working directory are created 0755, like runc.
    umask(Mode::from_bits_truncate(0o022));

    step(unistd::setsid(), || "creating a session".to_string())?;
    if config.process.terminal {
        step(sys::set_controlling_terminal(io::stdin().as_fd()), || {
            "making the terminal the controlling terminal".to_string()
        })?;
    }

    setup_rootfs(&config, reporter)?;
    finish_filesystem(&config, reporter)?;
    if let Some(hostname) = &config.hostname {
        step(unistd::sethostname(hostname), || {
            format!("setting the hostname to {hostname:?}")
        })?;
    }
    if let Some(domainname) = &config.domainname {
        set_domainname(domainname)?;
    }
    apply_limits(&config)?;
    let program = become_user(&config)?;

    step(sys::reset_signals(), || {
        "resetting signal handlers".to_string()
    })?;
    reporter.send(&InitMessage::Ready);
    let mut go = [0u8; 1];
    match (&start).read(&mut go) {
        Ok(1) => {}
        // The agent removed the container before starting it.
        _ => std::process::exit(0),
    }
    drop(start);
    exec(&program, &config)
}

/// Mounts everything under the rootfs and moves into it.
fn setup_rootfs(config: &InitConfig, reporter: &Reporter) -> Result<(), InitError> {
    let rootfs = &config.rootfs;
    step(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        || "making the mounts private".to_string(),
    )?;
    step(
        mount(
            Some(rootfs),
            rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        || format!("bind-mounting the rootfs {} onto itself", rootfs.display()),
    )?;
    let mut dev_is_tmpfs = false;
    for entry in &config.mounts {
        match mount_entry(rootfs, entry) {
            Ok(()) => {}
            // A container without cgroupfs still runs; say so and go on.
            Err(e) if entry.fstype == "cgroup2" => reporter.warn(e.to_string()),
            Err(e) => return Err(e.into()),
        }
        if entry.destination == Path::new("/dev") && entry.fstype == "tmpfs" {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        populate_dev(rootfs, reporter)?;
    }
    for device in &config.devices {
        create_device(rootfs, device)?;
    }
    if let Some(console) = &config.console {
        let target = resolve_in_root(rootfs, Path::new("/dev/console"))
            .and_then(|t| ensure_file(&t).map(|()| t));
        let target = step(target, || "creating /dev/console".to_string())?;
        step(
            mount(
                Some(console),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            || {
                format!(
                    "bind-mounting the terminal {} on /dev/console",
                    console.display()
                )
            },
        )?;
    }
    enter_rootfs(rootfs)?;
    if let Some(flags) = config.rootfs_propagation {
        step(
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::from_bits_retain(flags),
                None::<&str>,
            ),
            || "setting linux.rootfsPropagation".to_string(),
        )?;
    }
    Ok(())
}

/// Fills a fresh tmpfs `/dev` with the standard devices and symlinks.
fn populate_dev(rootfs: &Path, reporter: &Reporter) -> Result<(), InitError> {
    let dev = step(resolve_in_root(rootfs, Path::new("/dev")), || {
        "resolving /dev".to_string()
    })?;
    for &(name, major, minor) in DEFAULT_DEVICES {
        let node = DeviceEntry {
            path: PathBuf::from("/dev").join(name),
            kind: 'c',
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        if let Err(e) = create_device(rootfs, &node) {
            reporter.warn(e.to_string());
        }
    }
    for dir in ["pts", "shm"] {
        step(fs::create_dir_all(dev.join(dir)), || {
            format!("creating /dev/{dir}")
        })?;
    }
    create_dev_symlinks(&dev)?;
    Ok(())
}

/// Creates one device node: mknod, or a bind mount of the guest's node of
/// the same path when mknod is refused.
fn create_device(rootfs: &Path, device: &DeviceEntry) -> Result<(), InitError> {
    let path = step(resolve_in_root(rootfs, &device.path), || {
        format!("resolving {}", device.path.display())
    })?;
    if let Some(parent) = path.parent() {
        step(fs::create_dir_all(parent), || {
            format!("creating the directory of {}", device.path.display())
        })?;
    }
    let kind = match device.kind {
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    let _ = fs::remove_file(&path);
    let made = mknod(
        &path,
        kind,
        Mode::from_bits_truncate(device.mode),
        makedev(device.major, device.minor),
    );
    match made {
        Ok(()) => {
            // mknod applied the umask; the spec's mode is exact.
            step(
                fs::set_permissions(&path, fs::Permissions::from_mode(device.mode)),
                || format!("setting the mode of {}", device.path.display()),
            )?;
            step(
                unistd::chown(
                    &path,
                    Some(Uid::from_raw(device.uid)),
                    Some(Gid::from_raw(device.gid)),
                ),
                || format!("changing the owner of {}", device.path.display()),
            )
        }
        Err(Errno::EPERM) => {
            step(ensure_file(&path), || {
                format!("creating {}", device.path.display())
            })?;
            step(
                mount(
                    Some(&device.path),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                ),
                || format!("bind-mounting the guest's {}", device.path.display()),
            )
        }
        Err(e) => step(Err(e), || format!("creating {}", device.path.display())),
    }
}

/// pivot_root into the rootfs and detach the old root. When the agent's root
/// is the initramfs, which pivot_root refuses (EINVAL), move the rootfs over
/// `/` and chroot instead.
fn enter_rootfs(rootfs: &Path) -> Result<(), InitError> {
    step(unistd::chdir(rootfs), || {
        format!("entering the rootfs {}", rootfs.display())
    })?;
    match unistd::pivot_root(".", ".") {
        Ok(()) => {
            step(
                mount(
                    None::<&str>,
                    ".",
                    None::<&str>,
                    MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    None::<&str>,
                ),
                || "making the old root a slave".to_string(),
            )?;
            step(umount2(".", MntFlags::MNT_DETACH), || {
                "detaching the old root".to_string()
            })?;
        }
        Err(Errno::EINVAL) => {
            step(
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
                || "moving the rootfs over / (the guest root cannot be pivoted)".to_string(),
            )?;
            step(unistd::chroot("."), || "chroot into the rootfs".to_string())?;
        }
        Err(e) => step(Err(e), || "pivot_root into the rootfs".to_string())?,
    }
    step(unistd::chdir("/"), || "changing to /".to_string())
}

/// Read-only root, sysctls, read-only and masked paths (after pivot_root).
fn finish_filesystem(config: &InitConfig, reporter: &Reporter) -> Result<(), InitError> {
    if config.readonly_rootfs {
        step(
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ),
            || "remounting / read-only (root.readonly)".to_string(),
        )?;
    }
    for (key, value) in &config.sysctl {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        step(fs::write(&path, value), || {
            format!("setting sysctl {key}={value}")
        })?;
    }
    for path in &config.readonly_paths {
        let result = mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None::<&str>,
            )
        });
        match result {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => reporter.warn(format!(
                "making {} read-only (linux.readonlyPaths): {e}",
                path.display()
            )),
        }
    }
    for path in &config.masked_paths {
        let result = match fs::metadata(path) {
            Err(_) => Ok(()),
            Ok(meta) if meta.is_dir() => mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            ),
            Ok(_) => mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        };
        if let Err(e) = result {
            reporter.warn(format!(
                "masking {} (linux.maskedPaths): {e}",
                path.display()
            ));
        }
    }
    Ok(())
}

fn set_domainname(name: &str) -> Result<(), InitError> {
    step(fs::write("/proc/sys/kernel/domainname", name), || {
        format!("setting the domain name to {name:?}")
    })
}

fn rlimit_resource(typ: PosixRlimitType) -> Option<Resource> {
    Some(match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    })
}

fn apply_limits(config: &InitConfig) -> Result<(), InitError> {
    let process = &config.process;
    if let Some(score) = process.oom_score_adj {
        step(
            fs::write("/proc/self/oom_score_adj", score.to_string()),
            || format!("setting oomScoreAdj to {score}"),
        )?;
    }
    for limit in &process.rlimits {
        if let Some(resource) = rlimit_resource(limit.resource) {
            step(setrlimit(resource, limit.soft, limit.hard), || {
                format!(
                    "setting {:?} to soft {} hard {}",
                    limit.resource, limit.soft, limit.hard
                )
            })?;
        }
    }
    Ok(())
}

/// Working directory, groups, gid, uid, umask, no_new_privs; then finds the
/// program with the container's credentials.
fn become_user(config: &InitConfig) -> Result<PathBuf, InitError> {
    let process = &config.process;
    let cwd = &process.cwd;
    // Create the working directory as root, like runc; enter it before and,
    // if that failed (root squashing on a share), after dropping privileges.
    let _ = fs::create_dir_all(cwd);
    let entered = unistd::chdir(cwd.as_path()).is_ok();
    let groups: Vec<Gid> = process
        .additional_gids
        .iter()
        .map(|&g| Gid::from_raw(g))
        .collect();
    step(unistd::setgroups(&groups), || {
        format!(
            "setting the additional groups {:?}",
            process.additional_gids
        )
    })?;
    step(unistd::setgid(Gid::from_raw(process.gid)), || {
        format!("setting the gid to {}", process.gid)
    })?;
    step(unistd::setuid(Uid::from_raw(process.uid)), || {
        format!("setting the uid to {}", process.uid)
    })?;
    if !entered {
        unistd::chdir(cwd.as_path()).map_err(|e| {
            InitError::Spec(format!(
                "process.cwd {}: {e}; it must be a directory the user can enter",
                cwd.display()
            ))
        })?;
    }
    umask(Mode::from_bits_truncate(process.umask.unwrap_or(0o022)));
    if process.no_new_privileges {
        step(nix::sys::prctl::set_no_new_privs(), || {
            "setting no_new_privs".to_string()
        })?;
    }
    let name = &process.args[0];
    Ok(find_program(name, path_of(&process.env), |p| {
        unistd::access(p, AccessFlags::X_OK).is_ok()
    })?)
}

fn exec(program: &Path, config: &InitConfig) -> Result<Infallible, InitError> {
    let to_cstrings = |list: &[String]| -> Result<Vec<CString>, InitError> {
        list.iter()
            .map(|s| {
                CString::new(s.as_bytes())
                    .map_err(|_| InitError::Spec(format!("{s:?} contains a NUL byte")))
            })
            .collect()
    };
    let path = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| InitError::Spec("the program path contains a NUL byte".to_string()))?;
    let args = to_cstrings(&config.process.args)?;
    let env = to_cstrings(&config.process.env)?;
    let errno = match unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(InitError::Exec {
        program: config.process.args[0].clone(),
        errno,
    })
}

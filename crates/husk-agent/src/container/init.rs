//! The init stage: `husk-agent init`, the first process of a container.
//!
//! The agent clones itself into the container's new namespaces and execs this
//! stage (see `process/spawn.rs`). It is single-threaded and owns nothing of
//! the agent, so it may do anything: it reads its instructions from fd 3,
//! builds the container's filesystem, pivots into it, with `process.terminal`
//! allocates the terminal from the container's `/dev/ptmx` and sends its
//! master to the agent on fd 6, takes the container's identity, reports
//! `Ready` on fd 4, blocks until the agent writes to fd 5 (runc's
//! create/start split) and execs the container's program.
//!
//! Failures go to fd 4 as an [`StageMessage::Error`]; fd 4 is close-on-exec,
//! so the agent reads end-of-file once the program runs.

use std::convert::Infallible;
use std::fs::{self};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{self, Gid, Uid};

use super::mounts::{
    create_dev_symlinks, ensure_file, mount_entry, resolve_in_root, DEFAULT_DEVICES,
};
use super::protocol::StageMessage;
use super::spec::{DeviceEntry, InitConfig};
use super::stage::{self, step, Reporter, StageError};
use crate::sys;

/// Runs the init stage; never returns.
pub fn main() -> ! {
    stage::run_stage("init", run)
}

fn run(reporter: &Reporter) -> Result<Infallible, StageError> {
    let (config, start) = stage::take_instructions::<InitConfig>("init instructions")?;
    let console_socket = stage::take_console_socket(&config.process)?;
    // First the namespaces of the pod's sandbox container, while the
    // stage still holds the capabilities of the agent's user namespace.
    join_namespaces(&config)?;
    if config.loopback {
        // A new network namespace has only `lo`, down; runc brings it up.
        step(sys::set_loopback_up(), || {
            "bringing up the loopback interface lo of the container's network namespace".to_string()
        })?;
    }
    // Mount points and the working directory are created 0755, like runc.
    umask(Mode::from_bits_truncate(0o022));
    if config.cgroup_namespace {
        // The agent placed this process in the container's cgroup before it
        // exec'd, so that cgroup becomes the namespace's root.
        step(unshare(CloneFlags::CLONE_NEWCGROUP), || {
            "creating the cgroup namespace".to_string()
        })?;
    }

    step(unistd::setsid(), || "creating a session".to_string())?;

    setup_rootfs(&config, reporter)?;
    // After the container's mounts (its devpts) and before the read-only
    // and masked paths, as runc does.
    if let Some(socket) = console_socket {
        stage::setup_terminal(socket, &config.process, true)?;
        step(sys::set_controlling_terminal(io::stdin().as_fd()), || {
            "making the terminal the controlling terminal".to_string()
        })?;
    }
    finish_filesystem(&config, reporter)?;
    if let Some(hostname) = &config.hostname {
        step(unistd::sethostname(hostname), || {
            format!("setting the hostname to {hostname:?}")
        })?;
    }
    if let Some(domainname) = &config.domainname {
        set_domainname(domainname)?;
    }
    stage::become_and_exec(&config.process, config.seccomp.as_ref(), || {
        reporter.send(&StageMessage::Ready);
        stage::wait_for_start(start);
    })
}

/// Joins the namespaces of other containers the agent resolved (a pod
/// member joining its sandbox container's network, IPC and UTS namespaces).
fn join_namespaces(config: &InitConfig) -> Result<(), StageError> {
    for join in &config.joins {
        let what = || {
            format!(
                "joining the pod's {} namespace ({})",
                join.name,
                join.path.display()
            )
        };
        let fd = step(
            open(
                &join.path,
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
            what,
        )?;
        match setns(&fd, CloneFlags::from_bits_retain(join.nstype)) {
            Ok(()) => {}
            // The stage is in a user namespace of its own, which holds no
            // capability over the pod's namespaces.
            Err(Errno::EPERM) => {
                return Err(StageError::Spec(format!(
                    "{}: not permitted; a container with a user namespace of its own cannot join the pod's namespaces",
                    what()
                )))
            }
            Err(e) => step(Err(e), what)?,
        }
    }
    Ok(())
}

/// Mounts everything under the rootfs and moves into it.
fn setup_rootfs(config: &InitConfig, reporter: &Reporter) -> Result<(), StageError> {
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
            // In a user namespace without its own network (IPC) namespace
            // the kernel refuses a new sysfs (mqueue): bind the guest's, as
            // runc does.
            Err(e)
                if e.source.raw_os_error() == Some(libc::EPERM)
                    && matches!(entry.fstype.as_str(), "sysfs" | "mqueue") =>
            {
                let source = if entry.fstype == "sysfs" {
                    "/sys"
                } else {
                    "/dev/mqueue"
                };
                let mut bind = entry.clone();
                bind.source = Some(PathBuf::from(source));
                bind.fstype.clear();
                bind.data.clear();
                bind.flags |= (MsFlags::MS_BIND | MsFlags::MS_REC).bits();
                mount_entry(rootfs, &bind)?;
            }
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
fn populate_dev(rootfs: &Path, reporter: &Reporter) -> Result<(), StageError> {
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
fn create_device(rootfs: &Path, device: &DeviceEntry) -> Result<(), StageError> {
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
fn enter_rootfs(rootfs: &Path) -> Result<(), StageError> {
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
fn finish_filesystem(config: &InitConfig, reporter: &Reporter) -> Result<(), StageError> {
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

fn set_domainname(name: &str) -> Result<(), StageError> {
    step(fs::write("/proc/sys/kernel/domainname", name), || {
        format!("setting the domain name to {name:?}")
    })
}

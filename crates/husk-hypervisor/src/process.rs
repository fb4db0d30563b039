//! Spawning the helper processes a VM needs (QEMU, virtiofsd).
//!
//! Every child gets its own process group (so a Ctrl-C at the terminal reaches
//! husk, which forwards it to the container, and not QEMU), dies with its
//! parent (`PR_SET_PDEATHSIG`), and is killed when its handle is dropped.
//! It inherits no descriptor of husk's but its stdio and the ones passed
//! explicitly ([`Confine::fds`]): every other one (`--preserve-fds`, the
//! caller's sockets) is marked close-on-exec in the child before exec. It
//! runs with `no_new_privs`, and, when [`Confine::user`] is set, as that
//! uid/gid with only the given supplementary groups (so with no capability).
//!
//! This file is one of the host's two `unsafe` fences (with `husk-sys`):
//! the code between fork and exec cannot be written without it. Every block
//! says why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::HypervisorError;

/// At most this many descriptors are passed to one child.
pub(crate) const MAX_PASSED_FDS: usize = 16;
/// Passed descriptors are moved out of the way to at least this number
/// before they are put at their target numbers (which must be below it).
const FD_SCRATCH: RawFd = 100;

/// Who a child runs as and what it receives.
#[derive(Default)]
pub(crate) struct Confine {
    /// uid, gid, supplementary groups; `None` keeps husk's (root).
    pub user: Option<(u32, u32, Vec<u32>)>,
    /// Descriptors the child gets, each at the given number (3 and up,
    /// below [`FD_SCRATCH`]). They are closed here once the child runs.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// A network namespace (a descriptor of it, open until the child runs)
    /// the child enters before it drops privileges.
    pub netns: Option<RawFd>,
}

/// Spawns `cmd` with stderr (and stdout) appended to `log`, on the host CPUs
/// `cpus` when given, confined as `confine` says.
pub(crate) fn spawn(
    what: &'static str,
    mut cmd: Command,
    log: &Path,
    cpus: Option<&[usize]>,
    confine: Confine,
) -> Result<Child, HypervisorError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| HypervisorError::Io {
            context: format!("cannot open {}", log.display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| HypervisorError::Io {
        context: format!("cannot open {}", log.display()),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let affinity = match cpus {
        Some(cpus) => {
            let mut set = CpuSet::new();
            for &cpu in cpus {
                set.set(cpu).map_err(|e| HypervisorError::Io {
                    context: format!("host CPU {cpu} cannot be named in a CPU set"),
                    source: e.into(),
                })?;
            }
            Some(set)
        }
        None => None,
    };
    assert!(
        confine.fds.len() <= MAX_PASSED_FDS,
        "too many fds for {what}"
    );
    let mut pass = [(-1 as RawFd, -1 as RawFd); MAX_PASSED_FDS];
    for (slot, (fd, target)) in pass.iter_mut().zip(&confine.fds) {
        assert!(
            (3..FD_SCRATCH).contains(target),
            "fd target {target} for {what}"
        );
        *slot = (fd.as_raw_fd(), *target);
    }
    let npass = confine.fds.len();
    let user = confine.user.clone();
    let groups: Vec<libc::gid_t> = user.as_ref().map(|u| u.2.clone()).unwrap_or_default();
    // The highest descriptor number the fallback of close_range must mark.
    // SAFETY: sysconf reads a limit; it takes no pointer.
    let open_max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    let max_fd = if open_max > 0 {
        open_max.min(1 << 20) as RawFd
    } else {
        1024
    };
    let netns = confine.netns;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (close_range, fcntl, dup2, setgroups,
    // setns, setgid, setuid, prctl, getppid, sched_setaffinity) on data prepared
    // before the fork (fixed-size arrays, a Vec not resized in the child),
    // allocating nothing and touching no shared state.
    unsafe {
        cmd.pre_exec(move || {
            // 1. Nothing of husk's crosses exec but stdio and `pass`.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..max_fd {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            // 2. The passed fds at their numbers (dup2 clears CLOEXEC); via
            // scratch numbers so a source never sits on another's target.
            let mut scratch = [-1 as RawFd; MAX_PASSED_FDS];
            for i in 0..npass {
                scratch[i] = libc::fcntl(pass[i].0, libc::F_DUPFD_CLOEXEC, FD_SCRATCH);
                if scratch[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..npass {
                if libc::dup2(scratch[i], pass[i].1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // 3. Its network namespace, while still root.
            if let Some(fd) = netns {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // 4. The unprivileged user: groups, gid, then uid (which clears
            // every capability of a process that was root).
            if let Some((uid, gid, _)) = user {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // 5. Die with husk. Set after the uid change, which clears it;
            // husk may have died before it was set.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("husk exited"));
            }
            if let Some(set) = &affinity {
                sched_setaffinity(Pid::from_raw(0), set)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|source| HypervisorError::Spawn { what, source });
    // The child has its copies; ours close here.
    drop(confine.fds);
    child
}

/// The last `max` bytes of a log file, trimmed, for error messages. Reads
/// only that tail (the file may be large and is written by the guest).
pub fn log_tail(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut data = Vec::with_capacity(max.min(1 << 20));
    let _ = f.take(max as u64).read_to_end(&mut data);
    String::from_utf8_lossy(&data).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_reads_only_the_tail() {
        let p = std::env::temp_dir().join(format!("husk-tail-{}", std::process::id()));
        std::fs::write(&p, format!("{}the end", "x".repeat(100_000))).unwrap();
        assert_eq!(log_tail(&p, 7), "the end");
        assert_eq!(log_tail(&p, 10), "xxxthe end");
        assert_eq!(log_tail(Path::new("/nonexistent/log"), 10), "");
        std::fs::remove_file(&p).unwrap();
    }

    #[tokio::test]
    async fn a_child_inherits_only_what_is_passed() {
        use std::os::fd::FromRawFd;
        let dir = std::env::temp_dir().join(format!("husk-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        // A descriptor of husk's without CLOEXEC (as --preserve-fds leaves them).
        // SAFETY: dup returns a new descriptor this test owns.
        let leaked = unsafe { OwnedFd::from_raw_fd(libc::dup(0)) };
        // SAFETY: the descriptor is valid and owned; clearing FD_CLOEXEC.
        unsafe { libc::fcntl(leaked.as_raw_fd(), libc::F_SETFD, 0) };
        let passed: OwnedFd = File::open("/dev/null").unwrap().into();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("ls /proc/self/fd; grep NoNewPrivs /proc/self/status");
        let confine = Confine {
            user: None,
            fds: vec![(passed, 7)],
            netns: None,
        };
        let mut child = spawn("sh", cmd, &log, None, confine).unwrap();
        child.wait().await.unwrap();
        let out = std::fs::read_to_string(&log).unwrap();
        let fds: Vec<&str> = out.lines().filter(|l| l.parse::<u32>().is_ok()).collect();
        // 0-2, the passed 7, and the fd `ls` itself opens on /proc/self/fd.
        assert!(fds.contains(&"7"), "{out}");
        assert!(
            !fds.contains(&leaked.as_raw_fd().to_string().as_str()),
            "{out}"
        );
        assert!(fds.len() <= 5, "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Forking a container's init: a raw `clone(2)` of the agent into new
//! namespaces that immediately re-executes the agent binary.
//!
//! This is the only place where the agent forks (through
//! `sys::fork_with_flags`). The agent is multi-threaded,
//! so between `clone` and `execve` the child may only call async-signal-safe
//! functions: it calls `dup2`, `prctl`, `execve` and `_exit` (each a bare
//! system call) on data the parent prepared, and never allocates, locks or
//! unwinds. Everything interesting happens after the exec, in the fresh
//! single-threaded `husk-agent init` process (`container/init.rs`).
//!
//! It is one of the agent's two `unsafe` fences (with `sys.rs`): the child
//! between `clone` and `execve` must make raw system calls on raw pointers
//! the parent prepared, which no safe wrapper can offer without allocating.
//! Every block says why it is sound (`// SAFETY:`).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use crate::sys::{self, Forked};

/// The lowest number the parent duplicates the child's descriptors to, so
/// that no source can collide with a target (targets are 0..=7).
const FIRST_STAGING_FD: RawFd = 16;

/// What to start and how.
pub struct CloneExec<'a> {
    /// Namespaces to create (`CLONE_NEW*`); SIGCHLD is added here.
    pub namespaces: CloneFlags,
    /// A PID namespace to clone the child into (without `CLONE_NEWPID` in
    /// `namespaces`): the cloning thread enters it for the clone (a PID
    /// namespace's `setns` affects only the caller's later children) and
    /// returns to its own right after.
    pub pid_namespace: Option<BorrowedFd<'a>>,
    /// Absolute path of the program to exec.
    pub program: &'a CStr,
    /// Its argv (argv[0] included).
    pub argv: &'a [CString],
    /// Descriptors the child gets: `(source in the parent, number in the child)`.
    /// Everything else the agent has open is close-on-exec.
    pub fds: Vec<(BorrowedFd<'a>, RawFd)>,
    /// Signal the child gets when the thread that cloned it exits. Only for
    /// the agent as a plain process, where it keeps containers from outliving
    /// a killed agent; the cloning thread must live as long as the agent
    /// (a tokio worker thread, never a blocking-pool thread).
    pub parent_death_signal: Option<Signal>,
    /// A descriptor number of the child (a target in `fds`) that it reads one
    /// byte from before it execs, so the agent can act on the new pid first:
    /// place it in its cgroup, write its user namespace's id maps.
    pub hold_fd: Option<RawFd>,
    /// After the hold, become uid and gid 0 of the (new) user namespace, so
    /// that the exec'd stage keeps its capabilities there.
    pub become_userns_root: bool,
}

/// Clones and execs; returns the child's pid (in the agent's PID namespace).
///
/// Failures of `dup2` or `execve` in the child cannot be reported through
/// memory; the child exits with 126 or 127 and the caller notices that its
/// status pipe reached end-of-file without a message.
pub fn clone_exec(req: &CloneExec<'_>) -> io::Result<Pid> {
    let mut staged = Vec::with_capacity(req.fds.len());
    for (source, target) in &req.fds {
        staged.push((sys::dup_cloexec_from(*source, FIRST_STAGING_FD)?, *target));
    }
    let pairs: Vec<(RawFd, RawFd)> = staged
        .iter()
        .map(|(fd, target)| (fd.as_raw_fd(), *target))
        .collect();
    let mut argv: Vec<*const libc::c_char> = req.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let death_signal = req.parent_death_signal.map_or(0, |s| s as libc::c_ulong);
    let after = AfterClone {
        hold_fd: req.hold_fd.unwrap_or(-1),
        become_userns_root: req.become_userns_root,
    };
    let flags = req.namespaces.bits() as libc::c_ulong;
    // This thread's PID namespace for children, to return to; opened
    // before entering the other one, so that a failure leaves nothing
    // changed.
    let own_pid_namespace = match req.pid_namespace {
        Some(_) => Some(std::fs::File::open(
            "/proc/thread-self/ns/pid_for_children",
        )?),
        None => None,
    };
    if let Some(ns) = req.pid_namespace {
        setns(ns, CloneFlags::CLONE_NEWPID)?;
    }

    // Block every signal across the clone so that no handler of the agent
    // (tokio's) runs in the child; the init stage unblocks them.
    let mut saved = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )?;
    let cloned = match sys::fork_with_flags(flags) {
        // SAFETY: we are the freshly cloned child; `pairs`, `argv` and `envp`
        // are valid copies of the parent's prepared data, and `argv`/`envp`
        // are null-terminated arrays of pointers to NUL-terminated strings
        // that live as long as the copied `req`.
        Ok(Forked::Child) => unsafe {
            exec_child(
                &pairs,
                death_signal,
                after,
                req.program.as_ptr(),
                &argv,
                &envp,
            )
        },
        Ok(Forked::Parent(pid)) => Ok(pid),
        Err(e) => Err(e),
    };
    if let Some(own) = &own_pid_namespace {
        // Entering the namespace the thread was in cannot be refused (it
        // is this thread's own, or its active one); should it fail, later
        // processes cloned on this thread would land in the pod's.
        if let Err(e) = setns(own, CloneFlags::CLONE_NEWPID) {
            tracing::error!("returning the agent thread to its own PID namespace failed: {e}");
        }
    }
    let restored = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
    drop(staged);
    let pid = cloned?;
    restored?;
    Ok(pid)
}

/// What the child does between its descriptors and `execve`.
#[derive(Clone, Copy)]
struct AfterClone {
    hold_fd: RawFd,
    become_userns_root: bool,
}

/// The child between `clone` and `execve`: async-signal-safe calls only.
///
/// # Safety
/// Must only be called in the child of a fork-style clone, with pointers as
/// described in `clone_exec`.
unsafe fn exec_child(
    pairs: &[(RawFd, RawFd)],
    death_signal: libc::c_ulong,
    after: AfterClone,
    program: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    for &(source, target) in pairs {
        // dup2 clears close-on-exec on `target`; the staged sources stay
        // close-on-exec and vanish at execve.
        // SAFETY: dup2 and _exit are bare system calls on integers.
        if unsafe { libc::dup2(source, target) } < 0 {
            // SAFETY: _exit is a bare system call.
            unsafe { libc::_exit(126) };
        }
    }
    if death_signal != 0 {
        // SAFETY: PR_SET_PDEATHSIG takes integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal, 0, 0, 0) };
    }
    if after.hold_fd >= 0 {
        let mut byte = 0u8;
        loop {
            // SAFETY: read writes at most one byte through a pointer to
            // `byte`, which lives on this stack frame across the call.
            let n = unsafe { libc::read(after.hold_fd, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                break;
            }
            // SAFETY: __errno_location returns this thread's errno slot,
            // valid for the life of the thread.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            // The agent gave up on this child.
            // SAFETY: _exit is a bare system call.
            unsafe { libc::_exit(125) };
        }
        // SAFETY: closes the hold descriptor, which nothing in this child
        // owns (it came from dup2 above).
        unsafe { libc::close(after.hold_fd) };
    }
    if after.become_userns_root {
        // Raw system calls: glibc's set*id wrappers would try to signal the
        // agent's other threads, which do not exist in this child.
        // SAFETY: setgroups with a zero count reads no list; setresgid and
        // setresuid take integers; _exit is a bare system call.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, 0 as libc::c_ulong, 0 as libc::c_ulong) < 0
                || libc::syscall(libc::SYS_setresgid, 0, 0, 0) < 0
                || libc::syscall(libc::SYS_setresuid, 0, 0, 0) < 0
            {
                libc::_exit(125);
            }
        }
    }
    // SAFETY: the caller guarantees that `program` is a NUL-terminated
    // string and `argv` and `envp` null-terminated arrays of such strings,
    // alive until execve replaces the process image.
    unsafe { libc::execve(program, argv.as_ptr(), envp.as_ptr()) };
    // SAFETY: _exit is a bare system call.
    unsafe { libc::_exit(127) }
}

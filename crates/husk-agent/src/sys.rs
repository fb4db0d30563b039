//! Small, documented wrappers around the few system calls that `nix` exposes
//! only as `unsafe` (or not at all). Together with `process/spawn.rs` this is
//! the agent's whole `unsafe` surface.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Takes ownership of a descriptor the process inherited at a fixed number
/// (the init stage gets its control pipes at 3, 4 and 5).
///
/// Fails when `fd` is not open. Call it at most once per number: a second
/// call would create a second owner of the same descriptor.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table entry; it is valid
    // for any integer and fails with EBADF when `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above) and, per this function's contract,
    // nothing else in the process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Closes every descriptor numbered `first` or above.
///
/// Only for the single-threaded init stage, before it creates any descriptor
/// of its own above `first`: descriptors owned by live Rust objects must not
/// be closed behind their backs.
pub fn close_fds_from(first: u32) {
    // SAFETY: close_range takes plain integers and only closes descriptors;
    // the caller guarantees none of them is owned by a Rust object.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if rc != 0 {
        // Kernels older than 5.9 lack close_range: mark them close-on-exec
        // one by one instead, which is enough for an exec-bound process.
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<RawFd> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for fd in fds.into_iter().filter(|&fd| fd >= first as RawFd) {
                // SAFETY: F_SETFD on an arbitrary integer is harmless; it
                // fails with EBADF when the descriptor is not open.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
    }
}

/// Makes the terminal open at `fd` the controlling terminal of the calling
/// process (which must be a session leader without one).
pub fn set_controlling_terminal(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument and no pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the window size of the terminal open at `fd`.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points
    // to a live, initialised value for the duration of the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &size as *const libc::winsize,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restores every signal to its default action and unblocks all of them, so
/// that the program the init stage execs starts with a clean signal state
/// (the agent ignores SIGPIPE and blocks everything around `clone`).
pub fn reset_signals() -> io::Result<()> {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code, so none of
        // sigaction's hazards (non-async-signal-safe handlers) apply.
        unsafe { sigaction(signal, &default) }.map_err(io::Error::from)?;
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )
    .map_err(io::Error::from)
}

/// Puts `fd` into non-blocking mode (for use with tokio's `AsyncFd`).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Registers `file` (switched to non-blocking mode) with tokio's reactor.
/// Must be called inside the runtime.
pub fn register_async(file: std::fs::File) -> io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    use std::os::fd::AsFd;
    set_nonblocking(file.as_fd())?;
    // SAFETY: the `File` owns its descriptor; it stays open and refers to the
    // same file description for as long as the `AsyncFd` owns the `File`.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(file) }?)
}

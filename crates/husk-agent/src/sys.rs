//! The `unsafe` fence of the agent: small, documented, safe wrappers around
//! the few system calls that `nix` exposes only as `unsafe` (or not at all).
//! Together with `process/spawn.rs` (the child between `clone` and
//! `execve`) this is the agent's whole `unsafe` surface; the workspace
//! denies `unsafe` everywhere else, and every block here says why it is
//! sound (`// SAFETY:`).

#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

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

/// A new close-on-exec duplicate of `fd` numbered `lowest` or above
/// (`F_DUPFD_CLOEXEC`).
pub fn dup_cloexec_from(fd: BorrowedFd<'_>, lowest: RawFd) -> io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(lowest))?;
    // SAFETY: F_DUPFD_CLOEXEC has just created `new`; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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

/// Brings the loopback interface `lo` of the calling thread's network
/// namespace up, as runc does for every new network namespace: the kernel
/// then gives it 127.0.0.1/8 and ::1 itself. Reads the flags first
/// (`SIOCGIFFLAGS`) and only adds `IFF_UP` (`SIOCSIFFLAGS`); needs
/// `CAP_NET_ADMIN` over the namespace.
pub fn set_loopback_up() -> io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data (integers, byte arrays and a union of
    // them), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name from and writes the
    // flags into the `ifreq` the pointer points to, which is live, initialised
    // and exclusively borrowed for the duration of the call.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS has just filled `ifru_flags`, the union's active
    // field; reading and updating that same field is sound.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads the `ifreq` (name and flags) through
    // the pointer, which is live and initialised for the duration of the call.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &req as *const libc::ifreq,
        )
    } < 0
    {
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

/// Sends the descriptor `fd` over the unix socket `socket` (`SCM_RIGHTS`),
/// with a one-byte payload so that the peer can tell it from end-of-file.
/// The container stages send their terminal's master to the agent this way.
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(b"f")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the descriptor's message was not sent",
        ));
    }
    Ok(())
}

/// Receives one descriptor sent with [`send_fd`], close-on-exec.
///
/// `Ok(None)` is end-of-file: the peer closed its end without sending one.
/// Without `wait` the call does not block, and fails with `WouldBlock` when
/// nothing was sent yet. A message that carries no descriptor, or several,
/// is an error (extra descriptors are closed).
pub fn recv_fd(socket: BorrowedFd<'_>, wait: bool) -> io::Result<Option<OwnedFd>> {
    let mut payload = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut payload)];
    // Room for more than one, so that a surplus is seen (and closed) rather
    // than truncated away.
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if !wait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let (bytes, mut received) = loop {
        let msg = match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        let mut received = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: SCM_RIGHTS has just installed these descriptors in
                // this process; nothing else owns them.
                received.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        break (msg.bytes, received);
    };
    match received.len() {
        0 if bytes == 0 => Ok(None),
        1 => Ok(received.pop()),
        0 => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message without a descriptor",
        )),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} descriptors in one message where one was expected"),
        )),
    }
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

/// The three capability sets `capset(2)` takes, as bit masks (bit n is
/// capability n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapState {
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the calling thread's effective, permitted and inheritable sets.
pub fn capset(state: CapState) -> io::Result<()> {
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |mask: u64| [mask as u32, (mask >> 32) as u32];
    let (e, p, i) = (
        split(state.effective),
        split(state.permitted),
        split(state.inheritable),
    );
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: capset reads one header and, for version 3, two data structs
    // through the pointers, which point to live, initialised values.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's effective, permitted and inheritable sets.
pub fn capget() -> io::Result<CapState> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes at most two data structs (version 3) into the
    // array and may update the header's version; both are live and writable.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    Ok(CapState {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every prctl option used through this helper takes integer
    // arguments only (no pointers); unused arguments are zero.
    let rc = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes capability `cap` from the bounding set (`PR_CAPBSET_DROP`).
pub fn drop_bounding_cap(cap: u32) -> io::Result<()> {
    prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0)
}

/// Keeps the permitted set across a change from uid 0 (`PR_SET_KEEPCAPS`).
pub fn set_keep_caps(on: bool) -> io::Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, on as libc::c_ulong, 0)
}

/// Empties the ambient set.
pub fn clear_ambient_caps() -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )
}

/// Adds `cap` to the ambient set (it must be permitted and inheritable).
pub fn raise_ambient_cap(cap: u32) -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
        cap as libc::c_ulong,
    )
}

/// Sets the signal sent to the calling process when its parent exits.
pub fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0)
}

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset when true.
    pub jt: u8,
    /// Jump offset when false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const SockFilter,
}

/// Installs a seccomp filter on the calling thread (`seccomp(2)` with
/// `SECCOMP_SET_MODE_FILTER`). The caller needs `no_new_privs` or
/// `CAP_SYS_ADMIN`.
pub fn install_seccomp_filter(program: &[SockFilter], flags: u32) -> io::Result<()> {
    let len = libc::c_ushort::try_from(program.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = SockFprog {
        len,
        filter: program.as_ptr(),
    };
    // SAFETY: the kernel reads `fprog` and `len` instructions through its
    // pointer; both live until the call returns (the kernel copies them).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags as libc::c_ulong,
            &fprog as *const SockFprog,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`,
/// padded with zeros (the kernel requires unused bytes to be zero).
#[repr(C)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    padding: [u8; 64],
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct BpfProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    padding: [u8; 44],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `bpf_attr` layout for `cmd` of the size passed;
    // the kernel reads it (and, for a log buffer, writes to the buffer it
    // names, which the caller keeps alive) only during the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Loads a `BPF_PROG_TYPE_CGROUP_DEVICE` program (`bpf(2)`); a program the
/// verifier rejects is an error carrying the verifier's log.
pub fn load_device_program(program: &[crate::cgroup::devices::Insn]) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 0];
    let load = |log: &mut Vec<u8>| {
        let mut attr = BpfProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: u32::try_from(program.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
            insns: program.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            // No log: all three zero, or the kernel refuses the call.
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            kern_version: 0,
            prog_flags: 0,
            prog_name: *b"husk_devices\0\0\0\0",
            prog_ifindex: 0,
            expected_attach_type: BPF_CGROUP_DEVICE,
            padding: [0; 64],
        };
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    let fd = match load(&mut log) {
        Ok(fd) => fd,
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Ask again with the verifier's log, to say why.
            log = vec![0u8; 16 * 1024];
            let _ = load(&mut log);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{e}; verifier: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    // SAFETY: bpf(BPF_PROG_LOAD) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches a device program to the cgroup whose directory is open as
/// `cgroup`, alongside any others (`BPF_F_ALLOW_MULTI`: all must allow).
pub fn attach_device_program(cgroup: &std::fs::File, program: &OwnedFd) -> io::Result<()> {
    let mut attr = BpfProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
        padding: [0; 44],
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Outcome of [`fork_as_sibling`].
pub enum Forked {
    /// In the parent: the child's pid (in the caller's PID namespace).
    Parent(nix::unistd::Pid),
    /// In the child.
    Child,
}

/// Forks the calling process so that the child's parent is the caller's
/// parent (`clone(CLONE_PARENT)`), as the exec stage does: the process it
/// starts in the container becomes a child of the agent, which reaps it.
///
/// Only for single-threaded processes (the exec stage): the child is a copy
/// of the one thread, and glibc's fork handlers do not run (no locks are
/// held in a single-threaded process, and the child execs soon).
pub fn fork_as_sibling() -> io::Result<Forked> {
    fork_with_flags(libc::CLONE_PARENT as libc::c_ulong)
}

/// A fork (`clone(2)` without `CLONE_VM`, SIGCHLD to the parent) with extra
/// clone `flags`: `CLONE_PARENT`, or the `CLONE_NEW*` namespaces of a
/// container's init. In a multi-threaded caller the child may only make
/// async-signal-safe calls before it execs (see `process/spawn.rs`); this
/// function itself returns to it without allocating.
pub fn fork_with_flags(flags: libc::c_ulong) -> io::Result<Forked> {
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork:
    // the child gets a copy-on-write copy of this thread's stack and memory.
    // The arguments are plain integers and null pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    match rc {
        rc if rc < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(nix::unistd::Pid::from_raw(
            pid as libc::pid_t,
        ))),
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `bytes` into the kernel's entropy pool through `random` (an open
/// `/dev/urandom`), crediting 8 bits per byte, then makes the CRNG reseed
/// from the pool at once (`RNDRESEEDCRNG`). Needs CAP_SYS_ADMIN.
pub fn add_entropy_and_reseed(random: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    if bytes.len() > (i32::MAX / 8) as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the buffer 4-byte aligned as the kernel's struct is: copy it
    // into u32 words.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (i, chunk) in info.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words[i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `words` holds a complete rand_pool_info whose buf_size says
    // how many bytes follow the header, all within the allocation; the
    // kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_random_ioctl_numbers_are_their_encodings() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: libc::c_ulong, nr: libc::c_ulong, size: libc::c_ulong| {
            dir << 30 | size << 16 | (b'R' as libc::c_ulong) << 8 | nr
        };
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 2 * 4));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn a_descriptor_crosses_a_socketpair() {
        let (ours, theirs) = pair();
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        send_fd(theirs.as_fd(), write_end.as_fd()).unwrap();
        drop(write_end);
        let received = recv_fd(ours.as_fd(), false).unwrap().expect("a descriptor");
        let flags = fcntl(received.as_fd(), FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC));
        // It is the same pipe: what goes in comes out of our read end.
        std::fs::File::from(received).write_all(b"hello").unwrap();
        let mut text = String::new();
        std::fs::File::from(read_end)
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello");
        // Nothing more was sent: without waiting that is WouldBlock ...
        let err = recv_fd(ours.as_fd(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        // ... and once the peer is gone, end-of-file.
        drop(theirs);
        assert!(recv_fd(ours.as_fd(), true).unwrap().is_none());
    }

    #[test]
    fn a_message_without_a_descriptor_is_an_error() {
        let (ours, theirs) = pair();
        nix::unistd::write(&theirs, b"x").unwrap();
        let err = recv_fd(ours.as_fd(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("without a descriptor"), "{err}");
    }

    #[test]
    fn extra_descriptors_are_refused() {
        let (ours, theirs) = pair();
        let (a, b) = nix::unistd::pipe().unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        sendmsg::<()>(
            theirs.as_raw_fd(),
            &[IoSlice::new(b"f")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let err = recv_fd(ours.as_fd(), false).unwrap_err();
        assert!(err.to_string().contains("2 descriptors"), "{err}");
    }
}

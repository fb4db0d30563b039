//! The host's `unsafe` fence (with the hypervisor crate's process spawner):
//! thin wrappers of the Linux calls the host side of husk needs and neither
//! the standard library nor `nix` wraps safely — `openat2(2)`,
//! `open_tree(2)`, `move_mount(2)` and `mount_setattr(2)` (Linux 5.12 or
//! later) — and the few places where a descriptor or a process is taken
//! over: descriptors received with `SCM_RIGHTS` or inherited by number, a
//! terminal's size, a pre-exec hook, a fork.
//!
//! Each wrapper takes borrowed descriptors and C strings, returns an
//! [`OwnedFd`] or `io::Result<()>`, and holds exactly one `unsafe` block whose
//! `SAFETY:` comment says why the call is sound. No policy lives here: the
//! callers (`husk-runtime::share`) decide what to open and how. Its
//! [`socket_path`] module (no `unsafe`) names unix sockets whose paths are
//! longer than `sun_path`.
#![allow(unsafe_code)]

pub mod socket_path;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `openat2(2)` resolve flags (`linux/openat2.h`).
pub const RESOLVE_NO_XDEV: u64 = 0x01;
pub const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
pub const RESOLVE_NO_SYMLINKS: u64 = 0x04;
pub const RESOLVE_BENEATH: u64 = 0x08;
pub const RESOLVE_IN_ROOT: u64 = 0x10;

/// `open_tree(2)` flags (`linux/mount.h`).
pub const OPEN_TREE_CLONE: u32 = 1;
pub const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// `*at` flags used by the mount API.
pub const AT_EMPTY_PATH: u32 = libc::AT_EMPTY_PATH as u32;
pub const AT_SYMLINK_NOFOLLOW: u32 = libc::AT_SYMLINK_NOFOLLOW as u32;
pub const AT_RECURSIVE: u32 = 0x8000;

/// `move_mount(2)` flags.
pub const MOVE_MOUNT_F_SYMLINKS: u32 = 0x01;
pub const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x04;
pub const MOVE_MOUNT_T_SYMLINKS: u32 = 0x10;
pub const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;

/// `mount_setattr(2)` attributes.
pub const MOUNT_ATTR_RDONLY: u64 = 0x01;
pub const MOUNT_ATTR_NOSUID: u64 = 0x02;
pub const MOUNT_ATTR_NODEV: u64 = 0x04;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x08;

/// `struct open_how` of `openat2(2)`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    /// `MS_SHARED`, `MS_SLAVE`, `MS_PRIVATE`, `MS_UNBINDABLE` or 0 (unchanged).
    pub propagation: u64,
    pub userns_fd: u64,
}

fn fd_or_err(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = r as RawFd;
    // SAFETY: the kernel just returned `fd` as a new descriptor owned by no
    // one else in this process; wrapping it makes this the only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unit_or_err(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `openat2(dir, path, {flags, mode, resolve})`. `O_CLOEXEC` is always added.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: mode as u64,
        resolve,
    };
    // SAFETY: `path` is a NUL-terminated string and `how` a properly
    // initialised `struct open_how` whose size is passed; both outlive the
    // call. `dir` is a valid descriptor for the call's duration.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    fd_or_err(r)
}

/// `open_tree(dir, path, flags)`; `dir` `None` means `AT_FDCWD`.
pub fn open_tree(dir: Option<BorrowedFd<'_>>, path: &CStr, flags: u32) -> io::Result<OwnedFd> {
    let dfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `path` is NUL-terminated and outlives the call; `dfd` is
    // `AT_FDCWD` or a descriptor borrowed for the call's duration.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, dfd, path.as_ptr(), flags) };
    fd_or_err(r)
}

/// `move_mount(from_dir, from_path, to_dir, to_path, flags)`.
pub fn move_mount(
    from_dir: BorrowedFd<'_>,
    from_path: &CStr,
    to_dir: BorrowedFd<'_>,
    to_path: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both paths are NUL-terminated and outlive the call; both
    // descriptors are borrowed for the call's duration.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from_dir.as_raw_fd(),
            from_path.as_ptr(),
            to_dir.as_raw_fd(),
            to_path.as_ptr(),
            flags,
        )
    };
    unit_or_err(r)
}

/// `mount_setattr(dir, path, flags, attr)`.
pub fn mount_setattr(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: u32,
    attr: &MountAttr,
) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated; `attr` points to an initialised
    // `struct mount_attr` whose size is passed; both outlive the call, and
    // the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dir.as_raw_fd(),
            path.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    unit_or_err(r)
}

/// Receives into `buf` from the socket `sock` (one `recvmsg(2)`, no
/// waiting beyond the socket's own mode), taking ownership of up to 8
/// descriptors that ride along as `SCM_RIGHTS` (close-on-exec). Returns the
/// bytes read (0 at end of stream) and the descriptors.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: usize = 8;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, which live
    // across the call and are as large as the header says.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just
    // filled, within `msg_controllen`; each SCM_RIGHTS payload is an array
    // of descriptors the kernel installed in this process for us alone, so
    // each is owned exactly once here.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} descriptors sent at once"),
        ));
    }
    Ok((n as usize, fds))
}

/// Takes over descriptor `fd`, inherited from the process that started this
/// one and named on its command line (`--ready-fd N`), after checking it is
/// open; it is made close-on-exec. Call it once per descriptor, at start-up,
/// before anything else could have opened or claimed that number.
pub fn claim_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_SETFD on a number only fails (EBADF) if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open, and by this function's contract was
    // handed to this process alone and is claimed only here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The size (rows, columns) of the terminal `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: an all-zero winsize is valid; TIOCGWINSZ writes one `winsize`
    // into it while the borrowed descriptor stays open.
    let (r, ws) = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        let r = libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws);
        (r, ws)
    };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Makes `cmd`'s child keep descriptor `fd` across exec (clears its
/// close-on-exec flag) and start a new session before it execs.
pub fn keep_fd_and_setsid(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and makes only
    // async-signal-safe calls (fcntl, setsid); it touches no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 || libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `TUNSETIFF` (`linux/if_tun.h`: `_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Opens `/dev/net/tun` and attaches a new tap device named `name` (at
/// most 15 bytes) to it, with virtio-net headers and no packet info, as
/// QEMU's `-netdev tap,fd=` wants it. The device lives in the network
/// namespace of the calling thread and only as long as the descriptor
/// (and every copy of it) stays open: it is not persistent, so it goes
/// with the last process that holds it.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 bytes"),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is
    // and which outlives the call; `tun` is an open descriptor of ours.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun.into())
}

/// Which side of [`fork_single_threaded`] this is.
pub enum Forked {
    Parent { child: u32 },
    Child,
}

/// `fork(2)`, refused unless this process has exactly one thread (so the
/// child may run any code: no lock can be held by a thread that is not
/// copied).
pub fn fork_single_threaded() -> io::Result<Forked> {
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(format!(
            "cannot fork a process with {} threads",
            threads.map_or("an unknown number of".to_string(), |n| n.to_string())
        )));
    }
    // SAFETY: the process has one thread (checked above, and nothing here
    // starts one in between), so the child inherits no lock another thread
    // holds.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent { child: pid as u32 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn openat2_refuses_symlinks_and_escapes() {
        let d = std::env::temp_dir().join(format!("husk-sys-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let _ = std::fs::remove_file(d.join("link"));
        std::os::unix::fs::symlink("/etc", d.join("link")).unwrap();
        let dir = std::fs::File::open(&d).unwrap();
        let how = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS;
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        assert!(openat2(dir.as_fd(), c"sub", flags, 0, how).is_ok());
        let e = openat2(dir.as_fd(), c"link", flags, 0, how).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = openat2(dir.as_fd(), c"../", flags, 0, how).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        std::fs::remove_file(d.join("link")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn descriptors_sent_along_are_received_and_owned() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let data = [7u8; 4];
        let fds = [fd];
        // SAFETY: builds one SCM_RIGHTS message in buffers that outlive the
        // sendmsg call, as the CMSG_* macros lay it out.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let mut control = vec![0u8; space];
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: 4,
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fds[0]);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), 4);
        }
        let mut buf = [0u8; 4];
        let (n, got) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, buf, got.len()), (4, data, 1));
        assert_ne!(got[0].as_raw_fd(), fd, "a new descriptor of our own");
        (&a).write_all(b"x").unwrap();
        let (n, got) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, got.len()), (1, 0));
    }

    #[test]
    fn a_closed_number_is_not_claimed() {
        assert!(claim_inherited_fd(987_654).is_err());
    }

    #[test]
    fn a_pipe_is_not_a_terminal() {
        use std::os::fd::AsFd;
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(window_size(r.as_fd()), None);
    }

    #[test]
    fn a_threaded_process_is_not_forked() {
        // The test harness runs tests on threads of its own.
        assert!(fork_single_threaded().is_err());
    }
}

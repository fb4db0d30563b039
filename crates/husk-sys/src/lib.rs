//! The host's only `unsafe` fence: thin wrappers of the Linux syscalls the
//! host side of husk needs and neither the standard library nor `nix`
//! wraps — `openat2(2)`, `open_tree(2)`, `move_mount(2)` and
//! `mount_setattr(2)` (Linux 5.12 or later).
//!
//! Each wrapper takes borrowed descriptors and C strings, returns an
//! [`OwnedFd`] or `io::Result<()>`, and holds exactly one `unsafe` block whose
//! `SAFETY:` comment says why the call is sound. No policy lives here: the
//! callers (`husk-runtime::share`) decide what to open and how.
#![allow(unsafe_code)]

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
}

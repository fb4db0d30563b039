//! Unix socket paths that fit `sun_path` whatever the length of their
//! directory.
//!
//! `bind(2)` and `connect(2)` take a path of at most 107 bytes. A caller
//! picks the state directory (`--root`, Docker's
//! `/var/run/docker/runtime-runc/moby` plus a 64-character id), so a socket
//! in it may be out of reach by its own path. [`SocketPath`] opens the
//! socket's directory (`O_PATH`, close-on-exec) and names the socket
//! `/proc/self/fd/<N>/<name>`: the kernel resolves the magic link to that
//! directory, so the socket is made (or reached) in the real directory, and
//! the name fits as long as the socket's own file name does. No `unsafe`
//! is needed; it lives here with the other thin wrappers of path calls.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The longest path `bind(2)` and `connect(2)` take (`sun_path` holds 108
/// bytes with the terminating NUL).
pub const SUN_PATH_MAX: usize = 107;

/// A short name for the unix socket at a given path, valid while this
/// value lives (it holds the directory open).
#[derive(Debug)]
pub struct SocketPath {
    _dir: OwnedFd,
    short: PathBuf,
}

impl SocketPath {
    /// Opens the directory of `socket` (which need not exist yet: this is
    /// also how a socket is bound). Fails if the directory cannot be opened
    /// or the socket's file name alone is too long for `sun_path`.
    pub fn new(socket: &Path) -> io::Result<SocketPath> {
        let name = socket.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket path {} has no file name", socket.display()),
            )
        })?;
        let dir = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)?
            .into();
        let short = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if short.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket name {:?} is too long for a unix socket path (at most {} bytes)",
                    name,
                    SUN_PATH_MAX - 20
                ),
            ));
        }
        Ok(SocketPath { _dir: dir, short })
    }

    /// The name to give `bind(2)` or `connect(2)`.
    pub fn path(&self) -> &Path {
        &self.short
    }
}

/// Binds a listening unix socket at `path`, however long.
pub fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    std::os::unix::net::UnixListener::bind(SocketPath::new(path)?.path())
}

/// Connects to the unix socket at `path`, however long.
pub fn connect_unix(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(SocketPath::new(path)?.path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A directory whose sockets' own paths are longer than `sun_path`.
    fn deep_dir(tag: &str) -> (PathBuf, PathBuf) {
        let top = std::env::temp_dir().join(format!("husk-sp-{tag}-{}", std::process::id()));
        let deep = top.join("d".repeat(60)).join("e".repeat(64));
        std::fs::create_dir_all(&deep).unwrap();
        (top, deep)
    }

    #[test]
    fn a_socket_beyond_sun_len_is_bound_and_reached_in_its_directory() {
        let (top, deep) = deep_dir("bind");
        let sock = deep.join("monitor.sock");
        assert!(sock.as_os_str().len() > SUN_PATH_MAX + 20);
        // The plain path is refused: this is what the helper is for.
        let plain = std::os::unix::net::UnixListener::bind(&sock);
        assert!(plain.is_err(), "{} bound by its own path", sock.display());
        let l = bind_unix(&sock).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(&sock)
                .unwrap()
                .file_type()
                .is_socket(),
            "the socket is in the real directory"
        );
        let mut c = connect_unix(&sock).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop((c, s, l));
        std::fs::remove_file(&sock).unwrap();
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn the_directory_is_not_inherited_and_is_closed_with_the_value() {
        let (top, deep) = deep_dir("fd");
        let p = SocketPath::new(&deep.join("x.sock")).unwrap();
        let fd: i32 = p
            .path()
            .components()
            .nth(4)
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let link = PathBuf::from(format!("/proc/self/fd/{fd}"));
        assert_eq!(std::fs::read_link(&link).unwrap(), deep);
        let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = flags
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "close-on-exec");
        drop(p);
        assert_ne!(std::fs::read_link(&link).ok(), Some(deep));
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = SocketPath::new(Path::new("/nonexistent-husk-dir/x.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let (top, deep) = deep_dir("long");
        let e = SocketPath::new(&deep.join("n".repeat(100))).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        std::fs::remove_dir_all(&top).unwrap();
        // A bare name is in the working directory.
        assert!(SocketPath::new(Path::new("a.sock")).is_ok());
    }
}

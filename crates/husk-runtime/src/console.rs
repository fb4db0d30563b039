//! Host terminals: the pty handed to a caller through runc's
//! `--console-socket` protocol, terminal sizes, and raw mode.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::pty::{openpty, OpenptyResult};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot allocate a pty")]
    Pty(#[source] nix::Error),
    #[error("cannot connect to the console socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the pty to the console socket {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set up the terminal")]
    Termios(#[source] nix::Error),
}

/// A host pty whose master went to the caller; the slave stays here.
pub struct HostPty {
    pub slave: OwnedFd,
    pub name: PathBuf,
}

/// Allocates a pty, puts its slave in raw mode (the guest's pty does the
/// line discipline), and sends the master to `socket` as runc does: one
/// message whose payload is the pty's name and whose `SCM_RIGHTS` carries
/// the master.
pub fn send_pty_to_console_socket(socket: &Path) -> Result<HostPty, ConsoleError> {
    let OpenptyResult { master, slave } = openpty(None, None).map_err(ConsoleError::Pty)?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from("/dev/pts/unknown"));
    make_raw(slave.as_fd()).map_err(ConsoleError::Termios)?;
    let stream =
        husk_sys::socket_path::connect_unix(socket).map_err(|source| ConsoleError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let payload = name.to_string_lossy().into_owned();
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(payload.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|source| ConsoleError::Send {
        path: socket.to_path_buf(),
        source,
    })?;
    Ok(HostPty { slave, name })
}

/// Puts a terminal in raw mode; returns the previous settings.
pub fn make_raw(fd: BorrowedFd<'_>) -> Result<Termios, nix::Error> {
    let old = termios::tcgetattr(fd)?;
    let mut raw = old.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
    Ok(old)
}

/// Restores terminal settings saved by [`make_raw`].
pub fn restore(fd: BorrowedFd<'_>, saved: &Termios) {
    let _ = termios::tcsetattr(fd, SetArg::TCSANOW, saved);
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    termios::tcgetattr(fd).is_ok()
}

/// The size (rows, columns) of the terminal `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    husk_sys::window_size(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_reaches_the_console_socket() {
        let dir = std::env::temp_dir().join(format!("husk-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = send_pty_to_console_socket(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        let n = msg.bytes;
        let got_fd = msg.cmsgs().unwrap().any(|c| {
            matches!(c, nix::sys::socket::ControlMessageOwned::ScmRights(ref f) if f.len() == 1)
        });
        assert!(got_fd);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            pty.name.to_str().unwrap()
        );
        assert!(pty.name.starts_with("/dev/pts/"));
        assert!(is_terminal(pty.slave.as_fd()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

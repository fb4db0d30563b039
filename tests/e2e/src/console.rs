//! The receiving end of runc's `--console-socket` protocol, as conmon
//! implements it: a unix socket that gets one message whose payload is the
//! pty's name and whose `SCM_RIGHTS` carries the pty master.

use std::io::{IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::try_wait_until;

pub struct ConsoleSocket {
    listener: UnixListener,
    pub path: PathBuf,
}

/// A pty master received from the runtime, and the name it sent.
pub struct Received {
    pub master: OwnedFd,
    pub name: String,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> ConsoleSocket {
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        listener.set_nonblocking(true).unwrap();
        ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        }
    }

    /// Waits for the runtime to connect and send the master.
    pub fn receive(&self, timeout: Duration) -> Received {
        let mut conn = None;
        let accepted = try_wait_until(timeout, || match self.listener.accept() {
            Ok((c, _)) => {
                conn = Some(c);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("console socket accept: {e}"),
        })
        .is_some();
        assert!(
            accepted,
            "nothing connected to the console socket in {timeout:?}"
        );
        let conn = conn.unwrap();
        conn.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg on the console socket");
        let mut fds = Vec::new();
        for c in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmRights(list) = c {
                fds.extend(list);
            }
        }
        let n = msg.bytes;
        assert_eq!(fds.len(), 1, "expected one descriptor, got {fds:?}");
        let name = String::from_utf8_lossy(&buf[..n]).into_owned();
        Received {
            // SAFETY: SCM_RIGHTS just installed this descriptor in this
            // process; nothing else owns it.
            master: unsafe { OwnedFd::from_raw_fd(fds[0]) },
            name,
        }
    }
}

/// Reads a pty master until the slave side is closed everywhere (EIO) or
/// `timeout` passes; returns what was read.
pub fn read_pty(master: OwnedFd, timeout: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("the pty did not close within {timeout:?}"));
    String::from_utf8_lossy(&out).into_owned()
}

/// What a container printed with `echo tty=$(tty)`: the value of the first
/// `tty=` line of `text` (a terminal's output, so lines may end in `\r`).
pub fn tty_line(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("tty="))
}

/// Whether `name` is `/dev/pts/<digits>`: a terminal the container's own
/// devpts knows (not `/dev/console` or "not a tty").
pub fn is_pts_name(name: &str) -> bool {
    name.strip_prefix("/dev/pts/")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pts_names() {
        assert!(is_pts_name("/dev/pts/0"));
        assert!(is_pts_name("/dev/pts/12"));
        assert!(!is_pts_name("/dev/pts/"));
        assert!(!is_pts_name("/dev/pts/ptmx"));
        assert!(!is_pts_name("/dev/console"));
        assert!(!is_pts_name("not a tty"));
        assert_eq!(tty_line("x\r\ntty=/dev/pts/3\r\n"), Some("/dev/pts/3"));
        assert_eq!(tty_line("tty\n"), None);
    }
}

//! A process's stdio endpoints as containerd names them, opened for the
//! runtime's relays (the sandbox runs and drains them).
//!
//! containerd names each stream by a path (a FIFO that `ctr`, the CRI or
//! another client reads or writes), a `file://` URI (`ctr run --log-uri`), or
//! nothing. An output with no endpoint is still drained, so the container
//! never blocks on a full pipe; an absent stdin is closed at once (the
//! process sees end-of-input, as with `/dev/null`).
//!
//! - Output FIFOs are opened read-write, as containerd's own shims do: a
//!   client that goes away leaves the shim writing into a FIFO that still
//!   has a reader (so no EPIPE), and one that comes back (containerd after a
//!   restart) finds the stream where it was.
//! - stdin is read on a plain thread (inside `relay_input`) that polls the
//!   FIFO and a stop pipe: end-of-input is the writer closing its end, or
//!   `CloseIO`, after which what is already in the FIFO is still delivered.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use husk_runtime::sandbox::Stdio;
use tokio::io::AsyncWrite;

/// The endpoints containerd gave for one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}: binary:// log drivers are not supported by husk; use a FIFO or file:// URI")]
    Unsupported(String),
}

type Output = Box<dyn AsyncWrite + Send + Unpin>;

fn open_output(what: &'static str, uri: &str) -> Result<Output, IoError> {
    let err = |source| IoError::Open {
        what,
        path: uri.to_string(),
        source,
    };
    if uri.is_empty() {
        return Ok(Box::new(tokio::io::sink()));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        return Ok(Box::new(tokio::fs::File::from_std(f)));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    let sender = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(uri)
        .map_err(err)?;
    Ok(Box::new(sender))
}

/// Reads a stdin FIFO until its writer closes it or a stop is requested.
struct FifoReader {
    fifo: File,
    stop: OwnedFd,
    stopping: bool,
}

impl FifoReader {
    fn open(path: &Path, stop: OwnedFd) -> io::Result<FifoReader> {
        // Non-blocking, so the open does not wait for a writer; poll() then
        // reports nothing until a writer connects.
        let fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(FifoReader {
            fifo,
            stop,
            stopping: false,
        })
    }
}

impl Read for FifoReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stopping {
                // Deliver what is already there, then end.
                return match self.fifo.read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    r => r,
                };
            }
            let (fifo_ready, stop) =
                husk_runtime::stdio::wait_either(self.fifo.as_fd(), self.stop.as_fd())?;
            if fifo_ready {
                match self.fifo.read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // 0 is the writer's end of input.
                    r => return r,
                }
            }
            if stop {
                self.stopping = true;
            }
        }
    }
}

/// The endpoints of one process as the runtime's [`Stdio`], and the handle
/// whose drop ends its stdin (`CloseIO`).
pub fn endpoints(paths: &StdioPaths) -> Result<(Stdio, Option<OwnedFd>), IoError> {
    let stdout = open_output("stdout", &paths.stdout)?;
    let stderr = open_output("stderr", &paths.stderr)?;
    let mut stdin_stop = None;
    let mut stdin: Option<Box<dyn Read + Send>> = None;
    if !paths.stdin.is_empty() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| IoError::Open {
                what: "stdin",
                path: paths.stdin.clone(),
                source: e.into(),
            })?;
        let reader =
            FifoReader::open(Path::new(&paths.stdin), r).map_err(|source| IoError::Open {
                what: "stdin",
                path: paths.stdin.clone(),
                source,
            })?;
        stdin = Some(Box::new(reader));
        stdin_stop = Some(w);
    }
    Ok((
        Stdio {
            stdin,
            stdout,
            stderr,
            terminal: paths.terminal,
        },
        stdin_stop,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fifo(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("husk-shim-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    #[test]
    fn stdin_reads_until_the_writer_closes() {
        let p = fifo("eof");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let mut reader = FifoReader::open(&p, r).unwrap();
        let p2 = p.clone();
        let writer = std::thread::spawn(move || {
            let mut f = OpenOptions::new().write(true).open(&p2).unwrap();
            f.write_all(b"hello").unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, b"hello");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn close_delivers_what_was_written_then_ends() {
        let p = fifo("close");
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut reader = FifoReader::open(&p, r).unwrap();
        // The writer stays open: only the stop ends the input.
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"abc").unwrap();
        drop(w);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn no_writer_yet_is_not_end_of_input() {
        let p = fifo("wait");
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut reader = FifoReader::open(&p, r).unwrap();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !t.is_finished(),
            "a FIFO nobody opened yet must not read as EOF"
        );
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"late").unwrap();
        drop(f);
        assert_eq!(t.join().unwrap(), b"late");
        drop(w);
        std::fs::remove_file(&p).unwrap();
    }
}

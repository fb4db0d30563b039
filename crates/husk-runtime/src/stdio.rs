//! Relays between host descriptors (the caller's stdio, a pty, or fds sent
//! by `husk exec`) and a process in the guest.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::{AgentClient, Call, Stream};

/// Copies the process's stdout (or stderr) to `out` until end of stream.
pub fn relay_output<W>(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut out: W,
) -> JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader_gone = false;
        loop {
            match agent.read_output(&cid, &exec_id, stream).await {
                Ok(data) if data.is_empty() => break,
                Ok(data) => {
                    // When the reader went away, keep draining so the
                    // process does not block on a full pipe.
                    if !reader_gone
                        && (out.write_all(&data).await.is_err() || out.flush().await.is_err())
                    {
                        reader_gone = true;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?stream, "output relay ended");
                    break;
                }
            }
        }
        let _ = out.flush().await;
    })
}

/// Copies `input` to the process's stdin, then closes it. Reads happen on a
/// plain thread: a blocking read of a terminal or pipe must not hold a
/// runtime worker, and the descriptor must not be made non-blocking (its
/// file description may be shared with other processes).
pub fn relay_input<R>(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    mut input: R,
) -> JoinHandle<()>
where
    R: Read + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = agent.write_stdin(&cid, &exec_id, &chunk).await {
                tracing::debug!(error = %e, "stdin relay ended");
                return;
            }
        }
        if let Err(e) = agent.done(Call::CloseStdin { cid, exec_id }).await {
            tracing::debug!(error = %e, "closing stdin");
        }
    })
}

/// A blocking reader of a descriptor that can be told to stop. Each read
/// first polls the descriptor and a stop pipe; once the [`StopReading`]
/// handle is dropped, reads return end-of-input without touching the
/// descriptor again. A relay of an exec's stdin ends this way when the
/// process ends: otherwise its thread would stay blocked on the caller's
/// pipe or terminal, holding it open and swallowing the next thing typed.
pub struct StoppableReader {
    input: File,
    stop: OwnedFd,
}

/// Dropping this ends the paired [`StoppableReader`].
#[must_use = "dropping it stops the reader at once"]
pub struct StopReading {
    _write_end: OwnedFd,
}

/// Wraps `input` in a reader that ends when the returned handle is dropped.
pub fn stoppable(input: impl Into<OwnedFd>) -> io::Result<(StoppableReader, StopReading)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((
        StoppableReader {
            input: File::from(input.into()),
            stop: r,
        },
        StopReading { _write_end: w },
    ))
}

/// Blocks until `a` or `b` is readable, or hung up (retrying on EINTR);
/// says which.
pub fn wait_either(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    loop {
        let mut fds = [
            PollFd::new(a, PollFlags::POLLIN),
            PollFd::new(b, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let any = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        return Ok((any(&fds[0]), any(&fds[1])));
    }
}

impl Read for StoppableReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let (input_ready, stopped) = wait_either(self.input.as_fd(), self.stop.as_fd())?;
            if stopped {
                return Ok(0);
            }
            if input_ready {
                return self.input.read(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_blocked_reader_ends_when_stopped() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut w = File::from(w);
        let (mut reader, stop) = stoppable(r).unwrap();
        w.write_all(b"abc").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        // The writer stays open: the next read blocks until stopped.
        let t = std::thread::spawn(move || reader.read(&mut [0u8; 16]).unwrap());
        drop(stop);
        assert_eq!(t.join().unwrap(), 0);
        drop(w);
    }

    #[test]
    fn a_stopped_reader_leaves_later_input_alone() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut other_reader = File::from(r.try_clone().unwrap());
        let (mut reader, stop) = stoppable(r).unwrap();
        drop(stop);
        File::from(w).write_all(b"later").unwrap();
        assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);
        let mut got = String::new();
        other_reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "later");
    }

    #[test]
    fn end_of_input_is_passed_on() {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(w);
        let (mut reader, _stop) = stoppable(r).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
    }
}

//! Relays between host descriptors (the caller's stdio, a pty, or fds sent
//! by `husk exec`) and a process in the guest.

use std::io::Read;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::AgentClient;

/// Copies the process's stdout (or stderr) to `out` until end of stream.
pub fn relay_output<W>(
    agent: AgentClient,
    cid: String,
    exec_id: String,
    stderr: bool,
    mut out: W,
) -> JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader_gone = false;
        loop {
            match agent.read_output(&cid, &exec_id, stderr).await {
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
                    tracing::debug!(error = %e, stderr, "output relay ended");
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
        if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
            tracing::debug!(error = %e, "closing stdin");
        }
    })
}

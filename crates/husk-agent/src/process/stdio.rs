//! A process's stdio as the agent sees it: bounded output buffers filled by
//! pump tasks (stopping when full, so a chatty container blocks instead of
//! the agent growing), and a stdin sink.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How much of a stream the agent holds before it stops reading the pipe.
pub const OUTPUT_BUFFER_CAPACITY: usize = 1024 * 1024;

/// Largest single read from a process's pipe or terminal.
const PUMP_READ_SIZE: usize = 64 * 1024;

/// An owned descriptor (pipe, pty master, virtio-serial port) driven by
/// tokio's reactor. Reading a terminal master whose slave side is gone fails
/// with EIO; with `eio_is_eof` that reads as end-of-file.
pub struct FdIo {
    inner: AsyncFd<File>,
    eio_is_eof: bool,
}

impl FdIo {
    /// Switches `fd` to non-blocking mode and registers it with the reactor.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            inner: crate::sys::register_async(File::from(fd))?,
            eio_is_eof: false,
        })
    }

    /// Like [`FdIo::new`], for a terminal master: EIO means end-of-file.
    pub fn terminal(fd: OwnedFd) -> io::Result<Self> {
        let mut io = Self::new(fd)?;
        io.eio_is_eof = true;
        Ok(io)
    }
}

impl FdIo {
    /// `poll_read` through a shared reference (the descriptor may be shared
    /// by successive users, like the agent port).
    pub fn poll_read_ref(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// `poll_write` through a shared reference.
    pub fn poll_write_ref(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// The descriptor.
    pub fn file(&self) -> &File {
        self.inner.get_ref()
    }
}

impl AsyncRead for FdIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_ref(cx, buf)
    }
}

impl AsyncWrite for FdIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_ref(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[derive(Default)]
struct OutputState {
    data: VecDeque<u8>,
    eof: bool,
}

/// One output stream of a process: bytes read from its pipe, waiting for
/// `Read*` calls. Readers get the bytes complete and in order.
pub struct OutputBuffer {
    state: Mutex<OutputState>,
    capacity: usize,
    /// Woken when data or end-of-file arrives.
    readable: Notify,
    /// Woken when a reader made room.
    writable: Notify,
}

impl OutputBuffer {
    /// An empty buffer holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutputState::default()),
            capacity,
            readable: Notify::new(),
            writable: Notify::new(),
        })
    }

    /// A stream that is at end-of-file from the start (stderr of a terminal).
    pub fn closed() -> Arc<Self> {
        let buffer = Self::new(0);
        buffer.finish();
        buffer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for data and takes up to `max` bytes; an empty result means
    /// end-of-file (every writer closed and everything was read).
    pub async fn read(&self, max: usize) -> Vec<u8> {
        let max = max.max(1);
        loop {
            let notified = self.readable.notified();
            {
                let mut state = self.lock();
                if !state.data.is_empty() {
                    let n = max.min(state.data.len());
                    let chunk: Vec<u8> = state.data.drain(..n).collect();
                    drop(state);
                    self.writable.notify_waiters();
                    return chunk;
                }
                if state.eof {
                    return Vec::new();
                }
            }
            notified.await;
        }
    }

    /// Waits until there is room, returning how many bytes fit.
    async fn room(&self) -> usize {
        loop {
            let notified = self.writable.notified();
            {
                let state = self.lock();
                let free = self.capacity.saturating_sub(state.data.len());
                if free > 0 {
                    return free;
                }
            }
            notified.await;
        }
    }

    fn push(&self, data: &[u8]) {
        self.lock().data.extend(data);
        self.readable.notify_waiters();
    }

    /// Marks end-of-file.
    pub fn finish(&self) {
        self.lock().eof = true;
        self.readable.notify_waiters();
    }

    /// Bytes currently held (for tests and logs).
    pub fn len(&self) -> usize {
        self.lock().data.len()
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Copies `source` into `buffer` until end-of-file or an error, never holding
/// more than the buffer's capacity.
pub fn spawn_pump(mut source: FdIo, buffer: Arc<OutputBuffer>, name: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = vec![0u8; PUMP_READ_SIZE];
        loop {
            let room = buffer.room().await.min(chunk.len());
            match source.read(&mut chunk[..room]).await {
                Ok(0) => break,
                Ok(n) => buffer.push(&chunk[..n]),
                Err(e) => {
                    tracing::warn!("reading {name} failed, treating it as end of stream: {e}");
                    break;
                }
            }
        }
        buffer.finish();
    })
}

/// Why stdin could not be written or closed.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    /// CloseStdin was already called.
    #[error("stdin is already closed (CloseStdin was called)")]
    Closed,
    /// Nothing reads the other end any more.
    #[error("the process no longer reads its stdin (it closed it or exited)")]
    Gone,
    /// Any other write failure.
    #[error("writing to stdin failed: {0}")]
    Io(#[source] io::Error),
}

/// The agent's end of a process's stdin.
pub struct Stdin {
    sink: tokio::sync::Mutex<Option<FdIo>>,
    terminal: bool,
}

impl Stdin {
    /// Stdin through a pipe: closing it closes the pipe.
    pub fn pipe(io: FdIo) -> Self {
        Self {
            sink: tokio::sync::Mutex::new(Some(io)),
            terminal: false,
        }
    }

    /// Stdin through a terminal master: closing it sends the terminal's
    /// end-of-file character (^D), since closing the master would hang up the
    /// terminal under the process.
    pub fn terminal(io: FdIo) -> Self {
        Self {
            sink: tokio::sync::Mutex::new(Some(io)),
            terminal: true,
        }
    }

    /// Writes some of `data` (waiting until the pipe has room); returns how
    /// much was written.
    pub async fn write(&self, data: &[u8]) -> Result<usize, StdinError> {
        let mut sink = self.sink.lock().await;
        let io = sink.as_mut().ok_or(StdinError::Closed)?;
        if data.is_empty() {
            return Ok(0);
        }
        io.write(data).await.map_err(|e| match e.raw_os_error() {
            Some(libc::EPIPE) | Some(libc::EIO) => StdinError::Gone,
            _ => StdinError::Io(e),
        })
    }

    /// Signals end of input. Closing twice is fine.
    pub async fn close(&self) -> Result<(), StdinError> {
        let mut sink = self.sink.lock().await;
        if self.terminal {
            if let Some(io) = sink.as_mut() {
                // Best effort: a terminal whose process is gone cannot take it.
                let _ = io.write_all(&[0x04]).await;
            }
        }
        sink.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_buffer_delivers_in_order_and_blocks_when_full() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let buffer = OutputBuffer::new(1000);
        let pump = spawn_pump(
            FdIo::new(reader).unwrap(),
            Arc::clone(&buffer),
            "test".into(),
        );
        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer_task = tokio::task::spawn_blocking(move || {
            let mut file = File::from(writer);
            file.write_all(&payload).unwrap();
        });
        let mut got = Vec::new();
        loop {
            assert!(buffer.len() <= 1000, "the buffer outgrew its capacity");
            let chunk = buffer.read(777).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 777);
            got.extend(chunk);
        }
        writer_task.await.unwrap();
        pump.await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn closed_buffer_is_eof() {
        assert!(OutputBuffer::closed().read(10).await.is_empty());
    }

    #[tokio::test]
    async fn stdin_close_then_write_fails() {
        let (_reader, writer) = nix::unistd::pipe().unwrap();
        let stdin = Stdin::pipe(FdIo::new(writer).unwrap());
        assert_eq!(stdin.write(b"abc").await.unwrap(), 3);
        stdin.close().await.unwrap();
        assert!(matches!(stdin.write(b"x").await, Err(StdinError::Closed)));
    }
}

//! The agent channel in the VM: the virtio-serial port named
//! [`husk_protocol::AGENT_PORT_NAME`], served as a ttrpc listener that
//! yields one connection at a time.
//!
//! A virtio-serial port is not a socket: there is one "connection", the
//! character device, and it can be opened by one process at a time. When the
//! host side goes away, reads return end-of-file and ttrpc drops the
//! connection; the listener then yields the port again once the host is
//! back. While no host is connected the port polls as hung up, which the
//! listener checks (with a short backoff) before yielding it.
//!
//! The port stays open between connections: closing it makes the kernel
//! discard whatever the host already sent, and a host that reconnects at once
//! may already have sent its first request. It is reopened only after an
//! I/O error.

use std::fs::File;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use ttrpc::r#async::transport::Listener;

use crate::process::stdio::FdIo;

/// Where the kernel lists virtio-serial ports.
pub const SYSFS_VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Where their device nodes are.
pub const DEV_DIR: &str = "/dev";

/// Longest wait between two looks for the port or the host. Short: a guest
/// restored from a template is waiting here when its host connects (and
/// waits nowhere else for long, so the polling costs little).
const MAX_BACKOFF: Duration = Duration::from_millis(10);

/// Finds the device name (`vportNpM`) of the port called `name` under a
/// sysfs `virtio-ports` directory. A port's name is filled in when the host
/// announces it, so it may be empty for a short while after boot.
pub fn find_port(sysfs: &Path, name: &str) -> io::Result<Option<String>> {
    let mut entries: Vec<_> = fs::read_dir(sysfs)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            return Ok(Some(entry.file_name().to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// Where to look for the port.
#[derive(Clone, Debug)]
pub struct PortLocation {
    /// The `virtio-ports` sysfs directory.
    pub sysfs: PathBuf,
    /// The directory holding the device nodes.
    pub dev: PathBuf,
    /// The port name.
    pub name: String,
}

impl Default for PortLocation {
    fn default() -> Self {
        Self {
            sysfs: PathBuf::from(SYSFS_VIRTIO_PORTS),
            dev: PathBuf::from(DEV_DIR),
            name: husk_protocol::AGENT_PORT_NAME.to_string(),
        }
    }
}

/// The open port, shared by successive connections.
struct Port {
    io: FdIo,
    /// Set on an I/O error: the next connection reopens the device.
    broken: AtomicBool,
}

impl Port {
    fn check<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            tracing::warn!("agent port I/O failed: {e}");
            self.broken.store(true, Ordering::Relaxed);
        }
        result
    }
}

/// One connection over the port; dropping it (ttrpc does when the
/// connection ends) lets the listener yield the next one.
struct PortConnection {
    port: Arc<Port>,
    _closed: oneshot::Sender<()>,
}

impl AsyncRead for PortConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.port.check(self.port.io.poll_read_ref(cx, buf))
    }
}

impl AsyncWrite for PortConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.port.check(self.port.io.poll_write_ref(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Whether the host end of an open port is connected (no POLLHUP).
fn host_connected(port: &File) -> io::Result<bool> {
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO)?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(!revents.contains(PollFlags::POLLHUP))
}

/// Logs each distinct waiting state once and sleeps with a growing backoff.
struct Waiting {
    backoff: Duration,
    said: Option<String>,
}

impl Waiting {
    fn new() -> Self {
        Self {
            backoff: Duration::from_millis(1),
            said: None,
        }
    }

    async fn wait(&mut self, state: String) {
        if self.said.as_deref() != Some(state.as_str()) {
            tracing::info!("{state}");
            self.said = Some(state);
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Opens the port once it exists. Never fails: problems are logged and
/// retried, since the agent has nothing else to do.
async fn open_port(location: &PortLocation) -> FdIo {
    let mut waiting = Waiting::new();
    loop {
        let state = match find_port(&location.sysfs, &location.name) {
            Ok(Some(device)) => {
                let path = location.dev.join(&device);
                let opened = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|file| FdIo::new(OwnedFd::from(file)));
                match opened {
                    Ok(io) => {
                        tracing::debug!(port = %path.display(), "opened the agent port");
                        return io;
                    }
                    Err(e) => format!("cannot open {}: {e}", path.display()),
                }
            }
            Ok(None) => format!(
                "waiting for the virtio-serial port {:?} to appear in {}",
                location.name,
                location.sysfs.display()
            ),
            Err(e) => format!("cannot list {}: {e}", location.sysfs.display()),
        };
        waiting.wait(state).await;
    }
}

/// Waits until the host is connected to `port`; false if polling failed
/// (the port must be reopened).
async fn wait_for_host(port: &FdIo) -> bool {
    let mut waiting = Waiting::new();
    loop {
        match host_connected(port.file()) {
            Ok(true) => return true,
            Ok(false) => {
                waiting
                    .wait("waiting for the host to connect to the agent port".to_string())
                    .await
            }
            Err(e) => {
                tracing::warn!("cannot poll the agent port: {e}");
                return false;
            }
        }
    }
}

/// The port, opened (or reopened after an error) and with the host connected.
async fn connected_port(location: &PortLocation, cached: Option<Arc<Port>>) -> Arc<Port> {
    let mut port = cached.filter(|p| !p.broken.load(Ordering::Relaxed));
    loop {
        let current = match port.take() {
            Some(p) => p,
            None => Arc::new(Port {
                io: open_port(location).await,
                broken: AtomicBool::new(false),
            }),
        };
        if wait_for_host(&current.io).await {
            return current;
        }
        // Dropped here: the next round opens the device again.
    }
}

/// A stream of connections made by `open`, one at a time: each item comes
/// with a guard, and the next `open` starts only once that guard is dropped.
fn one_at_a_time<T, F, Fut>(open: F) -> impl futures::Stream<Item = (T, oneshot::Sender<()>)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    stream::unfold(
        (open, None::<oneshot::Receiver<()>>),
        |(open, previous)| async move {
            if let Some(closed) = previous {
                // Resolves (with an error) when the guard is dropped.
                let _ = closed.await;
                tracing::info!("the agent connection ended; reopening the port");
            }
            let item = open().await;
            let (tx, rx) = oneshot::channel();
            Some(((item, tx), (open, Some(rx))))
        },
    )
}

/// A ttrpc listener over the agent port: yields the port, waits until that
/// connection ends, and yields it again once the host is connected.
pub fn port_listener(location: PortLocation) -> Listener {
    let cached: Arc<std::sync::Mutex<Option<Arc<Port>>>> = Arc::default();
    let connections = one_at_a_time(move || {
        let location = location.clone();
        let cached = Arc::clone(&cached);
        async move {
            let previous = cached.lock().unwrap_or_else(|e| e.into_inner()).take();
            let port = connected_port(&location, previous).await;
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&port));
            tracing::info!("serving the agent API on the virtio-serial port");
            port
        }
    })
    .map(|(port, guard)| {
        Ok::<_, io::Error>(PortConnection {
            port,
            _closed: guard,
        })
    });
    Listener::new(connections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-agent-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_the_named_port() {
        let sysfs = temp_dir("ports");
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "husk.agent\n"),
        ] {
            fs::create_dir_all(sysfs.join(port)).unwrap();
            fs::write(sysfs.join(port).join("name"), name).unwrap();
        }
        assert_eq!(
            find_port(&sysfs, "husk.agent").unwrap().as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(&sysfs, "other").unwrap(), None);
        fs::remove_dir_all(&sysfs).unwrap();
        assert!(find_port(&sysfs, "husk.agent").is_err());
    }

    #[tokio::test]
    async fn opens_a_port_once_it_is_named() {
        // A FIFO opened read-write stands in for the character device: it
        // polls like a connected port.
        let root = temp_dir("open");
        let (sysfs, dev) = (root.join("sys"), root.join("dev"));
        fs::create_dir_all(sysfs.join("vport9p1")).unwrap();
        fs::create_dir_all(&dev).unwrap();
        fs::write(sysfs.join("vport9p1/name"), "").unwrap();
        nix::unistd::mkfifo(
            &dev.join("vport9p1"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let location = PortLocation {
            sysfs: sysfs.clone(),
            dev,
            name: "husk.agent".into(),
        };
        let opening = tokio::spawn(async move { open_port(&location).await });
        // The host names the port a little later.
        tokio::task::yield_now().await;
        fs::write(sysfs.join("vport9p1/name"), "husk.agent\n").unwrap();
        let port = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .expect("the port was not opened")
            .unwrap();
        drop(port);
        fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn the_next_connection_waits_for_the_previous_one() {
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&opened);
        let connections = one_at_a_time(move || {
            let counter = std::sync::Arc::clone(&counter);
            async move { counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) }
        });
        futures::pin_mut!(connections);
        let (first, guard) = connections.next().await.unwrap();
        assert_eq!(first, 0);
        let pending = tokio::time::timeout(Duration::from_millis(20), connections.next()).await;
        assert!(
            pending.is_err(),
            "a second connection while the first is open"
        );
        assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(guard);
        let (second, _guard) = connections.next().await.unwrap();
        assert_eq!(second, 1);
    }
}

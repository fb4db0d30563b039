//! The agent channel in the VM: the virtio-serial port named
//! [`husk_protocol::AGENT_PORT_NAME`], served as a ttrpc listener that
//! yields one connection at a time.
//!
//! A virtio-serial port is not a socket: there is one "connection", the
//! character device, and it can be opened by one process at a time. When the
//! host side goes away, reads return end-of-file and ttrpc drops the
//! connection; the listener then reopens the port and yields it again once
//! the host is back. While no host is connected the port polls as hung up,
//! which the listener checks (with a short backoff) before yielding it.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
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

/// Longest wait between two looks for the port or the host.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

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

/// One open of the port; dropping it (ttrpc does when the connection ends)
/// tells the listener to reopen.
struct PortConnection {
    io: FdIo,
    _closed: oneshot::Sender<()>,
}

impl AsyncRead for PortConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether the host end of an open port is connected (no POLLHUP).
fn host_connected(port: &OwnedFd) -> io::Result<bool> {
    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO)?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(!revents.contains(PollFlags::POLLHUP))
}

/// Opens the port once it exists and the host is connected. Never fails:
/// problems are logged and retried, since the agent has nothing else to do.
async fn open_port(location: &PortLocation) -> FdIo {
    let mut backoff = Duration::from_millis(1);
    let mut said = None::<String>;
    let mut open: Option<OwnedFd> = None;
    loop {
        let state = match &open {
            None => match find_port(&location.sysfs, &location.name) {
                Ok(Some(device)) => {
                    let path = location.dev.join(&device);
                    match OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                        .open(&path)
                    {
                        Ok(file) => {
                            open = Some(file.into());
                            tracing::debug!(port = %path.display(), "opened the agent port");
                            continue;
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
            },
            Some(port) => match host_connected(port) {
                Ok(true) => {
                    let port = open.take().expect("checked above");
                    match FdIo::new(port) {
                        Ok(io) => return io,
                        Err(e) => format!("cannot watch the agent port: {e}"),
                    }
                }
                Ok(false) => "waiting for the host to connect to the agent port".to_string(),
                Err(e) => {
                    open = None;
                    format!("cannot poll the agent port: {e}")
                }
            },
        };
        if said.as_deref() != Some(state.as_str()) {
            tracing::info!("{state}");
            said = Some(state);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
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
/// connection ends, and yields it again.
pub fn port_listener(location: PortLocation) -> Listener {
    let connections = one_at_a_time(move || {
        let location = location.clone();
        async move {
            let io = open_port(&location).await;
            tracing::info!("serving the agent API on the virtio-serial port");
            io
        }
    })
    .map(|(io, guard)| Ok::<_, io::Error>(PortConnection { io, _closed: guard }));
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

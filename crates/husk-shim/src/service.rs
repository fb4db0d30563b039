//! The shim's life cycle as containerd drives it (the `containerd-shim`
//! crate's [`Shim`] trait): `start` finds or spawns the pod's shim,
//! `delete` cleans up after a shim that died, and the server waits until the
//! task service says the last container is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, Shim, StartOpts};
use husk_runtime::config::Config;
use husk_runtime::pod::{self, Cleanup};
use oci_spec::runtime::Spec;

use crate::events;
use crate::task::TaskService;

/// Env var naming the directory of the shim's pod state dirs.
pub const ROOT_ENV: &str = "HUSK_SHIM_ROOT";
/// Its default: pods live in `<root>/<namespace>/<pod id>`.
pub const DEFAULT_ROOT: &str = "/run/husk-shim";

pub fn shim_root() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    address: String,
    /// The server's own socket (`-socket`), empty for `start` and `delete`.
    socket: String,
    debug: bool,
}

fn read_spec(bundle: &Path) -> Option<Spec> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The pod the container `id` of the bundle in the current directory
/// belongs to: the shim serving that pod serves it too.
fn pod_of(id: &str) -> String {
    read_spec(Path::new("."))
        .map(|s| pod::pod_id(id, &s))
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            debug: args.debug,
        }
    }

    /// Runs in the container's bundle. Containers of one pod share a shim:
    /// the socket address is derived from the pod's id, and a second
    /// `start` for the pod finds the first shim listening there.
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = pod_of(&opts.id);
        let address = containerd_shim::spawn(opts, &grouping, Vec::new()).await?;
        // containerd reconnects through it after a restart.
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// Runs in the container's bundle after its shim connection closed: a
    /// normal end (nothing left to do) or a shim that died. Then whatever
    /// the dead shim left of its pod is removed: QEMU and virtiofsd if they
    /// survived it, the pod's state dir, the shim's socket.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let pod_id = pod_of(&self.id);
        let root = shim_root().join(&self.namespace);
        match pod::cleanup_dead(&root, &pod_id) {
            Ok(Cleanup::Removed) => {
                tracing::warn!(pod = %pod_id, "removed what a dead shim left behind");
            }
            Ok(Cleanup::OwnerAlive(pid)) => {
                tracing::debug!(pod = %pod_id, pid, "the pod's shim still runs");
            }
            Ok(Cleanup::Absent) => {}
            Err(e) => tracing::warn!("{}", husk_runtime::monitor::error_chain(&e)),
        }
        remove_dead_socket(&containerd_shim::socket_address(
            &self.address,
            &self.namespace,
            &pod_id,
        ));
        Ok(DeleteResponse {
            // The process is gone without a status: report it killed.
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(events::timestamp(std::time::SystemTime::now())).into(),
            ..Default::default()
        })
    }

    /// Returns once the last container is gone. The socket's path goes
    /// first: the crate removes it later through the bundle's `address`
    /// file, which containerd may have deleted with the bundle by then.
    async fn wait(&mut self) {
        self.exit.wait().await;
        let path = self.socket.strip_prefix("unix://").unwrap_or(&self.socket);
        if !path.is_empty() {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let cfg = Config::load(None)
            .map(|(c, _)| c)
            .map_err(|e| husk_runtime::monitor::error_chain(&e));
        TaskService::new(
            cfg,
            shim_root().join(&self.namespace),
            self.debug,
            events::Events::new(publisher, self.namespace.clone()),
            self.exit.clone(),
            Box::new(crate::task::QemuLaunch),
        )
    }
}

/// Removes the shim socket at `address` if nobody listens on it any more.
fn remove_dead_socket(address: &str) {
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if !path.exists() {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

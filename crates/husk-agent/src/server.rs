//! Wiring: the reaper, the container table and the ttrpc server on a listener.

use std::io;
use std::sync::Arc;

use husk_protocol::agent_ttrpc::create_agent;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::Server;

use crate::container::{ContainerOptions, Containers};
use crate::process::Reaper;
use crate::rpc::{AgentService, ShutdownAction};

/// A running agent. Dropping it stops the server.
pub struct RunningAgent {
    /// The containers it manages.
    pub containers: Arc<Containers>,
    /// The server; kept alive here (ttrpc stops serving when it is dropped).
    pub server: Server,
}

/// Starts the reaper and serves the agent API on `listener`. Must run inside
/// a multi-threaded tokio runtime.
pub async fn start(
    listener: Listener,
    options: ContainerOptions,
    shutdown: ShutdownAction,
) -> io::Result<RunningAgent> {
    let reaper = Reaper::new();
    reaper.start()?;
    let containers = Arc::new(Containers::new(reaper, options));
    let service = AgentService::new(Arc::clone(&containers), shutdown);
    let mut server = Server::new()
        .register_service(create_agent(Arc::new(service)))
        .add_listener(listener);
    server
        .start()
        .await
        .map_err(|e| io::Error::other(format!("starting the ttrpc server: {e}")))?;
    // Off the request path: the first CreateContainer need not pay for it.
    containers.prepare_cgroups_in_background();
    containers.mount_early_storage_in_background();
    Ok(RunningAgent { containers, server })
}

/// The runtime the agent runs on: two workers are plenty for a guest, and
/// the workers live as long as the agent (see `CloneExec::parent_death_signal`).
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

//! The ttrpc `Agent` service: decodes requests, calls the container layer,
//! and turns failures into status replies (via `crate::error`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocol::agent::{
    CheckRequest, CheckResponse, ConfigureNetworkRequest, ContainerRequest, CreateContainerRequest,
    Empty, ExecProcessRequest, ListProcessesResponse, OOMEvent, ProcessRequest, ReadStreamRequest,
    ReadStreamResponse, ResizePtyRequest, SignalProcessRequest, StatsContainerResponse,
    UpdateContainerRequest, WaitProcessResponse, WriteStreamRequest, WriteStreamResponse,
};
use husk_protocol::agent_ttrpc::Agent;
use husk_protocol::{API_VERSION, MAX_CHUNK};
use tokio::sync::Notify;
use ttrpc::r#async::TtrpcContext;

use crate::container::Containers;
use crate::error::AgentError;

/// What `Shutdown` does after replying.
#[derive(Clone)]
pub enum ShutdownAction {
    /// PID 1 in the VM: sync and reboot (QEMU runs with `-no-reboot`, so the
    /// VM exits).
    RebootGuest,
    /// The agent as a plain process: wake the main loop, which kills the
    /// containers and exits.
    Exit(Arc<Notify>),
}

/// How long `Shutdown` waits before acting, so its reply leaves the guest.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// The service behind the agent channel.
pub struct AgentService {
    containers: Arc<Containers>,
    shutdown: ShutdownAction,
}

impl AgentService {
    /// A service over `containers`.
    pub fn new(containers: Arc<Containers>, shutdown: ShutdownAction) -> Self {
        Self {
            containers,
            shutdown,
        }
    }
}

type Reply<T> = ttrpc::Result<T>;

fn reply<T, E: Into<AgentError>>(result: Result<T, E>, rpc: &'static str) -> Reply<T> {
    result.map_err(|error| {
        let error = error.into();
        tracing::debug!(rpc, "error reply: {error}");
        error.into()
    })
}

fn chunk_limit(max_len: u32) -> usize {
    if max_len == 0 {
        MAX_CHUNK as usize
    } else {
        max_len.min(MAX_CHUNK) as usize
    }
}

/// The guest kernel release (`uname -r`).
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> Reply<CheckResponse> {
        tracing::debug!(host_api = req.api_version, "Check");
        if req.api_version != API_VERSION {
            return reply(
                Err(AgentError::VersionMismatch {
                    host: req.api_version,
                    agent: API_VERSION,
                }),
                "Check",
            );
        }
        Ok(CheckResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, storages = req.storages.len(), "CreateContainer");
        let result = self
            .containers
            .create(&req.container_id, &req.oci_spec_json, &req.storages)
            .await;
        if let Err(e) = &result {
            tracing::warn!(container = %req.container_id, "create failed: {e}");
        }
        reply(result, "CreateContainer").map(|()| Empty::default())
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, interfaces = req.interfaces.len(), "ConfigureNetwork");
        let result = async {
            let cfg = crate::net::NetConfig::parse(&req)?;
            let pid = self
                .containers
                .get(&req.container_id)
                .map_err(AgentError::from)?
                .process()
                .pid();
            crate::net::apply(pid.as_raw(), cfg)
                .await
                .map_err(AgentError::from)
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(container = %req.container_id, "network configuration failed: {e}");
        }
        reply(result, "ConfigureNetwork").map(|()| Empty::default())
    }

    async fn renew_identity(
        &self,
        _ctx: &TtrpcContext,
        req: husk_protocol::agent::RenewIdentityRequest,
    ) -> Reply<Empty> {
        tracing::debug!(
            entropy_bytes = req.entropy.len(),
            hostname = %req.hostname,
            "RenewIdentity"
        );
        let result = crate::identity::Identity::parse(&req).and_then(|id| id.apply());
        if let Err(e) = &result {
            tracing::warn!("renewing the guest's identity failed: {e}");
        }
        reply(result, "RenewIdentity").map(|()| Empty::default())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "StartContainer");
        let result = self.containers.start(&req.container_id).await;
        if let Err(e) = &result {
            tracing::warn!(container = %req.container_id, "start failed: {e}");
        }
        reply(result, "StartContainer").map(|()| Empty::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> Reply<WaitProcessResponse> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "WaitProcess");
        let process = reply(
            self.containers.get_process(&req.container_id, &req.exec_id),
            "WaitProcess",
        )?;
        let status = process.wait().await;
        Ok(WaitProcessResponse {
            exit_status: status.status,
            signal: status.signal,
            ..Default::default()
        })
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, signal = req.signal, all = req.all, "SignalProcess");
        reply(
            self.containers
                .signal(&req.container_id, &req.exec_id, req.signal, req.all),
            "SignalProcess",
        )
        .map(|()| Empty::default())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> Reply<WriteStreamResponse> {
        let written = reply(
            self.containers
                .write_stdin(&req.container_id, &req.exec_id, &req.data)
                .await,
            "WriteStdin",
        )?;
        Ok(WriteStreamResponse {
            len: written as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "CloseStdin");
        reply(
            self.containers
                .close_stdin(&req.container_id, &req.exec_id)
                .await,
            "CloseStdin",
        )
        .map(|()| Empty::default())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        let process = reply(
            self.containers.get_process(&req.container_id, &req.exec_id),
            "ReadStdout",
        )?;
        let data = process.stdout.read(chunk_limit(req.max_len)).await;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Reply<ReadStreamResponse> {
        let process = reply(
            self.containers.get_process(&req.container_id, &req.exec_id),
            "ReadStderr",
        )?;
        let data = process.stderr.read(chunk_limit(req.max_len)).await;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "PauseContainer");
        reply(self.containers.pause(&req.container_id), "PauseContainer").map(|()| Empty::default())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "ResumeContainer");
        reply(self.containers.resume(&req.container_id), "ResumeContainer")
            .map(|()| Empty::default())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "RemoveContainer");
        reply(
            self.containers.remove(&req.container_id).await,
            "RemoveContainer",
        )
        .map(|()| Empty::default())
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, "ExecProcess");
        let result = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json)
            .await;
        if let Err(e) = &result {
            tracing::warn!(container = %req.container_id, exec = %req.exec_id, "exec failed: {e}");
        }
        reply(result, "ExecProcess").map(|()| Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, exec = %req.exec_id, rows = req.rows, cols = req.cols, "ResizePty");
        reply(
            self.containers
                .resize_pty(&req.container_id, &req.exec_id, req.rows, req.cols),
            "ResizePty",
        )
        .map(|()| Empty::default())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        tracing::debug!(container = %req.container_id, "ListProcesses");
        let processes = reply(
            self.containers.list_processes(&req.container_id),
            "ListProcesses",
        )?;
        Ok(ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> Reply<Empty> {
        tracing::debug!(container = %req.container_id, "UpdateContainer");
        reply(
            self.containers
                .update(&req.container_id, &req.resources_json),
            "UpdateContainer",
        )
        .map(|()| Empty::default())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> Reply<StatsContainerResponse> {
        reply(self.containers.stats(&req.container_id), "StatsContainer")
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<OOMEvent> {
        let container_id = self.containers.next_oom_event().await;
        Ok(OOMEvent {
            container_id,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> Reply<Empty> {
        tracing::info!("Shutdown");
        nix::unistd::sync();
        let action = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            match action {
                ShutdownAction::RebootGuest => crate::pid1::power_off(),
                ShutdownAction::Exit(notify) => notify.notify_one(),
            }
        });
        Ok(Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_limits() {
        assert_eq!(chunk_limit(0), MAX_CHUNK as usize);
        assert_eq!(chunk_limit(10), 10);
        assert_eq!(chunk_limit(u32::MAX), MAX_CHUNK as usize);
    }
}

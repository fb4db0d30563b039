//! The host's client of the guest agent: a connection over the agent
//! channel, a version handshake, and one table of per-call deadlines.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_protocol::agent as pb;
use husk_protocol::agent_ttrpc::AgentClient as RawClient;
use husk_protocol::API_VERSION;
use ttrpc::r#async::transport::Socket;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent is unavailable: {0}")]
    Unavailable(String),
    #[error("the agent did not answer {call} within {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("{call}: {message}")]
    Rpc {
        call: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("the agent speaks API version {agent}, this husk speaks {host}: use a guest initrd built from the same husk version (make guest)")]
    Version { agent: u32, host: u32 },
}

/// Per-call deadlines; `None` waits as long as it takes.
pub mod deadline {
    use std::time::Duration;
    /// One `Check` attempt while the guest boots.
    pub const CHECK_ATTEMPT: Duration = Duration::from_secs(2);
    pub const CREATE: Option<Duration> = Some(Duration::from_secs(60));
    pub const START: Option<Duration> = Some(Duration::from_secs(30));
    pub const SIGNAL: Option<Duration> = Some(Duration::from_secs(10));
    pub const WRITE_STDIN: Option<Duration> = Some(Duration::from_secs(60));
    pub const CLOSE_STDIN: Option<Duration> = Some(Duration::from_secs(10));
    pub const REMOVE: Option<Duration> = Some(Duration::from_secs(30));
    pub const SHUTDOWN: Option<Duration> = Some(Duration::from_secs(5));
    /// Reads and waits block until there is something to report.
    pub const READ: Option<Duration> = None;
    pub const WAIT: Option<Duration> = None;
}

/// What `Check` reported.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub agent_version: String,
    pub kernel_release: String,
}

/// A process's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
}

#[derive(Clone)]
pub struct AgentClient {
    raw: RawClient,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

async fn call<T, F>(name: &'static str, limit: Option<Duration>, fut: F) -> Result<T, AgentError>
where
    F: Future<Output = ttrpc::Result<T>>,
{
    let r = match limit {
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .map_err(|_| AgentError::Timeout {
                call: name,
                after: d,
            })?,
        None => fut.await,
    };
    r.map_err(|e| match e {
        ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
            call: name,
            code: s.code(),
            message: s.message().to_string(),
        },
        other => AgentError::Unavailable(other.to_string()),
    })
}

impl AgentClient {
    /// Connects to the agent channel's host end (a unix socket served by the
    /// hypervisor). The guest may still be booting; see [`Self::handshake`].
    pub async fn connect(socket: &Path) -> Result<AgentClient, AgentError> {
        // The hypervisor creates the socket a moment before it listens.
        let mut tries = 0;
        let stream = loop {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 500 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => {
                    return Err(AgentError::Unavailable(format!(
                        "{}: {e}",
                        socket.display()
                    )))
                }
            }
        };
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        Ok(AgentClient {
            raw: RawClient::new(client),
        })
    }

    /// Waits until the agent answers `Check` (retrying while the guest
    /// boots, up to `boot_timeout`) and checks its API version.
    pub async fn handshake(&self, boot_timeout: Duration) -> Result<AgentInfo, AgentError> {
        let start = Instant::now();
        let req = pb::CheckRequest {
            api_version: API_VERSION,
            ..Default::default()
        };
        loop {
            let attempt = deadline::CHECK_ATTEMPT.min(boot_timeout.saturating_sub(start.elapsed()));
            match call("Check", Some(attempt), self.raw.check(ctx(), &req)).await {
                Ok(r) => {
                    if r.api_version != API_VERSION {
                        return Err(AgentError::Version {
                            agent: r.api_version,
                            host: API_VERSION,
                        });
                    }
                    return Ok(AgentInfo {
                        agent_version: r.agent_version,
                        kernel_release: r.kernel_release,
                    });
                }
                Err(AgentError::Timeout { .. }) if start.elapsed() < boot_timeout => {
                    tracing::debug!("agent not answering yet; retrying Check");
                }
                Err(AgentError::Timeout { .. }) => {
                    return Err(AgentError::Timeout {
                        call: "Check",
                        after: boot_timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn create_container(
        &self,
        id: &str,
        spec_json: Vec<u8>,
        storages: Vec<pb::Storage>,
    ) -> Result<(), AgentError> {
        let req = pb::CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: spec_json,
            storages,
            ..Default::default()
        };
        call(
            "CreateContainer",
            deadline::CREATE,
            self.raw.create_container(ctx(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let req = pb::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        call(
            "StartContainer",
            deadline::START,
            self.raw.start_container(ctx(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        let req = pb::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        call(
            "RemoveContainer",
            deadline::REMOVE,
            self.raw.remove_container(ctx(), &req),
        )
        .await
        .map(drop)
    }

    fn process(id: &str, exec_id: &str) -> pb::ProcessRequest {
        pb::ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        }
    }

    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<ExitStatus, AgentError> {
        let r = call(
            "WaitProcess",
            deadline::WAIT,
            self.raw.wait_process(ctx(), &Self::process(id, exec_id)),
        )
        .await?;
        Ok(ExitStatus {
            status: r.exit_status,
            signal: r.signal,
        })
    }

    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = pb::SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        call(
            "SignalProcess",
            deadline::SIGNAL,
            self.raw.signal_process(ctx(), &req),
        )
        .await
        .map(drop)
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        mut data: &[u8],
    ) -> Result<(), AgentError> {
        while !data.is_empty() {
            let n = data.len().min(husk_protocol::MAX_CHUNK as usize);
            let req = pb::WriteStreamRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                data: data[..n].to_vec(),
                ..Default::default()
            };
            let r = call(
                "WriteStdin",
                deadline::WRITE_STDIN,
                self.raw.write_stdin(ctx(), &req),
            )
            .await?;
            let written = (r.len as usize).min(n);
            if written == 0 {
                return Err(AgentError::Rpc {
                    call: "WriteStdin",
                    code: ttrpc::Code::INTERNAL,
                    message: "the agent accepted no bytes".into(),
                });
            }
            data = &data[written..];
        }
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        call(
            "CloseStdin",
            deadline::CLOSE_STDIN,
            self.raw.close_stdin(ctx(), &Self::process(id, exec_id)),
        )
        .await
        .map(drop)
    }

    /// The next chunk of stdout (`stderr == false`) or stderr; empty at EOF.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, AgentError> {
        let req = pb::ReadStreamRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            max_len: husk_protocol::MAX_CHUNK,
            ..Default::default()
        };
        let r = if stderr {
            call(
                "ReadStderr",
                deadline::READ,
                self.raw.read_stderr(ctx(), &req),
            )
            .await?
        } else {
            call(
                "ReadStdout",
                deadline::READ,
                self.raw.read_stdout(ctx(), &req),
            )
            .await?
        };
        Ok(r.data)
    }

    /// Starts `process_json` (an OCI process) in the running container.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = pb::ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process_json,
            ..Default::default()
        };
        call(
            "ExecProcess",
            deadline::CREATE,
            self.raw.exec_process(ctx(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = pb::ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            cols,
            ..Default::default()
        };
        call(
            "ResizePty",
            deadline::SIGNAL,
            self.raw.resize_pty(ctx(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<pb::ProcessInfo>, AgentError> {
        let req = pb::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let r = call(
            "ListProcesses",
            deadline::SIGNAL,
            self.raw.list_processes(ctx(), &req),
        )
        .await?;
        Ok(r.processes)
    }

    pub async fn update_container(
        &self,
        id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = pb::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json,
            ..Default::default()
        };
        call(
            "UpdateContainer",
            deadline::SIGNAL,
            self.raw.update_container(ctx(), &req),
        )
        .await
        .map(drop)
    }

    pub async fn stats_container(
        &self,
        id: &str,
    ) -> Result<pb::StatsContainerResponse, AgentError> {
        let req = pb::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        call(
            "StatsContainer",
            deadline::SIGNAL,
            self.raw.stats_container(ctx(), &req),
        )
        .await
    }

    /// Waits for the next OOM kill in the guest; returns the container id.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        let r = call(
            "GetOOMEvent",
            deadline::WAIT,
            self.raw.get_oom_event(ctx(), &pb::Empty::default()),
        )
        .await?;
        Ok(r.container_id)
    }

    pub async fn shutdown(&self) -> Result<(), AgentError> {
        call(
            "Shutdown",
            deadline::SHUTDOWN,
            self.raw.shutdown(ctx(), &pb::Empty::default()),
        )
        .await
        .map(drop)
    }
}

//! The real agent connection: ttrpc over the agent channel's host end (a
//! unix socket served by the hypervisor). The one place where protobuf
//! messages are built and read.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocol::agent as pb;
use husk_protocol::agent_ttrpc::AgentClient as RawClient;
use husk_protocol::API_VERSION;
use ttrpc::r#async::transport::Socket;

use super::{AgentConn, AgentError, AgentInfo, Call, ExitStatus, ProcessInfo, Reply, RpcCode};
use super::{Stats, Storage, Stream};

pub struct TtrpcConn {
    raw: RawClient,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

fn code(c: ttrpc::Code) -> RpcCode {
    match c {
        ttrpc::Code::NOT_FOUND => RpcCode::NotFound,
        ttrpc::Code::ALREADY_EXISTS => RpcCode::AlreadyExists,
        ttrpc::Code::INVALID_ARGUMENT => RpcCode::InvalidArgument,
        ttrpc::Code::FAILED_PRECONDITION => RpcCode::FailedPrecondition,
        _ => RpcCode::Other,
    }
}

fn container(cid: String) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: cid,
        ..Default::default()
    }
}

fn process(cid: String, exec_id: String) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: cid,
        exec_id,
        ..Default::default()
    }
}

fn storage(s: Storage) -> pb::Storage {
    pb::Storage {
        driver: s.driver,
        source: s.source,
        mount_point: s.mount_point,
        ..Default::default()
    }
}

fn stats(s: pb::StatsContainerResponse) -> Stats {
    Stats {
        cpu_usage_usec: s.cpu_usage_usec,
        cpu_user_usec: s.cpu_user_usec,
        cpu_system_usec: s.cpu_system_usec,
        cpu_nr_periods: s.cpu_nr_periods,
        cpu_nr_throttled: s.cpu_nr_throttled,
        cpu_throttled_usec: s.cpu_throttled_usec,
        memory_usage: s.memory_usage,
        memory_limit: s.memory_limit,
        memory_peak: s.memory_peak,
        memory_swap_usage: s.memory_swap_usage,
        memory_oom_kills: s.memory_oom_kills,
        memory_stat: s.memory_stat.into_iter().collect(),
        pids_current: s.pids_current,
        pids_limit: s.pids_limit,
    }
}

impl TtrpcConn {
    /// Connects to `socket`. The guest may still be booting; see
    /// [`super::AgentClient::handshake`].
    pub async fn connect(socket: &Path) -> Result<TtrpcConn, AgentError> {
        // The hypervisor creates the socket a moment before it listens.
        let mut tries = 0;
        let stream = loop {
            // Through the directory's descriptor: the path may be longer
            // than `sun_path`.
            let connected = match husk_sys::socket_path::SocketPath::new(socket) {
                Ok(short) => tokio::net::UnixStream::connect(short.path()).await,
                Err(e) => Err(e),
            };
            match connected {
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
        Ok(TtrpcConn {
            raw: RawClient::new(client),
        })
    }
}

#[async_trait]
impl AgentConn for TtrpcConn {
    async fn send(&self, call: Call) -> Result<Reply, AgentError> {
        let name = call.name();
        let raw = &self.raw;
        let done = |r: ttrpc::Result<pb::Empty>| r.map(|_| Reply::Done);
        let r: ttrpc::Result<Reply> = match call {
            Call::Check => {
                let req = pb::CheckRequest {
                    api_version: API_VERSION,
                    ..Default::default()
                };
                raw.check(ctx(), &req).await.map(|r| {
                    Reply::Info(AgentInfo {
                        api_version: r.api_version,
                        agent_version: r.agent_version,
                        kernel_release: r.kernel_release,
                    })
                })
            }
            Call::CreateContainer {
                cid,
                spec_json,
                storages,
            } => {
                let req = pb::CreateContainerRequest {
                    container_id: cid,
                    oci_spec_json: spec_json,
                    storages: storages.into_iter().map(storage).collect(),
                    ..Default::default()
                };
                done(raw.create_container(ctx(), &req).await)
            }
            Call::StartContainer { cid } => done(raw.start_container(ctx(), &container(cid)).await),
            Call::RenewIdentity {
                entropy,
                realtime,
                hostname,
            } => done(
                raw.renew_identity(ctx(), &identity_request(entropy, realtime, hostname))
                    .await,
            ),
            Call::ConfigureNetwork { cid, network } => done(
                raw.configure_network(ctx(), &network_request(cid, network))
                    .await,
            ),
            Call::RemoveContainer { cid } => {
                done(raw.remove_container(ctx(), &container(cid)).await)
            }
            Call::PauseContainer { cid } => done(raw.pause_container(ctx(), &container(cid)).await),
            Call::ResumeContainer { cid } => {
                done(raw.resume_container(ctx(), &container(cid)).await)
            }
            Call::ExecProcess {
                cid,
                exec_id,
                process_json,
            } => {
                let req = pb::ExecProcessRequest {
                    container_id: cid,
                    exec_id,
                    process_json,
                    ..Default::default()
                };
                done(raw.exec_process(ctx(), &req).await)
            }
            Call::WaitProcess { cid, exec_id } => raw
                .wait_process(ctx(), &process(cid, exec_id))
                .await
                .map(|r| {
                    Reply::Exit(ExitStatus {
                        status: r.exit_status,
                        signal: r.signal,
                    })
                }),
            Call::SignalProcess {
                cid,
                exec_id,
                signal,
                all,
            } => {
                let req = pb::SignalProcessRequest {
                    container_id: cid,
                    exec_id,
                    signal,
                    all,
                    ..Default::default()
                };
                done(raw.signal_process(ctx(), &req).await)
            }
            Call::WriteStdin { cid, exec_id, data } => {
                let req = pb::WriteStreamRequest {
                    container_id: cid,
                    exec_id,
                    data,
                    ..Default::default()
                };
                raw.write_stdin(ctx(), &req)
                    .await
                    .map(|r| Reply::Written(r.len as usize))
            }
            Call::CloseStdin { cid, exec_id } => {
                done(raw.close_stdin(ctx(), &process(cid, exec_id)).await)
            }
            Call::ReadOutput {
                cid,
                exec_id,
                stream,
            } => {
                let req = pb::ReadStreamRequest {
                    container_id: cid,
                    exec_id,
                    max_len: husk_protocol::MAX_CHUNK,
                    ..Default::default()
                };
                let r = match stream {
                    Stream::Stdout => raw.read_stdout(ctx(), &req).await,
                    Stream::Stderr => raw.read_stderr(ctx(), &req).await,
                };
                r.map(|r| Reply::Data(r.data))
            }
            Call::ResizePty {
                cid,
                exec_id,
                rows,
                cols,
            } => {
                let req = pb::ResizePtyRequest {
                    container_id: cid,
                    exec_id,
                    rows,
                    cols,
                    ..Default::default()
                };
                done(raw.resize_pty(ctx(), &req).await)
            }
            Call::ListProcesses { cid } => {
                raw.list_processes(ctx(), &container(cid)).await.map(|r| {
                    Reply::Processes(
                        r.processes
                            .into_iter()
                            .map(|p| ProcessInfo {
                                pid: p.pid,
                                ppid: p.ppid,
                                uid: p.uid,
                                state: p.state,
                                command: p.command,
                                exec_id: p.exec_id,
                            })
                            .collect(),
                    )
                })
            }
            Call::UpdateContainer {
                cid,
                resources_json,
            } => {
                let req = pb::UpdateContainerRequest {
                    container_id: cid,
                    resources_json,
                    ..Default::default()
                };
                done(raw.update_container(ctx(), &req).await)
            }
            Call::StatsContainer { cid } => raw
                .stats_container(ctx(), &container(cid))
                .await
                .map(|s| Reply::Stats(stats(s))),
            Call::NextOomEvent => raw
                .get_oom_event(ctx(), &pb::Empty::default())
                .await
                .map(|r| Reply::Oom(r.container_id)),
            Call::Shutdown => done(raw.shutdown(ctx(), &pb::Empty::default()).await),
        };
        r.map_err(|e| match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
                call: name,
                code: code(s.code()),
                message: s.message().to_string(),
            },
            other => AgentError::Unavailable(other.to_string()),
        })
    }
}

/// `RenewIdentity`'s message: `realtime` as seconds and nanoseconds since
/// the epoch. A time before the epoch (a host clock that is badly wrong)
/// goes as 0, which the agent refuses, naming `realtime_sec`.
fn identity_request(
    entropy: Vec<u8>,
    realtime: std::time::SystemTime,
    hostname: String,
) -> pb::RenewIdentityRequest {
    let t = realtime
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pb::RenewIdentityRequest {
        entropy,
        realtime_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        realtime_nsec: t.subsec_nanos(),
        hostname,
        ..Default::default()
    }
}

/// The one conversion of a sandbox's network into the agent's message.
fn network_request(cid: String, n: crate::net::GuestNetwork) -> pb::ConfigureNetworkRequest {
    pb::ConfigureNetworkRequest {
        container_id: cid,
        interfaces: n
            .interfaces
            .into_iter()
            .map(|i| pb::Interface {
                boot_mac: i.boot_mac,
                mac: i.mac,
                name: i.name,
                mtu: i.mtu,
                addresses: i.addresses,
                ..Default::default()
            })
            .collect(),
        routes: n
            .routes
            .into_iter()
            .map(|r| pb::Route {
                destination: r.destination,
                gateway: r.gateway,
                device: r.device,
                source: r.source,
                metric: r.metric,
                ..Default::default()
            })
            .collect(),
        neighbours: n
            .neighbours
            .into_iter()
            .map(|x| pb::Neighbour {
                address: x.address,
                mac: x.mac,
                device: x.device,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_identity_request_carries_the_time_as_seconds_and_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_796_000_000, 123_456_789);
        let r = identity_request(vec![9; 32], t, "husk-a".into());
        assert_eq!(
            (r.realtime_sec, r.realtime_nsec),
            (1_796_000_000, 123_456_789)
        );
        assert_eq!((r.entropy.len(), r.hostname.as_str()), (32, "husk-a"));
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(
            identity_request(vec![], before, String::new()).realtime_sec,
            0
        );
    }
}

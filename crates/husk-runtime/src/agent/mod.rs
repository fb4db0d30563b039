//! The host's client of the guest agent.
//!
//! One seam: [`AgentConn`] sends one typed [`Call`] and returns its typed
//! [`Reply`]. The real connection speaks ttrpc over the agent channel
//! ([`ttrpc::TtrpcConn`], the one place protobuf messages are built and
//! read); unit tests use [`fake::FakeAgent`]. Every call's deadline comes
//! from one table ([`Call::deadline`]), applied once in [`AgentClient::call`].

pub mod fake;
mod ttrpc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use husk_protocol::API_VERSION;

pub use self::ttrpc::TtrpcConn;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("the agent is unavailable: {0}")]
    Unavailable(String),
    #[error("the agent did not answer {call} within {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("{call}: {message}")]
    Rpc {
        call: &'static str,
        code: RpcCode,
        message: String,
    },
    #[error("the agent speaks API version {agent}, this husk speaks {host}: use a guest initrd built from the same husk version (make guest)")]
    Version { agent: u32, host: u32 },
    #[error("{call}: the agent answered with {got}, not what the call returns")]
    Unexpected {
        call: &'static str,
        got: &'static str,
    },
}

/// The ttrpc status codes the host tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Other,
}

/// What `Check` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub api_version: u32,
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

impl ExitStatus {
    /// What a process killed with SIGKILL reports.
    pub const KILLED: ExitStatus = ExitStatus {
        status: 128 + libc::SIGKILL,
        signal: libc::SIGKILL,
    };
    /// What the host reports for a process whose VM or agent went away.
    pub const LOST: ExitStatus = ExitStatus {
        status: 255,
        signal: 0,
    };
}

/// A process in the guest (its pids are the guest's, not the host's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    pub command: String,
    pub exec_id: String,
}

/// A container's cgroup v2 statistics, converted once from the agent's reply
/// and handed as they are to `husk events` and to containerd's metrics.
/// Limits of 0 mean "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_peak: u64,
    pub memory_swap_usage: u64,
    pub memory_oom_kills: u64,
    pub memory_stat: std::collections::BTreeMap<String, u64>,
    pub pids_current: u64,
    pub pids_limit: u64,
}

/// A shared filesystem the agent mounts before it builds a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    pub driver: String,
    pub source: String,
    pub mount_point: String,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One agent call, with its arguments. `exec_id` is `""` for a container's
/// init.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Check,
    CreateContainer {
        cid: String,
        spec_json: Vec<u8>,
        storages: Vec<Storage>,
    },
    StartContainer {
        cid: String,
    },
    RemoveContainer {
        cid: String,
    },
    PauseContainer {
        cid: String,
    },
    ResumeContainer {
        cid: String,
    },
    ExecProcess {
        cid: String,
        exec_id: String,
        process_json: Vec<u8>,
    },
    WaitProcess {
        cid: String,
        exec_id: String,
    },
    SignalProcess {
        cid: String,
        exec_id: String,
        signal: i32,
        all: bool,
    },
    /// At most [`husk_protocol::MAX_CHUNK`] bytes; replies how many the agent took.
    WriteStdin {
        cid: String,
        exec_id: String,
        data: Vec<u8>,
    },
    CloseStdin {
        cid: String,
        exec_id: String,
    },
    /// The next chunk of output; empty at its end.
    ReadOutput {
        cid: String,
        exec_id: String,
        stream: Stream,
    },
    ResizePty {
        cid: String,
        exec_id: String,
        rows: u32,
        cols: u32,
    },
    ListProcesses {
        cid: String,
    },
    UpdateContainer {
        cid: String,
        resources_json: Vec<u8>,
    },
    StatsContainer {
        cid: String,
    },
    /// Gives container `cid`'s network namespace the sandbox's network.
    ConfigureNetwork {
        cid: String,
        network: crate::net::GuestNetwork,
    },
    /// Waits for the next OOM kill in the guest.
    NextOomEvent,
    /// Gives a guest restored from a template fresh entropy, the host's
    /// time and a hostname (`template::renew_identity`).
    RenewIdentity {
        entropy: Vec<u8>,
        realtime: std::time::SystemTime,
        hostname: String,
    },
    Shutdown,
}

/// What a call returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    Info(AgentInfo),
    Exit(ExitStatus),
    Written(usize),
    Data(Vec<u8>),
    Processes(Vec<ProcessInfo>),
    Stats(Stats),
    /// The container an OOM kill hit.
    Oom(String),
}

/// One `Check` attempt while the guest boots.
pub const CHECK_ATTEMPT: Duration = Duration::from_secs(2);

impl Call {
    /// The call's name in the agent API (for errors and logs).
    pub fn name(&self) -> &'static str {
        self.entry().0
    }

    /// How long the host waits for the answer; `None` waits as long as it
    /// takes (reads and waits block until there is something to report, and
    /// race the VM's exit instead).
    pub fn deadline(&self) -> Option<Duration> {
        self.entry().1
    }

    /// The one table of names and deadlines.
    fn entry(&self) -> (&'static str, Option<Duration>) {
        const S: fn(u64) -> Option<Duration> = |s| Some(Duration::from_secs(s));
        match self {
            Call::Check => ("Check", Some(CHECK_ATTEMPT)),
            Call::CreateContainer { .. } => ("CreateContainer", S(60)),
            Call::StartContainer { .. } => ("StartContainer", S(30)),
            Call::RemoveContainer { .. } => ("RemoveContainer", S(30)),
            Call::PauseContainer { .. } => ("PauseContainer", S(10)),
            Call::ResumeContainer { .. } => ("ResumeContainer", S(10)),
            Call::ExecProcess { .. } => ("ExecProcess", S(60)),
            Call::WaitProcess { .. } => ("WaitProcess", None),
            Call::SignalProcess { .. } => ("SignalProcess", S(10)),
            Call::WriteStdin { .. } => ("WriteStdin", S(60)),
            Call::CloseStdin { .. } => ("CloseStdin", S(10)),
            Call::ReadOutput {
                stream: Stream::Stdout,
                ..
            } => ("ReadStdout", None),
            Call::ReadOutput { .. } => ("ReadStderr", None),
            Call::ResizePty { .. } => ("ResizePty", S(10)),
            Call::ListProcesses { .. } => ("ListProcesses", S(10)),
            Call::UpdateContainer { .. } => ("UpdateContainer", S(10)),
            Call::StatsContainer { .. } => ("StatsContainer", S(10)),
            Call::ConfigureNetwork { .. } => ("ConfigureNetwork", S(30)),
            Call::RenewIdentity { .. } => ("RenewIdentity", S(5)),
            Call::NextOomEvent => ("GetOOMEvent", None),
            Call::Shutdown => ("Shutdown", S(5)),
        }
    }
}

impl Reply {
    fn kind(&self) -> &'static str {
        match self {
            Reply::Done => "done",
            Reply::Info(_) => "agent info",
            Reply::Exit(_) => "an exit status",
            Reply::Written(_) => "a byte count",
            Reply::Data(_) => "data",
            Reply::Processes(_) => "a process list",
            Reply::Stats(_) => "statistics",
            Reply::Oom(_) => "an OOM event",
        }
    }
}

/// A connection to an agent: sends one call, returns its reply. Deadlines
/// are not its business ([`AgentClient`] applies them).
#[async_trait]
pub trait AgentConn: Send + Sync {
    async fn send(&self, call: Call) -> Result<Reply, AgentError>;
}

/// The agent of one sandbox: typed calls over an [`AgentConn`], each under
/// its deadline.
#[derive(Clone)]
pub struct AgentClient {
    conn: Arc<dyn AgentConn>,
}

macro_rules! expect {
    ($name:expr, $reply:expr, $pat:pat => $out:expr) => {
        match $reply {
            $pat => Ok($out),
            other => Err(AgentError::Unexpected {
                call: $name,
                got: other.kind(),
            }),
        }
    };
}

impl AgentClient {
    pub fn new(conn: Arc<dyn AgentConn>) -> AgentClient {
        AgentClient { conn }
    }

    /// Sends `call` and waits for its reply within the call's deadline.
    pub async fn call(&self, call: Call) -> Result<Reply, AgentError> {
        let name = call.name();
        match call.deadline() {
            Some(d) => tokio::time::timeout(d, self.conn.send(call))
                .await
                .map_err(|_| AgentError::Timeout {
                    call: name,
                    after: d,
                })?,
            None => self.conn.send(call).await,
        }
    }

    /// A call whose reply carries nothing.
    pub async fn done(&self, call: Call) -> Result<(), AgentError> {
        let name = call.name();
        expect!(name, self.call(call).await?, Reply::Done => ())
    }

    /// Waits until the agent answers `Check` (retrying while the guest
    /// boots, up to `boot_timeout`) and checks its API version.
    pub async fn handshake(&self, boot_timeout: Duration) -> Result<AgentInfo, AgentError> {
        let start = Instant::now();
        loop {
            let attempt = CHECK_ATTEMPT.min(boot_timeout.saturating_sub(start.elapsed()));
            let r = tokio::time::timeout(attempt, self.conn.send(Call::Check)).await;
            match r {
                Ok(Ok(Reply::Info(info))) => {
                    if info.api_version != API_VERSION {
                        return Err(AgentError::Version {
                            agent: info.api_version,
                            host: API_VERSION,
                        });
                    }
                    return Ok(info);
                }
                Ok(Ok(other)) => {
                    return Err(AgentError::Unexpected {
                        call: "Check",
                        got: other.kind(),
                    })
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if start.elapsed() < boot_timeout => {
                    tracing::debug!("agent not answering yet; retrying Check");
                }
                Err(_) => {
                    return Err(AgentError::Timeout {
                        call: "Check",
                        after: boot_timeout,
                    })
                }
            }
        }
    }

    pub async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus, AgentError> {
        let r = self
            .call(Call::WaitProcess {
                cid: cid.into(),
                exec_id: exec_id.into(),
            })
            .await?;
        expect!("WaitProcess", r, Reply::Exit(s) => s)
    }

    pub async fn signal(
        &self,
        cid: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.done(Call::SignalProcess {
            cid: cid.into(),
            exec_id: exec_id.into(),
            signal,
            all,
        })
        .await
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(
        &self,
        cid: &str,
        exec_id: &str,
        mut data: &[u8],
    ) -> Result<(), AgentError> {
        while !data.is_empty() {
            let n = data.len().min(husk_protocol::MAX_CHUNK as usize);
            let r = self
                .call(Call::WriteStdin {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                    data: data[..n].to_vec(),
                })
                .await?;
            let written = expect!("WriteStdin", r, Reply::Written(w) => w.min(n))?;
            if written == 0 {
                return Err(AgentError::Rpc {
                    call: "WriteStdin",
                    code: RpcCode::Other,
                    message: "the agent accepted no bytes".into(),
                });
            }
            data = &data[written..];
        }
        Ok(())
    }

    /// The next chunk of `stream`; empty at its end.
    pub async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stream: Stream,
    ) -> Result<Vec<u8>, AgentError> {
        let r = self
            .call(Call::ReadOutput {
                cid: cid.into(),
                exec_id: exec_id.into(),
                stream,
            })
            .await?;
        expect!(if stream == Stream::Stdout { "ReadStdout" } else { "ReadStderr" }, r, Reply::Data(d) => d)
    }

    pub async fn list_processes(&self, cid: &str) -> Result<Vec<ProcessInfo>, AgentError> {
        let r = self.call(Call::ListProcesses { cid: cid.into() }).await?;
        expect!("ListProcesses", r, Reply::Processes(p) => p)
    }

    pub async fn stats(&self, cid: &str) -> Result<Stats, AgentError> {
        let r = self.call(Call::StatsContainer { cid: cid.into() }).await?;
        expect!("StatsContainer", r, Reply::Stats(s) => s)
    }

    /// Waits for the next OOM kill in the guest; returns the container id.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        let r = self.call(Call::NextOomEvent).await?;
        expect!("GetOOMEvent", r, Reply::Oom(c) => c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_has_a_name_and_blocking_calls_have_no_deadline() {
        let c = |s: &str| s.to_string();
        let calls = [
            Call::WaitProcess {
                cid: c("a"),
                exec_id: c(""),
            },
            Call::ReadOutput {
                cid: c("a"),
                exec_id: c(""),
                stream: Stream::Stderr,
            },
            Call::NextOomEvent,
        ];
        for call in &calls {
            assert_eq!(call.deadline(), None, "{}", call.name());
        }
        assert_eq!(calls[1].name(), "ReadStderr");
        assert_eq!(
            Call::StartContainer { cid: c("a") }.deadline(),
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test]
    async fn renew_identity_has_a_short_deadline_and_the_fake_records_it() {
        let call = Call::RenewIdentity {
            entropy: vec![1; 64],
            realtime: std::time::SystemTime::now(),
            hostname: "husk-a".into(),
        };
        assert_eq!(call.name(), "RenewIdentity");
        assert_eq!(call.deadline(), Some(Duration::from_secs(5)));
        let fake = fake::FakeAgent::new();
        let client = AgentClient::new(fake.clone());
        client.done(call).await.unwrap();
        assert_eq!(fake.calls(), ["RenewIdentity"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_is_never_answered_times_out_at_its_deadline() {
        let fake = fake::FakeAgent::new();
        fake.hang("StartContainer");
        let client = AgentClient::new(fake.clone());
        let t0 = tokio::time::Instant::now();
        let e = client
            .done(Call::StartContainer { cid: "c".into() })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Timeout {
                    call: "StartContainer",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_kind_is_an_error_not_a_panic() {
        let fake = fake::FakeAgent::new();
        fake.reply_with("ListProcesses", Reply::Done);
        let client = AgentClient::new(fake.clone());
        let e = client.list_processes("c").await.unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Unexpected {
                    call: "ListProcesses",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_agent_of_another_api_version_is_refused() {
        let fake = fake::FakeAgent::new();
        fake.set_api_version(API_VERSION + 1);
        let e = AgentClient::new(fake.clone())
            .handshake(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Version { .. }), "{e}");
    }
}

//! A fake agent for unit tests of the lifecycle: it keeps containers and
//! processes as a well-behaved agent would, records every call, and can be
//! told to misbehave (never answer a call, fail it, answer with the wrong
//! kind of reply, report exits and OOM kills of its own accord).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::{AgentConn, AgentError, AgentInfo, Call, ExitStatus, Reply, RpcCode, Stats};

#[derive(Default)]
struct FakeProcess {
    exit: Option<watch::Sender<Option<ExitStatus>>>,
    stdout: VecDeque<Vec<u8>>,
    stdin: Vec<u8>,
    stdin_closed: bool,
}

impl FakeProcess {
    fn new() -> FakeProcess {
        FakeProcess {
            exit: Some(watch::channel(None).0),
            ..Default::default()
        }
    }
    fn watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.as_ref().expect("made by new").subscribe()
    }
    fn end(&self, s: ExitStatus) {
        if let Some(tx) = &self.exit {
            tx.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(s);
                    true
                } else {
                    false
                }
            });
        }
    }
    fn exited(&self) -> bool {
        self.exit.as_ref().is_some_and(|t| t.borrow().is_some())
    }
}

#[derive(Default)]
struct FakeContainer {
    started: bool,
    paused: bool,
    /// Signals held while paused.
    pending: Vec<i32>,
    processes: HashMap<String, FakeProcess>,
}

#[derive(Default)]
struct State {
    api_version: u32,
    containers: HashMap<String, FakeContainer>,
    calls: Vec<Call>,
    hang: HashSet<&'static str>,
    fail: HashMap<&'static str, String>,
    replies: HashMap<&'static str, Reply>,
    gone: bool,
}

/// See the module docs. Cheap to clone; clones share their state.
#[derive(Clone)]
pub struct FakeAgent {
    state: Arc<Mutex<State>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
    gone: watch::Sender<bool>,
}

impl Default for FakeAgent {
    fn default() -> Self {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        FakeAgent {
            state: Arc::new(Mutex::new(State {
                api_version: husk_protocol::API_VERSION,
                ..Default::default()
            })),
            oom_tx,
            oom_rx: Arc::new(tokio::sync::Mutex::new(oom_rx)),
            gone: watch::channel(false).0,
        }
    }
}

fn not_found(call: &'static str, what: String) -> AgentError {
    AgentError::Rpc {
        call,
        code: RpcCode::NotFound,
        message: format!("{what} does not exist"),
    }
}

impl FakeAgent {
    pub fn new() -> Arc<FakeAgent> {
        Arc::new(FakeAgent::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake agent lock")
    }

    /// Calls named `name` (as in [`Call::name`]) are never answered.
    pub fn hang(&self, name: &'static str) {
        self.lock().hang.insert(name);
    }
    /// Calls named `name` fail with an RPC error carrying `message`.
    pub fn fail(&self, name: &'static str, message: &str) {
        self.lock().fail.insert(name, message.to_string());
    }
    /// Calls named `name` get `reply`, whatever they asked.
    pub fn reply_with(&self, name: &'static str, reply: Reply) {
        self.lock().replies.insert(name, reply);
    }
    pub fn set_api_version(&self, v: u32) {
        self.lock().api_version = v;
    }
    /// The connection breaks: every call, pending or new, fails as
    /// unavailable (what a dead VM looks like from the host).
    pub fn disconnect(&self) {
        self.lock().gone = true;
        self.gone.send_replace(true);
    }
    /// Process `(cid, exec_id)` ends with `status` (whether or not the fake
    /// holds such a container: a hostile agent may report anything).
    pub fn exit(&self, cid: &str, exec_id: &str, status: i32) {
        let st = self.lock();
        if let Some(p) = st
            .containers
            .get(cid)
            .and_then(|c| c.processes.get(exec_id))
        {
            p.end(ExitStatus { status, signal: 0 });
        }
    }
    /// The guest reports an OOM kill in `cid`.
    pub fn oom(&self, cid: &str) {
        let _ = self.oom_tx.send(cid.to_string());
    }
    /// Output the process writes.
    pub fn push_stdout(&self, cid: &str, exec_id: &str, data: &[u8]) {
        if let Some(p) = self
            .lock()
            .containers
            .get_mut(cid)
            .and_then(|c| c.processes.get_mut(exec_id))
        {
            p.stdout.push_back(data.to_vec());
        }
    }
    /// What the process got on stdin so far, and whether it was closed.
    pub fn stdin_of(&self, cid: &str, exec_id: &str) -> (Vec<u8>, bool) {
        self.lock()
            .containers
            .get(cid)
            .and_then(|c| c.processes.get(exec_id))
            .map(|p| (p.stdin.clone(), p.stdin_closed))
            .unwrap_or_default()
    }
    /// The names of the calls received, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.lock().calls.iter().map(Call::name).collect()
    }
    /// How many calls named `name` were received.
    pub fn count(&self, name: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.name() == name)
            .count()
    }
    /// The signals sent to `cid` (any process).
    pub fn signals(&self, cid: &str) -> Vec<i32> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::SignalProcess { cid: c, signal, .. } if c == cid => Some(*signal),
                _ => None,
            })
            .collect()
    }
    pub fn holds(&self, cid: &str) -> bool {
        self.lock().containers.contains_key(cid)
    }
    pub fn is_paused(&self, cid: &str) -> bool {
        self.lock().containers.get(cid).is_some_and(|c| c.paused)
    }

    async fn until_gone(&self) -> AgentError {
        let mut rx = self.gone.subscribe();
        let _ = rx.wait_for(|g| *g).await;
        AgentError::Unavailable("the connection was closed".into())
    }

    fn answer(&self, call: &Call) -> Result<Answer, AgentError> {
        let name = call.name();
        let mut st = self.lock();
        st.calls.push(call.clone());
        if st.gone {
            return Err(AgentError::Unavailable("the connection was closed".into()));
        }
        if st.hang.contains(name) {
            return Ok(Answer::Never);
        }
        if let Some(m) = st.fail.get(name) {
            return Err(AgentError::Rpc {
                call: name,
                code: RpcCode::Other,
                message: m.clone(),
            });
        }
        if let Some(r) = st.replies.get(name) {
            return Ok(Answer::Forced(r.clone()));
        }
        let done = Ok(Answer::Now(Reply::Done));
        let get = |st: &mut State, cid: &str| -> Result<(), AgentError> {
            if st.containers.contains_key(cid) {
                Ok(())
            } else {
                Err(not_found(name, format!("container {cid}")))
            }
        };
        match call {
            Call::Check => Ok(Answer::Now(Reply::Info(AgentInfo {
                api_version: st.api_version,
                agent_version: "fake".into(),
                kernel_release: "6.1.0-fake".into(),
            }))),
            Call::CreateContainer { cid, .. } => {
                if st.containers.contains_key(cid) {
                    return Err(AgentError::Rpc {
                        call: name,
                        code: RpcCode::AlreadyExists,
                        message: format!("container {cid} exists"),
                    });
                }
                let mut c = FakeContainer::default();
                c.processes.insert(String::new(), FakeProcess::new());
                st.containers.insert(cid.clone(), c);
                done
            }
            Call::ConfigureNetwork { cid, .. } => {
                get(&mut st, cid)?;
                done
            }
            Call::RenewIdentity { .. } => done,
            Call::StartContainer { cid } => {
                get(&mut st, cid)?;
                st.containers.get_mut(cid).expect("checked").started = true;
                done
            }
            Call::RemoveContainer { cid } => {
                if let Some(c) = st.containers.remove(cid) {
                    for p in c.processes.values() {
                        p.end(ExitStatus::KILLED);
                    }
                }
                done
            }
            Call::PauseContainer { cid } => {
                get(&mut st, cid)?;
                st.containers.get_mut(cid).expect("checked").paused = true;
                done
            }
            Call::ResumeContainer { cid } => {
                get(&mut st, cid)?;
                let c = st.containers.get_mut(cid).expect("checked");
                c.paused = false;
                for sig in std::mem::take(&mut c.pending) {
                    deliver(c, "", sig);
                }
                done
            }
            Call::ExecProcess { cid, exec_id, .. } => {
                get(&mut st, cid)?;
                let c = st.containers.get_mut(cid).expect("checked");
                if c.processes.contains_key(exec_id) {
                    return Err(AgentError::Rpc {
                        call: name,
                        code: RpcCode::AlreadyExists,
                        message: format!("exec {exec_id} exists"),
                    });
                }
                c.processes.insert(exec_id.clone(), FakeProcess::new());
                done
            }
            Call::WaitProcess { cid, exec_id } => st
                .containers
                .get(cid)
                .and_then(|c| c.processes.get(exec_id))
                .map(|p| Answer::Exit(p.watch()))
                .ok_or_else(|| not_found(name, format!("process {cid}/{exec_id}"))),
            Call::SignalProcess {
                cid,
                exec_id,
                signal,
                ..
            } => {
                get(&mut st, cid)?;
                let c = st.containers.get_mut(cid).expect("checked");
                if c.paused && *signal != libc::SIGKILL {
                    c.pending.push(*signal);
                } else {
                    deliver(c, exec_id, *signal);
                }
                done
            }
            Call::WriteStdin { cid, exec_id, data } => {
                let p = st
                    .containers
                    .get_mut(cid)
                    .and_then(|c| c.processes.get_mut(exec_id))
                    .ok_or_else(|| not_found(name, format!("process {cid}/{exec_id}")))?;
                p.stdin.extend_from_slice(data);
                Ok(Answer::Now(Reply::Written(data.len())))
            }
            Call::CloseStdin { cid, exec_id } => {
                if let Some(p) = st
                    .containers
                    .get_mut(cid)
                    .and_then(|c| c.processes.get_mut(exec_id))
                {
                    p.stdin_closed = true;
                }
                done
            }
            Call::ReadOutput { cid, exec_id, .. } => {
                let p = st
                    .containers
                    .get_mut(cid)
                    .and_then(|c| c.processes.get_mut(exec_id))
                    .ok_or_else(|| not_found(name, format!("process {cid}/{exec_id}")))?;
                match p.stdout.pop_front() {
                    Some(d) => Ok(Answer::Now(Reply::Data(d))),
                    None if p.exited() => Ok(Answer::Now(Reply::Data(Vec::new()))),
                    // Nothing yet: end of stream comes with the exit.
                    None => Ok(Answer::EndWithExit(p.watch())),
                }
            }
            Call::ResizePty { .. } | Call::UpdateContainer { .. } | Call::Shutdown => done,
            Call::ListProcesses { cid } => {
                get(&mut st, cid)?;
                Ok(Answer::Now(Reply::Processes(Vec::new())))
            }
            Call::StatsContainer { cid } => {
                get(&mut st, cid)?;
                Ok(Answer::Now(Reply::Stats(Stats {
                    memory_usage: 4096,
                    pids_current: 1,
                    ..Default::default()
                })))
            }
            Call::NextOomEvent => Ok(Answer::Oom),
        }
    }
}

/// How a signal ends a fake process: as a process with default handlers.
fn deliver(c: &mut FakeContainer, exec_id: &str, sig: i32) {
    if matches!(
        sig,
        libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP
    ) {
        if let Some(p) = c.processes.get(exec_id) {
            p.end(ExitStatus {
                status: 128 + sig,
                signal: sig,
            });
        }
    }
}

enum Answer {
    Now(Reply),
    /// A reply set with [`FakeAgent::reply_with`]: it takes a millisecond,
    /// as a round trip over the wire would, so an agent that answers every
    /// read with more data lets time pass rather than spinning the runtime.
    Forced(Reply),
    Never,
    Exit(watch::Receiver<Option<ExitStatus>>),
    EndWithExit(watch::Receiver<Option<ExitStatus>>),
    Oom,
}

#[async_trait]
impl AgentConn for FakeAgent {
    async fn send(&self, call: Call) -> Result<Reply, AgentError> {
        let answer = self.answer(&call)?;
        let work = async {
            match answer {
                Answer::Now(r) => Ok(r),
                Answer::Forced(r) => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    Ok(r)
                }
                Answer::Never => std::future::pending().await,
                Answer::Exit(mut rx) => {
                    let got = rx.wait_for(Option::is_some).await.map(|s| *s);
                    match got {
                        Ok(Some(s)) => Ok(Reply::Exit(s)),
                        _ => std::future::pending().await,
                    }
                }
                Answer::EndWithExit(mut rx) => {
                    let _ = rx.wait_for(Option::is_some).await;
                    Ok(Reply::Data(Vec::new()))
                }
                Answer::Oom => match self.oom_rx.lock().await.recv().await {
                    Some(cid) => Ok(Reply::Oom(cid)),
                    None => std::future::pending().await,
                },
            }
        };
        tokio::select! {
            r = work => r,
            e = self.until_gone() => Err(e),
        }
    }
}

//! containerd's task service (`containerd.task.v2.Task`): a thin adapter
//! from containerd's task API to the runtime's one lifecycle model
//! ([`husk_runtime::sandbox::Sandbox`]). Statuses, exits, stdio relays,
//! hooks, pause and delete policy live there; this file translates names,
//! codes and events, behind a lock that is never held across an await.
//!
//! `lifecycle` creates, starts and deletes; `forward` passes events on.
//!
//! Pids: containerd wants a host pid per process. The processes run in the
//! guest, so every process of a pod reports the pod's QEMU process, which
//! lives exactly as long as the pod's VM. `Pids` lists the guest's pids.

mod forward;
mod launch;
mod lifecycle;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::protos::api::CheckpointTaskRequest;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use husk_runtime::config::Config;
use husk_runtime::sandbox::Sandbox;
use husk_runtime::sandbox_dir::validate_id;

use crate::container::{self, Container, Process};
use crate::error::{self, Result};
use crate::events::{self, topics, Events};
use crate::io::StdioPaths;
use crate::{metrics, rootfs};

pub use launch::{Launch, QemuLaunch};

#[derive(Default)]
struct Tasks {
    sandbox: Option<Arc<Sandbox>>,
    /// How the pod's owner was made: who may join it.
    origin: Option<husk_runtime::pod::PodOrigin>,
    containers: HashMap<String, Container>,
    /// `(container, exec)` whose start is being reported: their exit waits
    /// in `deferred`, so containerd never hears of an end before its start.
    starting: HashSet<(String, String)>,
    deferred: HashMap<(String, String), events::TaskExit>,
}

struct Inner {
    cfg: std::result::Result<Config, String>,
    /// `<shim root>/<namespace>`: where pods keep their state dirs.
    root: PathBuf,
    debug: bool,
    events: Events,
    exit: Arc<ExitSignal>,
    launcher: Box<dyn Launch>,
    tasks: Mutex<Tasks>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

fn container<'a>(t: &'a Tasks, id: &str) -> Result<&'a Container> {
    t.containers
        .get(id)
        .ok_or_else(|| error::not_found(format!("container {id} does not exist")))
}

fn container_mut<'a>(t: &'a mut Tasks, id: &str) -> Result<&'a mut Container> {
    t.containers
        .get_mut(id)
        .ok_or_else(|| error::not_found(format!("container {id} does not exist")))
}

fn process<'a>(c: &'a Container, id: &str, exec_id: &str) -> Result<&'a Process> {
    c.process(exec_id).ok_or_else(|| {
        error::not_found(format!(
            "process {exec_id} of container {id} does not exist"
        ))
    })
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

impl TaskService {
    pub fn new(
        cfg: std::result::Result<Config, String>,
        root: PathBuf,
        debug: bool,
        events: Events,
        exit: Arc<ExitSignal>,
        launcher: Box<dyn Launch>,
    ) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                cfg,
                root,
                debug,
                events,
                exit,
                launcher,
                tasks: Mutex::new(Tasks::default()),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.lock()
            .sandbox
            .clone()
            .ok_or_else(|| error::failed_precondition("this shim runs no pod"))
    }

    fn pid(&self) -> u32 {
        self.lock().sandbox.as_ref().map_or(0, |p| p.host_pid())
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event).await;
    }

    fn begin_start(&self, cid: &str, exec_id: &str) {
        self.lock().starting.insert((cid.into(), exec_id.into()));
    }

    /// The start is reported: an exit held back meanwhile goes out now.
    async fn end_start(&self, cid: &str, exec_id: &str) {
        let deferred = {
            let mut t = self.lock();
            let key = (cid.to_string(), exec_id.to_string());
            t.starting.remove(&key);
            t.deferred.remove(&key)
        };
        if let Some(ev) = deferred {
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                .await;
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let cid = req.id.clone();
        tracing::info!(container = %cid, bundle = %req.bundle, "create");
        validate_id(&cid).map_err(|e| error::invalid(e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(error::unimplemented(
                "restoring a checkpoint is not supported by husk",
            ));
        }
        if self.inner.lock().containers.contains_key(&cid) {
            return Err(error::status(
                containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS,
                format!("container {cid} already exists"),
            ));
        }
        let rootfs = rootfs::mount(&req.rootfs, Path::new(&req.bundle))
            .await
            .map_err(|e| error::internal(&e))?;
        let pid = match self.create_in_pod(&req, rootfs.clone()).await {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(r) = &rootfs {
                    rootfs::unmount(r);
                }
                tracing::warn!(container = %cid, "create failed: {e}");
                return Err(e);
            }
        };
        let ev = events::TaskCreate {
            container_id: cid,
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(events::TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "start");
        let pid = if req.exec_id.is_empty() {
            self.start_init(&req.id).await?
        } else {
            self.start_exec(&req.id, &req.exec_id).await?
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "delete");
        if req.exec_id.is_empty() {
            self.delete_init(&req.id).await
        } else {
            self.delete_exec(&req.id, &req.exec_id).await
        }
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let sandbox = self.inner.sandbox()?;
        let (bundle, paths, in_sandbox) = {
            let t = self.inner.lock();
            let c = container(&t, &req.id)?;
            let p = process(c, &req.id, &req.exec_id)?;
            let in_sandbox = *p.in_sandbox.borrow();
            (c.bundle.clone(), p.stdio.clone(), in_sandbox)
        };
        let lifecycle = sandbox.status(&req.id).map_err(|e| error::sandbox(&e))?;
        let exit = if in_sandbox {
            sandbox
                .exited(&req.id, &req.exec_id)
                .map_err(|e| error::sandbox(&e))?
        } else {
            None
        };
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: bundle.to_string_lossy().into_owned(),
            pid: sandbox.host_pid(),
            status: container::status(lifecycle, in_sandbox, exit).into(),
            stdin: paths.stdin,
            stdout: paths.stdout,
            stderr: paths.stderr,
            terminal: paths.terminal,
            exit_status: exit.map_or(0, |e| u32::try_from(e.status.status).unwrap_or(255)),
            exited_at: exit.map(|e| events::timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let sandbox = self.inner.sandbox()?;
        container(&self.inner.lock(), &req.id)?;
        let list = sandbox.ps(&req.id).await.map_err(|e| error::sandbox(&e))?;
        Ok(PidsResponse {
            processes: list
                .iter()
                .map(|p| ProcessInfo {
                    pid: u32::try_from(p.pid).unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Freezes the container's processes (the lifecycle's pause).
    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let sandbox = self.inner.sandbox()?;
        container(&self.inner.lock(), &req.id)?;
        sandbox
            .pause(&req.id)
            .await
            .map_err(|e| error::sandbox(&e))?;
        let ev = events::TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(Empty::default())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let sandbox = self.inner.sandbox()?;
        container(&self.inner.lock(), &req.id)?;
        sandbox
            .resume(&req.id)
            .await
            .map_err(|e| error::sandbox(&e))?;
        let ev = events::TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(error::unimplemented(
            "checkpoint is not supported by husk: the container runs in a VM, out of CRIU's reach",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        let sandbox = self.inner.sandbox()?;
        let in_sandbox = {
            let t = self.inner.lock();
            let c = container(&t, &req.id)?;
            let p = process(c, &req.id, &req.exec_id)?;
            let b = *p.in_sandbox.borrow();
            b
        };
        if !in_sandbox {
            return Err(error::failed_precondition(format!(
                "exec {} of container {} was not started",
                req.exec_id, req.id
            )));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| error::invalid(format!("invalid signal {}", req.signal)))?;
        sandbox
            .kill(&req.id, &req.exec_id, signal, req.all)
            .await
            .map_err(|e| error::sandbox(&e))?;
        Ok(Empty::default())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, exec = %req.exec_id, "exec");
        validate_id(&req.exec_id).map_err(|e| error::invalid(e.to_string()))?;
        let Some(any) = req.spec.as_ref() else {
            return Err(error::invalid("exec has no process spec"));
        };
        let mut process: serde_json::Value = serde_json::from_slice(&any.value)
            .map_err(|e| error::invalid(format!("invalid exec process spec: {e}")))?;
        serde_json::from_value::<oci_spec::runtime::Process>(process.clone())
            .map_err(|e| error::invalid(format!("invalid exec process spec: {e}")))?;
        process["terminal"] = serde_json::Value::Bool(req.terminal);
        let sandbox = self.inner.sandbox()?;
        let status = sandbox.status(&req.id).map_err(|e| error::sandbox(&e))?;
        if !status.can_exec() {
            return Err(error::failed_precondition(
                status.refusal(husk_runtime::status::Verb::Exec, &req.id),
            ));
        }
        {
            let mut t = self.inner.lock();
            let c = container_mut(&mut t, &req.id)?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(error::status(
                    containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let mut p = Process::new(
                stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
                false,
            );
            p.spec = Some(serde_json::to_vec(&process).expect("JSON value serializes"));
            c.execs.insert(req.exec_id.clone(), p);
        }
        let ev = events::TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let sandbox = self.inner.sandbox()?;
        sandbox
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| error::sandbox(&e))?;
        Ok(Empty::default())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            let mut t = self.inner.lock();
            let c = container_mut(&mut t, &req.id)?;
            if let Some(p) = c.process_mut(&req.exec_id) {
                p.stdin_stop = None;
            }
        }
        Ok(Empty::default())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let sandbox = self.inner.sandbox()?;
        let Some(any) = req.resources.as_ref() else {
            return Err(error::invalid("update carries no resources"));
        };
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&any.value)
            .map_err(|e| error::invalid(format!("invalid linux resources: {e}")))?;
        sandbox
            .update(&req.id, any.value.clone())
            .await
            .map_err(|e| error::sandbox(&e))?;
        Ok(Empty::default())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let sandbox = self.inner.sandbox()?;
        let mut in_sandbox = {
            let t = self.inner.lock();
            process(container(&t, &req.id)?, &req.id, &req.exec_id)?
                .in_sandbox
                .subscribe()
        };
        let gone = || {
            error::not_found(format!(
                "process {} of container {} was deleted",
                req.exec_id, req.id
            ))
        };
        // ctr waits on an exec before it starts it.
        if in_sandbox.wait_for(|s| *s).await.is_err() {
            return Err(gone());
        }
        let mut rx = sandbox
            .wait(&req.id, &req.exec_id)
            .map_err(|e| error::sandbox(&e))?;
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.expect("waited for Some"),
            Err(_) => return Err(gone()),
        };
        Ok(WaitResponse {
            exit_status: u32::try_from(exit.status.status).unwrap_or(255),
            exited_at: Some(events::timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let sandbox = self.inner.sandbox()?;
        let s = sandbox
            .stats(&req.id)
            .await
            .map_err(|e| error::sandbox(&e))?;
        let any = metrics::to_any(&s).map_err(|e| error::internal(&e))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.inner.pid(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// containerd asks after each container's deletion; the shim goes once
    /// its last container has.
    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let sandbox = {
            let mut t = self.inner.lock();
            if !t.containers.is_empty() {
                return Ok(Empty::default());
            }
            t.sandbox.take()
        };
        if let Some(s) = sandbox {
            s.teardown(false).await;
        }
        tracing::info!("no containers left; the shim exits");
        self.inner.exit.signal();
        Ok(Empty::default())
    }
}

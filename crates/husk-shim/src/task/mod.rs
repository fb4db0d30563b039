//! containerd's task service (`containerd.task.v2.Task`) over a husk pod.
//!
//! Each RPC is a few lines over [`Pod`] and its agent client; the state
//! containerd sees (statuses, exits, stdio) lives in [`Tasks`], behind a
//! lock that is never held across an await.
//!
//! `lifecycle` creates, starts and deletes; `watch` follows the guest.
//!
//! Pids: containerd wants a host pid per process. The processes run in the
//! guest, so every process of a pod reports the pod's QEMU process, which
//! lives exactly as long as the pod's VM. `Pids` lists the guest's pids.

mod lifecycle;
mod watch;

use std::collections::HashMap;
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
use husk_runtime::pod::Pod;
use husk_runtime::sandbox_dir::validate_id;

use crate::container::{Container, Paused, ProcState, Process};
use crate::error::{self, Result};
use crate::events::{self, topics, Events};
use crate::io::StdioPaths;
use crate::{metrics, rootfs};

#[derive(Default)]
struct Tasks {
    pod: Option<Arc<Pod>>,
    containers: HashMap<String, Container>,
}

struct Inner {
    cfg: std::result::Result<Config, String>,
    /// `<shim root>/<namespace>`: where pods keep their state dirs.
    root: PathBuf,
    debug: bool,
    events: Events,
    exit: Arc<ExitSignal>,
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

fn process_mut<'a>(c: &'a mut Container, id: &str, exec_id: &str) -> Result<&'a mut Process> {
    c.process_mut(exec_id).ok_or_else(|| {
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
    ) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                cfg,
                root,
                debug,
                events,
                exit,
                tasks: Mutex::new(Tasks::default()),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.tasks.lock().expect("task state lock")
    }

    fn pod(&self) -> Result<Arc<Pod>> {
        self.lock()
            .pod
            .clone()
            .ok_or_else(|| error::failed_precondition("this shim runs no pod"))
    }

    fn pid(&self) -> u32 {
        self.lock().pod.as_ref().map_or(0, |p| p.vm_pid())
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event).await;
    }

    /// Records that `(cid, exec_id)` ended with `status` and tells
    /// containerd, unless its end was already recorded.
    async fn process_exited(&self, cid: &str, exec_id: &str, status: u32) {
        let event = {
            let mut t = self.lock();
            let pid = t.pod.as_ref().map_or(0, |p| p.vm_pid());
            let Some(p) = t
                .containers
                .get_mut(cid)
                .and_then(|c| c.process_mut(exec_id))
            else {
                return;
            };
            let Some(exit) = p.set_exited(status) else {
                return;
            };
            let event = events::TaskExit {
                container_id: cid.into(),
                id: if exec_id.is_empty() { cid } else { exec_id }.into(),
                pid,
                exit_status: exit.status,
                exited_at: Some(events::timestamp(exit.at)).into(),
                ..Default::default()
            };
            tracing::info!(container = cid, exec = exec_id, status, "process exited");
            if p.starting {
                p.deferred_exit = Some(event);
                return;
            }
            event
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
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
        let pid = self.inner.pid();
        let t = self.inner.lock();
        let c = container(&t, &req.id)?;
        let p = process(c, &req.id, &req.exec_id)?;
        let exit = p.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid,
            status: c.status(&req.exec_id).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| events::timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pod = self.inner.pod()?;
        container(&self.inner.lock(), &req.id)?;
        let list = pod
            .agent()
            .list_processes(&req.id)
            .await
            .map_err(|e| error::agent(&e))?;
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

    /// A container alone in its VM is paused by stopping the VM (nothing of
    /// it runs, not even its kernel); one that shares the VM gets SIGSTOP.
    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let pod = self.inner.pod()?;
        let kind = {
            let t = self.inner.lock();
            let c = container(&t, &req.id)?;
            if c.init.state != ProcState::Running || c.paused.is_some() {
                return Err(error::failed_precondition(format!(
                    "container {} is not running",
                    req.id
                )));
            }
            if t.containers.len() == 1 {
                Paused::Vm
            } else {
                Paused::Signals
            }
        };
        match kind {
            Paused::Vm => pod.pause().await.map_err(|e| error::pod(&e))?,
            Paused::Signals => pod
                .agent()
                .signal_process(&req.id, "", libc::SIGSTOP, true)
                .await
                .map_err(|e| error::agent(&e))?,
        }
        container_mut(&mut self.inner.lock(), &req.id)?.paused = Some(kind);
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
        let pod = self.inner.pod()?;
        let kind = container(&self.inner.lock(), &req.id)?
            .paused
            .ok_or_else(|| {
                error::failed_precondition(format!("container {} is not paused", req.id))
            })?;
        self.resume_container(&pod, &req.id, kind).await?;
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
        let pod = self.inner.pod()?;
        let (paused, guest_id) = {
            let t = self.inner.lock();
            let c = container(&t, &req.id)?;
            let p = process(c, &req.id, &req.exec_id)?;
            if p.state == ProcState::Stopped {
                return Err(error::not_found("process already finished"));
            }
            (c.paused, p.guest_id.clone())
        };
        // A stopped VM cannot deliver signals: let it run again first.
        if paused == Some(Paused::Vm) {
            self.resume_container(&pod, &req.id, Paused::Vm).await?;
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| error::invalid(format!("invalid signal {}", req.signal)))?;
        pod.agent()
            .signal_process(&req.id, &guest_id, signal, req.all)
            .await
            .map_err(|e| error::agent(&e))?;
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
        {
            let mut t = self.inner.lock();
            let c = container_mut(&mut t, &req.id)?;
            if c.init.state != ProcState::Running {
                return Err(error::failed_precondition(format!(
                    "container {} is not running",
                    req.id
                )));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(error::status(
                    containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let guest_id = c.new_guest_exec_id(&req.exec_id);
            let mut p = Process::new(
                guest_id,
                stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
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
        let pod = self.inner.pod()?;
        let guest_id = {
            let t = self.inner.lock();
            process(container(&t, &req.id)?, &req.id, &req.exec_id)?
                .guest_id
                .clone()
        };
        pod.agent()
            .resize_pty(&req.id, &guest_id, req.height, req.width)
            .await
            .map_err(|e| error::agent(&e))?;
        Ok(Empty::default())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            let mut t = self.inner.lock();
            let p = process_mut(container_mut(&mut t, &req.id)?, &req.id, &req.exec_id)?;
            if let Some(io) = p.io.as_mut() {
                io.close_stdin();
            }
        }
        Ok(Empty::default())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let pod = self.inner.pod()?;
        let Some(any) = req.resources.as_ref() else {
            return Err(error::invalid("update carries no resources"));
        };
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&any.value)
            .map_err(|e| error::invalid(format!("invalid linux resources: {e}")))?;
        self.check_reachable(&req.id)?;
        pod.agent()
            .update_container(&req.id, any.value.clone())
            .await
            .map_err(|e| error::agent(&e))?;
        Ok(Empty::default())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut rx = {
            let t = self.inner.lock();
            process(container(&t, &req.id)?, &req.id, &req.exec_id)?
                .exit
                .subscribe()
        };
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.expect("waited for Some"),
            Err(_) => {
                return Err(error::not_found(format!(
                    "process {} of container {} was deleted",
                    req.exec_id, req.id
                )))
            }
        };
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(events::timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let pod = self.inner.pod()?;
        self.check_reachable(&req.id)?;
        let s = pod
            .agent()
            .stats_container(&req.id)
            .await
            .map_err(|e| error::agent(&e))?;
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
        let pod = {
            let mut t = self.inner.lock();
            if !t.containers.is_empty() {
                return Ok(Empty::default());
            }
            t.pod.take()
        };
        if let Some(pod) = pod {
            pod.teardown().await;
        }
        tracing::info!("no containers left; the shim exits");
        self.inner.exit.signal();
        Ok(Empty::default())
    }
}

impl TaskService {
    /// The container exists, runs, and its VM is not stopped.
    fn check_reachable(&self, cid: &str) -> Result<()> {
        let t = self.inner.lock();
        let c = container(&t, cid)?;
        if c.init.state == ProcState::Stopped {
            return Err(error::not_found(format!("container {cid} has exited")));
        }
        if c.paused == Some(Paused::Vm) {
            return Err(error::failed_precondition(format!(
                "container {cid} is paused"
            )));
        }
        Ok(())
    }

    async fn resume_container(&self, pod: &Pod, cid: &str, kind: Paused) -> Result<()> {
        match kind {
            Paused::Vm => pod.resume().await.map_err(|e| error::pod(&e))?,
            Paused::Signals => pod
                .agent()
                .signal_process(cid, "", libc::SIGCONT, true)
                .await
                .map_err(|e| error::agent(&e))?,
        }
        container_mut(&mut self.inner.lock(), cid)?.paused = None;
        let ev = events::TaskResumed {
            container_id: cid.into(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(())
    }
}

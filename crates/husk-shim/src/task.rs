//! containerd's task service (`containerd.task.v2.Task`) over a husk pod.
//!
//! Each RPC is a few lines over [`Pod`] and its agent client; the state
//! containerd sees (statuses, exits, stdio) lives in [`Tasks`], behind a
//! lock that is never held across an await.
//!
//! Pids: containerd wants a host pid per process. The processes run in the
//! guest, so every process of a pod reports the pod's QEMU process, which
//! lives exactly as long as the pod's VM. `Pids` lists the guest's pids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

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
use husk_hypervisor::qemu::Qemu;
use husk_runtime::bundle::Bundle;
use husk_runtime::config::Config;
use husk_runtime::hooks;
use husk_runtime::monitor::error_chain;
use husk_runtime::pod::{self, Membership, Pod};
use husk_runtime::sandbox_dir::validate_id;

use crate::container::{Container, Exit, Paused, ProcState, Process};
use crate::error::{self, Result};
use crate::events::{self, topics, Events};
use crate::io::{ProcessIo, StdioPaths, DRAIN_TIMEOUT};
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
            events::TaskExit {
                container_id: cid.into(),
                id: if exec_id.is_empty() { cid } else { exec_id }.into(),
                pid,
                exit_status: exit.status,
                exited_at: Some(events::timestamp(exit.at)).into(),
                ..Default::default()
            }
        };
        tracing::info!(container = cid, exec = exec_id, status, "process exited");
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }
}

/// Waits in the guest for the end of `(cid, exec_id)`. A lost agent (the VM
/// died) ends every process with status 255.
fn watch_exit(inner: Arc<Inner>, pod: Arc<Pod>, cid: String, exec_id: String) {
    tokio::spawn(async move {
        let status = match pod.agent().wait_process(&cid, &exec_id).await {
            Ok(s) => u32::try_from(s.status).unwrap_or(255),
            Err(e) => {
                tracing::warn!(container = %cid, exec = %exec_id, "lost the process: {}", error_chain(&e));
                255
            }
        };
        inner.process_exited(&cid, &exec_id, status).await;
    });
}

/// Passes the guest's OOM kills on to containerd, until the VM goes.
fn watch_oom(inner: Arc<Inner>, pod: Arc<Pod>) {
    tokio::spawn(async move {
        while let Ok(cid) = pod.agent().next_oom_event().await {
            let known = inner.lock().containers.contains_key(&cid);
            tracing::info!(container = %cid, known, "OOM kill in the guest");
            if known {
                let ev = events::TaskOOM {
                    container_id: cid,
                    ..Default::default()
                };
                inner
                    .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
        }
    });
}

impl TaskService {
    /// Creates container `cid` from its bundle (rootfs already mounted):
    /// boots a pod for it or joins the pod it names. Returns its pid.
    async fn create_in_pod(&self, req: &CreateTaskRequest, rootfs: Option<PathBuf>) -> Result<u32> {
        let inner = &self.inner;
        let cid = req.id.as_str();
        let cfg = inner.cfg.clone().map_err(error::failed_precondition)?;
        let bundle =
            Bundle::load(Path::new(&req.bundle)).map_err(|e| error::invalid(error_chain(&e)))?;
        let paths = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let (pod, owner) = match pod::membership(&bundle.spec) {
            Membership::Owner => {
                if let Some(p) = &inner.lock().pod {
                    return Err(error::failed_precondition(format!(
                        "this shim runs pod {}; container {cid} must name it in its sandbox-id annotation",
                        p.id()
                    )));
                }
                let agent_log = if inner.debug {
                    "debug".to_string()
                } else {
                    cfg.log_level.clone()
                };
                let pod = Pod::start(&cfg, &Qemu, &inner.root, cid, &bundle, &agent_log)
                    .await
                    .map_err(|e| error::pod(&e))?;
                let pod = Arc::new(pod);
                inner.lock().pod = Some(pod.clone());
                watch_oom(inner.clone(), pod.clone());
                (pod, true)
            }
            Membership::Member { sandbox_id } => {
                let pod = inner
                    .lock()
                    .pod
                    .clone()
                    .filter(|p| p.id() == sandbox_id)
                    .ok_or_else(|| {
                        error::not_found(format!("pod {sandbox_id} does not run in this shim"))
                    })?;
                (pod, false)
            }
        };
        let undo = |pod: Arc<Pod>| async move {
            if owner {
                pod.teardown().await;
                inner.lock().pod = None;
            } else if let Err(e) = pod.remove_container(cid).await {
                tracing::warn!("{}", error_chain(&e));
            }
        };
        if let Err(e) = pod.create_container(cid, &bundle).await {
            undo(pod).await;
            return Err(error::pod(&e));
        }
        let pid = pod.vm_pid();
        let mut c = Container {
            bundle: bundle.dir.clone(),
            owner,
            rootfs,
            hooks: bundle.spec.hooks().clone().unwrap_or_default(),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            init: Process::new(paths.clone()),
            execs: HashMap::new(),
            paused: None,
        };
        if c.hooks.create_container().is_some() || c.hooks.start_container().is_some() {
            tracing::warn!("createContainer and startContainer hooks are not run: they belong in the container's namespaces, inside the VM");
        }
        let mut create_hooks = c.hooks.prestart().clone().unwrap_or_default();
        create_hooks.extend(c.hooks.create_runtime().clone().unwrap_or_default());
        if !create_hooks.is_empty() {
            if let Err(e) = hooks::run("createRuntime", &create_hooks, &c.oci_state(cid, pid)).await
            {
                undo(pod).await;
                return Err(error::failed_precondition(error_chain(&e)));
            }
        }
        match ProcessIo::start(pod.agent(), cid, "", &paths).await {
            Ok(io) => c.init.io = Some(io),
            Err(e) => {
                undo(pod).await;
                return Err(error::invalid(error_chain(&e)));
            }
        }
        inner.lock().containers.insert(cid.to_string(), c);
        watch_exit(inner.clone(), pod, cid.to_string(), String::new());
        Ok(pid)
    }

    async fn start_init(&self, cid: &str) -> Result<u32> {
        let inner = &self.inner;
        let pod = inner.pod()?;
        {
            let t = inner.lock();
            let c = container(&t, cid)?;
            if c.init.state != ProcState::Created {
                return Err(error::failed_precondition(format!(
                    "container {cid} was already started"
                )));
            }
        }
        pod.agent()
            .start_container(cid)
            .await
            .map_err(|e| error::agent(&e))?;
        let pid = pod.vm_pid();
        let (poststart, state) = {
            let mut t = inner.lock();
            let c = container_mut(&mut t, cid)?;
            if c.init.state == ProcState::Created {
                c.init.state = ProcState::Running;
            }
            (
                c.hooks.poststart().clone().unwrap_or_default(),
                c.oci_state(cid, pid),
            )
        };
        if !poststart.is_empty() {
            hooks::run_logged("poststart", &poststart, &state).await;
        }
        let ev = events::TaskStart {
            container_id: cid.into(),
            pid,
            ..Default::default()
        };
        inner
            .publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(pid)
    }

    async fn start_exec(&self, cid: &str, exec_id: &str) -> Result<u32> {
        let inner = &self.inner;
        let pod = inner.pod()?;
        let (spec, paths) = {
            let mut t = inner.lock();
            let p = process_mut(container_mut(&mut t, cid)?, cid, exec_id)?;
            match (p.state, p.spec.take()) {
                (ProcState::Created, Some(spec)) => (spec, p.stdio.clone()),
                _ => {
                    return Err(error::failed_precondition(format!(
                        "exec {exec_id} of container {cid} was already started"
                    )))
                }
            }
        };
        let agent = pod.agent();
        if let Err(e) = agent.exec_process(cid, exec_id, spec.clone()).await {
            if let Some(p) = container_mut(&mut inner.lock(), cid)
                .ok()
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.spec = Some(spec);
            }
            return Err(error::agent(&e));
        }
        let io = match ProcessIo::start(agent, cid, exec_id, &paths).await {
            Ok(io) => io,
            Err(e) => {
                let _ = agent
                    .signal_process(cid, exec_id, libc::SIGKILL, false)
                    .await;
                return Err(error::invalid(error_chain(&e)));
            }
        };
        {
            let mut t = inner.lock();
            let p = process_mut(container_mut(&mut t, cid)?, cid, exec_id)?;
            p.state = ProcState::Running;
            p.io = Some(io);
        }
        watch_exit(inner.clone(), pod.clone(), cid.into(), exec_id.into());
        let pid = pod.vm_pid();
        let ev = events::TaskExecStarted {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            pid,
            ..Default::default()
        };
        inner
            .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(pid)
    }

    async fn delete_exec(&self, cid: &str, exec_id: &str) -> Result<DeleteResponse> {
        let pid = self.inner.pid();
        let p = {
            let mut t = self.inner.lock();
            let c = container_mut(&mut t, cid)?;
            let p = process(c, cid, exec_id)?;
            if p.state == ProcState::Running {
                return Err(error::failed_precondition(format!(
                    "exec {exec_id} of container {cid} is running: kill it before deleting it"
                )));
            }
            c.execs.remove(exec_id).expect("checked above")
        };
        let exit = p.exited().unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        if let Some(io) = { p }.io.take() {
            io.finish(DRAIN_TIMEOUT).await;
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(events::timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    /// Deletes a stopped (or never started) container: its processes'
    /// output is drained, the guest forgets it and its rootfs is unmounted.
    /// The pod's owner takes the pod, and whatever still runs in it, along.
    async fn delete_init(&self, cid: &str) -> Result<DeleteResponse> {
        let inner = &self.inner;
        let pid = inner.pid();
        let (owner, ios) = {
            let mut t = inner.lock();
            let c = container_mut(&mut t, cid)?;
            if c.init.state == ProcState::Running {
                return Err(error::failed_precondition(format!(
                    "container {cid} is running: kill it before deleting it"
                )));
            }
            let ios: Vec<ProcessIo> = std::iter::once(&mut c.init)
                .chain(c.execs.values_mut())
                .filter_map(|p| p.io.take())
                .collect();
            (c.owner, ios)
        };
        for io in ios {
            io.finish(DRAIN_TIMEOUT).await;
        }
        let pod = inner.lock().pod.clone();
        if owner {
            let members: Vec<String> = inner
                .lock()
                .containers
                .keys()
                .filter(|k| k.as_str() != cid)
                .cloned()
                .collect();
            for m in members {
                tracing::warn!(container = %m, pod = cid, "the pod goes away before this container of it");
                self.drop_member(&m).await;
            }
            if let Some(pod) = pod {
                pod.teardown().await;
            }
            inner.lock().pod = None;
        } else if let Some(pod) = pod {
            if let Err(e) = pod.remove_container(cid).await {
                tracing::warn!("{}", error_chain(&e));
            }
        }
        let Some(mut c) = inner.lock().containers.remove(cid) else {
            return Err(error::not_found(format!("container {cid} does not exist")));
        };
        if let Some(r) = &c.rootfs {
            rootfs::unmount(r);
        }
        // A container deleted before it ran was killed by the deletion.
        c.init.set_exited(128 + libc::SIGKILL as u32);
        let exit = c.init.exited().expect("set above");
        let poststop = c.hooks.poststop().clone().unwrap_or_default();
        if !poststop.is_empty() {
            hooks::run_logged("poststop", &poststop, &c.oci_state(cid, pid)).await;
        }
        let ev = events::TaskDelete {
            container_id: cid.into(),
            pid,
            exit_status: exit.status,
            exited_at: Some(events::timestamp(exit.at)).into(),
            id: cid.into(),
            ..Default::default()
        };
        inner
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(events::timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    /// Ends a container of a pod that is going away: its processes are
    /// reported killed and its rootfs unmounted; a later `Delete` of it
    /// finds nothing (containerd takes that as done).
    async fn drop_member(&self, cid: &str) {
        let Some(mut c) = self.inner.lock().containers.remove(cid) else {
            return;
        };
        let mut ended = Vec::new();
        for (exec_id, p) in std::iter::once((String::new(), &mut c.init))
            .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)))
        {
            if let Some(io) = p.io.take() {
                drop(io);
            }
            if let Some(exit) = p.set_exited(128 + libc::SIGKILL as u32) {
                ended.push((exec_id, exit));
            }
        }
        if let Some(r) = &c.rootfs {
            rootfs::unmount(r);
        }
        let pid = self.inner.pid();
        for (exec_id, exit) in ended {
            let ev = events::TaskExit {
                container_id: cid.into(),
                id: if exec_id.is_empty() {
                    cid.to_string()
                } else {
                    exec_id
                },
                pid,
                exit_status: exit.status,
                exited_at: Some(events::timestamp(exit.at)).into(),
                ..Default::default()
            };
            self.inner
                .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
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
        let paused = {
            let t = self.inner.lock();
            let c = container(&t, &req.id)?;
            if process(c, &req.id, &req.exec_id)?.state == ProcState::Stopped {
                return Err(error::not_found("process already finished"));
            }
            c.paused
        };
        // A stopped VM cannot deliver signals: let it run again first.
        if paused == Some(Paused::Vm) {
            self.resume_container(&pod, &req.id, Paused::Vm).await?;
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| error::invalid(format!("invalid signal {}", req.signal)))?;
        pod.agent()
            .signal_process(&req.id, &req.exec_id, signal, req.all)
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
            let mut p = Process::new(stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal));
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
        {
            let t = self.inner.lock();
            process(container(&t, &req.id)?, &req.id, &req.exec_id)?;
        }
        pod.agent()
            .resize_pty(&req.id, &req.exec_id, req.height, req.width)
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

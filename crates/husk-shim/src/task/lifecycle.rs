//! Creating, starting and deleting containers and execs: the parts of the
//! task service that change what runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::{CreateTaskRequest, DeleteResponse};
use husk_hypervisor::qemu::Qemu;
use husk_runtime::bundle::Bundle;
use husk_runtime::hooks;
use husk_runtime::monitor::error_chain;
use husk_runtime::pod::{self, Membership, Pod};

use super::watch::{watch_exit, watch_oom};
use super::{container_mut, process, process_mut, stdio, TaskService};
use crate::container::{Container, Exit, ProcState, Process};
use crate::error::{self, Result};
use crate::events::{self, topics};
use crate::io::{ProcessIo, DRAIN_TIMEOUT};
use crate::{options, rootfs};

impl TaskService {
    /// Creates container `cid` from its bundle (rootfs already mounted):
    /// boots a pod for it or joins the pod it names. Returns its pid.
    pub(super) async fn create_in_pod(
        &self,
        req: &CreateTaskRequest,
        rootfs: Option<PathBuf>,
    ) -> Result<u32> {
        let inner = &self.inner;
        let cid = req.id.as_str();
        // The runtime options may name the pod's config; else the shim's.
        let cfg = options::config(req.options.as_ref())
            .unwrap_or_else(|| inner.cfg.clone())
            .map_err(error::failed_precondition)?;
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
            init: Process::new(String::new(), paths.clone()),
            execs: HashMap::new(),
            guest_exec_ids: Default::default(),
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
        watch_exit(inner.clone(), pod, cid, "", "");
        Ok(pid)
    }

    pub(super) async fn start_init(&self, cid: &str) -> Result<u32> {
        let inner = &self.inner;
        let pod = inner.pod()?;
        {
            let mut t = inner.lock();
            let c = container_mut(&mut t, cid)?;
            if c.init.state != ProcState::Created || c.init.starting {
                return Err(error::failed_precondition(format!(
                    "container {cid} was already started"
                )));
            }
            c.init.starting = true;
        }
        let started = pod.agent().start_container(cid).await;
        let pid = pod.vm_pid();
        let (deferred, poststart, state) = {
            let mut t = inner.lock();
            let c = container_mut(&mut t, cid)?;
            c.init.starting = false;
            if started.is_ok() && c.init.state == ProcState::Created {
                c.init.state = ProcState::Running;
            }
            (
                c.init.deferred_exit.take(),
                c.hooks.poststart().clone().unwrap_or_default(),
                c.oci_state(cid, pid),
            )
        };
        let publish_exit = |ev: Option<events::TaskExit>| async move {
            if let Some(ev) = ev {
                inner
                    .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
        };
        if let Err(e) = started {
            publish_exit(deferred).await;
            return Err(error::agent(&e));
        }
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
        publish_exit(deferred).await;
        Ok(pid)
    }

    pub(super) async fn start_exec(&self, cid: &str, exec_id: &str) -> Result<u32> {
        let inner = &self.inner;
        let pod = inner.pod()?;
        let (spec, paths, guest_id) = {
            let mut t = inner.lock();
            let p = process_mut(container_mut(&mut t, cid)?, cid, exec_id)?;
            match (p.state, p.spec.take()) {
                (ProcState::Created, Some(spec)) => (spec, p.stdio.clone(), p.guest_id.clone()),
                _ => {
                    return Err(error::failed_precondition(format!(
                        "exec {exec_id} of container {cid} was already started"
                    )))
                }
            }
        };
        let agent = pod.agent();
        if let Err(e) = agent.exec_process(cid, &guest_id, spec.clone()).await {
            if let Some(p) = container_mut(&mut inner.lock(), cid)
                .ok()
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.spec = Some(spec);
            }
            return Err(error::agent(&e));
        }
        let io = match ProcessIo::start(agent, cid, &guest_id, &paths).await {
            Ok(io) => io,
            Err(e) => {
                let _ = agent
                    .signal_process(cid, &guest_id, libc::SIGKILL, false)
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
        // Only now, so its end is never reported before its start (the
        // agent keeps the status until it is asked).
        watch_exit(inner.clone(), pod.clone(), cid, exec_id, &guest_id);
        Ok(pid)
    }

    pub(super) async fn delete_exec(&self, cid: &str, exec_id: &str) -> Result<DeleteResponse> {
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
    pub(super) async fn delete_init(&self, cid: &str) -> Result<DeleteResponse> {
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

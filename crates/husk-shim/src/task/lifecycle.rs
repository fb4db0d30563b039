//! Creating, starting and deleting containers and execs: containerd's
//! calls mapped onto the sandbox's lifecycle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::api::{CreateTaskRequest, DeleteResponse};
use husk_runtime::bundle::Bundle;
use husk_runtime::monitor::error_chain;
use husk_runtime::pod::{self, Membership};
use husk_runtime::sandbox::Exit;
use husk_runtime::sandbox_dir::SandboxDir;

use super::forward::forward_events;
use super::{container_mut, stdio, TaskService};
use crate::container::{Container, Process};
use crate::error::{self, Result};
use crate::events::{self, topics};
use crate::{io, options, rootfs};

fn exit_response(pid: u32, exit: Exit) -> DeleteResponse {
    DeleteResponse {
        pid,
        exit_status: u32::try_from(exit.status.status).unwrap_or(255),
        exited_at: Some(events::timestamp(exit.at)).into(),
        ..Default::default()
    }
}

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
        let (sandbox, owner) = match pod::membership(&bundle.spec) {
            Membership::Owner => {
                if let Some(p) = &inner.lock().sandbox {
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
                let dir = SandboxDir::create(&inner.root, cid)
                    .map_err(|e| error::failed_precondition(error_chain(&e)))?;
                let sandbox = inner
                    .launcher
                    .launch(&cfg, dir, cid, &bundle, &agent_log)
                    .await
                    .map_err(|e| error::sandbox(&e))?;
                {
                    let mut t = inner.lock();
                    t.sandbox = Some(sandbox.clone());
                    t.origin = Some(pod::PodOrigin::of(&bundle.spec));
                }
                forward_events(inner.clone(), &sandbox);
                (sandbox, true)
            }
            Membership::Member { sandbox_id } => {
                let (sandbox, origin) = {
                    let t = inner.lock();
                    (t.sandbox.clone(), t.origin.clone())
                };
                let sandbox = sandbox.filter(|p| p.id() == sandbox_id).ok_or_else(|| {
                    error::not_found(format!("pod {sandbox_id} does not run in this shim"))
                })?;
                if let Some(origin) = origin {
                    origin
                        .admits(&sandbox_id, sandbox.host_pid(), cid, &bundle.spec)
                        .map_err(|e| {
                            tracing::warn!(container = %cid, pod = %sandbox_id, "{e}");
                            error::failed_precondition(e)
                        })?;
                }
                (sandbox, false)
            }
        };
        let opened = io::endpoints(&paths).map_err(|e| error::invalid(error_chain(&e)));
        let created = match opened {
            Ok((endpoints, stop)) => sandbox
                .create(cid, &bundle, endpoints)
                .await
                .map(|()| stop)
                .map_err(|e| error::sandbox(&e)),
            Err(e) => Err(e),
        };
        let stdin_stop = match created {
            Ok(s) => s,
            Err(e) => {
                if owner {
                    sandbox.teardown(false).await;
                    let mut t = inner.lock();
                    t.sandbox = None;
                    t.origin = None;
                }
                return Err(e);
            }
        };
        let mut init = Process::new(paths, true);
        init.stdin_stop = stdin_stop;
        inner.lock().containers.insert(
            cid.to_string(),
            Container {
                bundle: bundle.dir.clone(),
                rootfs,
                init,
                execs: HashMap::new(),
            },
        );
        Ok(sandbox.host_pid())
    }

    pub(super) async fn start_init(&self, cid: &str) -> Result<u32> {
        let inner = &self.inner;
        let sandbox = inner.sandbox()?;
        container_mut(&mut inner.lock(), cid)?;
        inner.begin_start(cid, "");
        let started = sandbox.start(cid).await;
        let pid = sandbox.host_pid();
        if let Err(e) = started {
            inner.end_start(cid, "").await;
            return Err(error::sandbox(&e));
        }
        let ev = events::TaskStart {
            container_id: cid.into(),
            pid,
            ..Default::default()
        };
        inner
            .publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        inner.end_start(cid, "").await;
        Ok(pid)
    }

    pub(super) async fn start_exec(&self, cid: &str, exec_id: &str) -> Result<u32> {
        let inner = &self.inner;
        let sandbox = inner.sandbox()?;
        let (spec, paths) = {
            let mut t = inner.lock();
            let c = container_mut(&mut t, cid)?;
            let p = c.execs.get_mut(exec_id).ok_or_else(|| {
                error::not_found(format!("exec {exec_id} of container {cid} does not exist"))
            })?;
            match p.spec.take() {
                Some(spec) => (spec, p.stdio.clone()),
                None => {
                    return Err(error::failed_precondition(format!(
                        "exec {exec_id} of container {cid} was already started"
                    )))
                }
            }
        };
        let put_back = |spec: Vec<u8>| {
            if let Some(p) = container_mut(&mut inner.lock(), cid)
                .ok()
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.spec = Some(spec);
            }
        };
        let (endpoints, stop) = match io::endpoints(&paths) {
            Ok(x) => x,
            Err(e) => {
                put_back(spec);
                return Err(error::invalid(error_chain(&e)));
            }
        };
        inner.begin_start(cid, exec_id);
        if let Err(e) = sandbox.exec(cid, exec_id, spec.clone(), endpoints).await {
            inner.end_start(cid, exec_id).await;
            put_back(spec);
            return Err(error::sandbox(&e));
        }
        {
            let mut t = inner.lock();
            if let Some(p) = container_mut(&mut t, cid)
                .ok()
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.stdin_stop = stop;
                p.in_sandbox.send_replace(true);
            }
        }
        let pid = sandbox.host_pid();
        let ev = events::TaskExecStarted {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            pid,
            ..Default::default()
        };
        inner
            .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
            .await;
        inner.end_start(cid, exec_id).await;
        Ok(pid)
    }

    pub(super) async fn delete_exec(&self, cid: &str, exec_id: &str) -> Result<DeleteResponse> {
        let sandbox = self.inner.sandbox()?;
        let pid = sandbox.host_pid();
        let started = {
            let t = self.inner.lock();
            let c = super::container(&t, cid)?;
            let p = super::process(c, cid, exec_id)?;
            let b = *p.in_sandbox.borrow();
            b
        };
        let exit = if started {
            sandbox
                .delete_exec(cid, exec_id)
                .await
                .map_err(|e| error::sandbox(&e))?
        } else {
            Exit {
                status: husk_runtime::agent::ExitStatus {
                    status: 0,
                    signal: 0,
                },
                at: std::time::SystemTime::now(),
            }
        };
        if let Ok(c) = container_mut(&mut self.inner.lock(), cid) {
            c.execs.remove(exec_id);
        }
        Ok(exit_response(pid, exit))
    }

    /// Deletes a stopped (or never started) container; the pod's owner
    /// takes the pod, and whatever still runs in it, along.
    pub(super) async fn delete_init(&self, cid: &str) -> Result<DeleteResponse> {
        let inner = &self.inner;
        let sandbox = inner.sandbox()?;
        let pid = sandbox.host_pid();
        super::container(&inner.lock(), cid)?;
        let exit = sandbox
            .delete(cid, false)
            .await
            .map_err(|e| error::sandbox(&e))?;
        let gone: Vec<Container> = {
            let mut t = inner.lock();
            if cid == sandbox.id() {
                // The members went with the VM (the sandbox reported their
                // ends); a later Delete of one finds nothing, which
                // containerd takes as done.
                t.sandbox = None;
                t.origin = None;
                t.containers.drain().map(|(_, c)| c).collect()
            } else {
                t.containers.remove(cid).into_iter().collect()
            }
        };
        for c in gone {
            if let Some(r) = &c.rootfs {
                rootfs::unmount(r);
            }
        }
        let ev = events::TaskDelete {
            container_id: cid.into(),
            pid,
            exit_status: u32::try_from(exit.status.status).unwrap_or(255),
            exited_at: Some(events::timestamp(exit.at)).into(),
            id: cid.into(),
            ..Default::default()
        };
        inner
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(exit_response(pid, exit))
    }
}

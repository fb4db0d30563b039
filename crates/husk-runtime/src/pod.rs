//! A pod: one sandbox VM that several containers share, owned by one
//! long-lived host process (the containerd shim). A container on its own is
//! a pod of one.
//!
//! The pod is the [`Sandbox`] (VM, agent, share, state dir) behind a task
//! that owns it: requests that need the VM itself (creating a container,
//! pause, resume, teardown) go to that task, which also watches the VM
//! process, so a VM that dies is noticed at once ([`Pod::vm_exited`]).
//! Agent calls that only need the connection go straight through
//! [`Pod::agent`].
//!
//! Membership follows the CRI annotations: a container whose
//! `io.kubernetes.cri.container-type` is `container` joins the pod named by
//! `io.kubernetes.cri.sandbox-id`; any other container (the CRI sandbox
//! container, or a container without the annotations) starts a pod of its
//! own, and the pod's VM goes away with it.
//!
//! The pod's state dir (`<root>/<id>`) holds a `state.json` naming the owner
//! process and the VM, so [`cleanup_dead`] can remove what an owner that died
//! left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_hypervisor::{Hypervisor, VmExit};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;
use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::{AgentClient, AgentInfo};
use crate::bundle::Bundle;
use crate::config::Config;
use crate::sandbox::{Sandbox, SandboxError};
use crate::sandbox_dir::{self, SandboxDir, SandboxDirError};
use crate::sizing::{self, SizingError};
use crate::state::{self, ContainerState, StateError, Status};
use crate::translate;

/// `sandbox` for the CRI sandbox (pause) container, `container` for the
/// others of the pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The id of the pod (its sandbox container) a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's memory limit in bytes (set by containerd 1.7 and later).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota and period in µs (set by containerd 1.7 and later).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Dir(#[from] SandboxDirError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error("the VM of pod {0} is gone")]
    Gone(String),
    #[error("cannot unmount {path} from the pod's share: {errno}")]
    Unmount { path: PathBuf, errno: nix::Error },
}

/// Where a container goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// It starts a pod (and a VM) of its own, named by its id.
    Owner,
    /// It joins the running pod `sandbox_id`.
    Member { sandbox_id: String },
}

pub(crate) fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a str> {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Reads a container's place from its spec's CRI annotations.
pub fn membership(spec: &Spec) -> Membership {
    match (
        annotation(spec, CONTAINER_TYPE),
        annotation(spec, SANDBOX_ID),
    ) {
        (Some("container"), Some(sandbox)) => Membership::Member {
            sandbox_id: sandbox.to_string(),
        },
        _ => Membership::Owner,
    }
}

/// The id of the pod a container (`cid`, with `spec`) belongs to.
pub fn pod_id(cid: &str, spec: &Spec) -> String {
    match membership(spec) {
        Membership::Owner => cid.to_string(),
        Membership::Member { sandbox_id } => sandbox_id,
    }
}

/// Requests served by the task that owns the sandbox.
enum Request {
    Create {
        cid: String,
        bundle: Box<Bundle>,
        reply: oneshot::Sender<Result<(), SandboxError>>,
    },
    Pause(oneshot::Sender<Result<(), SandboxError>>),
    Resume(oneshot::Sender<Result<(), SandboxError>>),
    Teardown(oneshot::Sender<()>),
}

pub struct Pod {
    id: String,
    dir: PathBuf,
    share_dir: PathBuf,
    agent: AgentClient,
    info: AgentInfo,
    vm_pid: u32,
    requests: mpsc::Sender<Request>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    /// Each container's bind targets in the share, deepest last.
    binds: Mutex<HashMap<String, Vec<PathBuf>>>,
    state: Mutex<ContainerState>,
}

impl Pod {
    /// Boots the pod `id` in `<root>/<id>`, sized for its owner `owner`
    /// (whose bundle is `bundle_dir`), and records this process as its
    /// owner. On error nothing of it remains.
    pub async fn start(
        cfg: &Config,
        hv: &dyn Hypervisor,
        root: &Path,
        id: &str,
        owner: &Bundle,
        agent_log: &str,
    ) -> Result<Pod, PodError> {
        let cfg = sizing::vm_config(cfg, &owner.spec, &sizing::Host::probe())?;
        let dir = SandboxDir::create(root, id)?;
        let dir_path = dir.path().to_path_buf();
        let me = std::process::id() as i32;
        let mut st = ContainerState {
            id: id.to_string(),
            bundle: owner.dir.clone(),
            rootfs: owner.rootfs.clone(),
            status: Status::Creating,
            pid: me,
            pid_start_time: state::process_start_time(me).unwrap_or(0),
            created: state::now_rfc3339(),
            annotations: Default::default(),
            owner: String::new(),
            exit_status: None,
            vm_pid: None,
        };
        // A failed save leaves `dir` to its Drop, which removes it.
        st.save(&dir_path)?;
        let t0 = Instant::now();
        let sandbox = Sandbox::start(&cfg, hv, dir, id, agent_log).await?;
        st.vm_pid = Some(sandbox.vm_pid());
        st.status = Status::Running;
        if let Err(e) = st.save(&dir_path) {
            sandbox.teardown().await;
            return Err(e.into());
        }
        tracing::info!(
            target: "husk_timing",
            pod_boot_ms = t0.elapsed().as_secs_f64() * 1e3,
            vcpus = cfg.hypervisor.vcpus,
            memory_mib = cfg.hypervisor.memory_mib,
            "pod ready"
        );
        let (tx, rx) = mpsc::channel(8);
        let (exit_tx, exit_rx) = watch::channel(None);
        let pod = Pod {
            id: id.to_string(),
            dir: dir_path,
            share_dir: sandbox.dir().share(),
            agent: sandbox.agent().clone(),
            info: sandbox.info().clone(),
            vm_pid: sandbox.vm_pid(),
            requests: tx,
            vm_exit: exit_rx,
            binds: Mutex::new(HashMap::new()),
            state: Mutex::new(st),
        };
        tokio::spawn(own(sandbox, rx, exit_tx));
        Ok(pod)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Host pid of the VM's hypervisor process.
    pub fn vm_pid(&self) -> u32 {
        self.vm_pid
    }

    /// `Some` once the VM has exited.
    pub fn vm_exited(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm_exit.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, PodError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .await
            .map_err(|_| PodError::Gone(self.id.clone()))?;
        rx.await.map_err(|_| PodError::Gone(self.id.clone()))
    }

    /// Shares `bundle`'s rootfs and bind sources into the running VM and has
    /// the agent build container `cid` (its init held before exec).
    pub async fn create_container(&self, cid: &str, bundle: &Bundle) -> Result<(), PodError> {
        let targets: Vec<PathBuf> =
            translate::guest_spec(&bundle.spec, cid, &bundle.dir, &bundle.rootfs)
                .binds
                .iter()
                .map(|b| self.share_dir.join(&b.share_path))
                .collect();
        let t0 = Instant::now();
        let created = self
            .ask(|reply| Request::Create {
                cid: cid.to_string(),
                bundle: Box::new(bundle.clone()),
                reply,
            })
            .await;
        if !matches!(created, Ok(Ok(()))) {
            // Release what was bound before the failure (the rest was
            // never mounted, and unbind() leaves it alone).
            for t in targets.iter().rev() {
                let _ = unbind(t);
            }
        }
        created??;
        tracing::info!(
            target: "husk_timing",
            create_ms = t0.elapsed().as_secs_f64() * 1e3,
            "container created"
        );
        self.binds
            .lock()
            .expect("binds lock")
            .insert(cid.to_string(), targets);
        Ok(())
    }

    /// Has the agent remove container `cid` (killing what still runs) and
    /// unmounts its rootfs and bind sources from the share, so they are
    /// released while the pod lives on.
    pub async fn remove_container(&self, cid: &str) -> Result<(), PodError> {
        if self.vm_exit.borrow().is_none() {
            if let Err(e) = self.agent.remove_container(cid).await {
                tracing::warn!(container = cid, error = %e, "removing the container in the guest");
            }
        }
        let targets = self
            .binds
            .lock()
            .expect("binds lock")
            .remove(cid)
            .unwrap_or_default();
        let mut first_err = None;
        for t in targets.iter().rev() {
            if let Err(errno) = unbind(t) {
                first_err.get_or_insert(PodError::Unmount {
                    path: t.clone(),
                    errno,
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Freezes the whole VM (every container of the pod).
    pub async fn pause(&self) -> Result<(), PodError> {
        self.ask(Request::Pause).await??;
        self.set_status(Status::Paused);
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), PodError> {
        self.ask(Request::Resume).await??;
        self.set_status(Status::Running);
        Ok(())
    }

    fn set_status(&self, status: Status) {
        let mut st = self.state.lock().expect("state lock");
        st.status = status;
        if let Err(e) = st.save(&self.dir) {
            tracing::warn!(error = %e, "saving the pod state");
        }
    }

    /// Stops the VM and removes every host-side trace of the pod (the share's
    /// teardown unmounts what the containers still hold). Idempotent.
    pub async fn teardown(&self) {
        let t0 = Instant::now();
        if self.ask(Request::Teardown).await.is_ok() {
            tracing::info!(
                target: "husk_timing",
                teardown_ms = t0.elapsed().as_secs_f64() * 1e3,
                "pod removed"
            );
        }
    }
}

/// Detaches the bind at `target` and puts an empty self-bind of the mount
/// point in its place: what the container shared is released now, and the
/// share's own teardown, which unmounts every bind it made, still finds a
/// mount there to remove.
fn unbind(target: &Path) -> Result<(), nix::Error> {
    umount2(target, MntFlags::MNT_DETACH)?;
    mount(
        Some(target),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// The task that owns the sandbox: serves requests, notices the VM's exit,
/// tears the sandbox down on request (or when every [`Pod`] handle is gone).
async fn own(
    mut sandbox: Sandbox,
    mut requests: mpsc::Receiver<Request>,
    vm_exit: watch::Sender<Option<VmExit>>,
) {
    let mut exited = false;
    loop {
        tokio::select! {
            exit = sandbox.wait_vm(), if !exited => {
                tracing::warn!(%exit, "the pod's VM exited");
                exited = true;
                let _ = vm_exit.send(Some(exit));
            }
            req = requests.recv() => match req {
                Some(Request::Create { cid, bundle, reply }) => {
                    let _ = reply.send(sandbox.create_container(&cid, &bundle).await);
                }
                Some(Request::Pause(reply)) => {
                    let _ = reply.send(sandbox.pause().await);
                }
                Some(Request::Resume(reply)) => {
                    let _ = reply.send(sandbox.resume().await);
                }
                Some(Request::Teardown(reply)) => {
                    sandbox.teardown().await;
                    let _ = reply.send(());
                    return;
                }
                None => {
                    sandbox.teardown().await;
                    return;
                }
            }
        }
    }
}

/// What [`cleanup_dead`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// No state dir: nothing to do.
    Absent,
    /// The owner still runs; it owns the pod and nothing was touched.
    OwnerAlive(i32),
    /// The owner was gone; its leftovers were removed.
    Removed,
}

/// Removes what the dead owner of pod `id` (in `<root>/<id>`) left behind:
/// the VM and virtiofsd if they still run (they die with their owner, so
/// normally they are gone), and the state dir. The share's bind mounts
/// lived in the owner's private mount namespace and went with it; only
/// their empty mount points are removed, never content.
pub fn cleanup_dead(root: &Path, id: &str) -> Result<Cleanup, PodError> {
    sandbox_dir::validate_id(id)?;
    let dir = root.join(id);
    if !dir.is_dir() {
        return Ok(Cleanup::Absent);
    }
    match ContainerState::load(&dir, id) {
        Ok(st) => {
            if st.monitor_alive() {
                return Ok(Cleanup::OwnerAlive(st.pid));
            }
            if let Some(pid) = st.vm_pid {
                kill_if_mentions(pid as i32, &dir);
            }
        }
        // No or unreadable state: the owner died while creating it.
        Err(e) => tracing::debug!(error = %e, "pod state"),
    }
    if let Ok(pid) = std::fs::read_to_string(dir.join("virtiofsd.sock.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            kill_if_mentions(pid, &dir);
        }
    }
    sandbox_dir::remove_leftovers(&dir);
    Ok(Cleanup::Removed)
}

/// SIGKILLs `pid` if its command line names `dir` (so a recycled pid is
/// left alone), and waits a moment for it to go.
fn kill_if_mentions(pid: i32, dir: &Path) {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = dir.to_string_lossy();
    if !String::from_utf8_lossy(&cmd).contains(needle.as_ref()) {
        return;
    }
    tracing::info!(pid, "killing a process the dead pod owner left");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let t0 = Instant::now();
    while state::process_start_time(pid).is_some() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::tests::spec;

    #[test]
    fn membership_follows_the_cri_annotations() {
        let none = spec(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(membership(&none), Membership::Owner);
        assert_eq!(pod_id("c1", &none), "c1");
        let sandbox = spec(
            serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}),
            serde_json::json!({}),
        );
        assert_eq!(membership(&sandbox), Membership::Owner);
        assert_eq!(pod_id("p1", &sandbox), "p1");
        let member = spec(
            serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}),
            serde_json::json!({}),
        );
        assert_eq!(
            membership(&member),
            Membership::Member {
                sandbox_id: "p1".into()
            }
        );
        assert_eq!(pod_id("c2", &member), "p1");
        // A member that does not say which pod is a pod of its own.
        let lost = spec(
            serde_json::json!({CONTAINER_TYPE: "container"}),
            serde_json::json!({}),
        );
        assert_eq!(membership(&lost), Membership::Owner);
    }

    #[test]
    fn cleanup_leaves_a_live_owner_alone() {
        let root = std::env::temp_dir().join(format!("husk-pod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::Absent);
        let dir = root.join("p");
        std::fs::create_dir_all(dir.join("share/c/rootfs")).unwrap();
        let me = std::process::id() as i32;
        let mut st = ContainerState {
            id: "p".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Running,
            pid: me,
            pid_start_time: state::process_start_time(me).unwrap(),
            created: state::now_rfc3339(),
            annotations: Default::default(),
            owner: String::new(),
            exit_status: None,
            vm_pid: None,
        };
        st.save(&dir).unwrap();
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::OwnerAlive(me));
        assert!(dir.join("share/c/rootfs").is_dir());
        // A dead owner (another start time): everything goes.
        st.pid_start_time += 1;
        st.save(&dir).unwrap();
        std::fs::write(dir.join("console.log"), "x").unwrap();
        assert_eq!(cleanup_dead(&root, "p").unwrap(), Cleanup::Removed);
        assert!(!dir.exists());
        std::fs::remove_dir(&root).unwrap();
    }
}

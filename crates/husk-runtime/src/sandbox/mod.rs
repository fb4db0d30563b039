//! The one container lifecycle, shared by the CLI's sandbox monitor and the
//! containerd shim: a [`Sandbox`] is one VM holding containers, each with
//! one status state machine ([`crate::status`]).
//!
//! The sandbox owns every host resource of the VM (the VM process through
//! [`vm::VmOwner`], the agent connection, the share's binds, the state
//! dir) and is the one place for the create/start/kill/pause/exec/delete
//! policy, the OCI hooks, the stdio relays and the teardown. The CLI's
//! monitor is a sandbox of one container; the shim's task service adapts
//! containerd's task API to it; neither keeps lifecycle rules of its own.
//!
//! The container whose id is the sandbox's id is its owner: deleting it
//! takes the VM, and every other container still in it, along. Its record
//! (`state.json` in the sandbox dir) follows its status.
//!
//! Everything the guest reports is checked: exits and OOM kills are taken
//! only for containers the sandbox holds, OOM events are rate-limited, and
//! a VM that dies ends every process it held (status 255) at once.

pub(crate) mod boot;
mod container;
pub mod fake;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
pub mod vm;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use husk_hypervisor::{Vm, VmExit};
use husk_protocol::{GUEST_SHARE_DIR, SHARE_TAG};
use oci_spec::runtime::Hooks;
use tokio::io::AsyncWrite;
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

pub use boot::boot;
pub use container::Exit;

use crate::agent::{AgentClient, AgentError, AgentInfo, Call, ExitStatus, ProcessInfo, Stats};
use crate::bundle::Bundle;
use crate::hooks::{self, HookError};
use crate::sandbox_dir::{validate_id, SandboxDir, SandboxDirError};
use crate::share::ShareError;
use crate::state::ContainerState;
use crate::status::{Status, Verb};
use crate::translate::{self, ShareBind};
use container::{Container, Process, Relays};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Dir(#[from] SandboxDirError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Translate(#[from] crate::translate::TranslateError),
    #[error(transparent)]
    Hypervisor(#[from] husk_hypervisor::HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    HostCgroup(#[from] crate::host_cgroup::HostCgroupError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("virtiofsd not found (searched $PATH, /usr/local/bin, /usr/libexec, /usr/lib/qemu, ~/.cargo/bin): install it with `cargo install virtiofsd` (make setup) or set shared_fs.virtiofsd to its path; or share over 9p with shared_fs.kind = \"9p\" in the husk config (QEMU then stays root)")]
    NoVirtiofsd,
    #[error("the VM died ({exit}) {when}; last guest console lines:\n{console}")]
    VmDied {
        exit: VmExit,
        when: &'static str,
        console: String,
    },
    #[error("the VM of sandbox {0} is gone")]
    Gone(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("process {exec_id} of container {cid} does not exist")]
    NoProcess { cid: String, exec_id: String },
    #[error("exec {exec_id} of container {cid} already exists")]
    ExecExists { cid: String, exec_id: String },
    #[error("process {} of container {cid} has already exited", if exec_id.is_empty() { "init" } else { exec_id })]
    Finished { cid: String, exec_id: String },
    #[error("exec {exec_id} of container {cid} is running: kill it before deleting it")]
    ExecRunning { cid: String, exec_id: String },
    /// The container's status does not allow the verb (the message says
    /// which and what to do).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Sizing(#[from] crate::sizing::SizingError),
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    #[error("cannot encode the guest spec")]
    Encode(#[from] serde_json::Error),
}

/// The last lines of the guest console, for error messages.
pub fn console_tail(dir: &SandboxDir) -> String {
    let t = husk_hypervisor::log_tail(&dir.console_log(), 1500);
    if t.is_empty() {
        "(the console log is empty)".into()
    } else {
        t
    }
}

/// The share's per-container bind mounts (the real one is
/// [`crate::share::Share`]; unit tests use a recording fake).
pub trait ShareBinds: Send {
    /// Binds `binds` for container `cid`; on error nothing of it stays.
    fn bind_container(&mut self, cid: &str, binds: &[ShareBind]) -> Result<(), ShareError>;
    /// Releases container `cid`'s binds now; the share lives on.
    fn unbind_container(&mut self, cid: &str) -> Result<(), ShareError>;
    /// Unmounts everything and removes what was created.
    fn teardown(&mut self);
}

/// What a booted VM is made of ([`boot()`] makes them; tests fake them).
pub struct Parts {
    pub vm: Box<dyn Vm>,
    pub agent: AgentClient,
    pub share: Box<dyn ShareBinds>,
    pub dir: SandboxDir,
    pub info: AgentInfo,
    /// The guest driver of the share ("virtiofs" or "9p").
    pub shared_fs: &'static str,
    /// The host cgroup QEMU, virtiofsd and this process run in.
    pub host_cgroup: Option<crate::host_cgroup::HostCgroup>,
    /// The owner's network namespace carried into the VM.
    pub network: Option<crate::net::HostNetwork>,
    /// What the guest is to be told of it, with the owner's CreateContainer.
    pub guest_network: Option<crate::net::GuestNetwork>,
}

/// Something that happened to a container, for the front ends (the shim
/// passes these on to containerd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Exited {
        cid: String,
        exec_id: String,
        exit: Exit,
    },
    Oom {
        cid: String,
    },
}

type Output = Box<dyn AsyncWrite + Send + Unpin>;

/// A process's host-side endpoints.
pub struct Stdio {
    /// Read on a plain thread and written to the process's stdin; `None`
    /// closes its stdin at once (unless it has a terminal: that would type
    /// ^D into it).
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: Output,
    pub stderr: Output,
    pub terminal: bool,
}

impl Stdio {
    /// No input, output drained and dropped.
    pub fn null() -> Stdio {
        Stdio {
            stdin: None,
            stdout: Box::new(tokio::io::sink()),
            stderr: Box::new(tokio::io::sink()),
            terminal: false,
        }
    }
}

/// How long output may keep arriving after a process exited.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `delete --force` waits for a killed container to end.
pub const KILL_WAIT: Duration = Duration::from_secs(10);
/// OOM events taken per second (a burst of as many); more are dropped.
pub const OOM_EVENTS_PER_SEC: u32 = 10;

/// The pid that stands for the sandbox's containers on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPid {
    /// This process (the CLI's monitor, which lives as long as the init).
    Owner,
    /// The VM's hypervisor process (the shim: one pid per pod).
    Vm,
}

pub struct Sandbox {
    id: String,
    dir_path: PathBuf,
    agent: AgentClient,
    info: AgentInfo,
    shared_fs: &'static str,
    vm: vm::VmOwner,
    host_pid: u32,
    share: Mutex<Box<dyn ShareBinds>>,
    state_dir: Mutex<Option<SandboxDir>>,
    containers: Mutex<HashMap<String, Container>>,
    record: Mutex<ContainerState>,
    events: broadcast::Sender<Event>,
    /// 0: up; 1: tearing down; 2: gone.
    torn_down: watch::Sender<u8>,
    /// The owner is being deleted through the lifecycle (not ending on its own).
    deleting: watch::Sender<bool>,
    host_cgroup: Mutex<Option<crate::host_cgroup::HostCgroup>>,
    network: Mutex<Option<crate::net::HostNetwork>>,
    /// Told to the guest with the owner's CreateContainer.
    guest_network: Mutex<Option<crate::net::GuestNetwork>>,
}

impl Sandbox {
    /// Puts `parts` to work as sandbox `record.id`; `record` is its owner's
    /// persisted state (pid, VM pid and status are kept up to date).
    pub fn new(parts: Parts, mut record: ContainerState, host_pid: HostPid) -> Arc<Sandbox> {
        let vm = vm::VmOwner::spawn(parts.vm);
        record.vm_pid = Some(vm.pid());
        let host_pid = match host_pid {
            HostPid::Owner => u32::try_from(record.pid).unwrap_or(0),
            HostPid::Vm => vm.pid(),
        };
        let sandbox = Arc::new(Sandbox {
            id: record.id.clone(),
            dir_path: parts.dir.path().to_path_buf(),
            agent: parts.agent,
            info: parts.info,
            shared_fs: parts.shared_fs,
            vm,
            host_pid,
            share: Mutex::new(parts.share),
            state_dir: Mutex::new(Some(parts.dir)),
            containers: Mutex::new(HashMap::new()),
            record: Mutex::new(record),
            events: broadcast::channel(256).0,
            torn_down: watch::channel(0).0,
            deleting: watch::channel(false).0,
            host_cgroup: Mutex::new(parts.host_cgroup),
            network: Mutex::new(parts.network),
            guest_network: Mutex::new(parts.guest_network),
        });
        sandbox.save_record();
        tokio::spawn(watch_vm(Arc::downgrade(&sandbox), sandbox.vm.exit()));
        tokio::spawn(watch_oom(Arc::downgrade(&sandbox), sandbox.agent.clone()));
        sandbox
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }
    /// The hypervisor's host pid.
    pub fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }
    /// The host pid that stands for the containers (see [`HostPid`]).
    pub fn host_pid(&self) -> u32 {
        self.host_pid
    }
    /// `Some` once the VM has exited.
    pub fn vm_exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm.exit()
    }
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
    /// Whether [`Self::teardown`] has finished.
    pub fn is_torn_down(&self) -> bool {
        *self.torn_down.borrow() == 2
    }
    /// True once the owner's deletion began.
    pub fn deleting(&self) -> watch::Receiver<bool> {
        self.deleting.subscribe()
    }
    pub fn is_deleting(&self) -> bool {
        *self.deleting.borrow()
    }
    /// Waits (at most [`DRAIN_TIMEOUT`]) until the output of `cid`'s
    /// processes is relayed.
    pub async fn drain(&self, cid: &str) {
        let relays = self.with(cid, |c| c.take_relays()).unwrap_or_default();
        for r in relays {
            r.finish(DRAIN_TIMEOUT).await;
        }
    }
    pub fn container_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
    pub fn holds(&self, cid: &str) -> bool {
        self.lock().contains_key(cid)
    }
    pub fn status(&self, cid: &str) -> Result<Status, SandboxError> {
        self.with(cid, |c| c.status)
    }
    pub fn oom_killed(&self, cid: &str) -> Result<bool, SandboxError> {
        self.with(cid, |c| c.oom_killed)
    }
    /// The end of `(cid, exec_id)`, once it has one.
    pub fn exited(&self, cid: &str, exec_id: &str) -> Result<Option<Exit>, SandboxError> {
        self.with_process(cid, exec_id, |p| p.exited())
    }
    /// Follows the end of `(cid, exec_id)`.
    pub fn wait(
        &self,
        cid: &str,
        exec_id: &str,
    ) -> Result<watch::Receiver<Option<Exit>>, SandboxError> {
        self.with_process(cid, exec_id, |p| p.exit.subscribe())
    }
    /// The container's OCI state (what hooks get), with the host pid.
    pub fn oci_state(&self, cid: &str) -> Result<serde_json::Value, SandboxError> {
        self.with(cid, |c| c.oci_state(cid, self.host_pid))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(&self, cid: &str, f: impl FnOnce(&mut Container) -> T) -> Result<T, SandboxError> {
        self.lock()
            .get_mut(cid)
            .map(f)
            .ok_or_else(|| SandboxError::NotFound(cid.to_string()))
    }

    fn with_process<T>(
        &self,
        cid: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Process) -> T,
    ) -> Result<T, SandboxError> {
        self.with(cid, |c| c.process_mut(exec_id).map(f))?
            .ok_or_else(|| SandboxError::NoProcess {
                cid: cid.into(),
                exec_id: exec_id.into(),
            })
    }

    /// Checks that `verb` is allowed now; returns the status.
    fn check(&self, cid: &str, verb: Verb) -> Result<Status, SandboxError> {
        let s = self.status(cid)?;
        if s.allows(verb) {
            Ok(s)
        } else {
            Err(SandboxError::Refused(s.refusal(verb, cid)))
        }
    }

    fn set_status(&self, cid: &str, status: Status) {
        let _ = self.with(cid, |c| c.status = status);
        if cid == self.id {
            self.record_mut(|r| r.status = status);
        }
    }

    fn record_mut(&self, f: impl FnOnce(&mut ContainerState)) {
        f(&mut self.record.lock().unwrap_or_else(|e| e.into_inner()));
        self.save_record();
    }

    /// The owner's persisted state.
    pub fn record(&self) -> ContainerState {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn save_record(&self) {
        // Held across the write: teardown takes the dir under this lock
        // before removing it, so a save never races the removal (it left
        // `.state.json.tmp` in a half-removed dir when the VM died during a
        // status change; caught by the leak guard in
        // run_vm_root::vm_killed_qemu_is_reported_and_cleaned_up).
        let dir = self.state_dir.lock().unwrap_or_else(|e| e.into_inner());
        if dir.is_none() {
            return;
        }
        if let Err(e) = self.record().save(&self.dir_path) {
            tracing::error!("{}", crate::monitor::error_chain(&e));
        }
        drop(dir);
    }

    fn alive(&self) -> Result<(), SandboxError> {
        if self.vm.exited().is_some() || *self.torn_down.borrow() != 0 {
            return Err(SandboxError::Gone(self.id.clone()));
        }
        Ok(())
    }

    /// Runs `fut` (a call to the agent) unless the VM dies first.
    pub async fn while_alive<T, F>(&self, when: &'static str, fut: F) -> Result<T, SandboxError>
    where
        F: std::future::Future<Output = Result<T, AgentError>>,
    {
        let mut exit = self.vm.exit();
        let died = |exit: VmExit| SandboxError::VmDied {
            exit,
            when,
            console: self.console_tail(),
        };
        let r = tokio::select! {
            // An answer that is there counts even if the VM is gone too.
            biased;
            r = fut => r.map_err(SandboxError::from),
            e = exit.wait_for(Option::is_some) => match e {
                Ok(e) => return Err(died(e.clone().expect("waited for Some"))),
                Err(_) => Err(SandboxError::Gone(self.id.clone())),
            },
        };
        // A VM that dies breaks the agent connection, and that may be seen
        // first: name the cause, not the symptom.
        if let Err(SandboxError::Agent(AgentError::Unavailable(_))) = &r {
            if let Ok(Ok(e)) =
                tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some)).await
            {
                return Err(died(e.clone().expect("waited for Some")));
            }
        }
        r
    }

    /// The last lines of the guest console (while the sandbox dir exists).
    pub fn console_tail(&self) -> String {
        match &*self.state_dir.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(d) => console_tail(d),
            None => "(the sandbox dir is gone)".into(),
        }
    }

    /// Shares `bundle`'s rootfs and bind sources with the guest, has the
    /// agent build container `cid` (its init held before exec), wires the
    /// init's stdio and runs the createRuntime hooks. On error nothing of
    /// the container is left.
    #[tracing::instrument(target = "husk_timing", name = "create", skip_all, fields(container = cid))]
    pub async fn create(
        self: &Arc<Self>,
        cid: &str,
        bundle: &Bundle,
        stdio: Stdio,
    ) -> Result<(), SandboxError> {
        validate_id(cid)?;
        self.alive()?;
        let hooks = bundle.spec.hooks().clone().unwrap_or_default();
        {
            let mut map = self.lock();
            if map.contains_key(cid) {
                return Err(SandboxError::Exists(cid.to_string()));
            }
            let annotations = bundle.spec.annotations().clone().unwrap_or_default();
            map.insert(
                cid.to_string(),
                Container::new(bundle.dir.clone(), hooks.clone(), annotations),
            );
        }
        if cid == self.id {
            let poststop = hooks.poststop().clone().unwrap_or_default();
            self.record_mut(|r| r.poststop = poststop);
        }
        let r = self.create_in_guest(cid, bundle, stdio, &hooks).await;
        if let Err(e) = &r {
            tracing::debug!(container = cid, "create failed: {e}");
            self.forget(cid, true).await;
            return r;
        }
        self.set_status(cid, Status::Created);
        Ok(())
    }

    async fn create_in_guest(
        self: &Arc<Self>,
        cid: &str,
        bundle: &Bundle,
        stdio: Stdio,
        hooks: &Hooks,
    ) -> Result<(), SandboxError> {
        let guest = translate::guest_spec(&bundle.spec, cid, &bundle.dir, &bundle.rootfs)?;
        self.share
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bind_container(cid, &guest.binds)?;
        let call = Call::CreateContainer {
            cid: cid.to_string(),
            spec_json: serde_json::to_vec(&guest.spec)?,
            storages: vec![crate::agent::Storage {
                driver: self.shared_fs.to_string(),
                source: SHARE_TAG.to_string(),
                mount_point: GUEST_SHARE_DIR.to_string(),
            }],
        };
        self.while_alive("while creating the container", self.agent.done(call))
            .await?;
        if cid == self.id {
            let pending = self
                .guest_network
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(net) = pending.filter(|n| !n.is_empty()) {
                self.configure_network(cid, net).await?;
            }
        }
        let relays = self.relays(cid, "", stdio).await;
        self.with(cid, |c| c.init.relays = Some(relays))?;
        self.spawn_waiter(cid, "", "");
        if hooks.create_container().is_some() || hooks.start_container().is_some() {
            tracing::warn!("createContainer and startContainer hooks are not run: they belong in the container's namespaces, inside the VM, where host hook binaries do not exist");
        }
        let mut create_hooks = hooks.prestart().clone().unwrap_or_default();
        create_hooks.extend(hooks.create_runtime().clone().unwrap_or_default());
        if !create_hooks.is_empty() {
            self.set_status(cid, Status::Created);
            hooks::run("createRuntime", &create_hooks, &self.oci_state(cid)?).await?;
        }
        Ok(())
    }

    /// Tells the agent the network of container `cid`'s namespace.
    async fn configure_network(
        &self,
        cid: &str,
        network: crate::net::GuestNetwork,
    ) -> Result<(), SandboxError> {
        let call = Call::ConfigureNetwork {
            cid: cid.to_string(),
            network,
        };
        self.while_alive("while configuring the network", self.agent.done(call))
            .await
    }

    /// Carries interfaces that appeared in the owner's network namespace
    /// since boot (a createRuntime hook made them) to the spare NIC.
    async fn connect_late_network(&self) -> Result<(), SandboxError> {
        let net = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut net) = net else { return Ok(()) };
        if !net.has_spare() {
            *self.network.lock().unwrap_or_else(|e| e.into_inner()) = Some(net);
            return Ok(());
        }
        let (net, found) = tokio::task::spawn_blocking(move || {
            let r = net.connect_late();
            (net, r)
        })
        .await
        .map_err(|e| SandboxError::Network(crate::net::NetError::Io(std::io::Error::other(e))))?;
        *self.network.lock().unwrap_or_else(|e| e.into_inner()) = Some(net);
        let found = found?;
        if !found.is_empty() {
            self.configure_network(&self.id, found).await?;
        }
        Ok(())
    }

    /// Starts the relays of `(cid, guest_id)` to `stdio`.
    async fn relays(&self, cid: &str, guest_id: &str, stdio: Stdio) -> Relays {
        use crate::agent::Stream;
        use crate::stdio::{relay_input, relay_output};
        let input = match stdio.stdin {
            Some(r) => Some(relay_input(
                self.agent.clone(),
                cid.into(),
                guest_id.into(),
                r,
            )),
            None => {
                if !stdio.terminal {
                    let call = Call::CloseStdin {
                        cid: cid.into(),
                        exec_id: guest_id.into(),
                    };
                    if let Err(e) = self.agent.done(call).await {
                        tracing::debug!(error = %e, "closing an unused stdin");
                    }
                }
                None
            }
        };
        Relays {
            out: Some(relay_output(
                self.agent.clone(),
                cid.into(),
                guest_id.into(),
                Stream::Stdout,
                stdio.stdout,
            )),
            err: Some(relay_output(
                self.agent.clone(),
                cid.into(),
                guest_id.into(),
                Stream::Stderr,
                stdio.stderr,
            )),
            input,
        }
    }

    /// Waits in the guest for the end of `(cid, exec_id)` (`guest_id` to
    /// the agent) and records it. A lost agent ends it with status 255.
    fn spawn_waiter(self: &Arc<Self>, cid: &str, exec_id: &str, guest_id: &str) {
        let me = Arc::downgrade(self);
        let agent = self.agent.clone();
        let (cid, exec_id, guest_id) = (cid.to_string(), exec_id.to_string(), guest_id.to_string());
        tokio::spawn(async move {
            let status = match agent.wait_process(&cid, &guest_id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(container = %cid, exec = %exec_id, "lost the process: {e}");
                    ExitStatus::LOST
                }
            };
            if let Some(me) = me.upgrade() {
                me.record_exit(&cid, &exec_id, status);
            }
        });
    }

    /// Records that `(cid, exec_id)` ended, unless its end was already
    /// recorded or the sandbox does not hold it.
    fn record_exit(&self, cid: &str, exec_id: &str, status: ExitStatus) {
        let exit = {
            let mut map = self.lock();
            let Some(c) = map.get_mut(cid) else {
                tracing::debug!(
                    container = cid,
                    "an exit for a container this sandbox does not hold"
                );
                return;
            };
            let Some(exit) = c.process(exec_id).and_then(|p| p.set_exited(status)) else {
                return;
            };
            if exec_id.is_empty() {
                c.status = Status::Stopped;
            }
            exit
        };
        tracing::info!(
            container = cid,
            exec = exec_id,
            status = status.status,
            "process exited"
        );
        if exec_id.is_empty() && cid == self.id {
            self.record_mut(|r| {
                r.status = Status::Stopped;
                r.exit_status = Some(status.status);
            });
        }
        let _ = self.events.send(Event::Exited {
            cid: cid.into(),
            exec_id: exec_id.into(),
            exit,
        });
    }

    /// Releases the container's init; runs the poststart hooks.
    #[tracing::instrument(target = "husk_timing", name = "start", skip_all, fields(container = cid))]
    pub async fn start(&self, cid: &str) -> Result<(), SandboxError> {
        self.with(cid, |c| {
            if c.status.can_start() && !c.starting {
                c.starting = true;
                Ok(())
            } else {
                let s = if c.starting {
                    Status::Running
                } else {
                    c.status
                };
                Err(SandboxError::Refused(s.refusal(Verb::Start, cid)))
            }
        })??;
        let r = async {
            if cid == self.id {
                self.connect_late_network().await?;
            }
            let call = Call::StartContainer { cid: cid.into() };
            self.while_alive("while starting the container", self.agent.done(call))
                .await
        }
        .await;
        let hooks = self.with(cid, |c| {
            c.starting = false;
            if r.is_ok() && c.status == Status::Created {
                c.status = Status::Running;
            }
            c.hooks.poststart().clone().unwrap_or_default()
        })?;
        r?;
        if cid == self.id {
            self.record_mut(|rec| {
                if rec.status == Status::Created {
                    rec.status = Status::Running
                }
            });
        }
        if !hooks.is_empty() {
            hooks::run_logged("poststart", &hooks, &self.oci_state(cid)?).await;
        }
        Ok(())
    }

    /// Signals the init (`exec_id` empty) or an exec; `all` signals every
    /// process of the container. A paused container keeps the signal
    /// pending until it is resumed (SIGKILL ends it at once).
    pub async fn kill(
        &self,
        cid: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let guest_id = self.with(cid, |c| {
            let p = c.process(exec_id).ok_or_else(|| SandboxError::NoProcess {
                cid: cid.into(),
                exec_id: exec_id.into(),
            })?;
            if p.exited().is_some() || !c.status.can_kill() {
                return Err(SandboxError::Finished {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                });
            }
            Ok(p.guest_id.clone())
        })??;
        let sent = self
            .while_alive(
                "while signalling",
                self.agent.signal(cid, &guest_id, signal, all),
            )
            .await;
        match sent {
            // The signal ended the process, and with it the sandbox, before
            // the agent's answer came back: it was delivered.
            Err(SandboxError::VmDied { .. } | SandboxError::Gone(_))
                if self
                    .with(cid, |c| {
                        c.process(exec_id).and_then(|p| p.exited()).is_some()
                    })
                    .unwrap_or(false) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// Freezes the container's processes.
    pub async fn pause(&self, cid: &str) -> Result<(), SandboxError> {
        self.check(cid, Verb::Pause)?;
        let call = Call::PauseContainer { cid: cid.into() };
        self.while_alive("while pausing", self.agent.done(call))
            .await?;
        self.set_status(cid, Status::Paused);
        Ok(())
    }

    pub async fn resume(&self, cid: &str) -> Result<(), SandboxError> {
        self.check(cid, Verb::Resume)?;
        let call = Call::ResumeContainer { cid: cid.into() };
        self.while_alive("while resuming", self.agent.done(call))
            .await?;
        // The init may have ended meanwhile (a pending SIGKILL).
        if self.status(cid)? == Status::Paused {
            self.set_status(cid, Status::Running);
        }
        Ok(())
    }

    /// Runs `process_json` (an OCI process) in the running container as
    /// `exec_id`, wired to `stdio`.
    pub async fn exec(
        self: &Arc<Self>,
        cid: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), SandboxError> {
        if exec_id.is_empty() {
            return Err(SandboxError::Refused(format!(
                "an exec in container {cid} needs an id"
            )));
        }
        let guest_id = self.with(cid, |c| {
            if !c.status.can_exec() {
                return Err(SandboxError::Refused(c.status.refusal(Verb::Exec, cid)));
            }
            if c.execs.contains_key(exec_id) {
                return Err(SandboxError::ExecExists {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                });
            }
            let guest_id = c.new_guest_exec_id(exec_id);
            c.execs
                .insert(exec_id.to_string(), Process::new(guest_id.clone()));
            Ok(guest_id)
        })??;
        let call = Call::ExecProcess {
            cid: cid.into(),
            exec_id: guest_id.clone(),
            process_json,
        };
        if let Err(e) = self
            .while_alive("while starting an exec", self.agent.done(call))
            .await
        {
            let _ = self.with(cid, |c| c.execs.remove(exec_id));
            return Err(e);
        }
        let relays = self.relays(cid, &guest_id, stdio).await;
        self.with_process(cid, exec_id, |p| p.relays = Some(relays))?;
        self.spawn_waiter(cid, exec_id, &guest_id);
        Ok(())
    }

    /// Forgets an exec that has ended, once its output is relayed.
    pub async fn delete_exec(&self, cid: &str, exec_id: &str) -> Result<Exit, SandboxError> {
        let (exit, relays) = self.with(cid, |c| {
            let p = c
                .execs
                .get(exec_id)
                .ok_or_else(|| SandboxError::NoProcess {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                })?;
            let Some(exit) = p.exited() else {
                return Err(SandboxError::ExecRunning {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                });
            };
            let mut p = c.execs.remove(exec_id).expect("checked above");
            Ok((exit, p.relays.take()))
        })??;
        if let Some(r) = relays {
            r.finish(DRAIN_TIMEOUT).await;
        }
        Ok(exit)
    }

    /// Deletes container `cid`: without `force` only a created or stopped
    /// one; with it, a running or paused one is killed first. Its output is
    /// relayed to the end, the guest forgets it, its binds are released and
    /// its poststop hooks run. Deleting the owner tears the whole sandbox
    /// down. Returns the init's end.
    pub async fn delete(&self, cid: &str, force: bool) -> Result<Exit, SandboxError> {
        let status = self.check(
            cid,
            if force {
                Verb::ForceDelete
            } else {
                Verb::Delete
            },
        )?;
        if cid == self.id {
            self.deleting.send_replace(true);
        }
        let alive = self.alive().is_ok();
        if alive && matches!(status, Status::Running | Status::Paused) {
            if let Err(e) = self.agent.signal(cid, "", libc::SIGKILL, true).await {
                tracing::debug!(container = cid, "killing before delete: {e}");
            }
            if let Ok(mut rx) = self.wait(cid, "") {
                let _ = tokio::time::timeout(KILL_WAIT, rx.wait_for(Option::is_some)).await;
            }
        }
        let exit = self.forget(cid, false).await;
        Ok(exit)
    }

    /// Removes container `cid` from the guest and the share (the owner: the
    /// whole sandbox), recording its processes as killed where they had no
    /// end yet; `quiet` skips the poststop hooks (a failed create).
    async fn forget(&self, cid: &str, quiet: bool) -> Exit {
        let relays = self.with(cid, |c| c.take_relays()).unwrap_or_default();
        let wait_output = self.exited(cid, "").ok().flatten().is_some();
        for r in relays {
            if wait_output {
                r.finish(DRAIN_TIMEOUT).await;
            }
        }
        if cid == self.id {
            self.teardown(false).await;
        } else {
            if self.alive().is_ok() {
                let call = Call::RemoveContainer { cid: cid.into() };
                if let Err(e) = self.agent.done(call).await {
                    tracing::warn!(container = cid, "removing the container in the guest: {e}");
                }
            }
            if let Err(e) = self
                .share
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unbind_container(cid)
            {
                tracing::warn!("{}", crate::monitor::error_chain(&e));
            }
        }
        let Some(c) = self.lock().remove(cid) else {
            return Exit {
                status: ExitStatus::KILLED,
                at: std::time::SystemTime::now(),
            };
        };
        for (exec_id, p) in c.processes() {
            if let Some(exit) = p.set_exited(ExitStatus::KILLED) {
                let _ = self.events.send(Event::Exited {
                    cid: cid.into(),
                    exec_id: exec_id.into(),
                    exit,
                });
            }
        }
        let exit = c.init.exited().expect("set above");
        let poststop = c.hooks.poststop().clone().unwrap_or_default();
        if !quiet && !poststop.is_empty() {
            let mut stopped = c;
            stopped.status = Status::Stopped;
            hooks::run_logged(
                "poststop",
                &poststop,
                &stopped.oci_state(cid, self.host_pid),
            )
            .await;
        }
        exit
    }

    /// Stops the VM and removes every host-side trace of the sandbox; every
    /// process still held is recorded as killed. With `keep_state`, the
    /// state dir keeps `state.json` (a created container that exited stays
    /// until `husk delete`). Idempotent.
    pub async fn teardown(&self, keep_state: bool) {
        let first = self.torn_down.send_if_modified(|s| {
            if *s == 0 {
                *s = 1;
                true
            } else {
                false
            }
        });
        if !first {
            // Another caller is at it: wait until it is done.
            let mut rx = self.torn_down.subscribe();
            let _ = rx.wait_for(|s| *s == 2).await;
            return;
        }
        let span =
            tracing::info_span!(target: crate::timing::TIMING, "teardown", sandbox = %self.id);
        self.teardown_once(keep_state).instrument(span).await
    }

    async fn teardown_once(&self, keep_state: bool) {
        let members: Vec<String> = self.container_ids();
        for m in &members {
            let relays = self.with(m, |c| c.take_relays()).unwrap_or_default();
            drop(relays);
            if m != &self.id {
                let gone = self.lock().remove(m);
                if let Some(c) = gone {
                    tracing::warn!(container = %m, pod = %self.id, "the pod goes away before this container of it");
                    for (exec_id, p) in c.processes() {
                        if let Some(exit) = p.set_exited(ExitStatus::KILLED) {
                            let _ = self.events.send(Event::Exited {
                                cid: m.clone(),
                                exec_id: exec_id.into(),
                                exit,
                            });
                        }
                    }
                }
            }
        }
        self.vm.shutdown().await;
        let network = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut net) = network {
            let _ = tokio::task::spawn_blocking(move || net.detach()).await;
        }
        let dir = self
            .state_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(d) = &dir {
            if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(
                    "guest console log:\n{}",
                    husk_hypervisor::log_tail(&d.console_log(), 64 * 1024)
                );
                tracing::debug!(
                    "qemu log:\n{}",
                    husk_hypervisor::log_tail(&d.hypervisor_log(), 16 * 1024)
                );
            }
        }
        self.share
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .teardown();
        if let Some(mut d) = dir {
            if keep_state {
                if let Err(e) = self.record().save(d.path()) {
                    tracing::warn!("{e}");
                }
                d.keep_state();
            }
            d.remove();
        }
        let cgroup = self
            .host_cgroup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut cgroup) = cgroup {
            // Waits (briefly) for the VM's processes to leave it.
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = cgroup.remove() {
                    tracing::warn!("{}", crate::monitor::error_chain(&e));
                }
            })
            .await;
        }
        self.torn_down.send_replace(2);
    }

    pub async fn ps(&self, cid: &str) -> Result<Vec<ProcessInfo>, SandboxError> {
        self.check(cid, Verb::Inspect)?;
        self.while_alive("while listing processes", self.agent.list_processes(cid))
            .await
    }

    pub async fn stats(&self, cid: &str) -> Result<Stats, SandboxError> {
        self.check(cid, Verb::Inspect)?;
        self.while_alive("while reading statistics", self.agent.stats(cid))
            .await
    }

    /// New resource limits (OCI `linux.resources` JSON) for the container.
    pub async fn update(&self, cid: &str, resources_json: Vec<u8>) -> Result<(), SandboxError> {
        self.check(cid, Verb::Update)?;
        let call = Call::UpdateContainer {
            cid: cid.into(),
            resources_json,
        };
        self.while_alive("while updating", self.agent.done(call))
            .await
    }

    pub async fn resize(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), SandboxError> {
        let guest_id = self.with_process(cid, exec_id, |p| p.guest_id.clone())?;
        let call = Call::ResizePty {
            cid: cid.into(),
            exec_id: guest_id,
            rows,
            cols,
        };
        self.while_alive("while resizing", self.agent.done(call))
            .await
    }
}

/// Ends every process of a sandbox whose VM died (status 255).
async fn watch_vm(me: Weak<Sandbox>, mut exit: watch::Receiver<Option<VmExit>>) {
    let Ok(e) = exit.wait_for(Option::is_some).await.map(|e| e.clone()) else {
        return;
    };
    let Some(me) = me.upgrade() else { return };
    if *me.torn_down.borrow() != 0 {
        return;
    }
    tracing::warn!(exit = ?e, sandbox = %me.id, "the VM exited");
    let ended: Vec<(String, String)> = me
        .lock()
        .iter()
        .flat_map(|(cid, c)| {
            c.processes()
                .filter(|(_, p)| p.exited().is_none())
                .map(|(x, _)| (cid.clone(), x.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    for (cid, exec_id) in ended {
        me.record_exit(&cid, &exec_id, ExitStatus::LOST);
    }
}

/// Passes the guest's OOM kills on, for the containers the sandbox holds,
/// at most [`OOM_EVENTS_PER_SEC`] a second.
async fn watch_oom(me: Weak<Sandbox>, agent: AgentClient) {
    let mut bucket = OOM_EVENTS_PER_SEC;
    let mut refill = tokio::time::Instant::now();
    let mut dropped = 0u64;
    while let Ok(cid) = agent.next_oom_event().await {
        let Some(me) = me.upgrade() else { return };
        if refill.elapsed() >= Duration::from_secs(1) {
            bucket = OOM_EVENTS_PER_SEC;
            refill = tokio::time::Instant::now();
            if dropped > 0 {
                tracing::warn!(dropped, "OOM events over the rate limit were dropped");
                dropped = 0;
            }
        }
        if bucket == 0 {
            dropped += 1;
            continue;
        }
        bucket -= 1;
        if me.with(&cid, |c| c.oom_killed = true).is_err() {
            tracing::warn!(container = %cid, "the guest reported an OOM kill in a container this sandbox does not hold; dropped");
            continue;
        }
        tracing::info!(container = %cid, "OOM kill in the guest");
        let _ = me.events.send(Event::Oom { cid });
    }
}

//! Containers in the guest: the table of them, and their lifecycle
//! (create holds the init before exec, start releases it, remove kills and
//! forgets). Extra processes (`exec`), process listings (`ps`) and the
//! cgroup-backed operations live in submodules.

mod exec;
pub mod exec_stage;
pub mod init;
pub mod mounts;
pub mod ps;
pub mod spec;
pub mod stage;
pub mod stdio;
pub mod storage;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_protocol::agent::{ProcessInfo, StatsContainerResponse, Storage};
use nix::sys::inotify::WatchDescriptor;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDevice, LinuxResources};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::cgroup::devices;
use crate::cgroup::oom::OomEvents;
use crate::cgroup::{Cgroup, CgroupError, CgroupRoot};
use crate::process::spawn::{clone_exec, CloneExec};
use crate::process::stdio::FdIo;
use crate::process::{wait_exit, ExitStatus, Process, Reaper, SignalError, StdinError};
use crate::seccomp::SeccompProgram;
use spec::{InitConfig, InitMessage, SpecError};
use stdio::pipe;
use storage::StorageError;

/// The descriptor number the cloned init reads its hold byte from, before
/// it execs (it closes it then; the init stage keeps only fds 0-6).
const HOLD_FD: i32 = 7;

/// Why a container operation failed. `crate::error` maps these to ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Unknown container id.
    #[error("container {0:?} does not exist; create it first (or it was already removed)")]
    NotFound(String),
    /// Unknown exec id.
    #[error("process {exec_id:?} of container {id:?} does not exist; address the init with an empty exec_id, or an exec by the id given to ExecProcess")]
    NoSuchProcess {
        /// Container id.
        id: String,
        /// Exec id asked for.
        exec_id: String,
    },
    /// Duplicate create.
    #[error("container {0:?} already exists; remove it first or choose another id")]
    AlreadyExists(String),
    /// Bad id.
    #[error("container id {0:?} is invalid; use 1 to 128 characters from A-Z a-z 0-9 _ + . - not starting with a dot")]
    InvalidId(String),
    /// ExecProcess without an exec id.
    #[error("ExecProcess for container {0:?} has an empty exec_id; name the process (the empty id is the init)")]
    EmptyExecId(String),
    /// Duplicate exec id.
    #[error("container {id:?} already has a process {exec_id:?}; choose another exec_id")]
    ExecExists {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The exec is still starting.
    #[error(
        "process {exec_id:?} of container {id:?} is still starting; wait for ExecProcess to return"
    )]
    ExecStarting {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// Exec into a container whose init is gone.
    #[error("container {id:?} is not running (its init {status}); exec needs a running container")]
    NotRunning {
        /// Container id.
        id: String,
        /// How its init ended.
        status: ExitStatus,
    },
    /// The exec stage or process reported a failure.
    #[error("exec {exec_id:?} in container {id:?}: {message}")]
    ExecFailed {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
        /// What failed.
        message: String,
        /// Whether the process description is at fault.
        invalid_spec: bool,
    },
    /// ResizePty of a process without a terminal.
    #[error(
        "process {exec_id:?} of container {id:?} has no terminal (process.terminal was false)"
    )]
    NoTerminal {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// A cgroup operation of a container failed.
    #[error("container {id:?}: {source}")]
    Cgroup {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: CgroupError,
    },
    /// The container has no cgroup (the agent runs without a cgroup root).
    #[error("container {0:?} has no cgroup: the agent runs without cgroups (start it with --cgroup-root, or as PID 1 of the guest with cgroup2 mounted)")]
    NoCgroup(String),
    /// UpdateContainer's resources are not OCI JSON.
    #[error("resources_json is not a valid OCI linux.resources object ({0})")]
    ResourcesJson(serde_json::Error),
    /// Create has not finished.
    #[error("container {0:?} is still being created; wait for CreateContainer to return")]
    Creating(String),
    /// Start twice.
    #[error("container {0:?} was already started; it can be started only once")]
    AlreadyStarted(String),
    /// The rootfs is not there.
    #[error("the rootfs {0} does not exist in the guest; list the storage that holds it in storages and check root.path")]
    RootfsMissing(PathBuf),
    /// The spec is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A storage could not be mounted.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The init stage reported a failure.
    #[error("container {id:?}: {message}")]
    Init {
        /// Container id.
        id: String,
        /// The init stage's message.
        message: String,
        /// Whether the spec is at fault.
        invalid_spec: bool,
    },
    /// The init stage died without saying why.
    #[error("the init of container {id:?} {status} before it ran the container's program; the guest console log may say why")]
    InitDied {
        /// Container id.
        id: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// Signal to a process that is gone.
    #[error("process {id:?} already exited ({status}); there is nothing to signal")]
    Exited {
        /// Container id.
        id: String,
        /// Its exit status.
        status: ExitStatus,
    },
    /// Signal number out of range.
    #[error("signal {0} is not a valid signal number")]
    BadSignal(i32),
    /// kill(2) failed otherwise.
    #[error("signalling container {id:?}: {source}")]
    Signal {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: SignalError,
    },
    /// Stdin problems.
    #[error("stdin of container {id:?}: {source}")]
    Stdin {
        /// Container id.
        id: String,
        /// The failure.
        #[source]
        source: StdinError,
    },
    /// A system call of the agent failed.
    #[error("container {id:?}: {what}: {source}")]
    Io {
        /// Container id.
        id: String,
        /// The step.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// The agent's end of the init stage's control pipes, until start.
struct InitControl {
    start: File,
    status: BufReader<FdIo>,
}

/// An extra process of a container, by exec id.
enum ExecSlot {
    Starting,
    Ready(Arc<Process>),
}

/// A container: its init process and, until it is started, the pipes that
/// hold the init before exec; its exec'd processes; its cgroup.
pub struct Container {
    id: String,
    process: Arc<Process>,
    control: tokio::sync::Mutex<Option<InitControl>>,
    execs: Mutex<HashMap<String, ExecSlot>>,
    cgroup: Option<Cgroup>,
    /// Whether the container has its own PID namespace.
    pid_namespace: bool,
    /// The container's compiled seccomp filter, for its execs.
    seccomp: Option<SeccompProgram>,
    oom_watch: Option<WatchDescriptor>,
}

impl Container {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, ExecSlot>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exec'd processes that finished starting, by exec id.
    fn exec_processes(&self) -> Vec<(String, Arc<Process>)> {
        self.execs()
            .iter()
            .filter_map(|(id, slot)| match slot {
                ExecSlot::Ready(p) => Some((id.clone(), Arc::clone(p))),
                ExecSlot::Starting => None,
            })
            .collect()
    }

    /// Every process of the container the agent can find: its cgroup's,
    /// or (without cgroups) by PID namespace or descent from the init and
    /// the execs.
    fn pids(&self) -> Vec<i32> {
        let mut pids = match &self.cgroup {
            Some(cgroup) => cgroup.pids(),
            None => {
                let roots: Vec<i32> = std::iter::once(self.process.pid().as_raw())
                    .chain(self.exec_processes().iter().map(|(_, p)| p.pid().as_raw()))
                    .collect();
                ps::related_pids(&roots, self.pid_namespace)
            }
        };
        let init = self.process.pid().as_raw();
        if self.process.exit_status().is_none() && !pids.contains(&init) {
            pids.push(init);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// How containers are started, fixed per agent mode.
#[derive(Clone, Debug)]
pub struct ContainerOptions {
    /// The agent binary to re-exec as the init stage.
    pub agent_exe: CString,
    /// Kill containers when the agent dies (the agent as a plain process).
    pub die_with_agent: bool,
    /// Where containers' cgroups go; `None` runs without cgroups (resources
    /// are then ignored, and Update/Stats fail).
    pub cgroup_root: Option<PathBuf>,
    /// The sandbox's share, mounted as soon as the agent serves (named on
    /// the kernel command line); CreateContainer waits for that mount.
    pub early_storage: Option<Storage>,
}

impl Default for ContainerOptions {
    /// The options of the agent as PID 1 of the guest.
    fn default() -> Self {
        Self {
            agent_exe: CString::from(c"/proc/self/exe"),
            die_with_agent: false,
            cgroup_root: Some(PathBuf::from(crate::cgroup::GUEST_ROOT)),
            early_storage: None,
        }
    }
}

/// Every container of the guest.
pub struct Containers {
    table: Mutex<HashMap<String, Slot>>,
    reaper: Arc<Reaper>,
    storages: tokio::sync::Mutex<()>,
    options: ContainerOptions,
    cgroups: Option<CgroupRoot>,
    oom: Arc<OomEvents>,
}

/// Removes a reserved id unless the create that reserved it succeeded.
struct Reservation<'a> {
    containers: &'a Containers,
    id: &'a str,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.containers.table().remove(self.id);
        }
    }
}

/// Checks a container id: it names things in logs and paths.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '.' | '-'))
}

/// Why a held child could not be prepared.
enum HoldError {
    Cgroup(CgroupError),
    Io(&'static str, io::Error),
}

/// Places a held child in its cgroup and writes its user namespace's id
/// maps (runc's order: cgroup first, then the maps).
fn prepare_held_init(
    pid: Pid,
    cgroup: Option<&Cgroup>,
    id_maps: Option<&(String, String)>,
) -> Result<(), HoldError> {
    if let Some(cgroup) = cgroup {
        cgroup.add(pid.as_raw()).map_err(HoldError::Cgroup)?;
    }
    if let Some((uid_map, gid_map)) = id_maps {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::write(proc.join("uid_map"), uid_map)
            .map_err(|e| HoldError::Io("writing linux.uidMappings to uid_map", e))?;
        std::fs::write(proc.join("gid_map"), gid_map)
            .map_err(|e| HoldError::Io("writing linux.gidMappings to gid_map", e))?;
    }
    Ok(())
}

/// Reads the init stage's next message; `None` at end-of-file. Warnings are
/// logged and skipped.
async fn next_message(id: &str, status: &mut BufReader<FdIo>) -> io::Result<Option<InitMessage>> {
    loop {
        let mut line = String::new();
        if status.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<InitMessage>(line.trim_end()) {
            Ok(InitMessage::Warning(text)) => {
                tracing::warn!(container = id, "container init: {text}");
            }
            Ok(message) => return Ok(Some(message)),
            Err(e) => tracing::warn!(
                container = id,
                "unreadable message from the container init ({e}): {line:?}"
            ),
        }
    }
}

impl Containers {
    /// An empty table whose processes are reaped by `reaper`.
    pub fn new(reaper: Arc<Reaper>, options: ContainerOptions) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            reaper,
            storages: tokio::sync::Mutex::new(()),
            cgroups: options.cgroup_root.clone().map(CgroupRoot::new),
            options,
            oom: Arc::new(OomEvents::default()),
        }
    }

    /// Enables the cgroup controllers for containers on a plain thread, so
    /// that work overlaps with the host's own before CreateContainer.
    pub fn prepare_cgroups_in_background(self: &Arc<Self>) {
        if self.cgroups.is_some() {
            let me = Arc::clone(self);
            std::thread::spawn(move || {
                if let Some(c) = &me.cgroups {
                    if let Err(e) = c.prepare() {
                        tracing::debug!("cgroups: {e}");
                    }
                }
            });
        }
    }

    /// Mounts [`ContainerOptions::early_storage`] on a blocking thread,
    /// holding the storage lock so that the first CreateContainer waits for
    /// it (and then finds it mounted). A failure is only logged: that
    /// CreateContainer mounts it again and reports the error.
    pub fn mount_early_storage_in_background(self: &Arc<Self>) {
        let Some(storage) = self.options.early_storage.clone() else {
            return;
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _serialised = me.storages.lock().await;
            let mounted =
                tokio::task::spawn_blocking(move || storage::mount_storage(&storage)).await;
            match mounted {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("mounting the sandbox share early: {e}"),
                Err(e) => tracing::warn!("mounting the sandbox share early: {e}"),
            }
        });
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container `id`, once created.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        match self.table().get(id) {
            Some(Slot::Ready(container)) => Ok(Arc::clone(container)),
            Some(Slot::Creating) => Err(ContainerError::Creating(id.to_string())),
            None => Err(ContainerError::NotFound(id.to_string())),
        }
    }

    /// Process `(id, exec_id)`: the init for an empty exec_id, otherwise
    /// the exec of that id.
    pub fn get_process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let container = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&container.process));
        }
        let execs = container.execs();
        match execs.get(exec_id) {
            Some(ExecSlot::Ready(process)) => Ok(Arc::clone(process)),
            Some(ExecSlot::Starting) => Err(ContainerError::ExecStarting {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
            None => Err(ContainerError::NoSuchProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// Mounts the storages, builds the container and holds its init before
    /// exec. On failure nothing of the container remains.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        storages: &[Storage],
    ) -> Result<(), ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.to_string()));
        }
        {
            let mut table = self.table();
            if table.contains_key(id) {
                return Err(ContainerError::AlreadyExists(id.to_string()));
            }
            table.insert(id.to_string(), Slot::Creating);
        }
        let mut reservation = Reservation {
            containers: self,
            id,
            done: false,
        };

        let t0 = std::time::Instant::now();
        self.mount_storages(storages).await?;
        let t_mount = t0.elapsed();
        let spec = spec::parse(spec_json)?;
        let (mut config, ignored) = spec::translate(&spec)?;
        if !config.rootfs.is_dir() {
            return Err(ContainerError::RootfsMissing(config.rootfs.clone()));
        }
        let id_maps = spec::id_maps(&spec)?;
        let (namespaces, notes) = spec::clone_flags(&spec);
        for note in notes.iter().chain(&ignored) {
            tracing::warn!(container = id, "{note}");
        }
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let t_spec = t0.elapsed();
        let device_nodes = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_deref())
            .unwrap_or_default();
        let cgroup = self.create_cgroup(id, resources, device_nodes)?;
        let t_cgroup = t0.elapsed();
        let spawned = self
            .spawn_init(id, &config, namespaces, cgroup.as_ref(), id_maps.as_ref())
            .await;
        tracing::debug!(
            container = id,
            mount_us = t_mount.as_micros() as u64,
            spec_us = t_spec.as_micros() as u64,
            cgroup_us = t_cgroup.as_micros() as u64,
            init_ready_us = t0.elapsed().as_micros() as u64,
            "create timings"
        );
        let (process, control) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    if let Err(error) = cgroup.remove().await {
                        tracing::warn!(container = id, "{error}");
                    }
                }
                return Err(e);
            }
        };
        let oom_watch = cgroup.as_ref().and_then(|c| {
            self.oom
                .watch(id, c.path().to_path_buf())
                .map_err(|e| {
                    // No memory.events: the kernel offers no memory controller.
                    tracing::debug!(container = id, "not watching for OOM kills: {e}")
                })
                .ok()
        });
        let container = Arc::new(Container {
            id: id.to_string(),
            process: Arc::new(process),
            control: tokio::sync::Mutex::new(Some(control)),
            execs: Mutex::new(HashMap::new()),
            cgroup,
            pid_namespace: namespaces.contains(nix::sched::CloneFlags::CLONE_NEWPID),
            seccomp: config.seccomp.take(),
            oom_watch,
        });
        self.watch_init(&container);
        self.table().insert(id.to_string(), Slot::Ready(container));
        reservation.done = true;
        tracing::info!(container = id, "created");
        Ok(())
    }

    /// The container's cgroup with `resources` applied, or `None` when the
    /// agent runs without cgroups.
    fn create_cgroup(
        &self,
        id: &str,
        resources: Option<&LinuxResources>,
        device_nodes: &[LinuxDevice],
    ) -> Result<Option<Cgroup>, ContainerError> {
        let cgroup_error = |source| ContainerError::Cgroup {
            id: id.to_string(),
            source,
        };
        let Some(root) = &self.cgroups else {
            if resources.is_some() {
                tracing::info!(
                    container = id,
                    "linux.resources ignored: the agent runs without cgroups"
                );
            }
            return Ok(None);
        };
        let cgroup = match root.create(id) {
            Ok(cgroup) => cgroup,
            Err(error @ CgroupError::Root { .. }) => {
                tracing::warn!(container = id, "running without a cgroup: {error}");
                return Ok(None);
            }
            Err(error) => return Err(cgroup_error(error)),
        };
        if let Some(resources) = resources {
            let applied = cgroup.apply(resources).and_then(|notes| {
                let rules = devices::rules(
                    resources.devices().as_deref().unwrap_or_default(),
                    device_nodes,
                )?;
                if let Some(rules) = rules {
                    cgroup.restrict_devices(&rules)?;
                }
                Ok(notes)
            });
            match applied {
                Ok(notes) => {
                    for note in notes {
                        tracing::warn!(container = id, "{note}");
                    }
                }
                Err(error) => {
                    let _ = std::fs::remove_dir(cgroup.path());
                    return Err(cgroup_error(error));
                }
            }
        }
        Ok(Some(cgroup))
    }

    /// When the init exits, its exec'd processes (and, without a PID
    /// namespace, everything else in its cgroup) are killed, as runc does.
    fn watch_init(&self, container: &Arc<Container>) {
        let process = Arc::clone(&container.process);
        let weak = Arc::downgrade(container);
        let reaper = Arc::clone(&self.reaper);
        tokio::spawn(async move {
            process.wait().await;
            let Some(container) = weak.upgrade() else {
                return;
            };
            for (_, exec) in container.exec_processes() {
                let _ = reaper.signal(exec.pid(), Signal::SIGKILL as i32);
            }
            if !container.pid_namespace {
                if let Some(cgroup) = &container.cgroup {
                    cgroup.kill_all();
                }
            }
        });
    }

    async fn mount_storages(&self, storages: &[Storage]) -> Result<(), ContainerError> {
        if storages.is_empty() {
            return Ok(());
        }
        let _serialised = self.storages.lock().await;
        for storage in storages {
            let storage = storage.clone();
            tokio::task::spawn_blocking(move || storage::mount_storage(&storage))
                .await
                .map_err(|e| ContainerError::Io {
                    id: String::new(),
                    what: "mounting storages",
                    source: io::Error::other(e),
                })??;
        }
        Ok(())
    }

    /// Clones the init stage, feeds it the config and waits for `Ready`
    /// (and, with a terminal, the master it allocated in the container).
    async fn spawn_init(
        &self,
        id: &str,
        config: &InitConfig,
        namespaces: nix::sched::CloneFlags,
        cgroup: Option<&Cgroup>,
        id_maps: Option<&(String, String)>,
    ) -> Result<(Process, InitControl), ContainerError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| ContainerError::Io {
                id: id.to_string(),
                what,
                source,
            }
        };
        let (child_stdio, pending_stdio) = if config.process.terminal {
            stdio::terminal().map_err(io_err("preparing the terminal's console socket"))?
        } else {
            stdio::pipes().map_err(io_err("creating stdio pipes"))?
        };
        let json = serde_json::to_vec(config).map_err(|e| ContainerError::Io {
            id: id.to_string(),
            what: "encoding the init instructions",
            source: io::Error::other(e),
        })?;
        let (config_r, config_w) = pipe().map_err(io_err("creating the config pipe"))?;
        let (status_r, status_w) = pipe().map_err(io_err("creating the status pipe"))?;
        let (start_r, start_w) = pipe().map_err(io_err("creating the start pipe"))?;
        let (hold_r, hold_w) = pipe().map_err(io_err("creating the hold pipe"))?;

        let argv = [CString::from(c"husk-agent"), CString::from(c"init")];
        let mut fds = child_stdio.stage_fds(config_r.as_fd(), status_w.as_fd(), start_r.as_fd());
        fds.push((hold_r.as_fd(), HOLD_FD));
        let request = CloneExec {
            namespaces,
            program: &self.options.agent_exe,
            argv: &argv,
            fds,
            parent_death_signal: self.options.die_with_agent.then_some(Signal::SIGKILL),
            hold_fd: Some(HOLD_FD),
            become_userns_root: id_maps.is_some(),
        };
        // Called on a runtime worker thread (this is an async fn, not a
        // blocking task), which lives as long as the agent: see
        // `CloneExec::parent_death_signal`.
        let (pid, exit) = self
            .reaper
            .spawn(|| clone_exec(&request))
            .map_err(io_err("starting the container init (clone)"))?;
        drop(request);
        drop((child_stdio, config_r, status_w, start_r, hold_r));
        tracing::debug!(container = id, pid = pid.as_raw(), "container init started");

        // The init waits before exec for its cgroup and its id maps.
        let placed = prepare_held_init(pid, cgroup, id_maps);
        if let Err(error) = placed {
            let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
            wait_exit(pid, &exit).await;
            return Err(match error {
                HoldError::Cgroup(source) => ContainerError::Cgroup {
                    id: id.to_string(),
                    source,
                },
                HoldError::Io(what, source) => ContainerError::Io {
                    id: id.to_string(),
                    what,
                    source,
                },
            });
        }
        // One byte into an empty pipe never blocks; a dead child is noticed
        // below through its status pipe.
        let _ = File::from(hold_w).write_all(b"g");

        let mut status =
            BufReader::new(FdIo::new(status_r).map_err(io_err("watching the status pipe"))?);
        let fed = async {
            let mut config_pipe = FdIo::new(config_w)?;
            config_pipe.write_all(&json).await
            // Dropping the pipe here gives the init its end-of-file.
        };
        if let Err(e) = fed.await {
            // The init is gone; its status pipe and exit status say why.
            tracing::debug!(container = id, "writing the init instructions failed: {e}");
        }
        let outcome = next_message(id, &mut status).await;
        let failure = match outcome {
            Ok(Some(InitMessage::Ready)) => None,
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => Some(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            // End-of-file (or an unreadable pipe) before Ready: the init died;
            // its exit status is filled in below.
            Ok(Some(InitMessage::Warning(_) | InitMessage::Pid(_))) | Ok(None) | Err(_) => {
                Some(ContainerError::InitDied {
                    id: id.to_string(),
                    status: ExitStatus::exited(-1),
                })
            }
        };
        if let Some(error) = failure {
            let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
            let status = wait_exit(pid, &exit).await;
            return Err(match error {
                ContainerError::InitDied { id, .. } => ContainerError::InitDied { id, status },
                other => other,
            });
        }
        // With a terminal, the init sent its master before it reported Ready.
        let stdio = match pending_stdio.finish(&format!("container {id}")) {
            Ok(stdio) => stdio,
            Err(source) => {
                let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
                wait_exit(pid, &exit).await;
                return Err(ContainerError::Io {
                    id: id.to_string(),
                    what: "taking over the init's stdio",
                    source,
                });
            }
        };
        let process = stdio.into_process(pid, exit);
        let start = File::from(start_w);
        Ok((process, InitControl { start, status }))
    }

    /// Releases the init into the container's program; returns once it was
    /// exec'd (or failed to be).
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let mut control = container.control.lock().await;
        let Some(InitControl {
            mut start,
            mut status,
        }) = control.take()
        else {
            return Err(ContainerError::AlreadyStarted(id.to_string()));
        };
        // One byte into an empty pipe never blocks. It fails (EPIPE) only
        // when the held init is gone: killed before it was started.
        if start.write_all(b"s").is_err() {
            let status = container.process.wait().await;
            return Err(ContainerError::InitDied {
                id: id.to_string(),
                status,
            });
        }
        drop(start);
        let outcome = next_message(id, &mut status).await;
        match outcome {
            // The status pipe closed at exec: the program runs (and may
            // already have exited, which WaitProcess reports).
            Ok(None) => {
                tracing::info!(container = id, "started");
                Ok(())
            }
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => Err(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            Ok(Some(other)) => {
                tracing::warn!(
                    container = id,
                    "unexpected message from the container init after start: {other:?}"
                );
                Ok(())
            }
            Err(source) => Err(ContainerError::Io {
                id: id.to_string(),
                what: "reading the init's status after start",
                source,
            }),
        }
    }

    /// Sends `signal` to process `(id, exec_id)`, or with `all` to every
    /// process of the container.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        if all {
            return self.signal_all(id, signal);
        }
        let process = self.get_process(id, exec_id)?;
        self.reaper
            .signal(process.pid(), signal)
            .map_err(|source| match source {
                SignalError::Exited => ContainerError::Exited {
                    id: id.to_string(),
                    status: process.exit_status().unwrap_or(ExitStatus::exited(-1)),
                },
                SignalError::Kill {
                    errno: nix::errno::Errno::EINVAL,
                    ..
                } => ContainerError::BadSignal(signal),
                source => ContainerError::Signal {
                    id: id.to_string(),
                    source,
                },
            })
    }

    fn signal_all(&self, id: &str, signal: i32) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let sig = match signal {
            0 => None,
            n => Some(Signal::try_from(n).map_err(|_| ContainerError::BadSignal(n))?),
        };
        // Signal a frozen container (as runc does), so that none of its
        // processes acts on a signal before the others have theirs: a shell
        // init whose children die first would exit, and its PID namespace's
        // end would SIGKILL the rest before they got the signal asked for.
        // A paused container stays frozen (the signal waits for resume).
        let frozen = match (&container.cgroup, sig) {
            (Some(cgroup), Some(s)) if s != Signal::SIGKILL && !cgroup.is_frozen() => {
                cgroup.freeze().then_some(cgroup)
            }
            _ => None,
        };
        let pids = container.pids();
        let signalled = self.signal_pids(id, &container, sig, pids);
        if let Some(cgroup) = frozen {
            cgroup.thaw();
        }
        signalled
    }

    fn signal_pids(
        &self,
        id: &str,
        container: &Container,
        sig: Option<Signal>,
        pids: Vec<i32>,
    ) -> Result<(), ContainerError> {
        if pids.is_empty() {
            return Err(ContainerError::Exited {
                id: id.to_string(),
                status: container
                    .process
                    .exit_status()
                    .unwrap_or(ExitStatus::exited(-1)),
            });
        }
        if sig == Some(Signal::SIGKILL) {
            if let Some(cgroup) = &container.cgroup {
                cgroup.kill_all();
            }
        }
        tracing::debug!(
            container = id,
            signal = sig.map_or(0, |s| s as i32),
            count = pids.len(),
            "signalling all processes"
        );
        for pid in pids {
            // Processes may exit meanwhile; that is fine.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
        Ok(())
    }

    /// Writes to a process's stdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ContainerError> {
        let process = self.get_process(id, exec_id)?;
        process
            .stdin
            .write(data)
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.get_process(id, exec_id)?;
        process
            .stdin
            .close()
            .await
            .map_err(|source| ContainerError::Stdin {
                id: id.to_string(),
                source,
            })
    }

    /// Kills the container if it still runs (with its exec'd processes),
    /// waits for them, removes its cgroup, and forgets it.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let process = container.process();
        if process.exit_status().is_none() {
            match self.reaper.signal(process.pid(), Signal::SIGKILL as i32) {
                Ok(()) | Err(SignalError::Exited) => {}
                Err(source) => {
                    return Err(ContainerError::Signal {
                        id: id.to_string(),
                        source,
                    })
                }
            }
        }
        let exit = process.wait().await;
        for (_, exec) in container.exec_processes() {
            let _ = self.reaper.signal(exec.pid(), Signal::SIGKILL as i32);
            exec.wait().await;
        }
        if let Some(cgroup) = &container.cgroup {
            cgroup.kill_all();
            if let Err(error) = cgroup.remove().await {
                tracing::warn!(container = id, "{error}");
            }
        }
        if let Some(wd) = container.oom_watch {
            self.oom.unwatch(wd);
        }
        {
            let mut table = self.table();
            if matches!(table.get(id), Some(Slot::Ready(c)) if Arc::ptr_eq(c, &container)) {
                table.remove(id);
            }
        }
        tracing::info!(container = id, %exit, "removed");
        Ok(())
    }

    /// Kills every container and waits for them (the agent is exiting).
    pub async fn kill_all(&self) {
        let containers: Vec<Arc<Container>> = self
            .table()
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(c) => Some(Arc::clone(c)),
                Slot::Creating => None,
            })
            .collect();
        // Every registered child is a container init or exec, including
        // those still being created.
        for pid in self.reaper.pids() {
            let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
        }
        for container in containers {
            container.process().wait().await;
            for (_, exec) in container.exec_processes() {
                exec.wait().await;
            }
            if let Some(cgroup) = &container.cgroup {
                cgroup.kill_all();
                if let Err(error) = cgroup.remove().await {
                    tracing::warn!(container = %container.id, "{error}");
                }
            }
        }
    }

    /// Sets the terminal size of process `(id, exec_id)`.
    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let process = self.get_process(id, exec_id)?;
        let Some(terminal) = process.terminal() else {
            return Err(ContainerError::NoTerminal {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        };
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        crate::sys::set_window_size(terminal, clamp(rows), clamp(cols)).map_err(|source| {
            ContainerError::Io {
                id: id.to_string(),
                what: "setting the terminal size",
                source,
            }
        })
    }

    /// The processes of container `id`.
    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, ContainerError> {
        let container = self.get(id)?;
        let execs: HashMap<i32, String> = container
            .exec_processes()
            .into_iter()
            .map(|(exec_id, p)| (p.pid().as_raw(), exec_id))
            .collect();
        Ok(container
            .pids()
            .into_iter()
            .filter_map(|pid| {
                let mut info = ps::process_info(pid)?;
                info.exec_id = execs.get(&pid).cloned().unwrap_or_default();
                Some(info)
            })
            .collect())
    }

    /// Freezes every process of container `id` (`runc pause`).
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        if self.cgroup_of(&container)?.freeze() {
            Ok(())
        } else {
            Err(ContainerError::NoCgroup(id.to_string()))
        }
    }

    /// Thaws container `id`.
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        self.cgroup_of(&container)?.thaw();
        Ok(())
    }

    fn cgroup_of<'a>(&self, container: &'a Container) -> Result<&'a Cgroup, ContainerError> {
        container
            .cgroup
            .as_ref()
            .ok_or_else(|| ContainerError::NoCgroup(container.id.clone()))
    }

    /// Applies new `linux.resources` to container `id`.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(ContainerError::ResourcesJson)?;
        let notes = self
            .cgroup_of(&container)?
            .apply(&resources)
            .map_err(|source| ContainerError::Cgroup {
                id: id.to_string(),
                source,
            })?;
        for note in notes {
            tracing::warn!(container = id, "{note}");
        }
        tracing::info!(container = id, "resources updated");
        Ok(())
    }

    /// The cgroup statistics of container `id`.
    pub fn stats(&self, id: &str) -> Result<StatsContainerResponse, ContainerError> {
        let container = self.get(id)?;
        Ok(self.cgroup_of(&container)?.stats())
    }

    /// The id of the next container that had an OOM kill, waiting for one.
    pub async fn next_oom_event(&self) -> String {
        self.oom.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(valid_id("abc-1.2_3"));
        assert!(valid_id("a+b"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(129)));
    }
}

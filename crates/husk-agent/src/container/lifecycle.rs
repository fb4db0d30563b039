//! A container's life in the guest: create (mount its storages, make its
//! cgroup, launch the init stage and hold it before exec), start (release
//! it), pause and resume (freeze and thaw its cgroup), remove (kill, reap,
//! remove the cgroup, forget), and kill_all when the agent exits.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use husk_protocol::agent::Storage;
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxDevice, LinuxResources};

use super::launch::{Hold, Launched, StageControl, StageKind, StageLaunch, Started};
use super::lookup::Reservation;
use super::protocol::StageMessage;
use super::spec::{self, InitConfig};
use super::storage;
use super::{valid_id, Container, ContainerError, ContainerOptions, Containers, Slot};
use crate::cgroup::devices;
use crate::cgroup::oom::OomEvents;
use crate::cgroup::{Cgroup, CgroupError, CgroupRoot};
use crate::process::{ExitStatus, Process, Reaper, SignalError};

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
        let Some(reservation) = Reservation::new(&self.table, id, Slot::Creating) else {
            return Err(ContainerError::AlreadyExists(id.to_string()));
        };

        // The phases are timing spans (target `husk_timing`, at debug).
        self.mount_storages(storages)
            .instrument(tracing::debug_span!(target: "husk_timing", "guest_mount"))
            .await?;
        let in_spec = tracing::debug_span!(target: "husk_timing", "guest_spec").entered();
        let spec = spec::parse(spec_json)?;
        let (mut config, ignored) = spec::translate(&spec)?;
        if !config.rootfs.is_dir() {
            return Err(ContainerError::RootfsMissing(config.rootfs.clone()));
        }
        let id_maps = spec::id_maps(&spec)?;
        let (namespaces, joins, notes) = spec::clone_flags(&spec);
        for note in notes.iter().chain(&ignored) {
            tracing::warn!(container = id, "{note}");
        }
        let (pid_join, joins): (Vec<_>, Vec<_>) = self
            .resolve_joins(id, &joins)?
            .into_iter()
            .partition(|j| j.nstype == nix::sched::CloneFlags::CLONE_NEWPID.bits());
        config.joins = joins;
        // A PID namespace is entered by being cloned into it: the agent
        // holds it open from here to the clone.
        let pid_namespace = pid_join
            .first()
            .map(|join| {
                std::fs::File::open(&join.path).map_err(|source| ContainerError::Io {
                    id: id.to_string(),
                    what: "opening the pod's PID namespace",
                    source,
                })
            })
            .transpose()?;
        config.loopback = namespaces.contains(nix::sched::CloneFlags::CLONE_NEWNET);
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        drop(in_spec);
        let device_nodes = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_deref())
            .unwrap_or_default();
        let cgroup = tracing::debug_span!(target: "husk_timing", "guest_cgroup")
            .in_scope(|| self.create_cgroup(id, resources, device_nodes))?;
        let spawned = self
            .spawn_init(
                id,
                &config,
                namespaces,
                pid_namespace.as_ref().map(|f| f.as_fd()),
                cgroup.as_ref(),
                id_maps.as_ref(),
            )
            .instrument(tracing::debug_span!(target: "husk_timing", "guest_init_ready"))
            .await;
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
        reservation.fill(Slot::Ready(container));
        tracing::info!(container = id, "created");
        Ok(())
    }

    /// The namespace files of the containers `id` joins: their inits'
    /// `/proc/<pid>/ns/<name>`, checked to be there now.
    fn resolve_joins(
        &self,
        id: &str,
        joins: &[spec::NamespaceJoin],
    ) -> Result<Vec<spec::JoinConfig>, ContainerError> {
        joins
            .iter()
            .map(|join| {
                let failed = |reason: String| ContainerError::JoinTarget {
                    id: id.to_string(),
                    name: join.name,
                    target: join.container.clone(),
                    reason,
                };
                let target = self.get(&join.container).map_err(|e| match e {
                    ContainerError::Creating(_) => failed("is still being created".to_string()),
                    _ => failed("does not exist in this sandbox".to_string()),
                })?;
                if let Some(status) = target.process.exit_status() {
                    return Err(failed(format!("is not running (its init {status})")));
                }
                let path = std::path::PathBuf::from(format!(
                    "/proc/{}/ns/{}",
                    target.process.pid(),
                    join.name
                ));
                if !path.exists() {
                    return Err(failed(format!("has no {}", path.display())));
                }
                Ok(spec::JoinConfig {
                    path,
                    nstype: join.flag.bits(),
                    name: join.name.to_string(),
                })
            })
            .collect()
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

    /// Launches the init stage, feeds it the config and waits for `Ready`
    /// (and, with a terminal, the master it allocated in the container).
    async fn spawn_init(
        &self,
        id: &str,
        config: &InitConfig,
        namespaces: nix::sched::CloneFlags,
        pid_namespace: Option<BorrowedFd<'_>>,
        cgroup: Option<&Cgroup>,
        id_maps: Option<&(String, String)>,
    ) -> Result<(Process, StageControl), ContainerError> {
        let launch = StageLaunch {
            kind: StageKind::Init,
            terminal: config.process.terminal,
            namespaces,
            pid_namespace,
            hold: Some(Hold { cgroup, id_maps }),
        };
        let Launched {
            pid,
            exit,
            stdio,
            mut control,
        } = self.launch_stage(id, &launch, config).await?;
        tracing::debug!(container = id, pid = pid.as_raw(), "container init started");
        let failure = match control.next_message(id).await {
            Ok(Some(StageMessage::Ready)) => None,
            Ok(Some(StageMessage::Error {
                message,
                invalid_spec,
            })) => Some(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            // End-of-file (or an unreadable pipe) before Ready: the init died;
            // its exit status is filled in below.
            Ok(Some(StageMessage::Warning(_) | StageMessage::Pid(_))) | Ok(None) | Err(_) => {
                Some(ContainerError::InitDied {
                    id: id.to_string(),
                    status: ExitStatus::exited(-1),
                })
            }
        };
        if let Some(error) = failure {
            let status = self.kill_and_reap(pid, &exit).await;
            return Err(match error {
                ContainerError::InitDied { id, .. } => ContainerError::InitDied { id, status },
                other => other,
            });
        }
        let process = self
            .take_over(stdio, &format!("container {id}"), pid, exit)
            .await
            .map_err(|source| ContainerError::Io {
                id: id.to_string(),
                what: "taking over the init's stdio",
                source,
            })?;
        Ok((process, control))
    }

    /// Releases the init into the container's program; returns once it was
    /// exec'd (or failed to be).
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let mut control = container.control.lock().await;
        let Some(control) = control.take() else {
            return Err(ContainerError::AlreadyStarted(id.to_string()));
        };
        match control.start(id).await {
            Started::Running => {
                tracing::info!(container = id, "started");
                Ok(())
            }
            Started::Gone => Err(ContainerError::InitDied {
                id: id.to_string(),
                status: container.process.wait().await,
            }),
            Started::Failed {
                message,
                invalid_spec,
            } => Err(ContainerError::Init {
                id: id.to_string(),
                message,
                invalid_spec,
            }),
            Started::Unexpected(other) => {
                tracing::warn!(
                    container = id,
                    "unexpected message from the container init after start: {other:?}"
                );
                Ok(())
            }
            Started::Unreadable(source) => Err(ContainerError::Io {
                id: id.to_string(),
                what: "reading the init's status after start",
                source,
            }),
        }
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
            self.kill_and_wait(&exec).await;
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
}

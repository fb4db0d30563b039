//! The QEMU implementation of [`Hypervisor`].

pub mod cmdline;
pub mod qmp;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::{
    caplog, process, virtiofsd, Accel, GuestMemory, HypervisorError, SharedFs, UidLease, Vm,
    VmExit, VmSpec,
};
use qmp::Qmp;

/// How long QEMU may take from its start to its QMP greeting.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long virtiofsd may take from creating its socket to listening on it.
const VIRTIOFSD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU gets to exit by itself after virtiofsd has gone (virtiofsd
/// also exits when QEMU quits; that is not a dead helper).
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// Launches VMs with `qemu-system-x86_64`.
#[derive(Debug, Default, Clone)]
pub struct Qemu;

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> HypervisorError {
    move |source| HypervisorError::Io { context, source }
}

/// Binds a listening unix socket at `path`, mode 0600 (QEMU or virtiofsd
/// gets the descriptor; only root connects by path). The path may be longer
/// than `sun_path`: it is bound through its directory's descriptor.
pub(crate) fn listen(path: &Path) -> Result<OwnedFd, HypervisorError> {
    let l = husk_sys::socket_path::bind_unix(path)
        .map_err(io_err(format!("cannot bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("cannot restrict {}", path.display())))?;
    Ok(l.into())
}

#[async_trait]
impl crate::Hypervisor for Qemu {
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        check_inputs(spec)?;
        let lease = match &spec.uid_pool {
            Some(pool) => {
                for (what, key, path) in [
                    ("guest kernel", "hypervisor.kernel", &spec.kernel),
                    ("guest initrd", "hypervisor.initrd", &spec.initrd),
                ] {
                    check_world_readable(what, key, path)?;
                }
                Some(pool.lease()?)
            }
            None => None,
        };
        let mut virtiofsd = match &spec.shared_fs {
            SharedFs::Virtiofs { daemon, socket } => Some(
                virtiofsd::start(
                    daemon,
                    &spec.share_dir,
                    socket,
                    &spec.hypervisor_log,
                    spec.host_cpus.as_deref(),
                )
                .await?,
            ),
            SharedFs::NineP => None,
        };
        let mut fds: Vec<(OwnedFd, RawFd)> = vec![
            (listen(&spec.qmp_socket)?, cmdline::QMP_FD),
            (listen(&spec.agent_socket)?, cmdline::AGENT_FD),
        ];
        let (console_host, console_qemu) =
            StdUnixStream::pair().map_err(io_err("cannot make the console socket".into()))?;
        caplog::spawn_console_reader(console_host, &spec.console_log, spec.console_log_limit)
            .map_err(io_err(format!(
                "cannot write {}",
                spec.console_log.display()
            )))?;
        fds.push((console_qemu.into(), cmdline::CONSOLE_FD));
        if let SharedFs::Virtiofs { socket, .. } = &spec.shared_fs {
            let s = connect_virtiofsd(socket).await?;
            fds.push((s.into(), cmdline::SHARE_FD));
        }
        let null =
            std::fs::File::open("/dev/null").map_err(io_err("cannot open /dev/null".into()))?;
        fds.push((null.into(), cmdline::TAG_FD));
        for (n, nic) in spec.nics.iter().enumerate() {
            let Some(tap) = &nic.tap else { continue };
            let tap = tap
                .try_clone()
                .map_err(io_err(format!("cannot pass the tap of NIC {n} to QEMU")))?;
            fds.push((tap, cmdline::NIC_FD + n as RawFd));
        }
        if let GuestMemory::TemplateRestore { state, .. } = &spec.memory {
            let f = std::fs::File::open(state).map_err(io_err(format!(
                "cannot open the template's device state {}",
                state.display()
            )))?;
            fds.push((f.into(), cmdline::STATE_FD));
        }
        let user = match &lease {
            Some(l) => {
                // KVM: the device's group, so the uid may open /dev/kvm.
                let groups = match spec.accel {
                    Accel::Kvm => std::fs::metadata("/dev/kvm")
                        .map(|m| vec![m.gid()])
                        .unwrap_or_default(),
                    Accel::Tcg => Vec::new(),
                };
                Some((l.uid(), l.gid(), groups))
            }
            None => None,
        };
        let mut cmd = Command::new(&spec.qemu);
        cmd.args(cmdline::command_line(spec));
        tracing::debug!(args = ?cmdline::command_line(spec), uid = ?user.as_ref().map(|u| u.0), "starting qemu");
        let mut child = process::spawn(
            "qemu",
            cmd,
            &spec.hypervisor_log,
            spec.host_cpus.as_deref(),
            process::Confine {
                user,
                fds,
                netns: spec.netns.as_ref().map(|n| n.0.as_raw_fd()),
            },
        )?;
        // virtiofsd's own start-up failure makes QEMU fail its vhost-user
        // handshake: name virtiofsd then (both write to the same log).
        let mut early_exit = |status: String| {
            let (what, status) = match virtiofsd.as_mut().map(|d| d.try_wait()) {
                Some(Ok(Some(s))) => ("virtiofsd", s.to_string()),
                _ => ("qemu", status),
            };
            HypervisorError::EarlyExit {
                what,
                status,
                output: process::log_tail(&spec.hypervisor_log, 2000),
            }
        };
        let connected = tokio::select! {
            q = Qmp::connect_with_deadline(&spec.qmp_socket, SOCKET_TIMEOUT) => q,
            status = child.wait() => {
                return Err(early_exit(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
            }
        };
        let mut qmp = match connected {
            Ok(q) => q,
            // A QEMU that died during start-up closes the QMP socket: say why.
            Err(e) => match tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
                Ok(Ok(status)) => return Err(early_exit(status.to_string())),
                _ => return Err(e.into()),
            },
        };
        qmp.set_deadline(qmp::QMP_DEADLINE);
        if let GuestMemory::TemplateRestore { .. } = spec.memory {
            let restored = tokio::select! {
                r = restore(&mut qmp) => r,
                status = child.wait() => {
                    return Err(early_exit(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
                }
            };
            if let Err(e) = restored {
                let _ = child.kill().await;
                return Err(e);
            }
        }
        Ok(Box::new(QemuVm {
            pid: child.id().unwrap_or(0),
            qemu: child,
            virtiofsd,
            qmp: Some(qmp),
            exit: None,
            _uid: lease,
        }))
    }
}

/// How long loading a template's device state may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long saving a template's device state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Loads the template's device state (passed as [`cmdline::STATE_FD`]) into
/// a QEMU started with `-incoming defer`, and lets the guest run.
async fn restore(qmp: &mut Qmp) -> Result<(), HypervisorError> {
    qmp.ignore_shared_memory().await?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("fd:{}", cmdline::STATE_FD) })),
    )
    .await?;
    let start = std::time::Instant::now();
    loop {
        match qmp.status().await?.as_str() {
            "inmigrate" if start.elapsed() < RESTORE_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            "paused" => break,
            other => {
                let (_, error) = qmp.migration_status().await.unwrap_or_default();
                return Err(HypervisorError::Template(format!(
                    "loading the template's device state ended in state {other}: {}",
                    error.unwrap_or_else(|| "QEMU gave no reason".into())
                )));
            }
        }
    }
    qmp.execute("cont", None).await?;
    Ok(())
}

/// Connects to virtiofsd's socket for QEMU (through its directory's
/// descriptor: the path may be longer than `sun_path`). husk binds the
/// socket before virtiofsd starts, so the connection waits in its backlog;
/// a refused one is still retried for up to [`VIRTIOFSD_CONNECT_TIMEOUT`].
async fn connect_virtiofsd(socket: &Path) -> Result<StdUnixStream, HypervisorError> {
    let start = std::time::Instant::now();
    loop {
        match husk_sys::socket_path::connect_unix(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < VIRTIOFSD_CONNECT_TIMEOUT =>
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => {
                return Err(io_err(format!(
                    "cannot connect to virtiofsd at {}",
                    socket.display()
                ))(e))
            }
        }
    }
}

/// QEMU running as an unprivileged uid opens the kernel and initrd itself:
/// they and every directory above them must be readable by others.
fn check_world_readable(
    what: &'static str,
    key: &'static str,
    path: &Path,
) -> Result<(), HypervisorError> {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    let bad = if mode(path) & 0o004 == 0 {
        Some(path.to_path_buf())
    } else {
        path.ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
            .find(|d| mode(d) & 0o001 == 0)
            .map(Path::to_path_buf)
    };
    match bad {
        None => Ok(()),
        Some(p) => Err(HypervisorError::NotReadable {
            what,
            path: path.to_path_buf(),
            blocker: p,
            key,
        }),
    }
}

fn check_inputs(spec: &VmSpec) -> Result<(), HypervisorError> {
    if !spec.qemu.exists() {
        return Err(HypervisorError::MissingBinary {
            what: "QEMU",
            path: spec.qemu.clone(),
            fix: "install qemu-system-x86 (make setup) or set hypervisor.path in the husk config",
        });
    }
    if !spec.kernel.exists() {
        return Err(HypervisorError::MissingFile {
            what: "guest kernel",
            path: spec.kernel.clone(),
            key: "hypervisor.kernel",
        });
    }
    if !spec.initrd.exists() {
        return Err(HypervisorError::MissingFile {
            what: "guest initrd",
            path: spec.initrd.clone(),
            key: "hypervisor.initrd",
        });
    }
    Ok(())
}

/// A running QEMU and its helpers.
pub struct QemuVm {
    pid: u32,
    qemu: Child,
    virtiofsd: Option<Child>,
    qmp: Option<Qmp>,
    exit: Option<VmExit>,
    /// QEMU's uid, leased until the VM is gone.
    _uid: Option<UidLease>,
}

fn to_exit(status: std::process::ExitStatus) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => VmExit::Code(c),
        (None, Some(s)) => VmExit::Signal(s),
        (None, None) => VmExit::Code(-1),
    }
}

impl QemuVm {
    fn qmp_mut(&mut self) -> Result<&mut Qmp, HypervisorError> {
        self.qmp
            .as_mut()
            .ok_or(HypervisorError::Qmp(qmp::QmpError::Closed))
    }

    async fn stop_helpers(&mut self) {
        if let Some(mut d) = self.virtiofsd.take() {
            // virtiofsd exits once QEMU has gone; give it a moment, then kill.
            if tokio::time::timeout(Duration::from_millis(500), d.wait())
                .await
                .is_err()
            {
                let _ = d.kill().await;
            }
        }
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait(&mut self) -> VmExit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        let e = match self.virtiofsd.as_mut() {
            None => match self.qemu.wait().await {
                Ok(s) => to_exit(s),
                Err(_) => VmExit::Code(-1),
            },
            // The guest's files are served by virtiofsd: without it the
            // VM is dead even if QEMU runs on (its file operations hang).
            Some(d) => tokio::select! {
                biased;
                s = self.qemu.wait() => match s {
                    Ok(s) => to_exit(s),
                    Err(_) => VmExit::Code(-1),
                },
                s = d.wait() => {
                    let status = s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    self.virtiofsd = None;
                    match tokio::time::timeout(HELPER_EXIT_GRACE, self.qemu.wait()).await {
                        Ok(Ok(s)) => to_exit(s),
                        _ => {
                            tracing::warn!(%status, "virtiofsd exited; stopping the VM");
                            let _ = self.qemu.kill().await;
                            VmExit::HelperExited { helper: "virtiofsd", status }
                        }
                    }
                }
            },
        };
        self.exit = Some(e.clone());
        e
    }

    async fn pause(&mut self) -> Result<(), HypervisorError> {
        self.qmp_mut()?.execute("stop", None).await?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), HypervisorError> {
        self.qmp_mut()?.execute("cont", None).await?;
        Ok(())
    }

    async fn save_template(&mut self, state: &Path) -> Result<(), HypervisorError> {
        let file = std::fs::File::create(state).map_err(io_err(format!(
            "cannot create the template's device state {}",
            state.display()
        )))?;
        let qmp = self.qmp_mut()?;
        qmp.ignore_shared_memory().await?;
        qmp.execute("stop", None).await?;
        qmp.pass_fd("template-state", file.as_fd()).await?;
        drop(file);
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": "fd:template-state" })),
        )
        .await?;
        let start = std::time::Instant::now();
        loop {
            let (status, error) = qmp.migration_status().await?;
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(HypervisorError::Template(format!(
                        "saving the template's device state failed: {}",
                        error.unwrap_or_else(|| "QEMU gave no reason".into())
                    )))
                }
                _ if start.elapsed() > SAVE_TIMEOUT => {
                    return Err(HypervisorError::Template(format!(
                        "saving the template's device state took longer than {SAVE_TIMEOUT:?}"
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    async fn shutdown(&mut self, grace: Duration) -> Result<VmExit, HypervisorError> {
        if self.exit.is_none() {
            if let Ok(Some(s)) = self.qemu.try_wait() {
                self.exit = Some(to_exit(s));
            }
        }
        if self.exit.is_none() {
            if let Some(mut q) = self.qmp.take() {
                if let Err(e) = q.quit().await {
                    tracing::debug!(error = %e, "qmp quit failed; killing qemu");
                }
            }
            match tokio::time::timeout(grace, self.qemu.wait()).await {
                Ok(Ok(s)) => self.exit = Some(to_exit(s)),
                _ => {
                    let _ = self.qemu.kill().await;
                    self.exit = Some(self.wait().await);
                }
            }
        }
        self.qmp = None;
        self.stop_helpers().await;
        Ok(self.exit.clone().unwrap_or(VmExit::Code(-1)))
    }
}

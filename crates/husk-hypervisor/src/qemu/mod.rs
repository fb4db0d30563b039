//! The QEMU implementation of [`Hypervisor`].

pub mod cmdline;
pub mod qmp;

use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::{process, virtiofsd, HypervisorError, SharedFs, Vm, VmExit, VmSpec};
use qmp::Qmp;

/// How long QEMU may take to create its sockets.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Launches VMs with `qemu-system-x86_64`.
#[derive(Debug, Default, Clone)]
pub struct Qemu;

#[async_trait]
impl crate::Hypervisor for Qemu {
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        check_inputs(spec)?;
        let virtiofsd = match &spec.shared_fs {
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
        let mut cmd = Command::new(&spec.qemu);
        cmd.args(cmdline::command_line(spec));
        tracing::debug!(args = ?cmdline::command_line(spec), "starting qemu");
        let mut child =
            process::spawn("qemu", cmd, &spec.hypervisor_log, spec.host_cpus.as_deref())?;
        for sock in [&spec.qmp_socket, &spec.agent_socket] {
            process::wait_for_socket(
                "qemu",
                &mut child,
                sock,
                &spec.hypervisor_log,
                SOCKET_TIMEOUT,
            )
            .await?;
        }
        let qmp = Qmp::connect(&spec.qmp_socket).await?;
        Ok(Box::new(QemuVm {
            pid: child.id().unwrap_or(0),
            qemu: child,
            virtiofsd,
            qmp: Some(qmp),
            exit: None,
        }))
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
        let e = match self.qemu.wait().await {
            Ok(s) => to_exit(s),
            Err(_) => VmExit::Code(-1),
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
